"""MUNBaOptimizer with K ≥ 3 players: the API, and steps against an independent float64 oracle.

The oracle solves the bargaining condition ``(G α)_k = w_k / α_k`` with scipy's root finder
on the float64 Gram (no code shared with :mod:`munba_kernels.bargaining_k`), forms
``d = Σ α_k g_k`` in float32 and feeds it to ``torch.optim.AdamW`` / ``SGD``.
"""

import contextlib
import copy
import io
import math

import numpy as np
import pytest
import scipy.optimize
import torch

from munba_kernels import BargainStatus, MUNBaOptimizer
from munba_kernels.backends import cpp

SHAPES = [(7, 5), (13,), (3, 4, 2)]
PLAYERS = ("forget", "neighbour", "preserve")
BACKENDS = ["torch"] + (["cpp"] if cpp.is_available() else [])


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def player_gradients(players, seed):
    """K correlated gradients per parameter (a shared component plus each player's own) at
    scales 1e-2..1e2; the second player has no gradient for parameter 1 (counts as zero)."""
    gen = torch.Generator().manual_seed(seed)
    shared = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = []
    for k in range(players):
        scale = 10.0 ** (4 * torch.rand((), generator=gen).item() - 2)
        sign = -1.0 if k == 0 else 1.0  # the forget player partly opposes the others
        grads.append([(sign * 0.5 * c + torch.randn(c.shape, generator=gen)) * scale for c in shared])
    grads[1][1] = None
    return grads


def oracle_alpha(grads, power):
    flat = [
        torch.cat([(g if g is not None else torch.zeros(s)).double().flatten() for g, s in zip(player, SHAPES)])
        for player in grads
    ]
    gram = torch.stack([torch.stack([a @ b for b in flat]) for a in flat]).numpy()
    w = np.asarray(power, dtype=np.float64)

    def residual(log_alpha):
        alpha = np.exp(log_alpha)
        return alpha * (gram @ alpha) / w - 1.0

    start = np.log(np.sqrt(w / np.diag(gram)))
    sol = scipy.optimize.root(residual, start, method="hybr", tol=1e-14)
    assert np.abs(residual(sol.x)).max() < 1e-10, sol.message  # (hybr may call 1e-14 "too small")
    return np.exp(sol.x)


def oracle_direction(grads, alpha):
    out = []
    for i, s in enumerate(SHAPES):
        d = torch.zeros(s)
        for player, a in zip(grads, alpha):
            if player[i] is not None:
                d = d + player[i] * torch.tensor(a, dtype=torch.float32)
        out.append(d)
    return out


def feed(opt, params, grads):
    for name, player in zip(opt.players[:-1], grads):
        for p, g in zip(params, player):
            p.grad = None if g is None else g.clone()
        opt.capture(name)
    for p, g in zip(params, grads[-1]):
        p.grad = None if g is None else g.clone()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs, make_torch",
    [
        (dict(base="adamw", lr=1e-2, weight_decay=1e-2), lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2)),
        (
            dict(base="sgd", lr=1e-2, momentum=0.9, nesterov=True),
            lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
        ),
    ],
    ids=["adamw", "sgd-nesterov"],
)
@pytest.mark.parametrize("power", [(1.0, 1.0, 1.0), (2.0, 0.5, 1.5)])
def test_three_players_match_float64_alpha_fed_to_torch(backend, kwargs, make_torch, power):
    ours = make_params()
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = MUNBaOptimizer(ours, players=PLAYERS, bargaining_power=power, backend=backend, **kwargs)
    ref = make_torch(theirs)
    for step in range(10):
        grads = player_gradients(3, seed=10 + step)
        feed(opt, ours, grads)
        opt.step()
        alpha = oracle_alpha(grads, power)
        assert int(opt.last_bargain.status) == BargainStatus.OK
        np.testing.assert_allclose(opt.last_bargain.alpha.numpy(), alpha, rtol=1e-8)
        for p, d in zip(theirs, oracle_direction(grads, alpha)):
            p.grad = d
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_four_players_and_a_power_mapping():
    players = ("a", "b", "c", "d")
    params = make_params()
    opt = MUNBaOptimizer(params, base="sgd", lr=0.1, players=players, bargaining_power={"b": 3.0})
    assert opt.bargaining_power == (1.0, 3.0, 1.0, 1.0)
    grads = player_gradients(4, seed=3)
    before = [p.detach().clone() for p in params]
    feed(opt, params, grads)
    opt.step()
    alpha = oracle_alpha(grads, (1.0, 3.0, 1.0, 1.0))
    np.testing.assert_allclose(opt.last_bargain.alpha.numpy(), alpha, rtol=1e-8)
    for p, b, d in zip(params, before, oracle_direction(grads, alpha)):
        torch.testing.assert_close(p.detach(), b - 0.1 * d, rtol=1e-6, atol=1e-6)
    assert opt.last_bargain.gram.shape == (10,) and opt.last_bargain.cosines.shape == (4, 4)


def test_a_player_with_zero_gradient_drops_out_and_the_others_bargain():
    params = make_params()
    opt = MUNBaOptimizer(params, base="sgd", lr=1.0, players=PLAYERS)
    grads = player_gradients(3, seed=4)
    grads[1] = [None] * len(SHAPES)
    before = [p.detach().clone() for p in params]
    feed(opt, params, grads)
    opt.step()
    assert int(opt.last_bargain.status) == BargainStatus.PLAYER_ZERO
    two = oracle_alpha([grads[0], grads[2]], (1.0, 1.0))
    for p, b, d in zip(params, before, oracle_direction([grads[0], grads[2]], two)):
        torch.testing.assert_close(p.detach(), b - d, rtol=1e-6, atol=1e-6)


def test_closure_returns_one_loss_per_player_and_matches_captures():
    def losses(params, x):
        out = sum((p * x[i]).sum() for i, p in enumerate(params))
        return (-out, out.square(), (out - 1).abs())

    gen = torch.Generator().manual_seed(5)
    x = [torch.randn(s, generator=gen) for s in SHAPES]
    a, b = make_params(), make_params()
    opt_a = MUNBaOptimizer(a, lr=1e-2, players=PLAYERS)
    opt_b = MUNBaOptimizer(b, lr=1e-2, players=PLAYERS)
    returned = opt_a.step(lambda: losses(a, x))
    assert len(returned) == 3 and all(not t.requires_grad for t in returned)
    la, lb, lc = losses(b, x)
    la.backward(retain_graph=True)
    opt_b.capture("forget")
    lb.backward(retain_graph=True)
    opt_b.capture("neighbour")
    lc.backward()
    opt_b.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    with pytest.raises(TypeError, match="3 losses"):
        opt_a.step(lambda: losses(a, x)[:2])


def test_gradients_of_accumulates_each_player_separately():
    micro = [player_gradients(3, seed=20 + m) for m in range(3)]
    whole = [[sum(mb[k][i] for mb in micro) if micro[0][k][i] is not None else None for i in range(len(SHAPES))] for k in range(3)]
    a, b = make_params(), make_params()
    opt_a = MUNBaOptimizer(a, lr=1e-2, players=PLAYERS)
    opt_b = MUNBaOptimizer(b, lr=1e-2, players=PLAYERS)
    for mb in micro:  # interleaved micro-batches, accumulated by backward-like adds into .grad
        for k, name in enumerate(PLAYERS):
            with opt_a.gradients_of(name) if k < 2 else contextlib.nullcontext():
                for p, g in zip(a, mb[k]):
                    if g is not None:
                        p.grad = g.clone() if p.grad is None else p.grad + g
    opt_a.step()
    feed(opt_b, b, whole)
    opt_b.step()
    torch.testing.assert_close(opt_a.last_bargain.gram, opt_b.last_bargain.gram, rtol=1e-12, atol=0)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_api_errors_name_the_players():
    params = make_params()
    opt = MUNBaOptimizer(params, players=PLAYERS)
    with pytest.raises(RuntimeError, match="two-player spelling"):
        opt.capture_forget()
    with pytest.raises(RuntimeError, match="two-player spelling"):
        opt.forget_gradients()
    with pytest.raises(ValueError, match="'preserve', is the live .grad"):
        opt.capture("preserve")
    with pytest.raises(ValueError, match="not a captured player"):
        opt.capture("nobody")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.capture("forget")
    with pytest.raises(RuntimeError, match="already captured"):
        opt.capture("forget")
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match=r"\['neighbour'\] not captured"):
        opt.step()
    for bad, message in [
        (dict(players=("a",)), "two or more distinct names"),
        (dict(players=("a", "a")), "two or more distinct names"),
        (dict(players=("a", "b", "c"), bargaining_power=(1.0, 2.0)), "bargaining_power"),
        (dict(players=("a", "b"), bargaining_power={"z": 1.0}), "not players"),
    ]:
        with pytest.raises(ValueError, match=message):
            MUNBaOptimizer(make_params(), **bad)


def test_state_dict_carries_players_and_powers_and_round_trips():
    params = make_params()
    opt = MUNBaOptimizer(params, players=PLAYERS, bargaining_power=(2.0, 0.5, 1.0), max_grad_norm=3.0)
    for step in range(2):
        feed(opt, params, player_gradients(3, seed=30 + step))
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = MUNBaOptimizer(twin_params)  # two players, default power: the saved settings win
    buffer.seek(0)
    twin.load_state_dict(torch.load(buffer))
    assert twin.players == PLAYERS and twin.bargaining_power == (2.0, 0.5, 1.0) and twin.max_grad_norm == 3.0
    for step in range(2, 4):
        grads = player_gradients(3, seed=30 + step)
        feed(opt, params, grads)
        opt.step()
        feed(twin, twin_params, grads)
        twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
    copied = copy.deepcopy(opt)
    assert copied.players == PLAYERS


def test_a_loaded_state_dict_with_bad_settings_changes_nothing():
    params = make_params()
    opt = MUNBaOptimizer(params, players=PLAYERS)
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        group["munba"] = dict(group["munba"], bargaining_power=[1.0, math.nan, 1.0])
    with pytest.raises(ValueError, match="bargaining_power"):
        opt.load_state_dict(sd)
    assert opt.bargaining_power == (1.0, 1.0, 1.0) and "munba" not in opt.param_groups[0]
