"""Hugging Face ``transformers`` integration: :class:`MUNBaTrainer`, a ``Trainer`` that bargains.

The field's frameworks (open-unlearning, TOFU) plug an unlearning method in as a ``Trainer`` whose
``compute_loss`` returns one scalar, which cannot express two backward passes.  ``MUNBaTrainer``
overrides ``training_step`` instead::

    from munba_kernels.integrations.transformers import MUNBaTrainer, PairedDataset

    train = PairedDataset(forget_examples, retain_examples)     # items {"forget": ex, "retain": ex}
    args = TrainingArguments("out", learning_rate=1e-5, per_device_train_batch_size=8,
                             gradient_accumulation_steps=4, num_train_epochs=10, bf16=True)
    trainer = MUNBaTrainer(model, args, train_dataset=train, forget_loss="npo", preserve_loss="nll")
    trainer.train()

How the Trainer's pieces are used:

* **Data**: each item is ``{"forget": example, "retain": example}`` (causal-LM examples:
  ``input_ids``, ``attention_mask``, ``labels``).  :class:`PairedCollator` (the default) pads each
  player's examples separately.
* **Accumulation**: per micro-batch, the forget backward runs inside ``opt.forget_gradients()`` and the
  preserve backward outside, so the two gradients accumulate separately; losses are sums divided by
  the window's totals (:class:`~munba_kernels.integrations.lm.Window`), so ``k`` micro-batches give
  the gradient of one batch of the same examples.
* **Optimizer**: :class:`~munba_kernels.MUNBaOptimizer` from ``TrainingArguments`` (``learning_rate``,
  ``weight_decay`` on the usual decay parameters, ``adam_beta1/2``, ``adam_epsilon``; ``optim`` is not
  used), or your own through ``optimizers=(opt, scheduler)``.  Any LR scheduler works.
* **Clipping, decided**: the Trainer's own ``clip_grad_norm_`` would run on the preserve gradient
  only (the forget gradient is in the capture), so it never runs here.  ``max_grad_norm`` is handed
  to the optimizer, which clips the bargained direction ``‖d‖`` exactly, once, at no cost.  An
  optimizer passed in must clip at the same value (or ``max_grad_norm=0`` in the arguments):
  anything else raises instead of silently ignoring one of the two settings.  The Trainer's
  ``grad_norm`` log entry is therefore absent; ``munba/forget_grad_norm`` and
  ``munba/retain_grad_norm`` (from the Gram, free) take its place.
* **fp16**: the accelerator's ``torch.amp.GradScaler`` is replaced by
  :class:`munba_kernels.amp.GradScaler`, which also inf-checks the captured forget gradient; a step
  the scaler skips leaves no capture behind.
* **Logs** (every ``logging_steps``, means over the steps since the last log): ``forget_loss``,
  ``retain_loss``, ``munba/alpha_f``, ``munba/alpha_r``, ``munba/cos``, the two gradient norms and
  ``munba/skipped_steps``; ``loss`` is their sum (the GradDiff objective's value).
* ``forget_loss="npo"`` and ``preserve_loss="kl"`` need a frozen reference model: ``ref_model=``
  or, by default, a copy of ``model`` taken at construction (before any checkpoint is loaded, so a
  resumed run keeps the original model as its reference).  PEFT models work as they are (only the
  adapters are trainable, hence optimised); gradient checkpointing, bf16 autocast and
  ``save_state``/resume (which continues identically) work as in ``Trainer``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

try:
    import accelerate  # noqa: F401  (transformers.Trainer needs it)
    import transformers  # noqa: F401
    from transformers import Trainer, TrainerCallback
except ImportError as err:  # pragma: no cover - exercised by a test that hides the modules
    raise ImportError(
        "munba_kernels.integrations.transformers needs the optional extra [hf] "
        "(transformers, accelerate, peft): pip install 'munba-kernels[hf]'"
    ) from err

import torch
from torch.utils.data import Dataset, IterableDataset

from .. import amp
from ..optim import MUNBaOptimizer
from . import lm

__all__ = ["MUNBaTrainer", "PairedDataset", "PairedCollator", "check_paired_dataset", "check_tokenizer"]


class PairedDataset(Dataset):
    """``{"forget": forget[i], "retain": retain[j]}`` pairs of causal-LM examples.

    ``anchor="forget"`` (the field's convention): one epoch is one pass over the forget examples,
    each paired with a retain example from a fixed seeded permutation (cycled when retain is the
    shorter); ``anchor="retain"`` the other way round.  The pairing depends on the index only, so a
    resumed run sees the same pairs.
    """

    def __init__(self, forget: Sequence, retain: Sequence, *, anchor: str = "forget", seed: int = 0):
        if anchor not in ("forget", "retain"):
            raise ValueError(f"anchor must be 'forget' or 'retain', got {anchor!r}")
        for name, split in (("forget", forget), ("retain", retain)):
            if len(split) == 0:
                raise ValueError(f"PairedDataset: the {name} split is empty")
        self.forget, self.retain, self.anchor = forget, retain, anchor
        other = len(retain) if anchor == "forget" else len(forget)
        self._partner = torch.randperm(other, generator=torch.Generator().manual_seed(seed)).tolist()

    def __len__(self) -> int:
        return len(self.forget) if self.anchor == "forget" else len(self.retain)

    def __getitem__(self, i: int) -> dict:
        j = self._partner[i % len(self._partner)]
        if self.anchor == "forget":
            return {"forget": self.forget[i], "retain": self.retain[j]}
        return {"forget": self.forget[j], "retain": self.retain[i]}


class PairedCollator:
    """Pads the forget and the retain examples of a batch separately (:func:`lm.pad_batch`)."""

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, items: list[Mapping]) -> dict[str, dict[str, torch.Tensor]]:
        for item in items:
            if not isinstance(item, Mapping) or "forget" not in item or "retain" not in item:
                raise ValueError(_PAIR_ERROR.format(name="a batch item", got=_keys(item)))
        return {k: lm.pad_batch([item[k] for item in items], self.pad_token_id) for k in ("forget", "retain")}


_PAIR_ERROR = (
    "{name} must be {{'forget': example, 'retain': example}} (causal-LM examples with input_ids, "
    "attention_mask, labels), got {got}; a dataset without a 'forget' split cannot be unlearned: "
    "build one with PairedDataset(forget_examples, retain_examples)"
)


def _keys(item) -> str:
    return f"keys {sorted(item)}" if isinstance(item, Mapping) else type(item).__name__


def check_paired_dataset(dataset, name: str = "train_dataset") -> None:
    """A clear ValueError for an empty dataset or items that are not forget/retain pairs."""
    if dataset is None or isinstance(dataset, IterableDataset):
        return
    try:
        n = len(dataset)
    except TypeError:
        return
    if n == 0:
        raise ValueError(f"{name} is empty: there is nothing to unlearn")
    item = dataset[0]
    if not isinstance(item, Mapping) or "forget" not in item or "retain" not in item:
        raise ValueError(_PAIR_ERROR.format(name=f"{name} items", got=_keys(item)))
    for split in ("forget", "retain"):
        if not isinstance(item[split], Mapping) or "input_ids" not in item[split]:
            raise ValueError(
                f"{name}[0][{split!r}] must be a causal-LM example with input_ids, got {_keys(item[split])}"
            )


def check_tokenizer(tokenizer, model) -> None:
    """ValueError when the tokenizer's ids do not fit the model's embedding table."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if tokenizer is None or embeddings is None or not hasattr(tokenizer, "__len__"):
        return
    rows = embeddings.num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"the tokenizer does not match the model: it has {len(tokenizer)} tokens but the model's "
            f"embedding table has {rows} rows (ids ≥ {rows} would index out of range)"
        )


class _StepEnd(TrainerCallback):
    """After every optimizer step (taken or skipped by a loss scaler): drop a leftover capture."""

    def __init__(self, trainer: MUNBaTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._after_optimizer_step()


class MUNBaTrainer(Trainer):
    """``transformers.Trainer`` whose steps move along the Nash-bargaining direction (module doc).

    Args (beyond ``Trainer``'s):
        forget_loss: ``"ga"`` (−NLL) or ``"npo"`` (``npo_beta``).
        preserve_loss: ``"nll"`` or ``"kl"`` (KL to the frozen reference model).
        ref_model: the frozen reference for NPO/KL (default: a copy of ``model``).
        bargaining_power: ``(w_f, w_r)`` for the optimizer this trainer creates.
        munba_kwargs: further :class:`MUNBaOptimizer` settings for the optimizer it creates
            (e.g. ``base="sgd", momentum=0.9`` or ``state_dtype=torch.float32``).
    """

    def __init__(
        self,
        model=None,
        args=None,
        *,
        forget_loss: str = "ga",
        preserve_loss: str = "nll",
        npo_beta: float = 0.1,
        ref_model=None,
        bargaining_power: tuple[float, float] = (1.0, 1.0),
        munba_kwargs: dict | None = None,
        data_collator=None,
        train_dataset=None,
        **kwargs,
    ):
        lm.check_loss_names(forget_loss, preserve_loss)
        if not npo_beta > 0:
            raise ValueError(f"npo_beta must be positive, got {npo_beta!r}")
        check_paired_dataset(train_dataset, "train_dataset")
        check_paired_dataset(kwargs.get("eval_dataset"), "eval_dataset")
        if model is not None:
            check_tokenizer(kwargs.get("processing_class"), model)
        if data_collator is None:
            data_collator = PairedCollator(_pad_id(kwargs.get("processing_class"), model))
        self.forget_loss, self.preserve_loss, self.npo_beta = forget_loss, preserve_loss, npo_beta
        self.bargaining_power = bargaining_power
        self.munba_kwargs = dict(munba_kwargs or {})
        self._acc: dict[str, torch.Tensor | float] = {}
        super().__init__(model, args, data_collator=data_collator, train_dataset=train_dataset, **kwargs)
        if self.optimizer is not None:
            self._check_given_optimizer(self.optimizer)
            self._hook(self.optimizer)
        self.ref_model = None
        if lm.needs_reference(forget_loss, preserve_loss):
            ref = ref_model if ref_model is not None else copy.deepcopy(self.model)
            self.ref_model = ref.to(self.args.device).eval().requires_grad_(False)
        self.add_callback(_StepEnd(self))

    # -------------------------------------------------------------- the optimizer
    def _check_given_optimizer(self, opt) -> None:
        if not isinstance(opt, MUNBaOptimizer):
            raise TypeError(
                f"MUNBaTrainer needs a MUNBaOptimizer (optimizers=(opt, scheduler)), got {type(opt).__name__}"
            )
        wanted = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else None
        if opt.max_grad_norm != wanted:
            raise ValueError(
                f"TrainingArguments.max_grad_norm={self.args.max_grad_norm} but the MUNBaOptimizer passed in "
                f"clips at max_grad_norm={opt.max_grad_norm}. MUNBaTrainer clips once, inside the optimizer "
                "(the Trainer's clip would see only the preserve gradient): pass "
                f"MUNBaOptimizer(..., max_grad_norm={wanted}) or set TrainingArguments(max_grad_norm=...) to match"
            )

    def create_optimizer(self, model=None):
        """A :class:`MUNBaOptimizer` from the TrainingArguments (decay/no-decay groups as torch's)."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            if not named:
                raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")
            groups = [
                {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
            ]
            settings = dict(
                lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
                max_grad_norm=self.args.max_grad_norm if self.args.max_grad_norm > 0 else None,
                bargaining_power=self.bargaining_power,
            )
            settings.update(self.munba_kwargs)
            if settings.get("base") == "sgd":
                settings.pop("betas"), settings.pop("eps")
            self.optimizer = MUNBaOptimizer([g for g in groups if g["params"]], **settings)
            self._hook(self.optimizer)
        return self.optimizer

    def _munba(self) -> MUNBaOptimizer:
        opt = self.optimizer
        while not isinstance(opt, MUNBaOptimizer) and hasattr(opt, "optimizer"):
            opt = opt.optimizer  # accelerate's AcceleratedOptimizer
        return opt

    def _hook(self, opt: MUNBaOptimizer) -> None:
        opt.register_step_post_hook(lambda o, args, kwargs: self._record_bargain(o.last_bargain))

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if getattr(self.accelerator, "scaler", None) is not None:  # fp16: see munba_kernels.amp
            self.accelerator.scaler = amp.cooperating_scaler(self.accelerator.scaler)

    # Clipping happens once, exactly, inside the optimizer (module doc): the Trainer's never runs.
    def _clip_grad_norm(self, model):
        return None

    def _get_grad_norm(self, model, grad_norm=None):
        return None

    # -------------------------------------------------------------- the data
    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["forget", "retain"]

    def get_batch_samples(self, epoch_iterator, num_batches, device=None):
        """The window's micro-batches and their :class:`lm.Window` (the losses' divisors)."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batches:
            return batches, None
        window = lm.Window.of(batches)
        world = self.accelerator.num_processes
        if world > 1:  # gradients are averaged over ranks: divide by the global totals / world
            local = torch.tensor(
                [
                    window.forget_tokens,
                    window.forget_sequences,
                    window.retain_tokens,
                    window.retain_sequences,
                ],
                device=self.args.device,
            )
            window = lm.Window(*self.accelerator.gather(local).reshape(world, 4).sum(0).tolist()).scaled(
                world
            )
        return batches, window

    def floating_point_ops(self, inputs) -> int:
        return sum(super(MUNBaTrainer, self).floating_point_ops(inputs[k]) for k in ("forget", "retain"))

    def _track_num_input_tokens(self, inputs):
        for k in ("forget", "retain"):
            super()._track_num_input_tokens(inputs[k])

    # -------------------------------------------------------------- the step
    def training_step(self, model, inputs, num_items_in_batch=None):
        """Both backward passes of one micro-batch: forget inside ``forget_gradients()``, preserve outside."""
        model.train()
        opt = self._munba()
        inputs = self._prepare_inputs(inputs)
        window = num_items_in_batch if isinstance(num_items_in_batch, lm.Window) else lm.Window.of([inputs])
        with opt.forget_gradients():
            with self.compute_loss_context_manager(), self.accelerator.autocast():
                loss_f = lm.forget_loss(
                    self.forget_loss,
                    model,
                    inputs["forget"],
                    window,
                    ref_model=self.ref_model,
                    beta=self.npo_beta,
                )
            self.accelerator.backward(loss_f)
        with self.compute_loss_context_manager(), self.accelerator.autocast():
            loss_r = lm.preserve_loss(
                self.preserve_loss, model, inputs["retain"], window, ref_model=self.ref_model
            )
        self.accelerator.backward(loss_r)
        loss_f, loss_r = loss_f.detach(), loss_r.detach()
        self._add("forget_loss", loss_f)
        self._add("retain_loss", loss_r)
        return loss_f + loss_r

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The two losses summed (for evaluation only; training never calls this)."""
        window = num_items_in_batch if isinstance(num_items_in_batch, lm.Window) else None
        loss = lm.forget_loss(
            self.forget_loss, model, inputs["forget"], window, ref_model=self.ref_model, beta=self.npo_beta
        ) + lm.preserve_loss(self.preserve_loss, model, inputs["retain"], window, ref_model=self.ref_model)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager(), self.accelerator.autocast():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -------------------------------------------------------------- logging
    def _add(self, key: str, value) -> None:
        self._acc[key] = self._acc.get(key, 0.0) + value

    def _record_bargain(self, bargain) -> None:
        if bargain is None:
            return
        self._add("munba/alpha_f", bargain.alpha[0].detach())
        self._add("munba/alpha_r", bargain.alpha[1].detach())
        self._add("munba/cos", bargain.cos.detach())
        self._add("munba/forget_grad_norm", bargain.gram[0].detach().sqrt())
        self._add("munba/retain_grad_norm", bargain.gram[2].detach().sqrt())
        self._add("munba/skipped_steps", bargain.skipped.detach().float())
        self._add("_bargains", 1)

    def _after_optimizer_step(self) -> None:
        self._munba().discard_forget()  # a step a loss scaler skipped keeps its capture otherwise
        self._add("_steps", 1)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._acc.get("_steps"):
            acc, self._acc = self._acc, {}
            steps, bargains = acc.pop("_steps"), acc.pop("_bargains", 0)
            # skipped: on the device (NaN/Inf, out of range) plus those a loss scaler skipped
            logs["munba/skipped_steps"] = float(acc.pop("munba/skipped_steps", 0.0)) + (steps - bargains)
            for key, value in acc.items():
                if key.startswith("munba/"):
                    logs[key] = float(value) / bargains
                else:
                    logs[key] = float(value) / steps
        super().log(logs, start_time)


def _pad_id(tokenizer, model) -> int:
    for source in (tokenizer, getattr(model, "config", None)):
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(source, attr, None)
            if isinstance(value, int):
                return value
    return 0  # right padding under an attention mask: the id never affects a scored position
