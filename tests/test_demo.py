"""`specedge demo --tiny`: a verifier and two node processes on loopback, end to end."""

from __future__ import annotations

import subprocess
import sys


def test_tiny_demo_streams_generations_and_prints_the_summary():
    res = subprocess.run(
        [sys.executable, "-m", "specedge.cli", "demo", "--tiny", "--max-new-tokens", "24",
         "--timeout", "240"],
        capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "node-a" in out and "node-b" in out
    for figure in ("acceptance", "server throughput", "inter-token latency", "rounds verified"):
        assert figure in out
    assert "Ledger cost summary" in out and "$/M" in out
