"""Several erased classes in the diffusion driver: options, anchors, per-class MUNBa players
(K alphas, a zero player sitting out), one batch plan for every method, the report."""

import json
import math

import pytest
import torch

pytest.importorskip("diffusers")

from munba_kernels.drivers import ddpm, diffusion  # noqa: E402
from munba_kernels.evaluation.report import plot_bargain_trace  # noqa: E402

QUICK = [
    "--dataset", "digits", "--image-size", "8", "--quick", "--ddpm-steps", "40", "--unlearn-steps", "4",
    "--samples-per-class", "3", "--sample-steps", "4", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def unet4():
    torch.manual_seed(0)
    return ddpm.build_unet(8, 1, num_classes=4, channels=(8, 16))


def _problem(forget_classes=(0, 1), num_classes=4, per_class=6):
    """Random images, ``per_class`` of each class; forget = ``forget_classes``, retain = the rest."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(num_classes).repeat(per_class)
    x = torch.rand(len(y), 1, 8, 8, generator=gen) * 2 - 1
    f = torch.isin(y, torch.tensor(forget_classes))
    return ddpm.Subset(x[f], y[f]), ddpm.Subset(x[~f], y[~f])


def _unlearn(unet, method, forget, retain, anchors, players="merged", steps=3, **recipe):
    return ddpm.unlearn_class(
        method, unet, forget, retain, num_classes=4, anchor_class=anchors, batch_size=6, class_dropout=0.1,
        recipe=ddpm.DiffusionRecipe(lr=1e-3, steps=steps, **recipe), seed=3, players=players, progress=False,
    )  # fmt: skip


def _exit_line(capsys, call):
    with pytest.raises(SystemExit) as info:
        call()
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "argv, option, words",
    [
        (["--forget-classes", "3", "5", "3"], "--forget-classes", "duplicates [3]"),
        (["--forget-class", "-1"], "--forget-classes", "from 0"),
        (["--forget-classes", "3", "5", "--anchor-class", "5"], "--anchor-class", "erased"),
        (["--players", "per-class"], "--players", "several"),
        (["--forget-classes", "3", "5", "--players", "per-class", "--methods", "Naive"], "--players", "MUNBa"),
        (["--players", "all"], "--players", "invalid choice"),
    ],
)
def test_bad_class_options_are_one_line_errors_at_parse_time(argv, option, words, capsys):
    line = _exit_line(capsys, lambda: diffusion.parse_args(argv))
    assert "error:" in line and option in line and words in line


def _no_work(*a, **k):
    raise AssertionError("a bad option must be reported before any training")


@pytest.mark.parametrize(
    "classes, words", [(["2", "10"], "--forget-classes 10: outside 0..9"), ([str(c) for c in range(10)], "retained")]
)
def test_classes_the_data_lacks_are_reported_before_any_work(classes, words, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(diffusion, "train_classifier", _no_work)
    monkeypatch.setattr(ddpm, "train_ddpm", _no_work)
    argv = [*QUICK, "--out", str(tmp_path), "--forget-classes", *classes]
    assert words in _exit_line(capsys, lambda: diffusion.main(argv))


def test_one_option_two_spellings_and_default_anchors():
    one, same = diffusion.parse_args(["--forget-class", "2"]), diffusion.parse_args(["--forget-classes", "2"])
    assert one == same and one.forget_classes == [2] and one.forget_class == 2 and one.relearn
    diffusion._check_classes(one, 10)
    assert (one.anchor_class, one.anchor_classes) == (3, [3])  # the one-class default, as before
    several = diffusion.parse_args(["--forget-classes", "3", "4", "9", "--players", "per-class"])
    assert not several.relearn  # RELEARN_SEVERAL
    assert several.rows() == ["MUNBa", diffusion.PER_CLASS_ROW, "Naive", "ESD"]
    diffusion._check_classes(several, 10)
    assert several.anchor_class is None and several.anchor_classes == [5, 5, 0]  # the next class not erased
    pinned = diffusion.parse_args(["--forget-classes", "3", "4", "--anchor-class", "7"])
    diffusion._check_classes(pinned, 10)
    assert pinned.anchor_classes == [7, 7]
    assert ddpm.default_anchor(3, 10) == 4 and ddpm.default_anchor(9, 10, (9, 0, 1)) == 2
    with pytest.raises(ValueError, match="no class is left"):
        ddpm.default_anchor(0, 2, (0, 1))


def test_power_weights_keep_the_ratio_and_sum_to_k():
    assert ddpm.power_weights(3.0, 2) == ddpm.power_pair(3.0)
    w = ddpm.power_weights(2.0, 4)
    assert sum(w) == pytest.approx(4.0) and w[0] == w[1] == w[2] == pytest.approx(2 * w[3])


@pytest.mark.parametrize("ratio", [1.0, 2.0])
def test_per_class_munba_bargains_k_players(unet4, ratio):
    """One player per erased class plus preserve: K = 3 positive alphas per step, and the Nash
    condition (GᵀG)α = w/α gives ‖d‖² = αᵀGᵀGα = Σ w = K, whatever the power ratio."""
    forget, retain = _problem((0, 1))
    run = _unlearn(unet4, "MUNBa", forget, retain, {0: 2, 1: 3}, "per-class", power_ratio=ratio)
    assert run.settings["players"] == ["forget_0", "forget_1", "preserve"]
    assert run.settings["bargaining_power"] == pytest.approx(ddpm.power_weights(ratio, 3))
    assert ddpm.trace_columns(run.settings["players"])[:3] == ["alpha_forget_0", "alpha_forget_1", "alpha_preserve"]
    for row, (norm, _) in zip(run.bargain_log, run.step_norms):
        assert len(row) == 6 and all(a > 0 for a in row[:3]) and all(-1 <= c <= 1 for c in row[3:])
        assert norm**2 == pytest.approx(3.0, rel=1e-4)
    merged = _unlearn(unet4, "MUNBa", forget, retain, {0: 2, 1: 3}, power_ratio=ratio)
    assert merged.settings["players"] == ["forget", "preserve"] and all(len(r) == 3 for r in merged.bargain_log)


def test_a_class_absent_from_the_batch_sits_out_and_the_rest_bargain_as_two(unet4):
    """Player forget_1 never draws a sample (the forget set holds class 0 only): its alpha is 0
    (PLAYER_ZERO) and the other two get the two-player closed form's weights."""
    forget, retain = _problem((0,))
    per_class = _unlearn(unet4, "MUNBa", forget, retain, {0: 2, 1: 3}, "per-class", steps=1)
    two = _unlearn(unet4, "MUNBa", forget, retain, {0: 2}, steps=1)
    (a0, a1, ar, *_), (f, r, _) = per_class.bargain_log[0], two.bargain_log[0]
    assert a1 == 0.0
    assert (a0, ar) == pytest.approx((f, r), rel=1e-5)
    assert per_class.losses[0] == pytest.approx(two.losses[0], rel=1e-6)


def test_every_method_sees_the_same_batch_plan(unet4, monkeypatch):
    """Fairness: merged MUNBa, per-class MUNBa and Naive draw the same forget samples (noised
    inputs, timesteps, classes, anchors) and retain batches at every step; per-class splits
    the merged batch by class and nothing else."""
    forget, retain = _problem((0, 1))
    seen = {}
    real_forget, real_denoise = ddpm.forget_loss, ddpm.denoising_loss

    def forget_spy(eps_fn, x_t, t, c_f, c_a):
        seen[key].append(("f", x_t.clone(), t.clone(), c_f.clone(), c_a.clone()))
        return real_forget(eps_fn, x_t, t, c_f, c_a)

    def denoise_spy(eps_fn, scheduler, x0, cond, gen):
        seen[key].append(("r", x0.clone(), cond.clone()))
        return real_denoise(eps_fn, scheduler, x0, cond, gen)

    monkeypatch.setattr(ddpm, "forget_loss", forget_spy)
    monkeypatch.setattr(ddpm, "denoising_loss", denoise_spy)
    for key, method, players in (("merged", "MUNBa", "merged"), ("per-class", "MUNBa", "per-class"),
                                 ("naive", "Naive", "merged")):  # fmt: skip
        seen[key] = []
        _unlearn(unet4, method, forget, retain, {0: 2, 1: 3}, players, steps=4)

    def plan(calls):
        steps, current = [], []
        for call in calls:
            if call[0] == "f":
                current.append(call[1:])
            else:  # the retain batch closes a step
                steps.append((current, call[1:]))
                current = []
        return steps

    merged, per_class, naive = plan(seen["merged"]), plan(seen["per-class"]), plan(seen["naive"])
    assert len(merged) == len(per_class) == len(naive) == 4
    for (mf, mr), (pf, pr), (nf, nr) in zip(merged, per_class, naive):
        assert len(mf) == 1 and len(pf) == 2  # both classes drawn in every step of this seed
        x_t, t, c_f, c_a = mf[0]
        order = torch.argsort(c_f, stable=True)  # per-class: class 0's samples, then class 1's
        for got, want in zip((torch.cat(parts) for parts in zip(*pf)), (x_t, t, c_f, c_a)):
            assert torch.equal(got, want[order])
        assert torch.equal(c_a, torch.tensor([2, 3])[c_f])
        for a, b in zip(mf[0] + mr, nf[0] + nr):
            assert torch.equal(a, b)
        for a, b in zip(mr, pr):
            assert torch.equal(a, b)


def test_one_class_runs_do_not_depend_on_the_anchor_spelling(unet4):
    """A mapping {class: anchor} and the plain anchor give bit-identical one-class runs."""
    forget, retain = _problem((1,))
    for method in ("MUNBa", "Naive"):
        plain, mapped = (_unlearn(unet4, method, forget, retain, a) for a in (2, {1: 2}))
        assert plain.losses == mapped.losses and plain.bargain_log == mapped.bargain_log
        assert plain.settings == mapped.settings  # the settings read back from the optimizer
        if method == "MUNBa":
            assert plain.settings["players"] == ["forget", "preserve"]  # one class: two players, as before
        for a, b in zip(plain.model.parameters(), mapped.model.parameters()):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="anchor_class"):
        _unlearn(unet4, "MUNBa", forget, retain, {1: 1})
    with pytest.raises(ValueError, match="players"):
        _unlearn(unet4, "MUNBa", forget, retain, 2, "each")


def test_plot_bargain_trace_takes_k_alphas(tmp_path):
    row = [0.5, 0.25, 0.4, 0.1, -0.2, 0.3]  # K = 3: 3 alphas, 3 pair cosines
    plot_bargain_trace([row, row], tmp_path / "k3.png", players=["a", "b", "c"])
    assert (tmp_path / "k3.png").stat().st_size > 0
    with pytest.raises(ValueError, match="does not fit"):
        plot_bargain_trace([row[:5]], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="does not fit"):
        plot_bargain_trace([row], tmp_path / "bad.png", players=["a", "b"])


def test_per_class_cli_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("MUNBA_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = [*QUICK, "--forget-classes", "0", "2", "5", "--players", "per-class", "--seeds", "2", "--out", str(out)]
    results = diffusion.main(argv)
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    rows = ["Original", "MUNBa", diffusion.PER_CLASS_ROW, "Naive", "ESD"]
    assert list(saved["methods"]) == rows
    assert saved["config"]["anchor_classes"] == [1, 3, 6] and saved["relearn"] == {}
    assert "Retrain" in saved["relearn_skipped"] and "relearn.png" not in {p.name for p in out.iterdir()}
    for row in saved["methods"].values():
        assert len(row["per_seed"]) == 2
        for s in row["per_seed"]:
            per = {int(c): v for c, v in s["per_class_accuracy"].items()}
            rec = [s[f"forget_recognition_{c}"] for c in (0, 2, 5)]
            assert rec == [per[c] for c in (0, 2, 5)]
            assert s["forget_recognition"] == pytest.approx(sum(rec) / 3)
            assert s["UA"] == pytest.approx(100 - s["forget_recognition"]) and s["UA_2"] == 100 - rec[1]
            assert s["forget_spread"] == max(rec) - min(rec)
            retained = [v for c, v in per.items() if c not in (0, 2, 5)]
            assert s["retain_accuracy"] == pytest.approx(sum(retained) / len(retained))
            assert math.isfinite(s["feature_distance"])
    # fairness: one recipe, read back from every optimizer; the K-player row bargains 4 players
    m = saved["methods"]
    shared = ("base", "lr", "weight_decay", "max_grad_norm", "steps", "batch_size")
    for name in rows[1:]:
        assert {k: m[name]["settings"][k] for k in shared} == {k: m["MUNBa"]["settings"][k] for k in shared}
    assert m[diffusion.PER_CLASS_ROW]["settings"]["players"] == ["forget_0", "forget_2", "forget_5", "preserve"]
    assert m["MUNBa"]["settings"]["players"] == ["forget", "preserve"]
    # the same step-0 batch: Naive's and both MUNBa's first (forget, preserve) losses agree
    first = [saved["losses"][r][0] for r in rows[1:4]]
    assert first[0] == pytest.approx(first[1], rel=1e-5) and first[0] == pytest.approx(first[2], rel=1e-5)
    trace = json.loads((out / "munba_bargain.json").read_text())
    k4 = trace[diffusion.PER_CLASS_ROW]
    assert k4["players"] == m[diffusion.PER_CLASS_ROW]["settings"]["players"] and len(k4["columns"]) == 10
    assert len(k4["steps"]) == 4 and all(len(r) == 10 and min(r[:4]) >= 0 for r in k4["steps"])
    assert trace["MUNBa"]["columns"] == ["alpha_forget", "alpha_preserve", "cos(forget,preserve)"]
    for png in ("samples.png", "munba_bargain.png", "munba_bargain_per_class.png"):
        assert (out / png).stat().st_size > 0
    # the paired comparison is the per-seed rows' difference
    pair = saved["paired"][f"{diffusion.PER_CLASS_ROW} − MUNBa"]["forget_spread"]
    want = [a["forget_spread"] - b["forget_spread"] for a, b in zip(m[rows[2]]["per_seed"], m["MUNBa"]["per_seed"])]
    assert pair["diff"] == pytest.approx(want)
    md = (out / "results.md").read_text()
    assert f"| {diffusion.PER_CLASS_ROW} |" in md and "forget_recognition_5" in md and "forget_spread" in md
    assert f"| {diffusion.PER_CLASS_ROW} − Naive |" in md and "Relearning attack skipped" in md
