"""`specedge monitor` against real processes, and its page in a real browser.

One network for the module: a bootstrap peer that also runs a monitor (`specedge
bootstrap --monitor`), two real `specedge-verifier serve --model tiny-test` processes
sharing one ledger, a peer posing as a verifier that answers garbage
(`hostile_verifier.py --mode garbage`), and a standalone `specedge monitor --ledger`.
The browser test drives Debian's headless Chromium through Selenium (never a downloaded
browser or driver) and is skipped, saying why, only when Chromium is not installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from faultutil import LOOPBACK, START_TIMEOUT, Verifier, child_env, json_result, node_generate
from netutil import TESTS, Proc, free_port, http_get, python_script, script, wait_until

from specedge.protocol.identity import load_identity, peer_id_of

pytestmark = pytest.mark.timeout(600)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REFRESH = 1  # seconds: the monitors' crawl and page period in these tests
WAIT = 90.0  # bound on waits for the network to settle (a shared 2-core machine)


@dataclass
class Net:
    workdir: Path
    boot_addr: str
    boot_url: str  # the bootstrap peer's own monitor
    url: str  # the standalone monitor (with the ledger)
    alive: Verifier
    doomed: Verifier
    hostile: str  # peer id of the garbage poser
    ledger: Path
    procs: list[Proc]

    def state(self, url: str | None = None) -> dict:
        return json.loads(http_get((url or self.url) + "api/state"))


def start(workdir: Path, name: str, args: list[str], procs: list[Proc]) -> Proc:
    proc = Proc(args, workdir, name, child_env(workdir))
    procs.append(proc)
    return proc


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("monitor")
    procs: list[Proc] = []
    try:
        boot_port = free_port()
        boot = start(workdir, "bootstrap", [
            script("specedge"), "bootstrap", "--listen", LOOPBACK,
            "--identity", str(workdir / "boot.key"), "--announce-file",
            str(workdir / "boot.announce"), "--monitor", f"127.0.0.1:{boot_port}",
            "--monitor-refresh", str(REFRESH)], procs)
        boot_addr = boot.wait_for_file(workdir / "boot.announce", START_TIMEOUT)[0]
        ledger = workdir / "fleet.sqlite3"
        verifiers = [Verifier(workdir, n, "--bootstrap", boot_addr, ledger=str(ledger))
                     for n in ("alive", "doomed")]
        procs += [v.proc for v in verifiers]
        hostile = start(workdir, "hostile", python_script(
            TESTS / "hostile_verifier.py", "--mode", "garbage", "--bootstrap", boot_addr,
            "--announce-file", str(workdir / "hostile.announce")), procs)
        for v in verifiers:
            v.ready()
        hostile_addr = hostile.wait_for_file(workdir / "hostile.announce", START_TIMEOUT)[0]
        monitor = start(workdir, "monitor", [
            script("specedge"), "monitor", "--bootstrap", boot_addr, "--listen",
            f"127.0.0.1:{free_port()}", "--refresh", str(REFRESH), "--ledger", str(ledger),
            "--announce-file", str(workdir / "monitor.announce")], procs)
        url = monitor.wait_for_file(workdir / "monitor.announce", START_TIMEOUT)[0]
        yield Net(workdir, boot_addr, f"http://127.0.0.1:{boot_port}/", url, verifiers[0],
                  verifiers[1], hostile_addr.rsplit("/p2p/", 1)[1], ledger, procs)
    finally:
        for p in procs:
            p.kill()


def verifier_ids(doc: dict) -> set[str]:
    return {v["peer_id"] for v in doc["verifiers"]}


def when(doc: dict, check) -> dict | None:  # noqa: ANN001
    """`doc` if `check(doc)` holds (for wait_until)."""
    return doc if check(doc) else None


def test_the_monitor_lists_every_verifier_and_flags_the_hostile_peer(net):
    both = {net.alive.peer, net.doomed.peer}
    doc = wait_until(lambda: when(net.state(), lambda d: verifier_ids(d) == both
                                  and d["misbehaving"]), WAIT, "both verifiers and the poser")
    for v in doc["verifiers"]:
        assert v["model_id"] == "tiny-test" and v["reachability"] == "direct"
        assert v["free_slots"] == 64 and v["queue_depth"] == 0 and v["sessions"] == 0
        assert v["audit"] == "unknown" and v["addrs"][0].startswith("/ip4/127.0.0.1/tcp/")
        assert v["uptime_s"] >= 0 and v["last_seen_unix"] <= doc["generated_unix"]
    (bad,) = doc["misbehaving"]
    assert bad["peer_id"] == net.hostile and bad["problem"].startswith("MALFORMED")
    assert bad["model_id"] == "tiny-test"
    assert doc["totals"]["verifiers"] == 2 and doc["totals"]["models"] == 1
    assert doc["models"] == [{"model_id": "tiny-test", "verifiers": 2, "sessions": 0,
                              "free_slots": 128, "queue_depth": 0,
                              "tokens_per_s": doc["models"][0]["tokens_per_s"]}]
    # The monitor inside the bootstrap peer sees the same network.
    wait_until(lambda: verifier_ids(net.state(net.boot_url)) == both, WAIT,
               "the bootstrap peer's monitor")
    html = http_get(net.url)
    assert net.alive.peer in html and net.hostile in html


def test_a_generation_shows_in_the_counters_and_the_leaderboard(net):
    node = node_generate(net.workdir, "node", "def fibonacci(n):", 48,
                         bootstrap=[net.boot_addr])
    out = json_result(node)
    node_peer = peer_id_of(load_identity(net.workdir / "node.key"))
    generated = len(out["token_ids"])
    used = set(out["stats"]["verifiers"])

    def counted() -> dict | None:
        d = net.state()
        committed = sum(v["committed_tokens"] for v in d["verifiers"])
        leaders = (d["ledger"] or {}).get("nodes") or []
        return d if committed >= generated and leaders else None

    doc = wait_until(counted, WAIT, "the generation in the counters and the ledger")
    board = doc["ledger"]
    assert board["error"] is None
    (leader,) = board["nodes"]
    assert leader["peer_id"] == node_peer and leader["accepted"] == out["stats"]["accepted"]
    assert {v["peer_id"] for v in board["verifiers"]} == used
    # Every receipt serves its accepted tokens and one more; the first token's receipt
    # (the verifier's prefill answering an empty tree) is one receipt beyond the rounds.
    receipts = out["stats"]["rounds"] + out["stats"]["first_token_from_prefill"]
    assert board["cost"]["tokens"] == out["stats"]["accepted"] + receipts
    assert sum(p["tokens_per_s"] for p in board["throughput"]) > 0
    html = http_get(net.url)
    assert leader["peer_id"] in html and "per 1M tokens served" in html


def test_a_killed_verifier_leaves_the_monitor(net):
    wait_until(lambda: net.doomed.peer in verifier_ids(net.state()), WAIT, "doomed listed")
    net.doomed.kill()
    # Killed mid-answer it may first show as a peer that hung up; once its connection is
    # gone it is listed as gone. Either way it leaves the verifiers at once.
    doc = wait_until(lambda: when(net.state(), lambda d: net.doomed.peer not in verifier_ids(d)
                                  and net.doomed.peer in {g["peer_id"] for g in d["gone"]}),
                     WAIT, "the killed verifier leaving the list")
    assert net.alive.peer in verifier_ids(doc)
    rows = re.findall(r'<tr class="verifier" data-peer="([^"]+)"', http_get(net.url))
    assert net.doomed.peer not in rows and net.alive.peer in rows  # (the leaderboard may
    # still name it: its receipts stay in the ledger)


# ---------------------------------------------------------------------------- browser


@pytest.fixture
def browser(tmp_path, monkeypatch):
    """Debian's headless Chromium under Selenium; nothing is ever downloaded."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"no {CHROMIUM} / {CHROMEDRIVER}: install Debian's chromium and "
                    "chromium-driver (scripts/system-deps does, via make test)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not go online
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1200,900"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver, path: Path, width: int) -> None:
    """The whole page at `width` CSS pixels."""
    driver.set_window_size(width, 900)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, height + 120)
    driver.save_screenshot(str(path))


def page_facts(driver, peer: str, hostile: str) -> dict:
    """What the test checks, read in one script: the page re-renders its tables on every
    refresh, so elements looked up in separate WebDriver calls can go stale in between."""
    return driver.execute_script("""
        const text = (sel) => {
            const e = document.querySelector(sel);
            return e ? e.innerText : null;
        };
        const row = document.querySelector(`tr.verifier[data-peer="${arguments[0]}"]`);
        const span = row && row.querySelector("td.peer span");
        return {
            cells: row ? Array.from(row.querySelectorAll("td"), (c) => c.innerText) : null,
            peer_title: span ? span.getAttribute("title") : null,
            shown: document.querySelectorAll("tr.verifier").length,
            total: text("#total-verifiers .value"),
            models_total: text("#total-models .value"),
            bad: text(`tr.misbehaving[data-peer="${arguments[1]}"]`) || "",
            models: text("table.models") || "",
            conn: text("#conn"),
        };""", peer, hostile)


def test_the_page_in_chromium_shows_the_network_and_drops_a_dead_verifier(net, browser,
                                                                         tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    row_css = f'tr.verifier[data-peer="{net.alive.peer}"]'
    browser.get(net.url)
    seen = WebDriverWait(browser, WAIT).until(
        lambda d: when(page_facts(d, net.alive.peer, net.hostile), lambda f: f["cells"]))
    cells = seen["cells"]
    assert cells[1] == "tiny-test" and cells[2] == "direct" and cells[-1] == "unknown"
    assert seen["peer_title"] == net.alive.peer
    assert seen["total"] == str(seen["shown"]) and seen["shown"] >= 1
    assert seen["models_total"] == "1"
    assert "MALFORMED" in seen["bad"]
    assert "tiny-test" in seen["models"]
    assert seen["conn"] == "live"
    screenshot(browser, tmp_path / "monitor.png", 1200)
    if os.environ.get("SPECEDGE_SCREENSHOT_DIR"):  # how docs/monitor.png is made
        shutil.copy(tmp_path / "monitor.png", Path(os.environ["SPECEDGE_SCREENSHOT_DIR"]))
    # A phone: nothing wider than the screen but the tables' own scroll boxes.
    screenshot(browser, tmp_path / "monitor-phone.png", 390)
    assert browser.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth")
    browser.set_window_size(1200, 900)
    # Kill the verifier: its row leaves the page that is open, without a reload.
    marker = browser.execute_script("window.__same_page = 1; return window.__same_page")
    net.alive.kill()
    WebDriverWait(browser, WAIT).until(
        lambda d: not d.find_elements(By.CSS_SELECTOR, row_css))
    assert browser.execute_script("return window.__same_page") == marker
    assert net.alive.peer not in browser.find_element(By.ID, "live").text
    screenshot(browser, tmp_path / "monitor-after-kill.png", 1200)
    assert (tmp_path / "monitor.png").stat().st_size > 10_000
