"""Causal-LM unlearning losses, normalised over a whole gradient-accumulation window.

A batch is a causal-LM example batch (``input_ids``, ``attention_mask``, ``labels`` with -100 on
positions that are not scored; a model shifts them by one).  Losses are *sums* over this
micro-batch divided by the totals of the whole accumulation window (:class:`Window`), so
accumulating ``k`` micro-batches gives the gradient of one batch holding the same examples.

Forget losses (the forget player):
    ``"ga"``  gradient ascent: −(token-mean NLL)
    ``"npo"`` negative preference optimisation: (2/β)·mean over sequences of
              log(1 + (π_θ(y|x)/π_ref(y|x))^β) = −(2/β)·log σ(β·(nll_θ − nll_ref)),
              nll = summed token NLL of a sequence (needs a frozen reference model)
Preserve losses (the preserve player):
    ``"nll"`` token-mean NLL on retain data
    ``"kl"``  token-mean KL(π_ref ‖ π_θ) of the next-token distributions on retain data
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FORGET_LOSSES = ("ga", "npo")
PRESERVE_LOSSES = ("nll", "kl")
IGNORE_INDEX = -100


def check_loss_names(forget_loss: str, preserve_loss: str) -> None:
    if forget_loss not in FORGET_LOSSES:
        raise ValueError(f"forget_loss must be one of {FORGET_LOSSES}, got {forget_loss!r}")
    if preserve_loss not in PRESERVE_LOSSES:
        raise ValueError(f"preserve_loss must be one of {PRESERVE_LOSSES}, got {preserve_loss!r}")


def needs_reference(forget_loss: str, preserve_loss: str) -> bool:
    return forget_loss == "npo" or preserve_loss == "kl"


def _scored(labels: Tensor) -> Tensor:
    """Mask of the positions whose next token is scored (labels shifted by one, as HF models do)."""
    return labels[:, 1:] != IGNORE_INDEX


@dataclass(frozen=True)
class Window:
    """Scored tokens and sequences of each player over one accumulation window (the divisors)."""

    forget_tokens: int
    forget_sequences: int
    retain_tokens: int
    retain_sequences: int

    @classmethod
    def of(cls, pairs: Iterable[Mapping[str, Mapping[str, Tensor]]]) -> Window:
        """The totals over micro-batches shaped ``{"forget": batch, "retain": batch}``."""
        ft = fs = rt = rs = 0
        for pair in pairs:
            f, r = _scored(pair["forget"]["labels"]), _scored(pair["retain"]["labels"])
            ft, fs = ft + int(f.sum()), fs + f.shape[0]
            rt, rs = rt + int(r.sum()), rs + r.shape[0]
        return cls(ft, fs, rt, rs)

    def scaled(self, factor: int) -> Window:
        """Divisors for ``factor`` data-parallel ranks whose gradients are averaged (DDP)."""
        return Window(
            *(
                max(1, v) / factor
                for v in (
                    self.forget_tokens,
                    self.forget_sequences,
                    self.retain_tokens,
                    self.retain_sequences,
                )
            )
        )


def _logits(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return out.logits if hasattr(out, "logits") else out[0]


def token_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-position NLL of the next token, float32, 0 where not scored: ``[B, T-1]``."""
    shifted = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), shifted.clamp_min(0), reduction="none")
    return nll * (shifted != IGNORE_INDEX)


def sequence_nll(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Summed token NLL of each sequence's scored positions: ``[B]``."""
    return token_nll(_logits(model, batch), batch["labels"]).sum(1)


def forget_loss(
    kind: str,
    model: nn.Module,
    batch: Mapping[str, Tensor],
    window: Window | None = None,
    *,
    ref_model: nn.Module | None = None,
    beta: float = 0.1,
) -> Tensor:
    """The forget player's loss on ``batch`` (this micro-batch's share of the window's loss)."""
    window = window or Window.of([{"forget": batch, "retain": batch}])
    if kind == "ga":
        return -token_nll(_logits(model, batch), batch["labels"]).sum() / max(window.forget_tokens, 1)
    if kind == "npo":
        if ref_model is None:
            raise ValueError("forget_loss 'npo' needs a reference model (ref_model)")
        nll = sequence_nll(model, batch)
        with torch.no_grad():
            ref = sequence_nll(ref_model, batch)
        return (-2.0 / beta) * F.logsigmoid(beta * (nll - ref)).sum() / max(window.forget_sequences, 1)
    raise ValueError(f"forget_loss must be one of {FORGET_LOSSES}, got {kind!r}")


def preserve_loss(
    kind: str,
    model: nn.Module,
    batch: Mapping[str, Tensor],
    window: Window | None = None,
    *,
    ref_model: nn.Module | None = None,
) -> Tensor:
    """The preserve player's loss on ``batch`` (this micro-batch's share of the window's loss)."""
    window = window or Window.of([{"forget": batch, "retain": batch}])
    if kind == "nll":
        return token_nll(_logits(model, batch), batch["labels"]).sum() / max(window.retain_tokens, 1)
    if kind == "kl":
        if ref_model is None:
            raise ValueError("preserve_loss 'kl' needs a reference model (ref_model)")
        logp = F.log_softmax(_logits(model, batch)[:, :-1].float(), -1)
        with torch.no_grad():
            ref = F.log_softmax(_logits(ref_model, batch)[:, :-1].float(), -1)
        kl = (ref.exp() * (ref - logp)).sum(-1) * _scored(batch["labels"])
        return kl.sum() / max(window.retain_tokens, 1)
    raise ValueError(f"preserve_loss must be one of {PRESERVE_LOSSES}, got {kind!r}")


# ----------------------------------------------------------------- QA examples
def qa_example(
    tokenizer, question: str, answer: str, max_length: int = 128, *, eos: bool = True
) -> dict[str, list[int]]:
    """One causal-LM example from a question/answer pair: ``question answer`` (with an end-of-sequence
    token unless ``eos=False``), labels on the answer tokens only (the field's convention: only the
    answer is scored).

    The prompt is tokenised on its own so the boundary does not depend on the tokenizer merging
    across it; ``tokenizer`` is any Hugging Face tokenizer (``PreTrainedTokenizerBase``).
    """
    prompt = tokenizer(question, add_special_tokens=True)["input_ids"]
    reply = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    end = [tokenizer.eos_token_id] if eos and tokenizer.eos_token_id is not None else []
    ids = (prompt + reply + end)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + reply + end)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def pad_batch(examples: list[Mapping], pad_token_id: int = 0) -> dict[str, Tensor]:
    """Right-pad causal-LM examples into tensors (labels -100 and attention 0 on padding).

    A missing ``attention_mask`` is all ones, missing ``labels`` are the ``input_ids``."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    ids = [list(_as_list(e["input_ids"])) for e in examples]
    masks = [list(_as_list(e.get("attention_mask", [1] * len(i)))) for e, i in zip(examples, ids)]
    labels = [list(_as_list(e.get("labels", i))) for e, i in zip(examples, ids)]
    width = max(len(i) for i in ids)
    out = {
        "input_ids": torch.tensor([i + [pad_token_id] * (width - len(i)) for i in ids]),
        "attention_mask": torch.tensor([m + [0] * (width - len(m)) for m in masks]),
        "labels": torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for lab in labels]),
    }
    return out


def _as_list(x):
    return x.tolist() if isinstance(x, Tensor) else x
