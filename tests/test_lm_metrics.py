"""Language-model metrics against independent references: scipy's KS test and harmonic mean,
rouge-score and a hand-counted LCS, hand-computed truth ratios, min-k% and AUCs, the model's own
loss, and a step-by-step greedy decode."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("rouge_score")
pytest.importorskip("scipy")

from lmtiny import one_thread  # noqa: E402, F401

from munba_kernels.drivers import lm_data, lm_models  # noqa: E402
from munba_kernels.evaluation import lm_metrics as M  # noqa: E402
from munba_kernels.integrations import lm  # noqa: E402


def test_truth_ratio_by_hand():
    para = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))  # P^(1/2) = 0.5
    wrong = [torch.log(torch.tensor([0.1], dtype=torch.float64)), torch.log(torch.tensor([0.03, 0.09, 0.27]))]
    # P^(1/|a|): 0.1 and (0.03·0.09·0.27)^(1/3) = 0.09; mean 0.095; / 0.5
    assert M.truth_ratio(para, wrong) == pytest.approx(0.19)
    assert M.normalised_probability(wrong[1]) == pytest.approx(0.09, rel=1e-6)
    assert M.truth_ratio_utility([0.19, 1.5, 1.0]) == pytest.approx((0.81 + 0 + 0) / 3)
    assert M.truth_ratio_closeness([0.5, 2.0, 1.0]) == pytest.approx(2.0 / 3)


def test_forget_quality_is_scipys_two_sample_ks_p_value():
    from scipy.stats import ks_2samp

    a, b = [0.1, 0.4, 0.35, 0.8, 0.9], [0.2, 0.25, 0.3, 0.5, 0.55, 0.6]
    assert M.forget_quality(a, b) == pytest.approx(ks_2samp(a, b).pvalue)
    assert M.forget_quality(a, a) == pytest.approx(1.0)
    assert M.forget_quality([0.1] * 10, [0.9] * 10) < 1e-4


def test_rouge_l_recall_is_rouge_scores_and_counts_the_lcs():
    from rouge_score import rouge_scorer

    ref, pred = "the cat sat on the mat", "the cat lay on a mat"
    assert M.rouge_l_recall([pred], [ref]) == [pytest.approx(4 / 6)]  # LCS: the cat on mat
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert M.rouge_l_recall([pred, ref], [ref, pred]) == [
        pytest.approx(scorer.score(ref, pred)["rougeL"].recall),
        pytest.approx(scorer.score(pred, ref)["rougeL"].recall),
    ]


def test_model_utility_is_the_harmonic_mean_and_zero_with_a_zero_term():
    from scipy.stats import hmean

    assert M.model_utility([0.5, 1.0]) == pytest.approx(2 / (1 / 0.5 + 1))
    assert M.model_utility([0.2, 0.7, 0.9]) == pytest.approx(hmean([0.2, 0.7, 0.9]))
    assert M.model_utility([0.0, 0.9]) == 0.0


def test_min_k_and_auc_by_hand():
    t = torch.tensor([-1.0, -5.0, -2.0, -0.5, -3.0])
    assert M.min_k_score(t, 0.4) == pytest.approx(-4.0)  # ceil(0.4·5) = 2 lowest: −5, −3
    assert M.min_k_score(t, 0.01) == pytest.approx(-5.0)
    assert M.mia_auc([3, 4], [1, 2]) == 1.0
    assert M.mia_auc([1, 3], [2]) == 0.5  # one of two member/non-member pairs ordered right
    assert M.mia_auc([1], [2]) == 0.0


@pytest.fixture(scope="module")
def tiny():
    corpus = lm_data.generate(0, n_people=3, facts_per_person=3, n_countries=1)
    tok = lm_models.build_tokenizer(corpus.texts())
    model = lm_models.tiny_llama(len(tok), lm_models.ModelSize(32, 2, 4, 64), seed=0).eval()
    return corpus, tok, model


def test_answer_logprobs_add_up_to_the_models_own_loss(tiny):
    corpus, tok, model = tiny
    qa = corpus.retain[0]
    lps = M.answer_token_logprobs(model, tok, [qa.question], [qa.answer])[0]
    ex = lm.pad_batch([lm.qa_example(tok, qa.question, qa.answer, eos=False)])
    with torch.no_grad():
        loss = model(**ex).loss  # mean NLL over the answer tokens
    assert lps.numel() == len(tok(" " + qa.answer, add_special_tokens=False)["input_ids"])
    assert (-lps.sum() / lps.numel()).item() == pytest.approx(loss.item(), rel=1e-5)


def test_greedy_answers_match_a_step_by_step_argmax_decode(tiny):
    corpus, tok, model = tiny
    questions = [qa.question for qa in corpus.retain[:3]]
    got = M.greedy_answers(model, tok, questions, max_new_tokens=5)
    for q, text in zip(questions, got):
        ids = tok(q, return_tensors="pt")["input_ids"]
        out = []
        with torch.no_grad():
            for _ in range(5):
                nxt = int(model(input_ids=ids).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                out.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        assert text == tok.decode(out, skip_special_tokens=True).strip()


def test_generated_corpus_is_deterministic_and_well_formed():
    a, b, c = lm_data.generate(3), lm_data.generate(3), lm_data.generate(4)
    assert a == b and a.forget != c.forget
    assert len(a.forget) == 2 * 10 and len(a.holdout) == len(a.forget) and len(a.retain) == 18 * 10
    subjects = [{qa.subject for qa in s} for s in (a.forget, a.retain, a.holdout)]
    assert (
        not (subjects[0] & subjects[1])
        and not (subjects[0] & subjects[2])
        and not (subjects[1] & subjects[2])
    )
    for qa in a.forget + a.general:
        assert (
            qa.paraphrase != qa.answer and len(set(qa.perturbed)) == 3 and qa.paraphrase not in qa.perturbed
        )
    tok = lm_models.build_tokenizer(a.texts())
    assert tok.unk_token_id not in tok(" ".join(a.texts()))["input_ids"]  # the tokenizer covers the corpus


def test_jsonl_loading_and_its_errors(tmp_path):
    good = tmp_path / "f.jsonl"
    good.write_text(
        '{"question": "Q1?", "answer": "A1", "paraphrased_answer": "P1", "perturbed_answers": ["W1", "W2"]}\n\n'
        '{"question": "Q2?", "answer": "A2"}\n'
    )
    rows = lm_data.load_jsonl(good, "--forget-file")
    assert rows[0] == lm_data.QA("Q1?", "A1", "P1", ("W1", "W2")) and rows[1].perturbed == ()
    for text, message in [
        ("", "holds no question/answer pairs"),
        ('{"question": "Q"}\n', "line 1: expected"),
        ('{"question": "Q", "answer": "A"}\nnot json\n', "line 2: not JSON"),
        ('{"question": "Q", "answer": "A", "perturbed_answers": [1]}\n', "list of strings"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(lm_data.DataError, match=message):
            lm_data.load_jsonl(bad, "--forget-file")
    with pytest.raises(lm_data.DataError, match="no such file"):
        lm_data.load_jsonl(tmp_path / "missing.jsonl", "--retain-file")
