"""`driftsafe bench api` in its smallest form: it runs end to end and writes every key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.live import ROOT

KEYS = {"reads_per_s", "list_reads_per_s", "creates_per_s", "bare_reads_per_s",
        "bare_creates_per_s", "reads_vs_bare", "creates_vs_bare", "p50_ms", "p99_ms",
        "reads_during_upload_per_s", "reads_during_upload_ratio", "workers", "connections",
        "seconds", "errors", "commit"}
PHASES = {"reads", "list_reads", "creates", "reads_during_upload", "bare_reads", "bare_creates"}


def test_bench_api_smallest_run(tmp_path):
    if shutil.which("wrk") is None:
        # .ci/run installs wrk, so CI always measures; a laptop without it is told what to do.
        if os.environ.get("CI"):
            pytest.fail("wrk is not installed; .ci/run should have installed it")
        pytest.skip("wrk is not installed (apt-get install -y wrk)")
    out = tmp_path / "api.json"
    run = subprocess.run([sys.executable, "-m", "cli.main", "bench", "api", "--seconds", "1",
                          "--warmup", "0", "--connections", "4", "--upload-mb", "1",
                          "--redis-db", "13", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode in (0, 3), run.stderr[-3000:]  # 3: measured, but with errors
    result = json.loads(out.read_text())
    assert KEYS <= set(result)
    for per_phase in ("p50_ms", "p99_ms", "errors"):
        assert set(result[per_phase]) == PHASES
    assert result["workers"] == 1 and result["connections"] == 4 and result["seconds"] == 1
    assert all(result["phases"][p]["requests"] > 0 for p in PHASES)
    assert result["bare_reads_per_s"] > 0 and result["reads_per_s"] > 0
    # Rounds, the bare app's phases beside driftsafe's: a phase is its rounds' mean rate and
    # their worst p99.
    reads = result["phases"]["reads"]
    assert result["rounds"] == 2 and len(reads["rounds"]) == 2
    assert reads["p99_ms"] == max(r["p99_ms"] for r in reads["rounds"])
    assert reads["requests"] == sum(r["requests"] for r in reads["rounds"])
    assert "reads vs bare app" in run.stdout
