"""The classification driver on scikit-learn's digits: every method, the CLI end to end, caching."""

import copy
import json
import math
import re

import pytest
import torch

from munba_kernels.drivers import classify, unlearning
from munba_kernels.drivers.data import load_dataset
from munba_kernels.drivers.models import build_model, classifier_head


@pytest.fixture(scope="module")
def digits_split():
    cfg = classify.Config(dataset="digits", model="narrow_resnet", train_size=400, test_size=200)
    return classify.prepare_data(cfg, load_dataset("digits"), seed=0)


@pytest.fixture(scope="module")
def original(digits_split):
    torch.manual_seed(0)
    model = build_model("narrow_resnet", 1, 10)
    train_all = unlearning.Subset(
        torch.cat([digits_split.forget.x, digits_split.retain.x]),
        torch.cat([digits_split.forget.y, digits_split.retain.y]),
    )
    return unlearning.train_classifier(
        model, train_all, epochs=3, lr=0.05, batch_size=64, seed=0, desc="t", progress=False
    )


@pytest.mark.parametrize("method", unlearning.METHODS)
def test_every_method_changes_the_model_and_keeps_it_finite(method, digits_split, original):
    model = copy.deepcopy(original)
    run = unlearning.unlearn(
        method,
        model,
        digits_split.forget,
        digits_split.retain,
        num_classes=10,
        lr=0.01,
        batch_size=64,
        seed=0,
        recipe=unlearning.Recipe(epochs=1),
        progress=False,
    )
    before = dict(original.named_parameters())
    changed = [n for n, p in run.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, f"{method} did not update any parameter"
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    assert run.seconds > 0
    if method.startswith("MUNBa"):
        steps = math.ceil(len(digits_split.retain) / 64)
        assert len(run.bargain_log) == steps
        a_f, a_r, cos = run.bargain_log[0]
        assert a_f > 0 and a_r > 0 and -1 <= cos <= 1
    else:
        assert run.bargain_log == []


def test_unknown_method_is_rejected(digits_split, original):
    with pytest.raises(ValueError, match="method must be one of"):
        unlearning.unlearn(
            "SalUn",
            original,
            digits_split.forget,
            digits_split.retain,
            num_classes=10,
            lr=0.1,
            batch_size=8,
            seed=0,
        )


def test_paired_batches_cover_retain_and_forget_once_per_epoch():
    gen = torch.Generator().manual_seed(0)
    pairs = list(unlearning._paired_batches(100, 23, 16, 1, gen, "cpu", True))
    retain = torch.cat([r for r, _ in pairs])
    forget = torch.cat([f for _, f in pairs])
    assert sorted(retain.tolist()) == list(range(100))
    assert set(forget.tolist()) == set(range(23))
    assert len(pairs) == math.ceil(100 / 16)


def test_class_scenario_split_drops_the_class_from_test():
    cfg = classify.Config(
        dataset="digits", scenario="class", forget_classes=[3, 5], train_size=400, test_size=200
    )
    split = classify.prepare_data(cfg, load_dataset("digits"), seed=0)
    assert set(split.forget.y.tolist()) == {3, 5}
    assert not ({3, 5} & set(split.retain.y.tolist()))
    assert not {3, 5} & (set(split.test.y.tolist()) | set(split.val.y.tolist()))
    assert {3, 5} <= set(split.probe.y.tolist())  # the probe can still recognise the forgotten classes


def test_models_shapes_and_heads():
    x28 = torch.randn(2, 1, 28, 28)
    narrow = build_model("narrow_resnet", 1, 10)
    assert narrow(x28).shape == (2, 10) and classifier_head(narrow).in_features == 64
    r18 = build_model("resnet18", 3, 100).eval()
    assert r18(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert r18.conv1.stride == (1, 1) and isinstance(r18.maxpool, torch.nn.Identity)
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("vit", 1, 10)


def test_cli_quick_end_to_end_and_cache_reuse(tmp_path, monkeypatch, capsys):
    def argv(out):
        return [
            "--dataset",
            "digits",
            "--scenario",
            "class",
            "--forget-classes",
            "3",
            "--methods",
            "all",
            "--seeds",
            "2",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / out),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--quick",
            "--no-progress",
        ]

    results = classify.main(argv("out"))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["config"]["dataset"] == "digits" and saved["config"]["seeds"] == 2
    assert set(saved["methods"]) == {"Retrain", "Original", *unlearning.METHODS}
    for name, row in saved["methods"].items():
        for key in ("UA", "RA", "TA", "MIA", "avg_gap", "seconds"):
            assert 0.0 <= row[key] <= 100.0 or key == "seconds", (name, key)
        assert len(row["per_seed"]) == 2
        assert row["avg_gap"] == pytest.approx(sum(s["avg_gap"] for s in row["per_seed"]) / 2)
    assert saved["methods"]["Retrain"]["avg_gap"] == 0.0
    assert results["methods"]["MUNBa"]["UA"] == saved["methods"]["MUNBa"]["UA"]
    # The fairness contract, end to end: what each two-objective method ran with is recorded
    # and shared (the optimizer's own settings, the budget, the batches).
    rows = {m: saved["methods"][m] for m in unlearning.TWO_OBJECTIVE}
    for key in ("base", "momentum", "weight_decay", "max_grad_norm", "epochs", "steps"):
        assert len({json.dumps(r["settings"][key]) for r in rows.values()}) == 1, key
    assert rows["MUNBa"]["settings"]["max_grad_norm"] == 1.0  # the paper recipe's clip, for all four
    assert rows["Naive"]["settings"]["optimizer"] == "SGD"
    assert rows["MUNBa"]["settings"]["optimizer"] == "MUNBaOptimizer(base=sgd)"
    assert len({json.dumps(r["plan_digest"]) for r in rows.values()}) == 1
    assert {r["settings"]["forget_loss"] for r in rows.values()} == {"random_labels", "gradient_ascent"}
    # The relearning attack ran on every model, Retrain included, with the same slices.
    assert set(saved["relearn"]) == set(saved["methods"])
    for curves in saved["relearn"].values():
        assert set(curves) == {"5%", "10%"}
        for frac, c in curves.items():
            assert c["steps"] == [0, 5] and len(c["per_seed"]) == 2
            assert c["slice"] == saved["relearn"]["Retrain"][frac]["slice"]
            assert all(0.0 <= a <= 100.0 for a in c["forget_acc"])
    assert saved["relearn"]["Retrain"]["5%"]["slice"] < saved["relearn"]["Retrain"]["10%"]["slice"]
    for name in ("results.md", "metrics.png", "relearn.png", "munba_bargain.png", "munba_bargain.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "| MUNBa |" in (tmp_path / "out" / "results.md").read_text()
    assert len(list((tmp_path / "cache" / "classify").glob("*.pt"))) == 4  # original + Retrain, 2 seeds

    def no_training(*a, **k):
        raise AssertionError("the cached original/Retrain models should have been reused")

    monkeypatch.setattr(classify, "train_classifier", no_training)
    again = classify.main([*argv("out2"), "--no-relearn"])
    assert again["methods"]["Retrain"]["UA"] == saved["methods"]["Retrain"]["UA"]


def test_hard_scenario_forgets_the_samples_the_original_fits_best(tmp_path):
    """--scenario hard: the forget set is the top --forget-ratio share by the original's margin."""
    from munba_kernels.drivers import robustness

    argv = ["--dataset", "digits", "--scenario", "hard", "--forget-ratio", "0.1", "--methods", "Naive,MUNBa",
            "--quick", "--no-progress", "--no-relearn", "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    saved = classify.main(argv)
    assert set(saved["methods"]) == {"Retrain", "Original", "Naive", "MUNBa"} and not saved["relearn"]
    cfg = classify.parse_args(argv)
    cfg.model = "narrow_resnet"
    ds = load_dataset("digits")
    full = classify.train_subset(cfg, ds)
    from types import SimpleNamespace

    original, _ = classify.cached_training(cfg, "original", full, SimpleNamespace(num_classes=10), 0, 1)
    margins = robustness.true_class_margin(unlearning.predict(original, full.x), full.y)
    mask = robustness.hard_forget_mask(unlearning.predict(original, full.x), full.y, 0.1)
    split = classify.prepare_data(cfg, ds, 0, mask)
    assert len(split.forget) == round(0.1 * len(full))
    assert margins[mask].min() >= margins[~mask].max()
    # The original fits these perfectly, so its UA is 0; Retrain's cache key names the scenario.
    assert saved["methods"]["Original"]["UA"] == 0.0
    assert split.forget_spec == {"scenario": "hard", "seed": 0, "forget_ratio": 0.1}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "FT,SalUn"], "unknown"),
        (["--max-grad-norm", "-1"], "--max-grad-norm"),
        (["--power", "0"], "--power"),
        (["--seeds", "0"], "at least 1"),
        (["--scenario", "sideways"], "invalid choice"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        classify.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["fsdp2", pytest.param("ddp", marks=pytest.mark.slow)])
def test_cli_distributed_over_two_ranks(mode, tmp_path):
    """torchrun, 2 gloo ranks: rank 0 alone trains, evaluates, logs and writes; the other
    rank unlearns alongside it (a rank that fell out of step would hang or crash the job)."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "munba_kernels.drivers.classify", "--dataset", "digits", "--methods", "MUNBa,FT",
           "--quick", "--no-progress", "--distributed", mode, "--out", str(tmp_path / "out"),
           "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"{mode} over 2 ranks" in proc.stdout
    assert proc.stdout.count("seed 0 MUNBa") == 1 and proc.stdout.count("seed 0 FT") == 1
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["config"]["distributed"] == mode
    assert set(saved["methods"]) == {"Retrain", "Original", "MUNBa", "FT"}
    for row in saved["methods"].values():
        assert all(0.0 <= row[k] <= 100.0 for k in ("UA", "RA", "TA", "MIA"))
    trace = json.loads((tmp_path / "out" / "munba_bargain.json").read_text())
    assert trace and all(math.isfinite(v) for step in trace for v in step)
    assert len(list((tmp_path / "cache" / "classify").glob("*.pt"))) == 2  # rank 0 trained once


def test_cli_distributed_needs_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        classify.main(["--dataset", "digits", "--quick", "--distributed", "ddp", "--out", "unused"])


# --- data integrity: the cache key, corrupt cache files, option and data errors ---------------


def _tiny(seed=0, relabel=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 1, 8, 8, generator=gen)
    y = torch.arange(16) % 4
    return unlearning.Subset(x, (y + 1) % 4 if relabel else y)


def _tiny_cached(cfg, data, monkeypatch):
    """``cached_training`` with training replaced by a counter; returns the number of trainings."""
    calls = []
    monkeypatch.setattr(classify, "train_classifier", lambda model, *a, **k: calls.append(1) or model)
    split = classify.Split(None, None, None, None, None, 4, {"scenario": "random", "seed": 0})
    model, _ = classify.cached_training(cfg, "original", data, split, 0, 1)
    return len(calls), model


def test_relabelled_data_is_not_served_from_the_cache(tmp_path, monkeypatch):
    cfg = classify.Config(dataset="fashion_mnist", model="narrow_resnet", cache_dir=str(tmp_path))
    assert _tiny_cached(cfg, _tiny(), monkeypatch)[0] == 1
    assert _tiny_cached(cfg, _tiny(), monkeypatch)[0] == 0  # the same data: reused
    # Same dataset name, sizes and settings, other labels (or other images): trained anew.
    assert _tiny_cached(cfg, _tiny(relabel=True), monkeypatch)[0] == 1
    assert _tiny_cached(cfg, _tiny(seed=1), monkeypatch)[0] == 1
    assert len(list((tmp_path / "classify").glob("*.pt"))) == 3


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_corrupt_cache_file_is_named_retrained_and_replaced(tmp_path, monkeypatch, damage):
    cfg = classify.Config(dataset="digits", model="narrow_resnet", cache_dir=str(tmp_path))
    _tiny_cached(cfg, _tiny(), monkeypatch)
    (path,) = (tmp_path / "classify").glob("*.pt")
    good = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": good[: len(good) // 2], "garbage": b"not a checkpoint"}[damage])
    with pytest.warns(UserWarning, match=re.escape(str(path))):
        trained, model = _tiny_cached(cfg, _tiny(), monkeypatch)
    assert trained == 1
    saved = torch.load(path)  # replaced by a complete entry
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in model.state_dict().items())
    assert _tiny_cached(cfg, _tiny(), monkeypatch)[0] == 0


def _exit_message(capsys, call):
    with pytest.raises(SystemExit) as exit_info:
        call()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]  # argparse: usage, then one "prog: error: ..." line


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--train-size", "-5"], "--train-size"),
        (["--test-size", "-1"], "--test-size"),
        (["--batch-size", "0"], "--batch-size"),
        (["--pretrain-lr", "0"], "--pretrain-lr"),
        (["--device", "tpu"], "--device"),
        (["--forget-ratio", "1.5"], "--forget-ratio"),
        (["--dataset", "cifar10"], "--data-dir"),
        (["--methods", ","], "--methods"),
    ],
)
def test_cli_rejects_bad_option_values_naming_the_option(argv, option, capsys):
    line = _exit_message(capsys, lambda: classify.parse_args(argv))
    assert "error:" in line and option in line


def _no_training(*a, **k):
    raise AssertionError("a bad option must be reported before any training")


def _main_error(tmp_path, monkeypatch, capsys, extra):
    monkeypatch.setattr(classify, "train_classifier", _no_training)
    argv = ["--quick", "--no-progress", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]
    return _exit_message(capsys, lambda: classify.main([*argv, *extra]))


def test_cli_out_of_range_forget_class_is_an_option_error(tmp_path, monkeypatch, capsys):
    line = _main_error(
        tmp_path, monkeypatch, capsys, ["--dataset", "digits", "--scenario", "class", "--forget-classes", "3", "12"]
    )
    assert "--forget-classes" in line and "12" in line and "0..9" in line


@pytest.mark.parametrize("option", ["--out", "--cache-dir"])
def test_cli_unwritable_output_is_found_before_any_work(tmp_path, monkeypatch, capsys, option):
    (tmp_path / "a_file").write_text("")
    line = _main_error(tmp_path, monkeypatch, capsys, ["--dataset", "digits", option, str(tmp_path / "a_file" / "x")])
    assert option in line and "a_file" in line


def test_cli_corrupt_data_file_is_named(tmp_path, monkeypatch, capsys):
    from datafiles import write_fashion_mnist

    data_dir = tmp_path / "fmnist"
    data_dir.mkdir()
    write_fashion_mnist(data_dir, relabel=lambda y: y + 10)
    line = _main_error(tmp_path, monkeypatch, capsys, ["--data-dir", str(data_dir)])
    assert str(data_dir / "train-labels-idx1-ubyte") in line
# ---------------------------------------------------------------- the fairness contract

_SHARED = ("base", "momentum", "weight_decay", "max_grad_norm", "epochs", "steps")


@pytest.mark.parametrize("clip", [0.5, None])
def test_two_objective_methods_share_optimizer_clip_budget_and_data_order(clip, digits_split, original):
    """Naive, NegGrad+, MUNBa and MUNBa-GA must run the same base rule, clip, budget and batches:
    read back from the optimizers that ran and from the norms of the directions they stepped along."""
    recipe = unlearning.Recipe(epochs=1, max_grad_norm=clip)
    runs = {
        m: unlearning.unlearn(
            m,
            copy.deepcopy(original),
            digits_split.forget,
            digits_split.retain,
            num_classes=10,
            lr=0.01,
            batch_size=64,
            seed=0,
            recipe=recipe,
            progress=False,
        )
        for m in unlearning.TWO_OBJECTIVE
    }
    reference = runs["MUNBa"]
    assert reference.settings["max_grad_norm"] == clip and reference.settings["epochs"] == 1
    for method, run in runs.items():
        assert {k: run.settings[k] for k in _SHARED} == {k: reference.settings[k] for k in _SHARED}, method
        assert run.plan_digest == reference.plan_digest, method
        assert len(run.step_norms) == run.settings["steps"] == math.ceil(len(digits_split.retain) / 64)
        raw, applied = torch.tensor(run.step_norms, dtype=torch.float64).T
        if clip is None:
            torch.testing.assert_close(applied, raw)
        else:
            assert (raw > clip).any(), f"{method}: the clip never bit; the test would prove nothing"
            torch.testing.assert_close(applied, raw.clamp(max=clip), rtol=1e-6, atol=0)
    assert runs["NegGrad+"].settings["forget_loss"] == runs["MUNBa-GA"].settings["forget_loss"]
    assert runs["Naive"].settings["forget_loss"] == runs["MUNBa"].settings["forget_loss"] == "random_labels"


def test_clip_grads_is_exact_and_returns_the_norm_before_clipping():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert unlearning.clip_grads_([a, b], 1.0).item() == 5.0
    assert a.grad.tolist() == pytest.approx([0.6, 0.0], abs=1e-7) and b.grad.item() == pytest.approx(0.8)
    assert unlearning.clip_grads_([a, b], None).item() == pytest.approx(1.0)  # no clip: unchanged
    assert unlearning.clip_grads_([a, b], 2.0).item() == pytest.approx(1.0)  # below the clip: unchanged
    assert b.grad.item() == pytest.approx(0.8)
    a.grad.zero_(), b.grad.zero_()
    assert unlearning.clip_grads_([a, b], 1.0).item() == 0.0 and a.grad.abs().sum() == 0


def test_the_paper_recipe_is_munba_paper_faithful_and_power_is_normalised():
    p = [torch.nn.Parameter(torch.zeros(3))]
    built = unlearning.optimizer_settings(unlearning.PAPER.optimizer("MUNBa", p, 0.01), None)
    published = unlearning.optimizer_settings(unlearning.MUNBaOptimizer.paper_faithful(p, lr=0.01), None)
    assert built == published and built["max_grad_norm"] == 1.0
    naive = unlearning.optimizer_settings(unlearning.PAPER.optimizer("Naive", p, 0.01), 1.0)
    assert {k: naive[k] for k in ("base", "momentum", "weight_decay", "max_grad_norm")} == {
        k: built[k] for k in ("base", "momentum", "weight_decay", "max_grad_norm")
    }
    assert unlearning.Recipe(power_ratio=3.0).bargaining_power == pytest.approx((1.5, 0.5))
    with pytest.raises(ValueError, match="max_grad_norm"):
        unlearning.Recipe(max_grad_norm=0.0)


@pytest.mark.parametrize("method", ["MUNBa", "Naive", "RL"])
def test_a_snapshot_at_epoch_k_is_exactly_a_k_epoch_run(method, digits_split, original):
    """What lets the study read budgets 2/5/10 off one run: same batches, labels and steps."""

    def run(epochs, snapshots=()):
        return unlearning.unlearn(method, copy.deepcopy(original), digits_split.forget, digits_split.retain,
                                  num_classes=10, lr=0.01, batch_size=64, seed=3, snapshots=snapshots,
                                  recipe=unlearning.Recipe(epochs=epochs), progress=False)  # fmt: skip

    short, long = run(1), run(2, snapshots=(1,))
    snap = long.snapshots[1]
    for (name, a), b in zip(short.model.state_dict().items(), snap.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert snap.settings == short.settings and snap.plan_digest == short.plan_digest
    assert snap.step_norms == short.step_norms and snap.bargain_log == short.bargain_log
    assert long.settings["epochs"] == 2 and long.settings["steps"] == 2 * short.settings["steps"]
    assert not torch.equal(long.model.fc.weight, snap.model.fc.weight)  # training went on
    with pytest.raises(ValueError, match="snapshots"):
        run(2, snapshots=(2,))



def test_every_option_named_like_a_config_field_reaches_the_config():
    """options.config_from_args: the CLI-to-config mapping is the parser's; a field an option
    names must carry the parsed value, a field no option names keeps its default."""
    import dataclasses

    from munba_kernels.drivers import options

    @dataclasses.dataclass
    class Small:
        forget_ratio: float = 0.1
        seeds: int = 1
        untouched: str = "default"
        progress: bool = True

    args = classify.build_parser().parse_args(["--forget-ratio", "0.25", "--seeds", "2", "--no-progress"])
    cfg = options.config_from_args(Small, args, progress=not args.no_progress)
    assert cfg == Small(forget_ratio=0.25, seeds=2, untouched="default", progress=False)
    full = classify.parse_args(["--forget-ratio", "0.25", "--seeds", "2", "--neggrad-betas", "0.5"])
    assert (full.forget_ratio, full.seeds, full.neggrad_betas) == (0.25, 2, [0.5])
