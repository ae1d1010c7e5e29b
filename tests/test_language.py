"""The language-model driver: --quick end to end (layout, fairness record, plots), the cache, and
one-line errors for bad input before any training."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("rouge_score")

from lmtiny import one_thread  # noqa: E402, F401

from munba_kernels.drivers import language, lm_data, lm_models  # noqa: E402
from munba_kernels.drivers.lm_unlearning import METHODS  # noqa: E402

METRICS = ("forget_quality", "model_utility", "forget_rouge", "forget_truth", "mia_auc", "seconds")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("language")
    argv = [
        "--quick",
        "--no-progress",
        "--threads",
        "1",
        "--out",
        str(tmp / "out"),
        "--cache-dir",
        str(tmp / "cache"),
    ]
    return language.main(argv), tmp


def test_quick_end_to_end_writes_every_method_in_the_drivers_layout(quick_run):
    results, tmp = quick_run
    out = tmp / "out"
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["methods"]) == {"Target", "Retain", *METHODS}
    for name, row in saved["methods"].items():
        for metric in METRICS:
            assert isinstance(row[metric], float), (name, metric)
        assert 0 <= row["forget_quality"] <= 1 and 0 <= row["model_utility"] <= 1 and 0 <= row["mia_auc"] <= 1
    assert saved["methods"]["Retain"]["forget_quality"] == 1.0
    for method in METHODS:
        assert isinstance(saved["methods"][method]["relearn_rouge"], float)
    for name in (
        "metrics.png",
        "tradeoff.png",
        "munba-ga_bargain.png",
        "munba-npo_bargain.png",
        "results.md",
    ):
        assert (out / name).stat().st_size > 0, name
    assert "| MUNBa-NPO |" in (out / "results.md").read_text()
    assert "Trade-off frontier" in (out / "results.md").read_text() and set(saved["frontier"]) == set(METHODS)


def test_every_two_objective_method_ran_with_the_same_settings(quick_run):
    results, _ = quick_run
    settings = {
        m: dict(results["methods"][m]["settings"]) for m in ("GradDiff", "NPO+RT", "MUNBa-GA", "MUNBa-NPO")
    }
    for s in settings.values():
        s.pop("optimizer"), s.pop("combine"), s.pop("forget_loss"), s.pop("npo_beta", None)
        assert s.pop("trainable_parameters") == results["models"][0]["parameters"]
    first = next(iter(settings.values()))
    assert all(s == first for s in settings.values())
    assert first["max_grad_norm"] == 1.0 and first["preserve_loss"] == "nll"
    assert results["methods"]["MUNBa-GA"]["settings"]["optimizer"] == "MUNBaOptimizer"
    assert results["methods"]["GradDiff"]["settings"]["optimizer"] == "AdamW"
    steps = results["config"]["steps"]
    assert [len(t) for t in results["bargain"][0].values()] == [steps, steps]
    for a_f, a_r, cos in results["bargain"][0]["MUNBa-NPO"]:
        assert a_f > 0 and a_r > 0 and -1 <= cos <= 1
    curve = results["curves"][0]["GradDiff"][results["config"]["lrs"][0]]
    assert [p["step"] for p in curve] == [0, steps // 2, steps]


def test_cached_models_are_reused(quick_run, monkeypatch):
    _, tmp = quick_run
    cfg = language.parse_args(["--quick", "--no-progress", "--cache-dir", str(tmp / "cache")])
    monkeypatch.setattr(lm_models, "finetune", _no_training)
    _, target, retain, info = language.prepare_models(cfg, language.load_corpus(cfg, 0), 0)
    assert target is not None and retain is not None and info["target_seconds"] > 0


def _no_training(*a, **k):
    raise AssertionError("a bad option must be reported before any training")


def _exit_message(capsys, call):
    with pytest.raises(SystemExit) as exit_info:
        call()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--lrs", "1e-3,0"], "--lrs"),
        (["--lrs", ","], "--lrs"),
        (["--forget-ratio", "1.5"], "--forget-ratio"),
        (["--people", "2", "--forget-ratio", "0.5"], "--forget-ratio"),
        (["--facts-per-person", "13"], "--facts-per-person"),
        (["--methods", "RMU"], "--methods"),
        (["--forget-file", "f.jsonl"], "--retain-file"),
        (["--pretrained", "some/dir"], "--forget-file"),
        (["--retain-model", "some/dir"], "--retain-model"),
        (["--steps", "0"], "--steps"),
    ],
)
def test_bad_option_values_are_one_line_errors_naming_the_option(argv, option, capsys):
    line = _exit_message(capsys, lambda: language.parse_args(argv))
    assert "error:" in line and option in line


def _main_error(tmp_path, monkeypatch, capsys, extra):
    monkeypatch.setattr(lm_models, "finetune", _no_training)
    argv = ["--quick", "--no-progress", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]
    return _exit_message(capsys, lambda: language.main([*argv, *extra]))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_hub_id_is_a_clear_error(tmp_path, monkeypatch, capsys):
    f = _jsonl(tmp_path / "f.jsonl", [{"question": "Q?", "answer": "A"}])
    line = _main_error(tmp_path, monkeypatch, capsys, ["--pretrained", "meta-llama/Llama-3.2-1B",
                                                       "--forget-file", f, "--retain-file", f])  # fmt: skip
    assert "--pretrained 'meta-llama/Llama-3.2-1B' is not a local Hugging Face model folder" in line
    assert "Nothing is downloaded" in line


def test_empty_or_broken_data_files_are_named(tmp_path, monkeypatch, capsys):
    good = _jsonl(tmp_path / "r.jsonl", [{"question": "Q?", "answer": "A"}])
    (tmp_path / "empty.jsonl").write_text("")
    line = _main_error(tmp_path, monkeypatch, capsys, ["--forget-file", str(tmp_path / "empty.jsonl"),
                                                       "--retain-file", good])  # fmt: skip
    assert "--forget-file" in line and "no question/answer pairs" in line
    (tmp_path / "bad.jsonl").write_text('{"question": "Q?"}\n')
    line = _main_error(tmp_path, monkeypatch, capsys, ["--forget-file", good, "--retain-file",
                                                       str(tmp_path / "bad.jsonl")])  # fmt: skip
    assert "--retain-file" in line and "line 1" in line


def test_unwritable_out_is_found_before_any_work(tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("")
    line = _main_error(tmp_path, monkeypatch, capsys, ["--out", str(tmp_path / "a_file" / "x")])
    assert "--out" in line and "a_file" in line


def test_a_tokenizer_that_does_not_match_the_model_is_a_clear_error(tmp_path, monkeypatch, capsys):
    corpus = lm_data.generate(0, n_people=3, facts_per_person=2, n_countries=1)
    tok = lm_models.build_tokenizer(corpus.texts())
    model = lm_models.tiny_llama(len(tok) - 5, lm_models.ModelSize(16, 1, 2, 32))  # five ids short
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    f = _jsonl(tmp_path / "f.jsonl", [{"question": qa.question, "answer": qa.answer} for qa in corpus.forget])
    line = _main_error(tmp_path, monkeypatch, capsys, ["--pretrained", str(tmp_path / "model"),
                                                       "--forget-file", f, "--retain-file", f])  # fmt: skip
    assert "--pretrained: the tokenizer does not match the model" in line and f"{len(tok)} tokens" in line


def _qa_rows(qas):
    return [
        {"question": qa.question, "answer": qa.answer, "paraphrased_answer": qa.paraphrase,
         "perturbed_answers": list(qa.perturbed)}
        for qa in qas
    ]  # fmt: skip


def test_pretrained_folders_jsonl_files_and_lora(tmp_path):
    """Real use on a tiny local model: --pretrained / --retain-model folders (no training, nothing
    downloaded), JSONL forget/retain/holdout files, LoRA adapters only."""
    corpus = lm_data.generate(1, n_people=4, facts_per_person=2, n_countries=1)
    tok = lm_models.build_tokenizer(corpus.texts())
    for name, seed in (("target", 0), ("retain", 1)):
        model = lm_models.tiny_llama(len(tok), lm_models.ModelSize(16, 1, 2, 32), seed=seed)
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    files = {
        k: _jsonl(tmp_path / f"{k}.jsonl", _qa_rows(getattr(corpus, k)))
        for k in ("forget", "retain", "holdout")
    }
    results = language.main(
        ["--quick", "--no-progress", "--threads", "1", "--out", str(tmp_path / "out"), "--pretrained", str(tmp_path / "target"),
         "--retain-model", str(tmp_path / "retain"), "--forget-file", files["forget"], "--retain-file",
         files["retain"], "--holdout-file", files["holdout"], "--lora", "--methods", "GradDiff,MUNBa-NPO"]
    )  # fmt: skip
    assert set(results["methods"]) == {"Retain", "Target", "GradDiff", "MUNBa-NPO"}
    total = sum(
        p.numel() for p in lm_models.tiny_llama(len(tok), lm_models.ModelSize(16, 1, 2, 32)).parameters()
    )
    for method in ("GradDiff", "MUNBa-NPO"):
        row = results["methods"][method]
        assert 0 < row["settings"]["trainable_parameters"] < total  # adapters only
        assert isinstance(row["forget_quality"], float) and isinstance(row["mia_auc"], float)
    assert not (tmp_path / "out" / "cache").exists()


def test_jsonl_files_without_truth_ratio_answers_still_run(tmp_path):
    """Files with only question/answer: the embedded models are fine-tuned on them; the truth-ratio
    metrics (and so forget quality) are reported as missing, not made up."""
    corpus = lm_data.generate(2, n_people=4, facts_per_person=2, n_countries=1)
    plain = lambda qas: [{"question": qa.question, "answer": qa.answer} for qa in qas]  # noqa: E731
    f, r = (
        _jsonl(tmp_path / "f.jsonl", plain(corpus.forget)),
        _jsonl(tmp_path / "r.jsonl", plain(corpus.retain)),
    )
    results = language.main(["--quick", "--no-progress", "--threads", "1", "--out", str(tmp_path / "out"),
                             "--cache-dir", str(tmp_path / "c"), "--forget-file", f, "--retain-file", r,
                             "--methods", "NPO+RT,MUNBa-NPO", "--relearn-steps", "0"])  # fmt: skip
    row = results["methods"]["MUNBa-NPO"]
    assert row["forget_quality"] is None and row["forget_truth"] is None and "mia_auc" not in row
    assert isinstance(row["model_utility"], float) and isinstance(row["forget_rouge"], float)
    assert "| MUNBa-NPO | – |" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.slow
def test_fsdp2_over_two_ranks_matches_one_process(quick_run, tmp_path):
    """torchrun, 2 gloo ranks sharding the decoder layers: the same numbers as one process."""
    import os
    import subprocess
    import sys

    _, tmp = quick_run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "munba_kernels.drivers.language", "--quick", "--no-progress", "--distributed", "fsdp2",
           "--methods", "GradDiff,MUNBa-NPO", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp / "cache")]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "fsdp2 over 2 ranks" in proc.stdout
    sharded = json.loads((tmp_path / "out" / "results.json").read_text())
    single = json.loads((tmp / "out" / "results.json").read_text())
    for method in ("GradDiff", "MUNBa-NPO"):
        for key in ("forget_prob", "retain_prob", "general_prob", "model_utility", "forget_quality"):
            assert sharded["methods"][method][key] == pytest.approx(
                single["methods"][method][key], rel=1e-4, abs=1e-6
            )


def test_the_selection_rule():
    rows = {
        1e-4: {"forget_quality": 0.01, "model_utility": 0.9},  # best utility but forgets too little
        3e-4: {"forget_quality": 0.3, "model_utility": 0.5},
        1e-3: {"forget_quality": 0.9, "model_utility": 0.2},
    }
    assert language.select(rows) == 3e-4
    rows[3e-4]["forget_quality"] = 0.04
    assert language.select(rows) == 1e-3  # the only one passing the threshold
    rows[1e-3]["forget_quality"] = 0.02
    assert language.select(rows) == 3e-4  # none passes: the highest forget quality
    rows[1e-4]["forget_quality"] = None  # not computable: never preferred
    assert language.select(rows) == 3e-4


def test_the_relearning_attack_fine_tunes_a_copy_towards_the_slice():
    from munba_kernels.drivers.lm_unlearning import relearn
    from munba_kernels.evaluation import lm_metrics as M

    corpus = lm_data.generate(0, n_people=3, facts_per_person=2, n_countries=1)
    tok = lm_models.build_tokenizer(corpus.texts())
    model = lm_models.tiny_llama(len(tok), lm_models.ModelSize(16, 1, 2, 32)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qas = corpus.forget[:2]

    def prob(m):
        lps = M.answer_token_logprobs(m, tok, [q.question for q in qas], [q.answer for q in qas])
        return sum(M.normalised_probability(t) for t in lps)

    attacked = relearn(model, lm_models.examples(tok, qas), steps=10, lr=1e-2, batch_size=8, seed=0)
    assert prob(attacked) > 2 * prob(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched


def test_the_frontier_takes_the_best_utility_at_each_forget_quality():
    point = lambda step, fq, mu: {"step": step, "forget_quality": fq, "model_utility": mu}  # noqa: E731
    seed0 = {"A": {1e-4: [point(0, 0.9, 0.99), point(5, 0.2, 0.6), point(10, 0.6, 0.4)],
                   1e-3: [point(5, 0.7, 0.5), point(10, None, 0.9)]}}  # fmt: skip
    seed1 = {"A": {1e-4: [point(5, 0.04, 0.8)], 1e-3: [point(5, 0.3, 0.3)]}}
    front = language.frontier([seed0, seed1], thresholds=(0.05, 0.5))
    # step 0 (the target) and points without a forget quality never count
    assert front == {"A": {"0.05": [0.6, 0.3], "0.5": [0.5, None]}}
    table = language.frontier_table(front)
    assert "| A | 0.450 ± 0.212 | – (1 seed(s) never reach it) |" in table
