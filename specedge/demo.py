"""`specedge demo`: a whole network on one machine, in separate processes over libp2p.

Prepares the demo pair (with progress bars the first time), starts one
`specedge-verifier` and two `specedge-node join` processes on loopback, streams a few
generations side by side through the nodes' OpenAI-compatible APIs, then prints
acceptance, server throughput, inter-token latency and the ledger's cost summary.
Processes are started as console scripts, so this module imports neither the node nor
the verifier.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from specedge.errors import DEMO_DRAFT, DEMO_TARGET, TINY_DRAFT, TINY_TARGET

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain in three sentences what speculative decoding is.",
    "Write a SQL query that returns the ten most recent orders with their customer names.",
    "Implement an iterative binary search in Python.",
]


@dataclass
class Stream:
    node: str
    prompt: str
    text: str = ""
    started: float = 0.0
    times: list[float] = field(default_factory=list)
    done: bool = False
    error: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        raise RuntimeError(f"{name} is not installed: run `pip install -e .` first")
    return found


class Processes:
    """Child processes with logs in a work folder; all stopped on exit, whatever happens."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], prefix: Sequence[str] = (),
              env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start console script argv[0]; `prefix` wraps it (e.g. taskset)."""
        log = open(self.work / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the child
        proc = subprocess.Popen([*prefix, script(argv[0]), *argv[1:]], stdout=log,
                                stderr=subprocess.STDOUT, env=env)
        self.procs.append((name, proc))
        return proc

    def wait_file(self, path: Path, proc: subprocess.Popen, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and path.read_text().strip():
                return path.read_text().strip()
            if proc.poll() is not None:
                name = next(n for n, p in self.procs if p is proc)
                tail = (self.work / f"{name}.log").read_text()[-2000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")
            time.sleep(0.2)
        raise RuntimeError(f"{path.name} did not appear within {timeout:.0f} s")

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for _, p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def stream_chat(api: str, model: str, stream: Stream, max_tokens: int, timeout: float) -> None:
    """Send one streamed chat completion and collect its text and token arrival times."""
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": stream.prompt}]}
    stream.started = time.perf_counter()
    try:
        with httpx.stream("POST", f"{api}/v1/chat/completions", json=body,
                          timeout=timeout) as r:
            if r.status_code != 200:
                r.read()
                stream.error = f"HTTP {r.status_code}: {r.text[:200]}"
                return
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    stream.text += delta
                    stream.times.append(time.perf_counter())
    except httpx.HTTPError as exc:
        stream.error = str(exc)
    finally:
        stream.done = True


def view(streams: list[Stream]) -> Group:
    panels = []
    for s in streams:
        state = "error: " + s.error if s.error else ("done" if s.done else "streaming ...")
        panels.append(Panel(s.text or "…", title=f"[bold]{s.node}[/] {s.prompt[:60]}",
                            subtitle=state, height=12))
    return Group(*panels)


def metrics(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def run_demo(tiny: bool = False, max_tokens: int = 96, dtype: str | None = None,
             timeout: float = 900.0, engine: str = "auto") -> int:
    """`engine`: auto lets every process measure its engines at start and keep the
    fastest on this machine (torch or llama.cpp; see the README's "Engines")."""
    console = Console()
    target, draft = (TINY_TARGET, TINY_DRAFT) if tiny else (DEMO_TARGET, DEMO_DRAFT)
    # The verifier measures float32 and bfloat16 unless told; nodes draft in `dtype`.
    verifier_dtype = dtype or ("float32" if tiny else ("auto" if engine != "llama.cpp"
                                                       else "bfloat16"))
    dtype = dtype or ("float32" if tiny else "bfloat16")
    if not tiny:
        from specedge.weights import prepare_demo_model

        console.print("[bold]Preparing the demo pair[/] (once: about 2 minutes and 9 GB of RAM)")
        for name in (DEMO_DRAFT, DEMO_TARGET):
            prepare_demo_model(name)
    with tempfile.TemporaryDirectory(prefix="specedge-demo-") as tmp, Processes(Path(tmp)) as ps:
        work = Path(tmp)
        ledger = f"sqlite:///{work / 'ledger.sqlite3'}"
        mport = free_port()
        console.print(f"Starting a verifier for [bold]{target}[/] (engine {engine}, dtype "
                      f"{verifier_dtype}) ...")
        v = ps.start("verifier", ["specedge-verifier", "serve", "--model", target,
                                  "--engine", engine, "--dtype", verifier_dtype,
                                  "--listen", "/ip4/127.0.0.1/tcp/0", "--announce-file",
                                  str(work / "verifier.addrs"), "--identity",
                                  str(work / "verifier.key"), "--ledger", ledger,
                                  "--metrics-port", str(mport)])
        addr = ps.wait_file(work / "verifier.addrs", v, timeout).splitlines()[0]
        console.print(f"  verifier at {addr}")
        apis = []
        for name in ("node-a", "node-b"):
            port = free_port()
            n = ps.start(name, ["specedge-node", "join", "--verifier", addr, "--target-model",
                                target, "--draft-model", draft, "--dtype", dtype,
                                "--engine", engine, "--api",
                                f"127.0.0.1:{port}", "--no-status", "--identity",
                                str(work / f"{name}.key"), "--ledger",
                                str(work / f"{name}.sqlite3"), "--announce-file",
                                str(work / f"{name}.ready")])
            ps.wait_file(work / f"{name}.ready", n, timeout)
            apis.append((name, f"http://127.0.0.1:{port}"))
            console.print(f"  {name} (draft {draft}) serving its API on {apis[-1][1]}")
        before = metrics(mport)
        streams: list[Stream] = []
        for i in range(0, len(PROMPTS), 2):
            pair = [Stream(apis[j][0], PROMPTS[i + j]) for j in range(2)]
            streams.extend(pair)
            threads = [threading.Thread(target=stream_chat, args=(apis[j][1], target, pair[j],
                                                                  max_tokens, timeout))
                       for j in range(2)]
            with Live(view(pair), console=console, refresh_per_second=8) as live:
                for t in threads:
                    t.start()
                while any(t.is_alive() for t in threads):
                    live.update(view(pair))
                    time.sleep(0.1)
                live.update(view(pair))
        after = metrics(mport)
        failed = [s for s in streams if s.error]
        summary(console, streams, before, after)
        # Receipts reach the ledger off the hot path; give them a moment.
        time.sleep(1.0)
        console.print("\n[bold]Ledger cost summary[/] (specedge-ledger cost)")
        res = subprocess.run([script("specedge-ledger"), "--ledger", ledger, "cost"],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "COLUMNS": str(max(console.width, 120))})
        console.print(res.stdout or res.stderr)
        return 1 if failed else 0


def summary(console: Console, streams: list[Stream], before: dict, after: dict) -> None:
    def d(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    p = "specedge_"
    drafted = d(p + "spec_decode_num_draft_tokens_total")
    accepted = d(p + "spec_decode_num_accepted_tokens_total")
    rounds = d(p + "spec_decode_num_drafts_total")
    busy = d(p + "engine_busy_seconds_total")
    committed = d(p + "committed_tokens_total")
    itl = sorted((s.times[-1] - s.times[0]) * 1000 / (len(s.times) - 1)
                 for s in streams if len(s.times) > 1)
    ttft = sorted((s.times[0] - s.started) * 1000 for s in streams if s.times)
    table = Table(title="Demo summary")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("rounds verified", f"{rounds:.0f}")
    table.add_row("acceptance (accepted / drafted)",
                  f"{accepted / drafted:.1%}" if drafted else "-")
    table.add_row("mean accepted length", f"{accepted / rounds:.2f}" if rounds else "-")
    table.add_row("server busy time", f"{busy:.2f} s")
    table.add_row("server throughput (tokens / busy s)",
                  f"{committed / busy:.1f}" if busy else "-")
    if itl:
        table.add_row("inter-token latency p50 (per text chunk)", f"{itl[len(itl) // 2]:.0f} ms")
    if ttft:
        table.add_row("time to first text p50", f"{ttft[len(ttft) // 2]:.0f} ms")
    console.print(table)
