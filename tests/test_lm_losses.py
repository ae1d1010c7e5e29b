"""Causal-LM unlearning losses against independent references (the model's own loss, hand-computed
NPO and KL with torch.distributions) and window normalisation (micro-batches add up to one batch)."""

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from lmtiny import examples, one_thread, tiny_llama  # noqa: E402, F401

from munba_kernels.integrations import lm  # noqa: E402


@pytest.fixture(scope="module")
def models():
    return tiny_llama(0).eval(), tiny_llama(1).eval()


def _batch(n=4, seed=1):
    return lm.pad_batch(examples(n, seed))


def test_nll_is_the_models_own_token_mean_loss_and_ga_its_negative(models):
    model, _ = models
    batch = _batch()
    reference = model(**batch).loss  # transformers' shifted cross-entropy, mean over scored tokens
    torch.testing.assert_close(lm.preserve_loss("nll", model, batch), reference)
    torch.testing.assert_close(lm.forget_loss("ga", model, batch), -reference)


def test_npo_matches_a_hand_computation_of_the_sequence_likelihood_ratio(models):
    model, ref = models
    batch, beta = _batch(), 0.1
    with torch.no_grad():
        got = lm.forget_loss("npo", model, batch, ref_model=ref, beta=beta)

        def log_prob(m):  # log π(y|x): gather the answer tokens' log-probabilities one by one
            logp = F.log_softmax(m(**batch).logits.double(), -1)
            total = []
            for b in range(batch["input_ids"].shape[0]):
                s = 0.0
                for t in range(1, batch["labels"].shape[1]):
                    y = int(batch["labels"][b, t])
                    if y != -100:
                        s += float(logp[b, t - 1, y])
                total.append(s)
            return total

        lp, lr = log_prob(model), log_prob(ref)
    expected = sum((2 / beta) * math.log1p(math.exp(beta * (a - b))) for a, b in zip(lp, lr)) / len(lp)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # at the reference itself NPO is (2/β)·log 2
    assert lm.forget_loss("npo", ref, batch, ref_model=ref, beta=beta).item() == pytest.approx(
        2 / beta * math.log(2), rel=1e-6
    )


def test_kl_matches_torch_distributions_on_scored_positions(models):
    model, ref = models
    batch = _batch()
    with torch.no_grad():
        got = lm.preserve_loss("kl", model, batch, ref_model=ref)
        p = torch.distributions.Categorical(logits=ref(**batch).logits[:, :-1].double())
        q = torch.distributions.Categorical(logits=model(**batch).logits[:, :-1].double())
        kl = torch.distributions.kl_divergence(p, q)
    mask = batch["labels"][:, 1:] != -100
    assert got.item() == pytest.approx((kl * mask).sum().item() / mask.sum().item(), rel=1e-5)
    assert lm.preserve_loss("kl", ref, batch, ref_model=ref).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("forget,preserve", [("ga", "nll"), ("npo", "kl")])
def test_micro_batch_shares_add_up_to_the_whole_batch(models, forget, preserve):
    model, ref = models
    exs_f, exs_r = examples(6, 3), examples(6, 4)
    whole = {"forget": lm.pad_batch(exs_f), "retain": lm.pad_batch(exs_r)}
    parts = [
        {"forget": lm.pad_batch(exs_f[i : i + 2]), "retain": lm.pad_batch(exs_r[i : i + 2])}
        for i in (0, 2, 4)
    ]
    window = lm.Window.of(parts)
    assert window == lm.Window.of([whole])
    with torch.no_grad():
        f = sum(lm.forget_loss(forget, model, p["forget"], window, ref_model=ref) for p in parts)
        r = sum(lm.preserve_loss(preserve, model, p["retain"], window, ref_model=ref) for p in parts)
        torch.testing.assert_close(
            f, lm.forget_loss(forget, model, whole["forget"], ref_model=ref), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            r, lm.preserve_loss(preserve, model, whole["retain"], ref_model=ref), rtol=1e-5, atol=1e-6
        )


def test_bad_names_and_missing_reference_are_clear_errors(models):
    model, _ = models
    with pytest.raises(ValueError, match="forget_loss must be one of"):
        lm.check_loss_names("rmu", "nll")
    with pytest.raises(ValueError, match="preserve_loss must be one of"):
        lm.check_loss_names("ga", "dpo")
    with pytest.raises(ValueError, match="reference model"):
        lm.forget_loss("npo", model, _batch())
    with pytest.raises(ValueError, match="empty"):
        lm.pad_batch([])


def test_qa_example_scores_only_the_answer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", "who", "is", "ann", "?", "a", "poet"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    ex = lm.qa_example(hf, "who is ann ?", "a poet")
    assert ex["input_ids"] == [3, 4, 5, 6, 7, 8, 1]
    assert ex["labels"] == [-100, -100, -100, -100, 7, 8, 1]
    assert lm.qa_example(hf, "who is ann ?", "a poet", max_length=5)["labels"] == [-100] * 4 + [7]
