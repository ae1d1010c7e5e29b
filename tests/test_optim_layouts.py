"""Memory layout must never change results: channels_last and strided-view parameters,
transposed and non-contiguous gradients, for every CPU backend."""

import pytest
import torch

from munba_kernels import MUNBaOptimizer, backends

CPU_BACKENDS = [b for b in ("torch", "cpp") if b in backends.available()]


def make_case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 10, generator=gen)
    return {
        "channels_last": torch.randn(2, 3, 4, 5, generator=gen).to(memory_format=torch.channels_last),
        "transposed": torch.randn(5, 7, generator=gen).t(),
        "strided_view": base[:, ::2],  # not dense: every other column of a larger buffer
        "plain": torch.randn(11, generator=gen),
    }


def grads_for(params, gen, layout_twist):
    out = []
    for p in params:
        g = torch.randn(p.shape, generator=gen)
        if layout_twist and p.dim() >= 2:
            g = g.transpose(0, 1).contiguous().transpose(0, 1)  # same values, transposed layout
        out.append(g)
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("base", ["adamw", "sgd"])
def test_layouts_give_the_same_result_as_contiguous_tensors(backend, base):
    odd = [torch.nn.Parameter(t) for t in make_case().values()]
    flat = [torch.nn.Parameter(t.detach().contiguous().clone()) for t in odd]
    assert not odd[2].is_contiguous() and odd[0].is_contiguous(memory_format=torch.channels_last)
    kw = dict(lr=0.05, base=base, backend=backend, weight_decay=0.01, max_grad_norm=1.0)
    if base == "sgd":
        kw["momentum"] = 0.9
    opt_odd, opt_flat = MUNBaOptimizer(odd, **kw), MUNBaOptimizer(flat, **kw)
    gen_odd, gen_flat = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(4):
        for opt, params, gen, twist in ((opt_odd, odd, gen_odd, True), (opt_flat, flat, gen_flat, False)):
            for p, g in zip(params, grads_for(params, gen, twist)):
                p.grad = g
            opt.capture_forget()
            for p, g in zip(params, grads_for(params, gen, twist)):
                p.grad = g
            opt.step()
    for a, b in zip(odd, flat):
        torch.testing.assert_close(a.detach().contiguous(), b.detach(), rtol=0, atol=0)
    assert odd[0].is_contiguous(memory_format=torch.channels_last)  # layouts are preserved
    assert odd[2].data_ptr() != 0 and not odd[2].is_contiguous()
