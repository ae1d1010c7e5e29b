"""Several forget classes in the classification driver: one player per class (K = classes + 1)
against the merged two-player run and the naive sum, and each class's UA reported on its own."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from munba_kernels import MUNBaOptimizer
from munba_kernels.drivers import classify, unlearning
from munba_kernels.drivers.data import load_dataset
from munba_kernels.drivers.models import build_model

CLASSES = (3, 5, 7)


@pytest.fixture(scope="module")
def split():
    cfg = classify.Config(
        dataset="digits", model="narrow_resnet", train_size=300, test_size=100, scenario="class",
        forget_classes=list(CLASSES),
    )  # fmt: skip
    return classify.prepare_data(cfg, load_dataset("digits"), seed=0)


@pytest.fixture(scope="module")
def original():
    torch.manual_seed(0)
    return build_model("narrow_resnet", 1, 10).eval()


def _unlearn(method, model, forget, retain, groups=(), epochs=1, batch_size=64):
    return unlearning.unlearn(
        method, model, forget, retain, num_classes=10, lr=0.05, batch_size=batch_size, seed=4,
        recipe=unlearning.Recipe(epochs=epochs), progress=False, forget_groups=groups,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["MUNBa", "MUNBa-GA"])
def test_one_per_class_step_is_the_k_player_bargain_of_the_classes_own_losses(method, split, original):
    """One step (retain fits one batch), against the same step built by hand: one forward of
    the forget batch, each class's samples (with the merged run's random labels) one player."""
    retain = unlearning.Subset(split.retain.x[:60], split.retain.y[:60])
    run = _unlearn(method, copy.deepcopy(original), split.forget, retain, CLASSES)

    gen, label_gen = torch.Generator().manual_seed(4), torch.Generator().manual_seed(5)
    ((r_idx, f_idx),) = unlearning._paired_batches(len(retain), len(split.forget), 64, 1, gen, "cpu", True)
    x, true_y = split.forget.x[f_idx], split.forget.y[f_idx]
    y = unlearning.random_labels(true_y, 10, label_gen) if method == "MUNBa" else true_y
    sign = 1.0 if method == "MUNBa" else -1.0
    model = copy.deepcopy(original).train()
    names = (*(f"forget_{c}" for c in CLASSES), "preserve")
    opt = MUNBaOptimizer(model.parameters(), 0.05, base="sgd", momentum=0.9, weight_decay=5e-4,
                         max_grad_norm=1.0, players=names, backend="torch")  # fmt: skip
    logits = model(x)
    for c, name in zip(CLASSES, names):
        own = true_y == c
        assert own.any(), "the test needs every class in the batch"
        (sign * F.cross_entropy(logits[own], y[own])).backward(retain_graph=True)
        opt.capture(name)
    F.cross_entropy(model(retain.x[r_idx]), retain.y[r_idx]).backward()
    opt.step()

    assert run.settings["players"] == list(names) and len(run.bargain_log) == 1
    assert run.bargain_log[0][: len(names)] == pytest.approx(opt.last_bargain.alpha.tolist(), rel=1e-5)
    for (name, a), b in zip(run.model.state_dict().items(), model.eval().state_dict().values()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6, msg=name)


def test_a_class_missing_from_a_batch_drops_out_of_that_step(split, original):
    """Small forget batches cannot hold every class: an absent class gets α = 0 that step, the
    present ones bargain (α > 0)."""
    retain = unlearning.Subset(split.retain.x[:64], split.retain.y[:64])
    run = _unlearn("MUNBa", copy.deepcopy(original), split.forget, retain, CLASSES, batch_size=2)
    gen = torch.Generator().manual_seed(4)
    plan = list(unlearning._paired_batches(len(retain), len(split.forget), 2, 1, gen, "cpu", True))
    present = torch.stack([torch.isin(torch.tensor(CLASSES), split.forget.y[f]) for _, f in plan])
    alphas = torch.tensor([row[:3] for row in run.bargain_log])
    assert (~present).any() and present.any(), "the test needs steps with absent classes"
    assert (alphas[~present] == 0).all() and (alphas[present] > 0).all()
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_per_class_sees_the_merged_runs_batches(split, original):
    merged = _unlearn("MUNBa", copy.deepcopy(original), split.forget, split.retain)
    per_class = _unlearn("MUNBa", copy.deepcopy(original), split.forget, split.retain, CLASSES)
    assert per_class.plan_digest == merged.plan_digest
    shared = ("optimizer", "base", "lr", "momentum", "weight_decay", "max_grad_norm", "epochs", "steps")
    assert {k: per_class.settings[k] for k in shared} == {k: merged.settings[k] for k in shared}
    assert merged.settings["players"] == ["forget", "preserve"]
    assert per_class.settings["bargaining_power"] == [1.0] * 4


@pytest.mark.parametrize(
    "method, groups, message",
    [("Naive", CLASSES, "MUNBa method"), ("MUNBa", (3,), "two or more"), ("MUNBa", (3, 3), "distinct"),
     ("MUNBa", (3, 5), "belong to one of")],
)  # fmt: skip
def test_bad_forget_groups_are_refused(method, groups, message, split, original):
    with pytest.raises(ValueError, match=message):
        _unlearn(method, copy.deepcopy(original), split.forget, split.retain, groups)


@pytest.mark.parametrize(
    "argv",
    [
        ["--players", "per-class"],  # random scenario
        ["--scenario", "class", "--forget-classes", "3", "--players", "per-class"],
        ["--scenario", "class", "--forget-classes", "3", "5", "--players", "per-class", "--methods", "Naive"],
        ["--scenario", "class", "--forget-classes", "3", "3"],
        ["--players", "all"],
    ],
)
def test_cli_refuses_per_class_players_where_they_cannot_run(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        classify.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "--players" in err or "--forget-classes" in err


def test_cli_per_class_end_to_end_reports_each_classs_ua(tmp_path):
    argv = ["--dataset", "digits", "--scenario", "class", "--forget-classes", "3", "5", "--players", "per-class",
            "--methods", "Naive,MUNBa", "--quick", "--no-progress", "--no-relearn",
            "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    classify.main(argv)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = saved["methods"]
    assert list(rows) == ["Retrain", "Original", "Naive", "MUNBa", "MUNBa per-class"]
    assert rows["MUNBa per-class"]["settings"]["players"] == ["forget_3", "forget_5", "preserve"]
    assert len(rows["MUNBa per-class"]["mean_alpha"]) == 3 and len(rows["MUNBa"]["mean_alpha"]) == 2
    assert rows["MUNBa per-class"]["plan_digest"] == rows["MUNBa"]["plan_digest"] == rows["Naive"]["plan_digest"]
    for name, row in rows.items():
        per_class = [row["UA[3]"], row["UA[5]"]]
        assert row["UA spread"] == pytest.approx(max(per_class) - min(per_class)), name
        # UA over the forget set is the classes' UAs weighted by their sizes: between them
        assert min(per_class) - 1e-9 <= row["UA"] <= max(per_class) + 1e-9, name
    assert rows["Retrain"]["UA[3]"] == rows["Retrain"]["UA[5]"] == 100.0  # never saw those labels
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| UA | UA[3] | UA[5] | UA spread | RA |" in table and "| MUNBa per-class |" in table
