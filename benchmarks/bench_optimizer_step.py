"""Time one optimizer step: MUNBa's backends against naive combination and torch's fused AdamW.

Variants, on the same parameters and gradients, timed interleaved (round-robin) so that load
from other processes on a shared machine hits all of them alike:
  fused-adamw         torch.optim.AdamW(fused=True) on one gradient: the single-objective floor
  naive-sum           d = g_f + g_r, then torch.optim.AdamW(fused=True): what most unlearning code does
  plain-ops           MUNBa in plain torch ops: three dot products, combine, foreach AdamW
  plain-ops-compiled  the same function under torch.compile (compilation is warm-up, never timed;
                      if it fails here, the row says why)
  munba-<name>        MUNBaOptimizer(backend=<name>) for every backend usable on the device
  naive-sum-3players, munba-<name>-3players
                      the same with a third gradient (K = 3: a 6-entry Gram, Newton's α; the
                      plain-torch backend is left out, it is the oracle, not a contender)
  copy-probe          a copy of 8 bytes per parameter (the Gram's traffic), measured in the same run
                      to give every row an effective bandwidth and its share of the probe's
  munba-<name>[-3players]:gram, munba-<name>[-3players]:update
                      (--passes, or by name in --variants) each of that variant's two passes alone,
                      the backend's gram()/adamw() called directly on the optimizer's own buckets
                      after one real step: which pass falls short of the probe.  Bytes: the Gram
                      reads K gradients; the update reads K gradients + p, m, v and writes p, m, v

Each row reports the median and the inter-quartile spread of the step time, the ratio to
fused AdamW, the effective bandwidth (bytes a step must move / time) and the peak memory a
step needs beyond fused AdamW's (each variant in a fresh subprocess; parameters, gradients,
optimizer state and temporaries all counted), also in units of one gradient.  Bytes per fp32
parameter: fused AdamW 28 (read p, g, m, v; write p, m, v), a MUNBa step 40 (the Gram reads
g_f, g_r; the update reads g_f, g_r, p, m, v and writes p, m, v).  ``--state-dtype float32``
keeps MUNBa's moments in fp32 for bf16 parameters (``MUNBaOptimizer(state_dtype=torch.float32)``;
the torch rows keep theirs in the parameter dtype, as torch does), and the bytes count 4 per state.

    python benchmarks/bench_optimizer_step.py [--numel 20000000] [--tensors 10] [--dtype float32]
        [--device cpu|cuda] [--rounds 15] [--variants a,b,...] [--passes] [--state-dtype param|float32]
        [--no-memory] [--quick]
        [--out results.json] [--markdown results.md]

The pytest-benchmark sweep over sizes (benchmarks/sweep.py) builds its variants with this file's
StepInputs and build_step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterable
from functools import cached_property

import torch
from bench_memory import peak_extra_bytes, probe_in_subprocess, release_freed_memory
from bench_output import emit

from munba_kernels import MUNBaOptimizer, backends
from munba_kernels.backends.base import AdamWHyper, TensorBucket, compute_dtype, kernel_coefficients

VARIANTS = (
    "fused-adamw",
    "naive-sum",
    "plain-ops",
    "plain-ops-compiled",
    *(f"munba-{name}" for name in backends.BACKEND_NAMES if name != "auto"),
    # three players (a third gradient): the naive sum of three, and the K-general bargained step
    "naive-sum-3players",
    *(f"munba-{name}-3players" for name in backends.BACKEND_NAMES if name not in ("auto", "torch")),
    "copy-probe",
)
PASSES = ("gram", "update")
#: One row per pass of every MUNBa variant (never in the default list: ``--passes`` adds them).
PASS_VARIANTS = tuple(f"{v}:{p}" for v in VARIANTS if v.startswith("munba-") for p in PASSES)
# Arrays an ideal implementation of each row's math reads + writes per parameter (× element
# size): AdamW alone 4 + 3; summed gradients 5 + 3 (three: 6 + 3); MUNBa with K gradients
# (Gram K, update K + 3 reads + 3 writes) 2K + 6; probe 1 + 1.
BYTES_PER_ELEMENT = {"fused-adamw": 7, "naive-sum": 8, "naive-sum-3players": 9, "copy-probe": 2}
MEMORY_STEPS = 3


def players_of(name: str) -> int:
    return 3 if name.split(":")[0].endswith("-3players") else 2


def munba_bytes_per_element(name: str) -> int:
    return 2 * players_of(name) + 6


def bytes_per_parameter(name: str, dtype: torch.dtype, state_dtype: torch.dtype | None = None) -> int:
    """Bytes an ideal implementation of row ``name`` moves per parameter.

    Gradients and parameters are in ``dtype``; MUNBa's two moments (read and written) in
    ``state_dtype`` (None: the parameter dtype).  Torch's rows always keep states in ``dtype``.
    """
    size = torch.finfo(dtype).bits // 8
    if name in BYTES_PER_ELEMENT or name.startswith("plain-ops"):
        return size * BYTES_PER_ELEMENT.get(name, munba_bytes_per_element(name))
    state = torch.finfo(state_dtype).bits // 8 if state_dtype is not None else size
    k = players_of(name)
    gram, update = k * size, (k + 2) * size + 4 * state  # update: K grads + p read and written, m and v
    return {"gram": gram, "update": update}.get(name.partition(":")[2], gram + update)


class Unavailable(Exception):
    """A variant that cannot run on this machine; its message goes into the table."""


class StepInputs:
    """Seeded parameters and the two gradients of one configuration, each made on first use,
    so that a memory probe counts only the arrays its variant touches."""

    def __init__(
        self, numel: int, tensors: int, dtype: torch.dtype, device: str, state_dtype: torch.dtype | None = None
    ):
        if tensors < 1:
            raise ValueError(f"tensors must be at least 1, got {tensors}")
        if numel < tensors:
            raise ValueError(f"numel must be at least tensors ({tensors}), got {numel}")
        self.numel, self.tensors, self.dtype, self.device = numel, tensors, dtype, device
        self.state_dtype = state_dtype  # MUNBa's moments (None: the parameter dtype)
        self.sizes = [numel // tensors] * tensors
        self.sizes[0] += numel % tensors

    def _seeded(self, seed: int) -> list[torch.Tensor]:
        gen = torch.Generator(self.device).manual_seed(seed)
        return [torch.randn(n, generator=gen, dtype=self.dtype, device=self.device) for n in self.sizes]

    @cached_property
    def g_f(self) -> list[torch.Tensor]:
        return self._seeded(1)

    @cached_property
    def g_r(self) -> list[torch.Tensor]:
        return self._seeded(2)

    @cached_property
    def g_3(self) -> list[torch.Tensor]:
        """A third player's gradient (the ``-3players`` rows)."""
        return self._seeded(3)

    def params(self) -> list[torch.nn.Parameter]:
        return [torch.nn.Parameter(t) for t in self._seeded(0)]


def plain_munba_step(params, opt, g_f, g_r) -> None:
    """MUNBa as one would write it with torch ops: Gram by three dot products, closed-form α, combine."""
    ff = sum(torch.dot(f, f) for f in g_f)
    fr = sum(torch.dot(f, r) for f, r in zip(g_f, g_r))
    rr = sum(torch.dot(r, r) for r in g_r)
    scale = 1 / torch.sqrt(1 + fr / torch.sqrt(ff * rr))
    a_f, a_r = scale / torch.sqrt(ff), scale / torch.sqrt(rr)
    for p, f, r in zip(params, g_f, g_r):
        p.grad = f * a_f + r * a_r
    opt.step()


def build_step(name: str, inputs: StepInputs) -> Callable[[], None]:
    """One step of variant ``name`` on ``inputs`` (fresh parameters and optimizer state).

    Raises Unavailable for a backend this install or device cannot run, or a compile failure.
    """
    if name not in VARIANTS + PASS_VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS + PASS_VARIANTS}, got {name!r}")
    if name == "copy-probe":
        dst = [torch.empty_like(g) for g in inputs.g_f]
        return lambda: torch._foreach_copy_(dst, inputs.g_f)
    params = [] if name.endswith(":gram") else inputs.params()  # the Gram reads gradients alone
    if name in ("fused-adamw", "naive-sum", "naive-sum-3players"):
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

        def adamw_step():
            if name == "fused-adamw":
                grads = inputs.g_f
            else:
                grads = torch._foreach_add(inputs.g_f, inputs.g_r)
                if name == "naive-sum-3players":
                    torch._foreach_add_(grads, inputs.g_3)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()

        return adamw_step
    if name.startswith("plain-ops"):
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        if name == "plain-ops":
            return lambda: plain_munba_step(params, opt, inputs.g_f, inputs.g_r)
        compiled = torch.compile(plain_munba_step)
        try:
            for _ in range(2):  # compile, then any recompilation once the optimizer has state
                compiled(params, opt, inputs.g_f, inputs.g_r)
        except Exception as err:  # any compiler failure makes the row unavailable
            raise Unavailable(f"torch.compile failed: {type(err).__name__}: {str(err).splitlines()[0]}") from err
        return lambda: compiled(params, opt, inputs.g_f, inputs.g_r)
    variant, _, one_pass = name.partition(":")
    backend = variant.removeprefix("munba-").removesuffix("-3players")
    try:
        module = backends.resolve(backend, torch.device(inputs.device))
    except RuntimeError as err:  # not built here, or e.g. the C++ kernels on a GPU
        raise Unavailable(str(err)) from err
    players = ("forget", "neighbour", "preserve") if players_of(name) == 3 else ("forget", "preserve")
    grads = [inputs.g_f, inputs.g_3, inputs.g_r] if len(players) == 3 else [inputs.g_f, inputs.g_r]
    if one_pass == "gram":
        return lambda: module.gram(grads, torch.device(inputs.device))
    opt = MUNBaOptimizer(params, lr=1e-4, backend=backend, players=players, state_dtype=inputs.state_dtype)

    def munba_step():
        for player, player_grads in zip(players[:-1], grads):
            for p, g in zip(params, player_grads):
                p.grad = g
            opt.capture(player)
        for p, g in zip(params, grads[-1]):
            p.grad = g
        opt.step()

    if not one_pass:
        return munba_step
    munba_step()  # creates the states the update pass reads and writes
    opt.zero_grad()
    return update_pass_step(module, params, opt, grads, inputs.device)


def update_pass_step(module, params, opt, grads, device: str) -> Callable[[], None]:
    """The backend's update pass alone, on the tensors the optimizer's own step uses (every
    parameter in one bucket, as for one param group of one dtype), with fixed coefficients:
    what it costs does not depend on their values.  (The Gram pass alone needs no optimizer.)"""
    group = opt.param_groups[0]
    keys = ("exp_avg", "exp_avg_sq", "step")
    bucket = TensorBucket(list(params), [list(g) for g in grads], {k: [opt.state[p][k] for p in params] for k in keys})
    c = torch.full((len(grads),), 0.5, dtype=torch.float64, device=device)
    coefficients = kernel_coefficients(c, compute_dtype(params[0].dtype))
    skip = torch.zeros((), dtype=torch.float32, device=device)
    b1, b2 = group["betas"]
    hp = AdamWHyper(group["lr"], b1, b2, group["eps"], group["weight_decay"], group["maximize"])
    return lambda: module.adamw(bucket, coefficients, skip, hp)


def with_passes(names: Iterable[str]) -> list[str]:
    """``names`` with each MUNBa variant followed by its ``:gram`` and ``:update`` rows."""
    out: list[str] = []
    for n in names:
        for row in (n, *(f"{n}:{p}" for p in PASSES)):
            if row not in out and (row == n or row in PASS_VARIANTS):
                out.append(row)
    return out


def build_steps(inputs: StepInputs, names: Iterable[str]) -> tuple[dict[str, Callable], dict[str, str]]:
    """The runnable steps by name, each warmed up once, and the reasons the others cannot run."""
    steps, unavailable = {}, {}
    for name in names:
        try:
            steps[name] = build_step(name, inputs)
        except Unavailable as err:
            unavailable[name] = str(err)
            continue
        steps[name]()  # warm-up: state allocation, first-touch page faults, kernels
    return steps, unavailable


def synchronizer(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else lambda: None


def time_interleaved(steps: dict[str, Callable], rounds: int, device: str) -> dict[str, list[float]]:
    sync = synchronizer(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            sync()
            begin = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - begin)
    return times


def summarize(
    stats: dict[str, tuple[float, float]], numel: int, dtype: torch.dtype, state_dtype: torch.dtype | None = None
) -> dict[str, dict]:
    """Rows from ``{variant: (median seconds, IQR seconds)}``: ms, ratio to fused AdamW, GB/s, % of probe."""
    rows = {}
    for name, (median, iqr) in stats.items():
        moved = numel * bytes_per_parameter(name, dtype, state_dtype)
        rows[name] = dict(
            median_ms=median * 1e3, iqr_ms=iqr * 1e3, gb_per_s=moved / median / 1e9, bytes_moved=moved
        )
    for row in rows.values():
        if "fused-adamw" in rows:
            row["vs_fused_adamw"] = row["median_ms"] / rows["fused-adamw"]["median_ms"]
        if "copy-probe" in rows:
            row["pct_of_probe_bandwidth"] = 100 * row["gb_per_s"] / rows["copy-probe"]["gb_per_s"]
    return rows


def median_and_iqr(ts: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
    return q[1], q[2] - q[0]


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "param" if dtype is None else str(dtype).removeprefix("torch.")


def _config_argv(numel: int, tensors: int, dtype: torch.dtype, device: str, state_dtype=None) -> list[str]:
    return ["--numel", str(numel), "--tensors", str(tensors), "--dtype", _dtype_name(dtype), "--device", device,
            "--state-dtype", _dtype_name(state_dtype)]  # fmt: skip


def measure_memory(
    numel: int, tensors: int, dtype: torch.dtype, device: str, names: Iterable[str], state_dtype=None
) -> dict:
    """Peak bytes of building and taking a few steps of each variant, each in a fresh process
    (not the per-pass rows: a pass alone is no step)."""
    argv = _config_argv(numel, tensors, dtype, device, state_dtype)
    return {
        n: probe_in_subprocess(__file__, [*argv, "--memory-probe", n])
        for n in names
        if n != "copy-probe" and ":" not in n
    }


def add_memory(rows: dict[str, dict], peak_bytes: dict[str, int], numel: int, dtype: torch.dtype) -> None:
    """Peak memory beyond fused AdamW's, in MiB and in gradients (numel × element size)."""
    if "fused-adamw" not in peak_bytes:
        return
    gradient = numel * (torch.finfo(dtype).bits // 8)
    for name, peak in peak_bytes.items():
        extra = peak - peak_bytes["fused-adamw"]
        rows[name].update(extra_peak_mib=extra / 2**20, extra_peak_gradients=extra / gradient)


def _memory_probe(name: str, numel: int, tensors: int, dtype: torch.dtype, device: str, state_dtype=None) -> int:
    """Peak bytes of building and stepping one variant, after a throwaway run that loads its kernels
    (and compiles, at the same shapes) so that neither counts as the step's memory."""
    warm = build_step(name, StepInputs(numel if "compiled" in name else tensors, tensors, dtype, device, state_dtype))
    warm()
    del warm
    release_freed_memory()

    def work():
        step = build_step(name, StepInputs(numel, tensors, dtype, device, state_dtype))
        for _ in range(MEMORY_STEPS):
            step()

    return peak_extra_bytes(work, device)


def run(
    numel: int,
    tensors: int,
    dtype: torch.dtype,
    device: str,
    rounds: int,
    names: Iterable[str] = VARIANTS,
    memory: bool = True,
    state_dtype: torch.dtype | None = None,
) -> dict:
    names = list(names)
    steps, unavailable = build_steps(StepInputs(numel, tensors, dtype, device, state_dtype), names)
    times = time_interleaved(steps, rounds, device)
    rows = summarize({n: median_and_iqr(ts) for n, ts in times.items()}, numel, dtype, state_dtype)
    if memory:
        add_memory(rows, measure_memory(numel, tensors, dtype, device, steps, state_dtype), numel, dtype)
    rows.update({n: dict(unavailable=reason) for n, reason in unavailable.items()})
    return dict(
        numel=numel,
        tensors=tensors,
        dtype=str(dtype).removeprefix("torch."),
        state_dtype=_dtype_name(state_dtype),
        device=device,
        device_name=torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        threads=torch.get_num_threads(),
        rounds=rounds,
        rows={n: rows[n] for n in names},
        times_s=times,
    )


def _cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else "–"


def markdown(result: dict) -> str:
    states = result.get("state_dtype", "param")
    state_note = f", MUNBa states in {states} (torch rows: {result['dtype']})" if states != "param" else ""
    lines = [
        f"{result['numel']:,} {result['dtype']} params in {result['tensors']} tensors on {result['device']}"
        f"{state_note}, {result['threads']} threads, median of {result['rounds']} rounds "
        f"({result.get('timing', 'interleaved')})",
        "",
        "| variant | median ms | IQR ms | vs fused AdamW | effective GB/s | % of copy probe "
        "| extra peak MiB vs fused AdamW | in gradients |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["rows"].items():
        if "unavailable" in r:
            lines.append(f"| {name} | not run: {r['unavailable']} |||||||")
            continue
        lines.append(
            f"| {name} | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | {_cell(r, 'vs_fused_adamw', '.2f')}× | "
            f"{r['gb_per_s']:.1f} | {_cell(r, 'pct_of_probe_bandwidth', '.0f')}% | "
            f"{_cell(r, 'extra_peak_mib', '.0f')} | {_cell(r, 'extra_peak_gradients', '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def parse_variants(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(VARIANTS + PASS_VARIANTS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"--variants takes names from {', '.join(VARIANTS)} (and munba-<name>[-3players]:gram|update); "
            f"got {text!r}"
        )
    return names


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--numel", type=int, default=20_000_000, help="parameters in all (default 20M)")
    parser.add_argument("--tensors", type=int, default=10, help="how many tensors they are split into")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timed rounds (default 15)")
    parser.add_argument("--variants", type=parse_variants, help="comma-separated subset (default: all)")
    parser.add_argument(
        "--passes", action="store_true", help="time each MUNBa variant's Gram and update passes alone too"
    )
    parser.add_argument(
        "--state-dtype",
        choices=("param", "float32"),
        default="param",
        help="MUNBa's moment dtype: the parameter dtype (default) or float32 (for bfloat16 params)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory subprocesses")
    parser.add_argument(
        "--quick", action="store_true", help="1M params, 3 rounds, no compile unless --variants names it (a smoke test)"
    )
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--markdown", help="write the table as Markdown here")
    parser.add_argument("--memory-probe", choices=VARIANTS + PASS_VARIANTS, help=argparse.SUPPRESS)  # internal: one subprocess
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    numel, rounds = (1_000_000, 3) if args.quick else (args.numel, args.rounds)
    if args.variants is None:  # compiling takes a minute even when tiny
        args.variants = [v for v in VARIANTS if not (args.quick and v == "plain-ops-compiled")]
    if args.passes:
        args.variants = with_passes(args.variants)
    dtype = getattr(torch, args.dtype)
    state_dtype = None if args.state_dtype == "param" else getattr(torch, args.state_dtype)
    if args.memory_probe:
        print(_memory_probe(args.memory_probe, numel, args.tensors, dtype, args.device, state_dtype))
        return {}
    result = run(
        numel, args.tensors, dtype, args.device, rounds, args.variants, memory=not args.no_memory,
        state_dtype=state_dtype,
    )  # fmt: skip
    emit(result, markdown(result), args.out, args.markdown)
    return result


if __name__ == "__main__":
    main()
