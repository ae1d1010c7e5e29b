"""Smoke tests: every benchmark script runs in its --quick configuration (timings are never asserted)."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
PNG_MAGIC = b"\x89PNG"


def run_script(name: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(BENCH / name), *map(str, args)], capture_output=True, text=True, timeout=900
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_optimizer_step_benchmark_quick(tmp_path):
    out, table = tmp_path / "bench.json", tmp_path / "bench.md"
    variants = "fused-adamw,naive-sum,munba-torch,munba-cpp,munba-triton,copy-probe"
    run_script("bench_optimizer_step.py", "--quick", "--dtype", "bfloat16", "--variants", variants,
               "--out", out, "--markdown", table)  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == variants.split(",")
    ran = {n: r for n, r in rows.items() if "unavailable" not in r}
    assert {"fused-adamw", "naive-sum", "munba-torch", "copy-probe"} <= set(ran)
    assert all(r["median_ms"] > 0 and r["gb_per_s"] > 0 for r in ran.values())
    assert rows["fused-adamw"]["vs_fused_adamw"] == 1.0
    assert rows["fused-adamw"]["extra_peak_mib"] == 0.0
    # every variant but the probe has its memory measured in a fresh process
    assert all("extra_peak_gradients" in r for n, r in ran.items() if n != "copy-probe")
    text = table.read_text()
    assert "| munba-torch |" in text and "| copy-probe |" in text
    if "unavailable" in rows["munba-triton"]:  # no GPU: the row says why instead of failing
        assert "| munba-triton | not run:" in text


def test_backward_gram_benchmark_quick(tmp_path):
    out, table = tmp_path / "bg.json", tmp_path / "bg.md"
    run_script("bench_backward_gram.py", "--quick", "--backend", "torch", "--out", out, "--markdown", table)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert list(rows) == ["fused-adamw", "naive-sum", "munba", "munba-hooks"]
    assert all(r["step_ms"] > 0 and r["backward_ms"] > 0 for r in rows.values())
    assert rows["fused-adamw"]["step_vs_fused_adamw"] == 1.0
    assert rows["munba-hooks"]["tensors_from_hooks"] == result["tensors"] == 4  # every hook's partials used
    assert "tensors_from_hooks" not in rows["munba"]
    assert "| munba-hooks |" in table.read_text()


def test_optimizer_step_benchmark_rejects_bad_input(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    bench = importlib.import_module("bench_optimizer_step")
    with pytest.raises(ValueError, match="numel must be at least tensors"):
        bench.StepInputs(5, 10, torch.float32, "cpu")
    with pytest.raises(ValueError, match="tensors must be at least 1"):
        bench.StepInputs(5, 0, torch.float32, "cpu")
    with pytest.raises(ValueError, match="variant must be one of"):
        bench.build_step("adamw", bench.StepInputs(5, 1, torch.float32, "cpu"))
    for argv in (["--variants", "fused-adamw,nope"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert argv[0] in capsys.readouterr().err


def test_sweep_quick_writes_json_markdown_and_plot(tmp_path):
    out = tmp_path / "sweep"
    run_script("sweep.py", "--quick", "--dtypes", "bfloat16,float32", "--tensors", "3",
               "--variants", "fused-adamw,munba-cpp,munba-triton,copy-probe", "--out", out)  # fmt: skip
    raw = json.loads((out / "pytest-benchmark.json").read_text())
    timed = {(b["extra_info"]["dtype"], b["extra_info"]["variant"]) for b in raw["benchmarks"]}
    assert ("bfloat16", "fused-adamw") in timed and ("float32", "copy-probe") in timed
    configs = json.loads((out / "sweep.json").read_text())["configs"]
    assert {c["dtype"] for c in configs} == {"float32", "bfloat16"}
    for c in configs:
        assert c["rows"]["fused-adamw"]["vs_fused_adamw"] == 1.0
        assert c["rows"]["munba-cpp"]["median_ms"] > 0
        assert "extra_peak_gradients" in c["rows"]["munba-cpp"]  # the quick sweep measures its one size
        assert "munba-triton" in c["rows"]  # run, or listed with the reason it could not run
    assert "Step time as a multiple of fused AdamW's" in (out / "sweep.md").read_text()
    assert (out / "headline.png").read_bytes()[:4] == PNG_MAGIC


# the UNet run skips the memory subprocesses: each would spend ~10 s importing diffusers
@pytest.mark.parametrize("model, memory", [("resnet18", []), ("unet", ["--no-memory"])])
def test_unlearning_step_benchmark_quick_and_plot(tmp_path, model, memory):
    out, table, png = tmp_path / "e2e.json", tmp_path / "e2e.md", tmp_path / "e2e.png"
    run_script("bench_unlearning_step.py", "--quick", "--model", model, *memory, "--out", out, "--markdown", table)
    result = json.loads(out.read_text())
    assert set(result["median_ms"]) == {"munba", "published", "naive"}
    assert all(t > 0 for t in result["median_ms"].values())
    assert set(result["extra_peak_bytes"]) == (set() if memory else {"munba", "published", "naive"})
    assert all(b >= 0 for b in result["extra_peak_bytes"].values())
    assert "| published |" in table.read_text()
    run_script("plot.py", out, "--out", png)
    assert png.read_bytes()[:4] == PNG_MAGIC


@pytest.mark.slow
def test_munba_step_needs_one_extra_gradient_of_memory(tmp_path):
    """The claim the step benchmark's memory column checks, at a size where RSS noise is small."""
    out = tmp_path / "mem.json"
    run_script("bench_optimizer_step.py", "--numel", 20_000_000, "--rounds", 1,
               "--variants", "fused-adamw,munba-cpp", "--out", out)  # fmt: skip
    extra = json.loads(out.read_text())["rows"]["munba-cpp"]["extra_peak_gradients"]
    assert 0.8 < extra < 1.3


@pytest.mark.slow
def test_compiled_plain_ops_row_runs_or_says_why(tmp_path):
    out = tmp_path / "compiled.json"
    run_script("bench_optimizer_step.py", "--numel", 10_000, "--tensors", 2, "--rounds", 2, "--no-memory",
               "--variants", "fused-adamw,plain-ops-compiled", "--out", out)  # fmt: skip
    row = json.loads(out.read_text())["rows"]["plain-ops-compiled"]
    assert row.get("median_ms", 0) > 0 or row["unavailable"].startswith("torch.compile failed")
