"""Smoke tests: every benchmark script runs in its --quick configuration (timings are never asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_optimizer_step_benchmark_quick(tmp_path):
    out, table = tmp_path / "bench.json", tmp_path / "bench.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_optimizer_step.py"),
            "--quick",
            "--dtype",
            "bfloat16",
            "--out",
            str(out),
            "--markdown",
            str(table),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {"fused-adamw", "naive-sum", "plain-ops", "munba-torch", "copy-probe"} <= set(rows)
    assert all(r["median_ms"] > 0 and r["gb_per_s"] > 0 for r in rows.values())
    assert rows["fused-adamw"]["vs_fused_adamw"] == 1.0
    assert "| munba-torch |" in table.read_text()


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
