"""munba_kernels.amp.GradScaler: the captured forget gradient takes part in unscale and inf check.

The stock torch scaler is run alongside as the counterpart that shows the bug: after a forget-loss
overflow its scale never backs off and every later step is skipped."""

import warnings

import pytest
import torch
from lmtiny import one_thread  # noqa: E402, F401

from munba_kernels import BargainStatus, MUNBaOptimizer, amp
from munba_kernels.integrations.loop import two_player_step

X = torch.linspace(-1, 1, 16).reshape(4, 4)
Y = torch.ones(4)
FORGET_GAIN = 1e10  # forget gradients ~1e10: × scale 2**100 ≈ 1.3e30 overflows float32, preserve's do not


def _setup(scaler_cls, **scaler_kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = MUNBaOptimizer(model.parameters(), lr=1e-2)
    settings = dict(init_scale=2.0**100, backoff_factor=2.0**-60, growth_interval=10_000)
    settings.update(scaler_kwargs)
    return model, opt, scaler_cls("cpu", **settings)


def _losses(model):
    return (
        lambda _: FORGET_GAIN * model(X).sum(),
        lambda _: ((model(X).squeeze(1) - Y) ** 2).mean(),
    )


def _run(model, opt, scaler, steps):
    history = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            before = [p.detach().clone() for p in model.parameters()]
            two_player_step(opt, [None], *_losses(model), scaler=scaler)
            moved = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
            history.append((scaler.get_scale(), moved))
    return history


def test_a_forget_overflow_backs_the_scale_off_and_training_resumes():
    model, opt, scaler = _setup(amp.GradScaler)
    history = _run(model, opt, scaler, 3)
    assert history[0] == (2.0**40, False)  # step skipped by the scaler, scale backed off
    assert history[1][1] and history[2][1]  # then every step is taken
    assert opt.captured_forget_gradients() == []  # zero_grad dropped the skipped step's capture
    assert int(opt.last_bargain.status) == BargainStatus.OK


def test_the_stock_scaler_never_backs_off_so_every_step_is_skipped():
    model, opt, scaler = _setup(torch.amp.GradScaler)
    history = _run(model, opt, scaler, 3)
    assert history == [(2.0**100, False)] * 3  # the bug this module fixes
    assert int(opt.last_bargain.status) == BargainStatus.NONFINITE  # the optimizer skipped them itself


def test_unscale_gives_the_true_forget_and_preserve_gradients():
    model, opt, scaler = _setup(amp.GradScaler, init_scale=1024.0)
    forget, preserve = _losses(model)
    forget(None).backward()
    true_f = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    preserve(None).backward()
    true_r = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with opt.forget_gradients():
        scaler.scale(forget(None)).backward()
    scaler.scale(preserve(None)).backward()
    scaler.unscale_(opt)
    for got, want in zip(opt.captured_forget_gradients(), true_f):
        torch.testing.assert_close(got, want)
    for p, want in zip(model.parameters(), true_r):
        torch.testing.assert_close(p.grad, want)


def test_from_torch_keeps_settings_and_state_and_stock_scalers_warn_once():
    stock = torch.amp.GradScaler(
        "cpu", init_scale=8.0, growth_factor=3.0, backoff_factor=0.25, growth_interval=7
    )
    stock.scale(torch.ones(()))  # creates the scale tensor
    stock._scale.fill_(64.0)
    ours = amp.cooperating_scaler(stock)
    assert isinstance(ours, amp.GradScaler)
    assert ours.get_scale() == 64.0
    assert (ours.get_growth_factor(), ours.get_backoff_factor(), ours.get_growth_interval()) == (3.0, 0.25, 7)
    assert amp.cooperating_scaler(ours) is ours and amp.cooperating_scaler(None) is None
    amp._WARNED = False
    with pytest.warns(UserWarning, match="captured forget gradient"):
        amp.warn_if_blind(stock)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        amp.warn_if_blind(stock)  # once only
        amp.warn_if_blind(ours)


def test_plain_optimizers_see_no_difference():
    runs = []
    for cls in (torch.amp.GradScaler, amp.GradScaler):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scaler = cls("cpu", init_scale=2.0**10)
        for _ in range(3):
            scaler.scale(((model(X).squeeze(1) - Y) ** 2).mean()).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
