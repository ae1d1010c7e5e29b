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
    # random: paper (5 rows) + power 2 (2 rows), 2 seeds; hard: paper, 2 seeds; confirm seed 2 on hard
    assert len(records) == 2 * 7 + 2 * 5 + (5 if report["candidate"]["cell"] == "paper" else 7)
    assert len({r["key"] for r in records}) == len(records)
    for r in records:
        assert r["settings"]["epochs"] == 1 and r["settings"]["max_grad_norm"] == 1.0
    # The summary's comparison is the per-seed difference of the recorded test gaps.
    by = {(r["scenario"], r["seed"], r["row"], r["power"]): r["avg_gap"] for r in records}
    pair = report["summary"]["random"]["paper"]["pairs"]["MUNBa vs Naive"]
    assert pair["diff"] == pytest.approx([by[("random", s, "MUNBa", 1.0)] - by[("random", s, "Naive", 1.0)] for s in (0, 1)])
    power = report["summary"]["random"]["power 2"]["pairs"]["MUNBa vs Naive"]
    assert power["diff"] == pytest.approx([by[("random", s, "MUNBa", 2.0)] - by[("random", s, "Naive", 1.0)] for s in (0, 1)])
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
