"""`driftsafe bench gpu` refuses cleanly where there is no GPU (the figures need one)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.live import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the bench runs")
def test_bench_gpu_refuses_on_a_cpu_with_one_line_and_no_traceback(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "cli.main", "bench", "gpu", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA GPU" in lines[0] and lines[0].startswith("error:")
    assert "Traceback" not in proc.stderr and not out.exists()
