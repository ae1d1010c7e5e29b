"""Test helpers for the language-model tests: a tiny Llama and random causal-LM examples."""

import pytest
import torch


def tiny_llama(seed=0, vocab=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def examples(n, seed=1, vocab=64, prompt=3):
    """``n`` causal-LM examples of 6–11 tokens, the first ``prompt`` tokens unscored."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 12, (1,), generator=g))
        ids = torch.randint(1, vocab, (length,), generator=g).tolist()
        out.append(
            {"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * prompt + ids[prompt:]}
        )
    return out


def pairs(n, seed=1):
    """``n`` micro-batch-sized {"forget", "retain"} example pairs."""
    return [{"forget": f, "retain": r} for f, r in zip(examples(n, seed), examples(n, seed + 100))]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (their kernels are too small to split; with two
    threads on a busy 2-core machine they were several times slower).  Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
