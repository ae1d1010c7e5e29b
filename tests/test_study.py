"""The study runner: paired statistics against a hand computation, and --quick end to end."""

import json
import math

import pytest

pytest.importorskip("scipy")

from munba_kernels.drivers import classify, study  # noqa: E402


def test_paired_comparison_by_hand():
    munba, naive = [1.0, 2.0, 4.0], [2.0, 2.5, 3.0]
    p = study.paired(munba, naive)
    d = [-1.0, -0.5, 1.0]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    assert p["diff"] == d and p["wins"] == 2 and p["n"] == 3
    assert p["mean"] == pytest.approx(mean) and p["std"] == pytest.approx(sd)
    from scipy.stats import t as student_t

    t_stat = mean / (sd / math.sqrt(3))
    assert p["p"] == pytest.approx(2 * student_t.sf(abs(t_stat), df=2))
    assert study.paired([1.0, 1.0], [1.0, 1.0])["p"] is None  # no variation: no test


def test_power_cells_take_their_baselines_at_equal_power():
    cell = study.Cell("power 2", "power", epochs=5, clip=None, power=2.0)
    base = cell.baseline_cell()
    assert (base.epochs, base.clip, base.power) == (5, None, 1.0)
    assert cell.methods() == study.MUNBA_VARIANTS and study.PAPER.baseline_cell() is study.PAPER
    key = study.Records.key("random", 0, "Naive", cell)
    assert key == study.Records.key("random", 0, "Naive", base)  # a sum has no power
    assert study.Records.key("random", 0, "MUNBa", cell) != study.Records.key("random", 0, "MUNBa", base)


def test_quick_study_end_to_end_and_resume(tmp_path, monkeypatch):
    argv = ["--driver", "classify", "--quick", "--out", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "c")]
    report = study.main(argv)
    records = [json.loads(line) for line in (tmp_path / "s" / "records.jsonl").read_text().splitlines()]
    # random: paper and 2 epochs (5 rows each) + power 2 (2 rows), 2 seeds; hard: paper, 2 seeds;
    # the candidate on hard, seed 2 (a power cell also needs its equal-power baselines)
    confirmed_rows = 0
    if report["confirmation"]["won_selection"]:
        confirmed_rows = 7 if report["candidate"]["cell"] == "power 2" else 5
    assert len(records) == 2 * 12 + 2 * 5 + confirmed_rows
    assert len({r["key"] for r in records}) == len(records)
    for r in records:
        assert r["settings"]["epochs"] == r["epochs"] in (1, 2) and r["settings"]["max_grad_norm"] == 1.0
        assert r["settings"]["steps"] == r["epochs"] * records[0]["settings"]["steps"] // records[0]["epochs"]
    # The summary's comparison is the per-seed difference of the recorded test gaps.
    by = {(r["scenario"], r["seed"], r["row"], r["epochs"], r["power"]): r["avg_gap"] for r in records}
    for cell, epochs, power in (("paper", 1, 1.0), ("2 epochs", 2, 1.0), ("power 2", 1, 2.0)):
        pair = report["summary"]["random"][cell]["pairs"]["MUNBa vs Naive"]
        expected = [by[("random", s, "MUNBa", epochs, power)] - by[("random", s, "Naive", epochs, 1.0)] for s in (0, 1)]
        assert pair["diff"] == pytest.approx(expected), cell
    assert set(report["summary"]["hard"]) == {"paper"}
    assert report["confirmation"]["complete"] and set(report["confirmation"]["scenarios"]) == {"hard"}
    md = (tmp_path / "s" / "study.md").read_text()
    assert "## random" in md and "## hard" in md and "Verdict:" in md and "Command: `" in md
    assert (tmp_path / "s" / "study.png").stat().st_size > 0

    def no_runs(*a, **k):
        raise AssertionError("a resumed study must not rerun recorded cells")

    monkeypatch.setattr(classify, "run_method", no_runs)
    again = study.main(argv)
    assert again["summary"] == report["summary"]


def test_quick_diffusion_study_end_to_end(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "d"
    report = study.main(["--driver", "diffusion", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "c")])
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    # per seed: Naive and MUNBa at 4 steps (2 from a snapshot of the same runs), MUNBa at power 2
    assert sorted((r["seed"], r["row"], r["cell"]) for r in records) == sorted(
        (s, m, c) for s in (0, 1) for m, c in
        [("Naive", "4 steps"), ("Naive", "2 steps"), ("MUNBa", "4 steps"), ("MUNBa", "2 steps"), ("MUNBa", "power 2")]
    )  # fmt: skip
    by = {(r["seed"], r["row"], r["cell"]): r for r in records}
    assert by[(0, "MUNBa", "2 steps")]["settings"]["steps"] == 2 and by[(0, "MUNBa", "power 2")]["settings"]["power_ratio"] == 2.0
    acc = report["summary"]["power 2"]["pairs"]["retain_accuracy"]
    expected = [by[(s, "MUNBa", "power 2")]["retain_accuracy"] - by[(s, "Naive", "4 steps")]["retain_accuracy"] for s in (0, 1)]
    assert acc["diff"] == pytest.approx(expected)
    assert "| power 2 |" in (out / "study.md").read_text() and (out / "study.png").stat().st_size > 0


def test_driver_results_stand_in_for_the_paper_cell_only_when_configured_alike(tmp_path):
    plan = study.Plan()
    records = study.Records(tmp_path / "records.jsonl")
    row = {"UA": 1.0, "RA": 2.0, "TA": 3.0, "MIA": 4.0, "avg_gap": 5.0, "val_gap": 6.0, "lr": 0.01,
           "settings": {"epochs": 2}}  # fmt: skip
    cfg = {**classify.asdict(classify.Config()), "scenario": "class", "seeds": 2, "model": "narrow_resnet"}
    saved = {"config": cfg, "methods": {m: {"per_seed": [row, {**row, "avg_gap": 7.0}]} for m in ("Naive", "MUNBa")}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(saved))
    study.import_driver_results(plan, records, path, log=lambda *_: None)
    assert records.get("class", 1, "MUNBa", study.PAPER)["avg_gap"] == 7.0
    assert records.get("class", 0, "Naive", study.PAPER)["imported"] == str(path)
    assert records.get("class", 0, "MUNBa", study.CELLS[2]) is None  # only the paper cell
    assert len(study.Records(tmp_path / "records.jsonl").rows) == 4  # persisted
    path.write_text(json.dumps({**saved, "config": {**cfg, "epochs": 5, "train_size": 600}}))
    with pytest.raises(ValueError, match="train_size"):
        study.import_driver_results(plan, records, path)


@pytest.mark.parametrize(
    "argv, option",
    [(["--seeds", "0"], "--seeds"), (["--confirm-seeds", "-1"], "--confirm-seeds"),
     (["--dataset", "mnist"], "--dataset"), (["--scenarios", "sideways"], "--scenarios")],
)  # fmt: skip
def test_bad_option_values_are_one_line_errors(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        study.parse_args(["--out", "unused", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert option in err.strip().splitlines()[-1]
