"""MUNBaTrainer on a tiny Llama: accumulation = one large batch, resume = uninterrupted, LoRA, bf16,
gradient checkpointing, schedulers, the one clip, logging, the optimizer from TrainingArguments,
and clear errors for bad input."""

import importlib
import math
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from lmtiny import examples, one_thread, pairs, tiny_llama  # noqa: E402, F401
from transformers import TrainingArguments  # noqa: E402

from munba_kernels import MUNBaOptimizer, amp  # noqa: E402
from munba_kernels.integrations import lm  # noqa: E402
from munba_kernels.integrations.loop import lm_unlearning_step  # noqa: E402
from munba_kernels.integrations.transformers import MUNBaTrainer, PairedCollator, PairedDataset  # noqa: E402


def _args(tmp_path, **kw):
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        data_seed=0,
    )
    settings.update(kw)
    return TrainingArguments(**settings)


def _dataset(n=12):
    return PairedDataset(examples(n, 1), examples(2 * n, 2))


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_close(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


def _train(tmp_path, model=None, **kw):
    trainer_kw = {
        k: kw.pop(k) for k in ("forget_loss", "preserve_loss", "optimizers", "ref_model") if k in kw
    }
    model = model if model is not None else tiny_llama()
    trainer = MUNBaTrainer(model, _args(tmp_path, **kw), train_dataset=_dataset(), **trainer_kw)
    trainer.train()
    return trainer, model


BASELINE = dict(lr_scheduler_type="linear", warmup_steps=1, max_steps=4)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One run every comparison below starts from: batches of 4, 4 steps, linear schedule, clip 1."""
    trainer, model = _train(tmp_path_factory.mktemp("baseline"), **BASELINE)
    return trainer, _params(model)


def test_accumulation_equals_one_large_batch(tmp_path, baseline):
    _, big = baseline
    _, acc = _train(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, **BASELINE)
    _assert_close(big, _params(acc), rtol=1e-4, atol=1e-5)
    # the check can fail: training moved every weight matrix far beyond the tolerance
    start = _params(tiny_llama())
    assert min((big[k] - start[k]).abs().max().item() for k in big if big[k].ndim == 2) > 1e-3


def test_the_loop_helper_accumulates_like_one_batch():
    torch.manual_seed(0)
    runs = []
    ref = tiny_llama()
    for split in (1, 2):
        model = tiny_llama()
        opt = MUNBaOptimizer(model.parameters(), lr=1e-3, max_grad_norm=1.0)
        exs = pairs(4)  # NPO + NLL (a KL preserve gradient is float noise at the reference: 0 in theory)
        size = 4 // split
        window = [
            {k: lm.pad_batch([e[k] for e in exs[i : i + size]]) for k in ("forget", "retain")}
            for i in range(0, 4, size)
        ]
        for _ in range(2):
            lm_unlearning_step(opt, model, window, forget_loss="npo", ref_model=ref)
        runs.append(_params(model))
    _assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-5)


def test_resume_from_a_checkpoint_continues_identically(tmp_path):
    kw = dict(save_strategy="steps", save_steps=2, per_device_train_batch_size=2, **BASELINE)
    _, straight = _train(tmp_path, forget_loss="npo", **kw)  # also writes checkpoint-2
    resumed = tiny_llama()
    trainer = MUNBaTrainer(resumed, _args(tmp_path / "b", **kw), train_dataset=_dataset(), forget_loss="npo")
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    _assert_close(_params(straight), _params(resumed), rtol=0, atol=0)
    assert trainer.state.global_step == 4


def test_lora_trains_only_the_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    before = _params(model)
    trainer, _ = _train(tmp_path, model=model, max_steps=2, forget_loss="npo", preserve_loss="kl")
    after = _params(model)
    opt = trainer._munba()
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in trained}
    assert names and all("lora_" in n for n in names)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)  # B starts at zero and moved


def test_bf16_runs_the_forward_passes_under_autocast(tmp_path):
    model = tiny_llama()
    dtypes = set()
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    trainer, _ = _train(tmp_path, model=model, max_steps=2, bf16=True)
    assert dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a bf16 model
    losses = [h["forget_loss"] for h in trainer.state.log_history if "forget_loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_gradient_checkpointing_gives_the_same_steps(tmp_path, baseline):
    _, ckpt = _train(tmp_path, gradient_checkpointing=True, **BASELINE)
    _assert_close(baseline[1], _params(ckpt), rtol=1e-5, atol=1e-6)


def test_logs_hold_the_bargain_both_losses_and_the_schedule(baseline):
    trainer, _ = baseline
    logs = [h for h in trainer.state.log_history if "munba/alpha_f" in h]
    assert len(logs) == 4
    for h in logs:
        # the closed form, by hand: α_i ‖g_i‖ = 1 / sqrt(1 + cos φ)
        expected = 1 / math.sqrt(1 + h["munba/cos"])
        assert h["munba/alpha_f"] * h["munba/forget_grad_norm"] == pytest.approx(expected, rel=1e-6)
        assert h["munba/alpha_r"] * h["munba/retain_grad_norm"] == pytest.approx(expected, rel=1e-6)
        assert h["loss"] == pytest.approx(h["forget_loss"] + h["retain_loss"], rel=1e-5)
        assert h["munba/skipped_steps"] == 0 and "grad_norm" not in h
    # linear warm-up over one step, then linear decay: the lr each step ran with
    assert [h["learning_rate"] for h in logs] == pytest.approx([0.0, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3])


def test_the_trainers_clip_never_runs_and_max_grad_norm_goes_to_the_optimizer(tmp_path, monkeypatch):
    calls = []
    import accelerate

    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", lambda self, *a, **k: calls.append(a))
    trainer, _ = _train(
        tmp_path, max_steps=2, max_grad_norm=0.5, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.9
    )
    assert calls == []
    opt = trainer._munba()
    assert opt.max_grad_norm == 0.5
    assert opt.last_bargain.clip_scale.item() == pytest.approx(0.5 / math.sqrt(2))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.8, 0.9) and decay["lr"] == pytest.approx(0.0)  # linear schedule ended
    assert any(p.ndim == 1 for p in no_decay["params"]) and all(p.ndim == 2 for p in decay["params"])


def test_an_optimizer_passed_in_must_be_munba_and_clip_once(tmp_path):
    model = tiny_llama()
    ds = _dataset()
    with pytest.raises(
        ValueError, match="max_grad_norm=1.0 but the MUNBaOptimizer passed in clips at max_grad_norm=None"
    ):
        MUNBaTrainer(
            model, _args(tmp_path), train_dataset=ds, optimizers=(MUNBaOptimizer(model.parameters()), None)
        )
    with pytest.raises(TypeError, match="needs a MUNBaOptimizer"):
        MUNBaTrainer(
            model, _args(tmp_path), train_dataset=ds, optimizers=(torch.optim.AdamW(model.parameters()), None)
        )
    opt = MUNBaOptimizer(model.parameters(), lr=1e-3, base="sgd", momentum=0.9, max_grad_norm=1.0)
    trainer = MUNBaTrainer(model, _args(tmp_path, max_steps=2), train_dataset=ds, optimizers=(opt, None))
    trainer.train()
    assert trainer._munba() is opt and "momentum_buffer" in opt.state[model.lm_head.weight]


def test_bad_input_gets_clear_errors(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama()
    with pytest.raises(ValueError, match="without a 'forget' split"):
        MUNBaTrainer(model, _args(tmp_path), train_dataset=examples(4))
    with pytest.raises(ValueError, match="train_dataset is empty"):
        MUNBaTrainer(model, _args(tmp_path), train_dataset=[])
    with pytest.raises(ValueError, match="the forget split is empty"):
        PairedDataset([], examples(2))
    with pytest.raises(ValueError, match="forget_loss must be one of"):
        MUNBaTrainer(model, _args(tmp_path), train_dataset=_dataset(), forget_loss="rmu")
    big = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)}, unk_token="w0"))
    )
    with pytest.raises(ValueError, match="tokenizer does not match the model: it has 100 tokens .* 64 rows"):
        MUNBaTrainer(model, _args(tmp_path), train_dataset=_dataset(), processing_class=big)
    with pytest.raises(ValueError, match="without a 'forget' split"):
        PairedCollator()([{"retain": examples(1)[0]}])


def test_the_accelerators_fp16_scaler_is_replaced_by_the_cooperating_one(tmp_path, monkeypatch):
    # accelerate refuses fp16 on a CPU, so give the accelerator a stock scaler by hand
    import accelerate

    original = accelerate.Accelerator.__init__

    def with_scaler(self, *a, **k):
        original(self, *a, **k)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=4.0)

    monkeypatch.setattr(accelerate.Accelerator, "__init__", with_scaler)
    trainer = MUNBaTrainer(tiny_llama(), _args(tmp_path), train_dataset=_dataset())
    assert (
        isinstance(trainer.accelerator.scaler, amp.GradScaler)
        and trainer.accelerator.scaler.get_scale() == 4.0
    )


def test_a_missing_extra_is_an_import_error_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "munba_kernels.integrations.transformers")
    with pytest.raises(ImportError, match=r"optional extra \[hf\]"):
        importlib.import_module("munba_kernels.integrations.transformers")
