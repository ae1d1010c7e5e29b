"""The language-model driver's tokenizer, tiny Llama, fine-tuning and model cache.

* :func:`build_tokenizer`: a word-level ``tokenizers`` tokenizer built from the corpus itself
  (lower-cased, punctuation split off, ``<bos>`` prepended), wrapped in ``PreTrainedTokenizerFast``.
* :func:`tiny_llama`: a ``LlamaForCausalLM`` from ``LlamaConfig`` (about a million parameters by
  default), randomly initialised.
* :func:`finetune`: AdamW on answer tokens (questions are not scored, as in TOFU), linear warm-up and
  cosine decay, seeded batches.
* :func:`cached_finetune`: the "target" (fine-tuned on everyone) and "retain" (retained people only)
  models, cached under a key holding every setting and a fingerprint of the tokenised training data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from munba_kernels.integrations import lm

from .cache import cache_path, fingerprint, load_entry, save_atomic

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
MAX_LENGTH = 64


def build_tokenizer(texts: Sequence[str]):
    """A word-level tokenizer covering ``texts`` (ids in first-seen order, so deterministic)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    norm = normalizers.Lowercase()
    split = pre_tokenizers.Whitespace()
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for text in texts:
        for word, _ in split.pre_tokenize_str(norm.normalize_str(text)):
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = norm, split
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


@dataclass(frozen=True)
class ModelSize:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384


def tiny_llama(vocab_size: int, size: ModelSize = ModelSize(), seed: int = 0, pad_token_id: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=MAX_LENGTH,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def examples(tokenizer, qas) -> list[dict]:
    return [lm.qa_example(tokenizer, qa.question, qa.answer, MAX_LENGTH) for qa in qas]


def batches(items: list, batch_size: int, seed: int, pad_token_id: int = 0):
    """An endless stream of padded batches: one seeded permutation per epoch."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(items), generator=gen).tolist()
        for i in range(0, len(order), batch_size):
            yield lm.pad_batch([items[j] for j in order[i : i + batch_size]], pad_token_id)


def finetune(model, items: list[dict], *, steps: int, lr: float, batch_size: int, seed: int,
             device: str = "cpu", desc: str = "fine-tune", progress: bool = True) -> list[float]:  # fmt: skip
    """Plain AdamW fine-tuning on answer tokens; returns the loss per step."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    stream = batches(items, batch_size, seed)
    losses = []
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in next(stream).items()}
        loss = lm.preserve_loss("nll", model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def cached_finetune(*, kind: str, cache_dir: str | Path, key: dict, tokenizer, items: list[dict], size: ModelSize,
                    steps: int, lr: float, batch_size: int, seed: int, device: str, progress: bool):  # fmt: skip
    """Load ``kind`` ("target" / "retain") from the cache, or fine-tune a fresh tiny Llama on ``items``.

    Returns ``(model, seconds, final_loss)``; a damaged cache entry is retrained (cache.load_entry)."""
    ids = torch.tensor([t for e in items for t in e["input_ids"] + [-1]])
    labels = torch.tensor([t for e in items for t in e["labels"] + [-1]])
    vocab = torch.tensor(
        [ord(c) for c in "\n".join(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))]
    )
    key = {**key, "kind": kind, "size": vars(size), "steps": steps, "lr": lr, "batch_size": batch_size,
           "seed": seed, "data": fingerprint(ids, labels, vocab)}  # fmt: skip
    path = cache_path(cache_dir, "language", kind, key)
    model = tiny_llama(len(tokenizer), size, seed, tokenizer.pad_token_id)
    saved = load_entry(path, model, device)
    if saved is not None:
        return model.to(device).eval(), saved["seconds"], saved.get("final_loss")
    start = time.perf_counter()
    losses = finetune(model, items, steps=steps, lr=lr, batch_size=batch_size, seed=seed, device=device,
                      desc=f"fine-tune {kind}", progress=progress)  # fmt: skip
    seconds = time.perf_counter() - start
    final = sum(losses[-10:]) / len(losses[-10:])
    save_atomic({"state_dict": model.state_dict(), "seconds": seconds, "final_loss": final, "key": key}, path)
    return model.eval(), seconds, final
