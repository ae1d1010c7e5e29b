"""The class-conditional diffusion driver: losses, generation metrics (vs float64 references), the CLI."""

import json
import re
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from munba_kernels.drivers import ddpm, diffusion  # noqa: E402
from munba_kernels.evaluation import generation_scores, kernel_inception_distance  # noqa: E402


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return ddpm.build_unet(8, 1, num_classes=3, channels=(8, 16))


def _noised(seed=0, n=4):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1
    return ddpm.add_noise(ddpm.build_scheduler(), x0, gen)


def _grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def test_forget_loss_vanishes_with_its_gradient_when_forget_is_the_anchor(unet):
    x_t, _, t = _noised()
    c = torch.tensor([0, 1, 2, 1])
    unet.zero_grad(set_to_none=True)
    loss = ddpm.forget_loss(partial(ddpm.eps, unet), x_t, t, c, c)
    loss.backward()
    assert loss.item() == 0.0
    assert all(g.abs().max() == 0 for g in _grads(unet))


def test_forget_loss_is_the_mse_to_a_detached_anchor_prediction(unet):
    x_t, _, t = _noised(1)
    c_f, c_a = torch.full((4,), 0), torch.full((4,), 2)
    unet.zero_grad(set_to_none=True)
    ddpm.forget_loss(partial(ddpm.eps, unet), x_t, t, c_f, c_a).backward()
    got = _grads(unet)
    assert any(g.abs().max() > 0 for g in got)
    # Reference: the anchor branch is a constant, computed separately; values in float64.
    with torch.no_grad():
        target = ddpm.eps(unet, x_t, t, c_a)
    unet.zero_grad(set_to_none=True)
    pred = ddpm.eps(unet, x_t, t, c_f)
    ref_loss = ((pred.double() - target.double()) ** 2).mean()
    ref_loss.backward()
    for g, r in zip(got, _grads(unet)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


def test_esd_target_pushes_away_from_the_concept(unet):
    """With the frozen copy equal to the model, the ESD loss is (1+η)²·mean((ε_c − ε_∅)²)."""
    x_t, _, t = _noised(2)
    c_f, null = torch.full((4,), 1), torch.full((4,), 3)
    fn = partial(ddpm.eps, unet)
    with torch.no_grad():
        e_c, e_u = ddpm.eps(unet, x_t, t, c_f).double(), ddpm.eps(unet, x_t, t, null).double()
        for eta in (0.0, 1.0, 2.5):
            got = ddpm.esd_loss(fn, fn, x_t, t, c_f, null, eta).item()
            assert got == pytest.approx(((1 + eta) ** 2 * (e_c - e_u) ** 2).mean().item(), rel=1e-4)


def test_denoising_loss_matches_its_definition(unet):
    sched = ddpm.build_scheduler()
    x0, c = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        got = ddpm.denoising_loss(partial(ddpm.eps, unet), sched, x0, c, torch.Generator().manual_seed(5))
        x_t, noise, t = ddpm.add_noise(sched, x0, torch.Generator().manual_seed(5))
        abar = sched.alphas_cumprod[t].double().view(-1, 1, 1, 1)
        torch.testing.assert_close(
            x_t.double(), abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()
        )
        ref = F.mse_loss(ddpm.eps(unet, x_t, t, c).double(), noise.double())
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_class_dropout_uses_the_null_class():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(500)
    dropped = ddpm.drop_labels(labels, 10, 0.25, gen)
    share = (dropped == 10).double().mean().item()
    assert 0.2 < share < 0.3
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])
    assert torch.equal(ddpm.drop_labels(labels, 10, 0.0, gen), labels)


def _kid_reference(x, y):
    """Unbiased MMD² with k(a, b) = (a·b/d + 1)³, by explicit loops over pairs (numpy float64)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d = x.shape[1]

    def k(a, b):
        return (a @ b / d + 1.0) ** 3

    n, m = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    sxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return sxx + syy - 2 * sxy


def test_kid_matches_a_float64_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(17, 6, generator=gen)
    y = torch.randn(23, 6, generator=gen) * 1.3 + 0.4
    assert kernel_inception_distance(x, y) == pytest.approx(_kid_reference(x, y), rel=1e-10)
    assert kernel_inception_distance(x.float(), y.float()) == pytest.approx(_kid_reference(x, y), rel=1e-5)


def test_kid_separates_distributions_and_is_unbiased_near_zero():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(400, 8, generator=gen), torch.randn(400, 8, generator=gen)
    same = kernel_inception_distance(a, b)
    shifted = kernel_inception_distance(a, b + 1.0)
    assert abs(same) < 0.05 and shifted > 20 * max(abs(same), 1e-3)
    with pytest.raises(ValueError, match="feature matrices"):
        kernel_inception_distance(a, b[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(a[:1], b)


def test_generation_scores_by_hand():
    labels = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 1, 2, 2])
    logits = F.one_hot(pred, 3).float()
    s = generation_scores(logits, labels, forget_class=0)
    assert s["forget_recognition"] == pytest.approx(50.0)
    assert s["per_class"] == {0: 50.0, 1: 75.0, 2: 100.0}
    assert s["retain_accuracy"] == pytest.approx(87.5)  # classes count equally, not samples
    with pytest.raises(ValueError, match="forget_class"):
        generation_scores(logits, labels, forget_class=5)


def test_sampling_is_seeded_and_in_range(unet):
    labels = torch.tensor([0, 1, 2])
    a = ddpm.sample(unet, labels, null_class=3, steps=3, guidance=2.0, seed=4)
    b = ddpm.sample(unet, labels, null_class=3, steps=3, guidance=2.0, seed=4)
    assert a.shape == (3, 1, 8, 8) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1


QUICK = [
    "--dataset", "digits", "--image-size", "8", "--quick", "--ddpm-steps", "40", "--unlearn-steps", "4",
    "--samples-per-class", "3", "--sample-steps", "4", "--no-progress",
]  # fmt: skip


def test_quick_cli_run_writes_results_and_reuses_its_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MUNBA_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    results = diffusion.main([*QUICK, "--forget-class", "2", "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["methods"]) == {"Original", "MUNBa", "Naive", "ESD"}
    for row in saved["methods"].values():
        for key in ("forget_recognition", "retain_accuracy"):
            assert 0.0 <= row[key] <= 100.0
        assert np.isfinite(row["feature_distance"])
        assert row["UA"] == pytest.approx(100.0 - row["forget_recognition"])
    assert saved["config"]["forget_class"] == 2 and saved["config"]["anchor_class"] == 3
    assert saved == json.loads(json.dumps(results))
    assert "| MUNBa |" in (out / "results.md").read_text()
    for png in ("samples.png", "munba_bargain.png"):
        assert (out / png).stat().st_size > 0
    # MUNBa moved the model along bargained steps: positive weights for both players.
    assert len(saved["losses"]["MUNBa"]) == 4
    # Fairness: one recipe for every method, read back from the optimizers that ran.
    settings = {m: saved["methods"][m]["settings"] for m in ("MUNBa", "Naive", "ESD")}
    for key in ("base", "lr", "weight_decay", "max_grad_norm", "steps", "batch_size"):
        assert len({json.dumps(s[key]) for s in settings.values()}) == 1, key
    assert settings["MUNBa"]["optimizer"] == "MUNBaOptimizer(base=adamw)" and settings["Naive"]["optimizer"] == "AdamW"
    # The relearning attack: every model, the Retrain DDPM included, with checkpoints 0, 2, 4.
    assert set(saved["relearn"]) == {"Original", "Retrain", "MUNBa", "Naive", "ESD"}
    for curve in saved["relearn"].values():
        assert curve["steps"] == [0, 2, 4] and all(0 <= r <= 100 for r in curve["forget_recognition"])
    assert (out / "relearn.png").stat().st_size > 0
    cached = diffusion.main(
        [*QUICK, "--forget-class", "2", "--methods", "MUNBa", "--out", str(tmp_path / "r2")]
    )
    assert cached["config"]["ddpm_seconds"] == saved["config"]["ddpm_seconds"]  # loaded, not retrained
    assert (
        cached["methods"]["Original"]["forget_recognition"]
        == saved["methods"]["Original"]["forget_recognition"]
    )


def _tiny_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(24, 1, 8, 8, generator=gen) * 2 - 1
    y = torch.arange(3).repeat(8)
    f = y == 0
    return ddpm.Subset(x[f], y[f]), ddpm.Subset(x[~f], y[~f])


def test_munba_and_naive_share_the_recipe_clip_and_batches(unet):
    """The fairness contract for diffusion: same optimizer settings and clip, read back from
    the optimizers and from the norms of the directions each method stepped along."""
    forget, retain = _tiny_problem()
    recipe = ddpm.DiffusionRecipe(lr=1e-4, steps=3, max_grad_norm=1e-3)  # small enough to bite
    runs = {
        m: ddpm.unlearn_class(m, unet, forget, retain, num_classes=3, anchor_class=1, batch_size=4,
                              class_dropout=0.1, recipe=recipe, seed=0, progress=False)
        for m in ddpm.UNLEARN_METHODS
    }  # fmt: skip
    shared = ("base", "lr", "weight_decay", "max_grad_norm", "steps", "batch_size")
    for m, run in runs.items():
        assert {k: run.settings[k] for k in shared} == {k: runs["MUNBa"].settings[k] for k in shared}, m
        raw, applied = torch.tensor(run.step_norms, dtype=torch.float64).T
        assert (raw > 1e-3).all(), m
        torch.testing.assert_close(applied, raw.clamp(max=1e-3), rtol=1e-6, atol=0)
    # Naive and MUNBa saw the same forget and retain batches: their first losses agree.
    assert runs["MUNBa"].losses[0] == pytest.approx(runs["Naive"].losses[0])


def test_scheduled_power_ratio_by_hand():
    f = ddpm.scheduled_power_ratio
    assert f(2.0, forget_loss=0.5, first_loss=1.0, threshold=0.1) == 2.0  # above the threshold
    assert f(2.0, forget_loss=0.05, first_loss=1.0, threshold=0.1) == pytest.approx(1.0)  # half of it
    assert f(1.0, forget_loss=0.0, first_loss=1.0, threshold=0.1) == ddpm.SCHEDULE_FLOOR
    assert f(1.0, forget_loss=float("nan"), first_loss=1.0, threshold=0.1) == 1.0
    assert ddpm.power_pair(3.0) == pytest.approx((1.5, 0.5))


def test_forget_loss_schedule_lowers_munba_power_as_the_forget_loss_falls(unet):
    forget, retain = _tiny_problem()
    recipe = ddpm.DiffusionRecipe(lr=3e-3, steps=12, power_schedule="forget-loss", power_threshold=0.9)
    run = ddpm.unlearn_class("MUNBa", unet, forget, retain, num_classes=3, anchor_class=1, batch_size=4,
                             class_dropout=0.0, recipe=recipe, seed=0, progress=False)  # fmt: skip
    assert run.power_ratios[0] == 1.0 and len(run.power_ratios) == 12
    assert min(run.power_ratios) < 1.0 and run.settings["bargaining_power"] == "scheduled"
    with pytest.raises(ValueError, match="power_schedule"):
        ddpm.DiffusionRecipe(power_schedule="sometimes")


def test_relearn_checkpoints_train_a_copy_and_yield_on_schedule(unet):
    forget, _ = _tiny_problem()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    seen = []
    for step, model in ddpm.relearn_checkpoints(unet, forget, steps=5, every=2, lr=1e-3, batch_size=4, seed=0):
        seen.append((step, sum(p.double().sum().item() for p in model.parameters())))
    assert [s for s, _ in seen] == [0, 2, 4, 5]
    assert len({v for _, v in seen}) == 4  # the copy moves between checkpoints
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())  # the original does not


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "MUNBa,SalUn"], "--methods"),
        (["--max-grad-norm", "0"], "--max-grad-norm"),
        (["--power-threshold", "2"], "--power-threshold"),
        (["--image-size", "0"], "--image-size"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        diffusion.parse_args(argv)
    assert message in capsys.readouterr().err


def _exit_message(capsys, call):
    with pytest.raises(SystemExit) as exit_info:
        call()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]  # argparse: usage, then one "prog: error: ..." line


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--sd-steps", "2.5"], "--sd-steps"),  # an integer option: was accepted as a float, crashed later
        (["--ddpm-steps", "1e3"], "--ddpm-steps"),
        (["--device", "tpu"], "--device"),
        (["--image-size", "10"], "--image-size"),  # the UNet halves it twice
        (["--dataset", "svhn"], "--data-dir"),
        (["--forget-prompt", "a cat"], "--pretrained"),
        (["--retain-prompt", "a dog"], "--pretrained"),
    ],
)
def test_cli_rejects_bad_option_values_naming_the_option(argv, option, capsys):
    line = _exit_message(capsys, lambda: diffusion.parse_args(argv))
    assert "error:" in line and option in line


def _no_work(*a, **k):
    raise AssertionError("a bad option must be reported before any training")


@pytest.mark.parametrize("flag, value", [("--forget-class", "10"), ("--anchor-class", "2")])
def test_bad_classes_name_the_parameter(flag, value, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(diffusion, "train_classifier", _no_work)
    monkeypatch.setattr(ddpm, "train_ddpm", _no_work)
    argv = (
        [*QUICK, "--forget-class", "2", "--out", str(tmp_path)]
        if flag == "--anchor-class"
        else [*QUICK, "--out", str(tmp_path)]
    )
    assert flag in _exit_message(capsys, lambda: diffusion.main([*argv, flag, value]))


@pytest.mark.parametrize("option", ["--out", "--cache-dir"])
def test_unwritable_output_is_found_before_any_work(tmp_path, monkeypatch, capsys, option):
    monkeypatch.setattr(diffusion, "train_classifier", _no_work)
    monkeypatch.setattr(ddpm, "train_ddpm", _no_work)
    (tmp_path / "a_file").write_text("")
    argv = [*QUICK, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    line = _exit_message(capsys, lambda: diffusion.main([*argv, option, str(tmp_path / "a_file" / "x")]))
    assert option in line and "a_file" in line


def _cfg(tmp_path):
    return diffusion.Config(
        dataset="fashion_mnist", image_size=8, channels=[8, 16], cache_dir=str(tmp_path), progress=False
    )


def _train_data(seed=0, relabel=False):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(12) % 3
    return diffusion.Subset(torch.rand(12, 1, 8, 8, generator=gen) * 2 - 1, (y + 1) % 3 if relabel else y)


def _count_trainings(monkeypatch):
    calls = []
    monkeypatch.setattr(diffusion, "train_classifier", lambda m, *a, **k: calls.append("judge"))
    monkeypatch.setattr(ddpm, "train_ddpm", lambda m, *a, **k: calls.append("ddpm"))
    return calls


def test_relabelled_data_is_not_served_from_the_cache(tmp_path, monkeypatch):
    calls = _count_trainings(monkeypatch)
    cfg = _cfg(tmp_path)
    for data in (_train_data(), _train_data(), _train_data(relabel=True), _train_data(seed=1)):
        diffusion.judge_classifier(cfg, data, 1, 3)
        diffusion.pretrained_ddpm(cfg, data, 1, 3)
    # the second (identical) data set is served from the cache; the relabelled and the redrawn are not
    assert calls == ["judge", "ddpm"] * 3
    assert len(list((tmp_path / "diffusion").glob("*.pt"))) == 6


@pytest.mark.parametrize("kind", ["judge", "ddpm"])
def test_corrupt_cache_file_is_named_retrained_and_replaced(tmp_path, monkeypatch, kind):
    calls = _count_trainings(monkeypatch)
    cfg = _cfg(tmp_path)
    build = diffusion.judge_classifier if kind == "judge" else diffusion.pretrained_ddpm
    build(cfg, _train_data(), 1, 3)
    (path,) = (tmp_path / "diffusion").glob(f"{kind}-*.pt")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.warns(UserWarning, match=re.escape(str(path))):
        model, _ = build(cfg, _train_data(), 1, 3)
    assert calls == [kind, kind]
    saved = torch.load(path)
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_default_fashion_mnist_run_meets_the_targets(tmp_path, report):
    """The issue's default run (minutes on 2 cores; the DDPM and judge are cached)."""
    pytest.importorskip("sklearn")
    out = tmp_path / "fmnist"
    results = diffusion.main(
        ["--dataset", "fashion_mnist", "--forget-class", "3", "--out", str(out), "--no-progress"]
    )
    m = results["methods"]
    for name, row in m.items():
        report(
            f"diffusion {name}: forget recognition {row['forget_recognition']:.1f}%, "
            f"retain accuracy {row['retain_accuracy']:.1f}%, KID {row['feature_distance']:.4f}"
        )
    assert m["MUNBa"]["forget_recognition"] <= 2.0
    assert m["MUNBa"]["retain_accuracy"] >= m["Original"]["retain_accuracy"] - 3.0


def test_a_snapshot_after_k_steps_is_exactly_a_k_step_run(unet):
    forget, retain = _tiny_problem()

    def run(steps, snapshots=()):
        return ddpm.unlearn_class("MUNBa", unet, forget, retain, num_classes=3, anchor_class=1, batch_size=4,
                                  class_dropout=0.1, recipe=ddpm.DiffusionRecipe(lr=1e-3, steps=steps),
                                  seed=2, snapshots=snapshots, progress=False)  # fmt: skip

    short, long = run(2), run(4, snapshots=(2,))
    snap = long.snapshots[2]
    for (name, a), b in zip(short.model.state_dict().items(), snap.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert snap.losses == short.losses and snap.settings == short.settings and len(long.losses) == 4
    with pytest.raises(ValueError, match="snapshots"):
        run(2, snapshots=(2,))
