"""Smoke tests: every benchmark script runs in its --quick configuration (timings are never asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_step_benchmark_quick(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_cpu_step.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| munba-cpp |" in proc.stdout or "| munba-torch |" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["median_ms"]) >= {"fused-adamw", "munba-torch", "plain-ops"}
    assert all(t > 0 for t in result["median_ms"].values())


def test_unlearning_step_benchmark_quick(tmp_path):
    out = tmp_path / "e2e.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_unlearning_step.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result["median_ms"]) == {"munba", "published", "naive"}
    assert all(t > 0 for t in result["median_ms"].values())
    assert all(b >= 0 for b in result["extra_peak_bytes"].values())
