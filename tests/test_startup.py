"""Start-up stays light: `--help` of every command, and a bootstrap/relay peer, never load
the model stack (torch, transformers cost seconds; a relay needs neither).

Each program runs in a fresh interpreter that reports, at exit, which heavy modules it
had imported. No timing is asserted (the README's measured figures give the times).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.netutil import spawned, wait_until

HEAVY = ("torch", "transformers")

# What each console script's `main` is, and the argument lists whose --help must stay light.
PROGRAMS = {
    "specedge": ("specedge.cli", [[], ["generate"], ["bootstrap"], ["monitor"], ["demo"],
                                  ["bench"]]),
    "specedge-node": ("specedge.node.cli", [[], ["generate"], ["join"]]),
    "specedge-verifier": ("specedge.verifier.cli", [[], ["serve"]]),
    "specedge-ledger": ("specedge.ledger.cli", [[]]),
}

_REPORT = """
import atexit, importlib, json, sys
atexit.register(lambda: sys.__stderr__.write(
    "HEAVY " + json.dumps([m for m in {heavy!r} if m in sys.modules]) + "\\n"))
main = importlib.import_module({module!r}).main
for argv in {argvs!r}:
    try:
        main(argv + ["--help"])
    except SystemExit:
        pass
"""


def heavy_modules(stderr: str) -> list[str]:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("HEAVY ")]
    assert lines, f"no report from the child:\n{stderr[-2000:]}"
    return json.loads(lines[-1][len("HEAVY "):])


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_help_never_loads_the_model_stack(program: str) -> None:
    module, argvs = PROGRAMS[program]
    code = _REPORT.format(heavy=HEAVY, module=module, argvs=argvs)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert "usage:" in res.stdout, res.stderr[-2000:]
    assert heavy_modules(res.stderr) == [], f"{program} --help imported the model stack"


def test_bootstrap_relay_peer_never_loads_the_model_stack(tmp_path) -> None:
    """A running bootstrap peer that relays, stopped by SIGTERM, imported neither."""
    announce = tmp_path / "boot.addrs"
    code = _REPORT.replace("for argv in", "for argv in []:  #").format(
        heavy=HEAVY, module="specedge.cli", argvs=[])
    code += (f"\nsys.exit(main(['bootstrap', '--listen', '/ip4/127.0.0.1/tcp/0', '--relay', "
             f"'--identity', {str(tmp_path / 'boot.key')!r}, "
             f"'--announce-file', {str(announce)!r}]))\n")
    with spawned([sys.executable, "-c", code], tmp_path, name="boot") as proc:
        wait_until(announce.exists, 60, "the bootstrap peer's announce file")
        assert proc.stop() == 0, proc.describe()
    assert heavy_modules(proc.stderr()) == [], "the bootstrap peer imported the model stack"
