"""gram_in_backward=True: the Gram partials computed in post-accumulate-grad hooks give the
two-pass step's bits, and any gradient changed after its hook is recomputed, not trusted."""

import copy
import pickle

import pytest
import torch
from torch import nn

from munba_kernels import MUNBaOptimizer, backward_gram
from munba_kernels.backends import cpp, reference

BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.skipif(not cpp.is_available(), reason="C++ not built"))]
SETTINGS = {
    "adamw": dict(base="adamw", lr=1e-2),
    "sgd-clip": dict(base="sgd", lr=5e-2, momentum=0.9, weight_decay=5e-4, max_grad_norm=0.5),
    "adamw-3players": dict(base="adamw", lr=1e-2, players=("forget", "neighbour", "preserve")),
}


def make_model(dtype=torch.float32) -> nn.Module:
    """A 1×1 conv, a bias-free layer and a weight of 2 × 32768 + 3 elements: several Gram chunks."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(13, 5041), nn.Tanh(), nn.Linear(5041, 13, bias=False), nn.Tanh(), nn.Linear(13, 3)
    ).to(dtype)


def losses(model, step, players=2):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(3 + players, 7, 13, generator=gen).to(next(model.parameters()).dtype)
    out = [model(x[i]).pow(2).mean() * (i + 1) for i in range(players)]
    out[0] = -out[0]
    return out


def one_step(model, opt, step, accumulate=1, between=None):
    k = len(opt.players)
    for name, loss in zip(opt.players[:-1], losses(model, step, k)):
        loss.backward()
        opt.capture(name)
    for micro in range(accumulate):  # the live player's gradient over several micro-batches
        losses(model, 100 * step + micro, k)[-1].backward()
    if between is not None:
        between(model)
    opt.step()
    opt.zero_grad()


def twin_runs(settings, backend, steps=3, dtype=torch.float32, **kwargs):
    plain, hooked = make_model(dtype), make_model(dtype)
    opts = [
        MUNBaOptimizer(plain.parameters(), backend=backend, **settings),
        MUNBaOptimizer(hooked.parameters(), backend=backend, gram_in_backward=True, **settings),
    ]
    hits = []
    for step in range(steps):
        for model, opt in zip((plain, hooked), opts):
            one_step(model, opt, step, **kwargs)
        hits.append(opts[1]._backward_gram.hits)
        a, b = opts[0].last_bargain.gram, opts[1].last_bargain.gram
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"step {step}")
    return plain, hooked, hits


def assert_bitwise(a: nn.Module, b: nn.Module):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_hooks_give_the_two_pass_bits_and_read_no_gradient_twice(setting, backend):
    plain, hooked, hits = twin_runs(SETTINGS[setting], backend)
    assert_bitwise(plain, hooked)
    assert hits == [5] * 3  # every tensor's partials came from its hook


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_parameters(backend):
    plain, hooked, hits = twin_runs(SETTINGS["adamw"], backend, dtype=torch.bfloat16)
    assert_bitwise(plain, hooked)
    assert hits == [5] * 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation_uses_the_last_accumulation(backend):
    plain, hooked, hits = twin_runs(SETTINGS["sgd-clip"], backend, accumulate=3)
    assert_bitwise(plain, hooked)
    assert hits == [5] * 3


def test_a_gradient_changed_after_its_hook_is_recomputed():
    """A loss scaler's unscale or a hand clip writes .grad in place after backward: the hooks'
    partials no longer describe it, and the step must not use them."""

    def halve_first_layer(model):
        model[0].weight.grad.mul_(0.5)

    def replace_last_bias(model):
        model[4].bias.grad = model[4].bias.grad * 3

    def unscale_all(model):  # what a loss scaler does: no hook's partials survive
        for p in model.parameters():
            p.grad.mul_(0.25)

    for between, expected_hits in ((halve_first_layer, 4), (replace_last_bias, 4), (unscale_all, 0)):
        plain, hooked, hits = twin_runs(SETTINGS["adamw"], "torch", between=between)
        assert_bitwise(plain, hooked)
        assert hits == [expected_hits] * 3


def test_a_nan_gradient_skips_the_step_as_the_two_pass_step_does():
    def poison(model):
        model[2].weight.grad[0, 0] = float("nan")

    plain, hooked, _ = twin_runs(SETTINGS["adamw"], "torch", steps=2, between=poison)
    assert_bitwise(plain, hooked)
    assert torch.equal(make_model().state_dict()["0.weight"], hooked.state_dict()["0.weight"])  # skipped


def test_closure_steps_use_the_hooks():
    plain, hooked = make_model(), make_model()
    opts = [MUNBaOptimizer(m.parameters(), lr=1e-2, gram_in_backward=g) for m, g in ((plain, False), (hooked, True))]
    for step in range(2):
        for model, opt in zip((plain, hooked), opts):
            opt.step(lambda model=model, step=step: tuple(losses(model, step)))
            opt.zero_grad()
    assert_bitwise(plain, hooked)
    assert opts[1]._backward_gram.hits == 5


def test_hooks_ignore_the_captured_players_backward():
    model = make_model()
    opt = MUNBaOptimizer(model.parameters(), lr=1e-2, gram_in_backward=True)
    losses(model, 0)[0].backward()
    assert opt._backward_gram._entries == {}  # no player captured yet: nothing to fold in
    opt.capture_forget()
    losses(model, 0)[1].backward()
    assert len(opt._backward_gram._entries) == 5
    opt.zero_grad()
    assert opt._backward_gram._entries == {}  # dropped with the gradients


def test_copies_hook_their_own_parameters():
    model = make_model()
    opt = MUNBaOptimizer(model.parameters(), lr=1e-2, gram_in_backward=True)
    one_step(model, opt, 0)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        params = clone.param_groups[0]["params"]
        assert params[0] is not model[0].weight and clone.gram_in_backward
        loss_f = -(params[0].sum() + params[1].sum())
        loss_f.backward()
        clone.capture_forget()
        params[0].pow(2).sum().backward()
        clone.step()
        assert clone._backward_gram.hits == 1  # the copy's own parameter fired its hook
        assert opt._backward_gram.hits == 5  # and not the original's


def test_a_group_added_later_is_hooked():
    model = make_model()
    opt = MUNBaOptimizer(list(model[0].parameters()), lr=1e-2, gram_in_backward=True)
    opt.add_param_group({"params": list(model[2].parameters()) + list(model[4].parameters())})
    one_step(model, opt, 0)
    assert opt._backward_gram.hits == 5


def test_bad_settings_are_refused():
    p = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(TypeError, match="gram_in_backward"):
        MUNBaOptimizer(p, gram_in_backward="yes")
    with pytest.raises(ValueError, match="gram_in_backward=True is implemented for the CPU backends"):
        MUNBaOptimizer(p, gram_in_backward=True, backend="triton")


def test_ddp_and_fsdp1_are_refused(monkeypatch):
    """Under DDP the hooks would see this rank's unreduced gradient: refused at construction
    (the two-rank FSDP2 run is in tests/test_distributed.py)."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="DDP and FSDP1 reduce gradients after"):
        MUNBaOptimizer(make_model().parameters(), gram_in_backward=True)
    with pytest.raises(ValueError, match="DDP and FSDP1"):
        backward_gram.check_supported([], gram_process_group=object())


def test_partials_of_single_tensors_sum_to_the_backends_gram():
    torch.manual_seed(1)
    grads = [[torch.randn(70000), None, torch.randn(5, 7)], [torch.randn(70000), torch.randn(3), torch.randn(5, 7)]]
    backends = [reference] + ([cpp] if cpp.is_available() else [])
    for backend in backends:
        parts = [backend.gram_partials([[g[i]] for g in grads], "cpu") for i in range(3)]
        assert [p.shape[0] for p in parts] == [3, 1, 1]
        assert torch.equal(backend.sum_partials(torch.cat(parts)), backend.gram(grads, "cpu"))
