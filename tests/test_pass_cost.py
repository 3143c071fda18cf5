"""The pass-cost measurement (bench/pass_cost.py) and the one-script GPU check
(bench/gpu_check.sh), on the CPU with the tiny model: what runs on a GPU machine, minus
the GPU. No timing is asserted, only what is measured and written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import pass_cost

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def test_pass_cost_measures_both_series(tmp_path, capsys):
    out = tmp_path / "pc.json"
    assert pass_cost.main(["--device", "cpu", "--model", "tiny-test", "--dtype", "float32",
                           "--rows", "1,5,12", "--repeats", "1", "--context", "16",
                           "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["machine"]["device"] == "cpu" and doc["machine"]["gpu"] is None
    assert doc["one_session"]["rows"] == [1, 5, 12]
    assert doc["sessions"]["rows"] == [5, 5, 10] and doc["sessions"]["sessions"] == [1, 1, 2]
    assert all(ms > 0 for ms in doc["one_session"]["ms"] + doc["sessions"]["ms"])
    assert "one session" in capsys.readouterr().out


def test_pass_cost_refuses_cuda_without_a_gpu_and_bad_rows(capsys):
    import torch

    if not torch.cuda.is_available():
        assert pass_cost.main(["--device", "cuda", "--model", "tiny-test"]) == 2
        assert "sees no CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pass_cost.main(["--rows", "0,4"])


def test_pass_cost_help_does_not_import_torch():
    code = ("import sys; from bench import pass_cost; pass_cost.parser().format_help(); "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


@pytest.mark.slow
def test_gpu_check_cpu_tiny_writes_one_json(tmp_path):
    out = tmp_path / "check.json"
    res = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--tiny", "--skip-bench",
                          "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                         timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and doc["models"]["target"] == "tiny-test"
    assert [s["name"] for s in doc["steps"]] == ["pass_cost"] and doc["steps"][0]["rc"] == 0
    assert doc["pass_cost"]["one_session"]["rows"] == [1, 5, 10]
    assert doc["bench"] is None


def test_gpu_check_dry_run_shows_the_cuda_commands():
    res = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    bench = next(line for line in lines if line.startswith("bench:"))
    assert "specedge.cli bench --quick --device cuda" in bench
    assert any(line.startswith("pass_cost:") and "--device cuda" in line for line in lines)
    bad = subprocess.run(["bash", str(SCRIPT), "--models", "huge"], capture_output=True,
                         text=True, cwd=REPO, timeout=60)
    assert bad.returncode == 2 and "--models" in bad.stderr


@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_gpu_check_cpu_tiny_with_the_bench(tmp_path):
    out = tmp_path / "check.json"
    res = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out)],
                         capture_output=True, text=True, cwd=REPO, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert [s["name"] for s in doc["steps"]] == ["pass_cost", "bench"]
    assert set(doc["bench"]["modes"]) == {"autoregressive", "server_only", "specedge"}
