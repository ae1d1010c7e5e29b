"""Backend dispatch: "auto" picks by device and falls back cleanly; forced backends fail clearly."""

import warnings

import pytest
import torch

from munba_kernels import MUNBaOptimizer, backends
from munba_kernels.backends import reference


def test_auto_on_cpu_prefers_cpp_when_built():
    expected = "cpp" if "cpp" in backends.available() else "torch"
    assert backends.resolve("auto", torch.device("cpu")).name == expected


def test_auto_on_other_devices_uses_the_reference():
    assert backends.resolve("auto", torch.device("meta")) is reference


def test_missing_fast_backend_warns_once_and_falls_back(monkeypatch):
    real_load = backends._load
    monkeypatch.setattr(backends, "_load", lambda name: None if name == "cpp" else real_load(name))
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="'cpp' backend .* unavailable .* falling back"):
        assert backends.resolve("auto", torch.device("cpu")) is reference
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second resolve must stay silent
        assert backends.resolve("auto", torch.device("cpu")) is reference
    with pytest.raises(RuntimeError, match=r"backend='cpp' is not available .*not built"):
        backends.resolve("cpp", torch.device("cpu"))


def test_optimizer_runs_on_the_fallback(monkeypatch):
    real_load = backends._load
    monkeypatch.setattr(backends, "_load", lambda name: None if name == "cpp" else real_load(name))
    monkeypatch.setattr(backends, "_warned", {"cpp"})  # already warned
    p = torch.nn.Parameter(torch.zeros(3))
    opt = MUNBaOptimizer([p], lr=1.0, base="sgd")
    p.grad = torch.tensor([1.0, 0.0, 0.0])
    opt.capture_forget()
    p.grad = torch.tensor([0.0, 2.0, 0.0])
    opt.step()
    torch.testing.assert_close(p.detach(), -torch.tensor([1.0, 1.0, 0.0]))  # bisector of e1, e2 (‖d‖ = √2)


def test_forced_backend_on_an_unsupported_device_fails_clearly():
    if "cpp" not in backends.available():
        pytest.skip("the C++ extension is not built")
    with pytest.raises(RuntimeError, match="does not support parameters on meta"):
        backends.resolve("cpp", torch.device("meta"))
