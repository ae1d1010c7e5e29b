"""benchmarks/gpu_check.sh and the per-pass rows of the step benchmark, on the CPU.

GPU windows are rare and short, so what can go wrong in the check before the GPU does must
be caught here: the script's CPU path (every GPU section skipped with its reason, a summary,
exit 0), its failure path (a failing section does not stop the rest, and the exit status
says so), the summary's probe-share table, and the benchmark's ``:gram`` / ``:update`` rows
(their bytes and their results) with the torch and C++ backends and interpreted Triton.
No timing is asserted; subprocess timeouts only turn a hang into a failure.
"""

import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPT = BENCH / "gpu_check.sh"
GPU_SECTIONS = [
    "triton-kernels",
    "compile",
    "step-100M-float32",
    "step-100M-bf16-fp32states",
    "step-1B-float32",
    "step-1B-float32-3players",
    "step-1B-bf16-fp32states",
    "step-1B-bf16-fp32states-3players",
    "e2e-unet",
    "e2e-resnet18",
]


def run_check(out, *args, python=sys.executable, **env):
    return subprocess.run(
        ["bash", str(SCRIPT), *args, str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHON": str(python), "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


def sections(out):
    rows = [line.split("\t") for line in (out / "sections.tsv").read_text().splitlines()]
    return {name: (status, reason) for name, status, reason, _ in rows}


@pytest.mark.parametrize("how", ["no CUDA device", "--dry-run"])
def test_without_cuda_every_gpu_section_is_skipped_with_its_reason(tmp_path, how):
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so the CPU path is tested on a GPU machine too.
    args = ["--dry-run"] if how == "--dry-run" else []
    proc = run_check(tmp_path, *args, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = sections(tmp_path)
    assert list(got) == ["env", *GPU_SECTIONS, "total"]
    assert got["env"] == ("pass", "")
    for name in GPU_SECTIONS:
        assert got[name] == ("skip", f"skipped: {how}"), name
    summary = (tmp_path / "summary.md").read_text()
    for name in GPU_SECTIONS:
        assert f"| {name} | skip | skipped: {how} |" in summary
    assert "Failed: none." in summary and "device: no CUDA device" in summary
    env = json.loads((tmp_path / "env.json").read_text())
    # the package imported with its C++ extension blocked, as on a machine without a build
    assert env["import_without_cpp"].startswith("yes") and "cpp" not in env["backends"].split(", ")
    assert env["has_cuda"] is False


def test_a_failing_section_does_not_stop_the_rest_and_fails_the_exit_status(tmp_path):
    """A Python that dies in the env section: the script records it, goes on, still writes the
    summary (with the real Python) and exits non-zero."""
    wrapper = tmp_path / "python"
    wrapper.write_text(
        f'#!/bin/sh\ncase "$*" in *gpu_check_env.py*) echo broken >&2; exit 3;; esac\nexec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    out = tmp_path / "out"
    proc = run_check(out, python=wrapper)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    got = sections(out)
    assert got["env"] == ("fail", "exit status 3 (see env.log)")
    assert all(got[name] == ("skip", "skipped: no CUDA device") for name in GPU_SECTIONS)
    assert got["total"][0] == "fail"
    summary = (out / "summary.md").read_text()
    assert "Failed: env, total." in summary and "no env.json" in summary
    assert "broken" in (out / "env.log").read_text()


def test_only_runs_the_named_sections_and_refuses_unknown_ones(tmp_path):
    proc = run_check(tmp_path, "--only", "compile,e2e-unet", CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = sections(tmp_path)
    for name in GPU_SECTIONS:
        want = "skipped: no CUDA device" if name in ("compile", "e2e-unet") else "not selected (--only)"
        assert got[name] == ("skip", want), name
    proc = run_check(tmp_path / "other", "--only", "compile,nope")
    assert proc.returncode == 2 and "unknown section nope" in proc.stderr


def test_bad_arguments_are_refused():
    for args in ([], ["--nope", "x"], ["a", "b"], ["--only"], ["--budget", "soon", "out"]):
        proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and "usage:" in proc.stderr, args


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_script_passes_shellcheck():
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


# ------------------------------------------------------------------- summary.md
def test_summary_flags_each_pass_against_the_goal_and_counts_tests(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    summary = importlib.import_module("gpu_check_summary")
    (tmp_path / "sections.tsv").write_text(
        "triton-kernels\tfail\texit status 1 (see triton-kernels.log)\t42\nstep-1B-float32\tpass\t\t30\n"
    )
    (tmp_path / "triton-kernels.xml").write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="1">'
        '<testcase classname="t" name="ok"/><testcase classname="t" name="bad"><failure/></testcase>'
        "</testsuite></testsuites>"
    )
    row = dict(median_ms=1.0, iqr_ms=0.1, bytes_moved=8e9)
    rows = {
        "munba-triton:gram": dict(row, gb_per_s=2900.0, pct_of_probe_bandwidth=90.0),
        "munba-triton:update": dict(row, gb_per_s=1600.0, pct_of_probe_bandwidth=50.0),
        "munba-triton-3players": dict(unavailable="out of memory"),
        "copy-probe": dict(row, gb_per_s=3200.0, pct_of_probe_bandwidth=100.0),
    }
    (tmp_path / "step-1B-float32.json").write_text(json.dumps(dict(rows=rows, device_name="H100")))
    (tmp_path / "step-1B-float32.md").write_text("| the benchmark's own table |\n")
    summary.main([str(tmp_path)])
    text = (tmp_path / "summary.md").read_text()
    assert "3 passed, 1 failed, 0 errors, 1 skipped; failing: t::bad" in text
    assert "| munba-triton:gram | 1.000 | 8 | 2900 | 90% | meets |" in text
    assert "| munba-triton:update | 1.000 | 8 | 1600 | 50% | **below** |" in text
    assert "| munba-triton-3players | not run: out of memory |" in text
    assert "| copy-probe |" not in text.split("## Benchmark tables")[0]  # the probe is the 100%
    assert "| the benchmark's own table |" in text and "Failed: triton-kernels." in text


# -------------------------------------------------- the benchmark's per-pass rows
def bench_module(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("bench_optimizer_step")


def test_pass_rows_count_the_bytes_each_pass_must_move(monkeypatch):
    bench = bench_module(monkeypatch)
    f32, bf16 = torch.float32, torch.bfloat16
    # Gram: K gradients; update: K gradients + p read and written + m, v read and written
    assert bench.bytes_per_parameter("munba-triton:gram", f32) == 8
    assert bench.bytes_per_parameter("munba-triton:update", f32) == 32
    assert bench.bytes_per_parameter("munba-triton", f32) == 40
    assert bench.bytes_per_parameter("munba-triton-3players:gram", f32) == 12
    assert bench.bytes_per_parameter("munba-triton-3players:update", f32) == 36
    assert bench.bytes_per_parameter("munba-triton:gram", bf16, f32) == 4
    assert bench.bytes_per_parameter("munba-triton:update", bf16, f32) == 24  # 14 + 10, README's table
    assert bench.bytes_per_parameter("munba-triton:update", bf16) == 16
    assert bench.bytes_per_parameter("fused-adamw", bf16, f32) == 14  # torch's states stay bf16
    assert bench.with_passes(["fused-adamw", "munba-cpp", "munba-cpp:gram"]) == [
        "fused-adamw", "munba-cpp", "munba-cpp:gram", "munba-cpp:update"
    ]  # fmt: skip


@pytest.mark.parametrize("backend, players", [("torch", 2), ("cpp", 2), ("cpp", 3)])  # no torch K=3 row
def test_pass_rows_run_the_backends_passes(monkeypatch, backend, players):
    """The :gram row returns the Gram of the inputs; the :update row writes the parameters and
    moments the optimizer created (bf16 params with fp32 states)."""
    bench = bench_module(monkeypatch)
    from munba_kernels.backends import cpp

    if backend == "cpp" and not cpp.is_available():
        pytest.skip(cpp.unavailable_reason())
    variant = f"munba-{backend}" + ("-3players" if players == 3 else "")
    inputs = bench.StepInputs(3000, 3, torch.bfloat16, "cpu", torch.float32)
    gram = bench.build_step(f"{variant}:gram", inputs)()
    grads = [inputs.g_f, inputs.g_3, inputs.g_r] if players == 3 else [inputs.g_f, inputs.g_r]
    flat = [torch.cat([g.double() for g in player]) for player in grads]
    want = torch.stack([flat[i] @ flat[j] for i in range(players) for j in range(i, players)])
    torch.testing.assert_close(gram, want, rtol=1e-12, atol=0)

    update = bench.build_step(f"{variant}:update", inputs)
    bucket = inspect.getclosurevars(update).nonlocals["bucket"]
    assert bucket.players == players and len(bucket.params) == 3
    moments = [*bucket.states["exp_avg"], *bucket.states["exp_avg_sq"]]
    before, steps = [m.clone() for m in moments], [s.item() for s in bucket.states["step"]]
    update()
    assert all(m.dtype == torch.float32 for m in moments)
    assert all(not torch.equal(a, b) for a, b in zip(moments, before))  # (an lr-1e-4 step is below bf16's ulp)
    assert [s.item() for s in bucket.states["step"]] == [n + 1 for n in steps]


def test_per_pass_benchmark_with_interpreted_triton(tmp_path):
    """The Triton rows of --passes, run by Triton's interpreter on a few thousand elements."""
    pytest.importorskip("triton")
    out = tmp_path / "passes.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_optimizer_step.py"), "--device", "cpu", "--numel", "2000",
         "--tensors", "2", "--rounds", "1", "--no-memory", "--dtype", "bfloat16", "--state-dtype", "float32",
         "--variants", "fused-adamw,munba-triton-3players,copy-probe", "--passes", "--out", out],
        env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert list(rows) == [
        "fused-adamw", "munba-triton-3players", "munba-triton-3players:gram", "munba-triton-3players:update",
        "copy-probe",
    ]  # fmt: skip
    assert result["state_dtype"] == "float32"
    assert rows["munba-triton-3players:gram"]["bytes_moved"] == 2000 * 3 * 2
    assert rows["munba-triton-3players:update"]["bytes_moved"] == 2000 * (5 * 2 + 16)
    assert all(r["median_ms"] > 0 and "pct_of_probe_bandwidth" in r for r in rows.values())


def test_unlearning_benchmark_imports_without_torchvision():
    """A bare CUDA machine may lack torchvision: the UNet runs must not need it."""
    code = (
        "import sys; sys.modules['torchvision'] = None\n"
        f"sys.path.insert(0, {str(BENCH)!r})\n"
        "import bench_unlearning_step\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
