"""Language-model unlearning metrics with the field's definitions (TOFU / open-unlearning).

* answer probability: ``P(a|q)^(1/|a|)``, the length-normalised probability of the answer tokens;
* truth ratio per question: ``R = mean_j P(â_j|q)^(1/|â_j|) / P(ã|q)^(1/|ã|)`` (perturbed wrong answers
  â_j against the paraphrased answer ã); as a utility term ``max(0, 1 − R)`` (a model that prefers the
  truth scores near 1), on the forget set ``min(R, 1/R)``;
* forget quality: the two-sample Kolmogorov–Smirnov test's p-value between the unlearned and the
  retain model's truth-ratio distributions on the forget set (``scipy.stats.ks_2samp``);
* ROUGE-L recall of the greedy answer against the true one (``rouge_score``);
* model utility: the harmonic mean of the utility terms (``scipy.stats.hmean``; 0 if any term is 0);
* min-k% membership inference: the mean of the lowest k% answer-token log-probabilities, and the
  ROC AUC of telling members (forget) from non-members (holdout) by it (``sklearn``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from munba_kernels.integrations import lm


@torch.no_grad()
def answer_token_logprobs(model, tokenizer, questions: Sequence[str], answers: Sequence[str], *,
                          device="cpu", batch_size: int = 64, max_length: int = 128) -> list[torch.Tensor]:  # fmt: skip
    """The log-probability of each answer token given the question (no end token), per pair."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    model.eval()
    out = []
    for i in range(0, len(questions), batch_size):
        items = [
            lm.qa_example(tokenizer, q, a, max_length, eos=False)
            for q, a in zip(questions[i : i + batch_size], answers[i : i + batch_size])
        ]
        batch = {k: v.to(device) for k, v in lm.pad_batch(items, tokenizer.pad_token_id or 0).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = lm.token_nll(logits, batch["labels"])
        scored = batch["labels"][:, 1:] != lm.IGNORE_INDEX
        out += [(-nll[b][scored[b]]).double().cpu() for b in range(len(items))]
    return out


def normalised_probability(token_logprobs: torch.Tensor) -> float:
    """``P(a|q)^(1/|a|)`` = exp(mean token log-probability)."""
    return math.exp(token_logprobs.mean().item()) if token_logprobs.numel() else 0.0


def truth_ratio(paraphrased: torch.Tensor, perturbed: Sequence[torch.Tensor]) -> float:
    """``mean_j P(â_j)^(1/|â_j|) / P(ã)^(1/|ã|)`` from the answers' token log-probabilities."""
    wrong = sum(normalised_probability(t) for t in perturbed) / len(perturbed)
    return wrong / normalised_probability(paraphrased)


def truth_ratio_utility(ratios: Sequence[float]) -> float:
    """Mean of ``max(0, 1 − R)``: 1 when the truth is always much likelier than the perturbations."""
    return sum(max(0.0, 1.0 - r) for r in ratios) / len(ratios)


def truth_ratio_closeness(ratios: Sequence[float]) -> float:
    """Mean of ``min(R, 1/R)``: the forget-set form (1 = no preference between truth and perturbation)."""
    return sum(min(r, 1.0 / r) for r in ratios) / len(ratios)


def forget_quality(unlearned_ratios: Sequence[float], retain_ratios: Sequence[float]) -> float:
    """KS-test p-value between the two truth-ratio distributions (high = indistinguishable)."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(list(unlearned_ratios), list(retain_ratios)).pvalue)


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(ref, pred)["rougeL"].recall for pred, ref in zip(predictions, references)]


def model_utility(terms: Sequence[float]) -> float:
    """Harmonic mean of the utility terms (0 when any is 0, as the harmonic mean's limit)."""
    from scipy.stats import hmean

    terms = list(terms)
    return 0.0 if min(terms) <= 0 else float(hmean(terms))


def min_k_score(token_logprobs: torch.Tensor, k: float = 0.4) -> float:
    """Mean of the lowest ``ceil(k·n)`` token log-probabilities (Min-K% Prob)."""
    n = max(1, math.ceil(k * token_logprobs.numel()))
    return token_logprobs.sort().values[:n].mean().item()


def mia_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of telling members (higher scores) from non-members; 0.5 = no leak."""
    from sklearn.metrics import roc_auc_score

    labels = [1] * len(member_scores) + [0] * len(nonmember_scores)
    return float(roc_auc_score(labels, list(member_scores) + list(nonmember_scores)))


@torch.no_grad()
def greedy_answers(model, tokenizer, questions: Sequence[str], *, max_new_tokens: int = 24,
                   device="cpu", batch_size: int = 64) -> list[str]:  # fmt: skip
    """Greedy continuations of the questions (left-padded batches), decoded without special tokens."""
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out = []
    try:
        for i in range(0, len(questions), batch_size):
            enc = tokenizer(list(questions[i : i + batch_size]), return_tensors="pt", padding=True).to(device)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [text.strip() for text in out]
