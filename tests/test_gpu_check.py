"""benchmarks/gpu_check.py, the prepared GPU check, in its dry-run mode: every step runs
on the CPU at its smallest and the summary, the logs and the op CSV come out, so the
script a lent GPU machine runs is known to work before one is lent."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert proc.returncode == 0, (proc.stdout, [s["tail"] for s in summary["steps"] if not s["ok"]])
    assert summary["dry_run"] and summary["ok"]
    assert [s["step"] for s in summary["steps"]] == ["env", "ops", "bench", "vee"]
    assert "torch" in (tmp_path / "env.log").read_text()
    assert " passed" in (tmp_path / "ops.log").read_text()
    with open(tmp_path / "ops_gpu.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and {r["op"] for r in rows} == {"neuron_gain"}, rows[:2]


def test_gpu_check_refuses_without_a_gpu(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the full check would run")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr
