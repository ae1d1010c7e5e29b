"""Language-model unlearning, TOFU-style: MUNBa against GradAscent, GradDiff, NPO and NPO+RT.

    python -m munba_kernels.drivers.language --out runs/language [--seeds 3] [--quick]

Embedded default (offline, CPU, minutes): question/answer facts about invented people and general
facts about invented countries are generated from the seed (lm_data.py); a word-level tokenizer is
built from them and two tiny Llama models are fine-tuned and cached (lm_models.py): the *target* on
everyone, the *retain* model (the gold standard) on the retained people only (both also on the
general facts).  ``--forget-ratio`` of the people are forgotten; as many *holdout* people, never
trained on, are the membership-inference attack's non-members.

Every method (lm_unlearning.py) unlearns the target with the same AdamW settings, clip, steps, data
order and learning-rate grid; each is evaluated along training and at the end:

* forget_quality: KS-test p-value, unlearned vs retain model truth ratios on the forget set (↑);
* model_utility: harmonic mean of answer probability, ROUGE-L recall and truth-ratio preference
  max(0, 1 − R) on retained people and on the general facts (↑);
* forget_rouge, forget_truth: ROUGE-L recall and max(0, 1 − R) on the forget set (the retain
  model's values are the target);
* mia_auc: min-k% (k = 40%) membership-inference AUC, forget vs holdout people (retain model ≈ 0.5);
  privleak = (AUC − AUC_retain) / AUC_retain · 100;
* relearn_rouge, relearn_truth: the same on the forget facts *not* relearned, after the relearning
  attack fine-tunes the model on a slice of the forget facts (``--relearn-*``).

Learning-rate selection (one rule for every method, fixed in advance): the rate whose final model
has the highest model utility among those with forget quality ≥ 0.05 (the KS test does not tell it
from the retain model at the 5% level); when no rate reaches that, the rate with the highest forget
quality.  As in the field, selection uses the reported metrics.

Writes results.json, results.md, metrics.png, tradeoff.png (utility against forget quality along
training) and munba_*_bargain.png (α_f, α_r, cos φ per step) to --out.

Real use: ``--pretrained DIR`` unlearns a local Hugging Face causal LM (never downloaded) on
``--forget-file``/``--retain-file`` JSONL ({"question", "answer"}, optionally "paraphrased_answer" and
"perturbed_answers"); ``--retain-model DIR`` gives the gold standard for forget quality; ``--lora``
trains LoRA adapters only.  ``--distributed fsdp2`` under torchrun shards the decoder layers.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from munba_kernels.evaluation import lm_metrics as M
from munba_kernels.evaluation.report import (
    markdown_table,
    plot_bargain_trace,
    plot_metric_bars,
    plot_tradeoff,
)

from . import lm_data, lm_models, options, parallel
from .cache import default_cache_dir
from .lm_unlearning import METHODS, Budget, relearn, unlearn

LR_GRID = (1e-4, 3e-4, 1e-3)
FQ_THRESHOLD = 0.05
SELECTION_RULE = (
    f"highest model_utility among learning rates with forget_quality >= {FQ_THRESHOLD}; "
    "if none, highest forget_quality (final model of each run)"
)
CACHE_VERSION = 1
REPORT_COLUMNS = (
    "forget_quality", "model_utility", "forget_rouge", "forget_truth", "mia_auc", "privleak",
    "relearn_rouge", "relearn_truth", "seconds", "lr",
)  # fmt: skip
PLOT_METRICS = ("forget_quality", "model_utility", "forget_rouge", "forget_truth", "mia_auc")


@dataclass
class Config:
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: int = 1
    people: int = 20
    facts_per_person: int = 10
    countries: int = 15
    forget_ratio: float = 0.1
    hidden: int = 128
    layers: int = 4
    finetune_steps: int = 300
    finetune_lr: float = 2e-3
    finetune_batch: int = 32
    lrs: list[float] = field(default_factory=lambda: list(LR_GRID))
    steps: int = 30
    forget_batch: int = 8
    retain_batch: int = 8
    max_grad_norm: float = 1.0
    npo_beta: float = 0.1
    curve_points: int = 4
    eval_retain: int = 40
    mia_k: float = 0.4
    relearn_fraction: float = 0.25
    relearn_steps: int = 20
    relearn_lr: float = 3e-4
    max_new_tokens: int = 24
    device: str = "cpu"
    threads: int | None = None
    out: str = "runs/language"
    cache_dir: str = field(default_factory=default_cache_dir)
    quick: bool = False
    progress: bool = True
    # real use
    pretrained: str | None = None
    retain_model: str | None = None
    forget_file: str | None = None
    retain_file: str | None = None
    holdout_file: str | None = None
    lora: bool = False
    lora_r: int = 8
    distributed: str | None = None


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    pos_int, pos_float = options.positive_int, options.positive_float
    p = argparse.ArgumentParser(
        prog="python -m munba_kernels.drivers.language",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--methods", default="all", help=f"'all' or a comma list of {', '.join(METHODS)}")
    p.add_argument("--seeds", type=pos_int, default=d.seeds, help="number of seeds (0, 1, …) to average over")
    p.add_argument(
        "--forget-ratio", type=options.fraction, default=d.forget_ratio, help="share of people forgotten"
    )
    p.add_argument("--people", type=options.int_at_least(2), default=d.people, help="invented people")
    p.add_argument("--facts-per-person", type=pos_int, default=d.facts_per_person,
                   help=f"1..{len(lm_data.PERSON_FACTS)}")  # fmt: skip
    p.add_argument(
        "--finetune-steps", type=pos_int, default=d.finetune_steps, help="target/retain fine-tuning"
    )
    p.add_argument("--lrs", default=",".join(map(str, d.lrs)), help="learning-rate grid, every method")
    p.add_argument("--steps", type=pos_int, default=d.steps, help="unlearning steps, every method")
    p.add_argument("--max-grad-norm", type=pos_float, default=d.max_grad_norm, help="clip, every method")
    p.add_argument("--npo-beta", type=pos_float, default=d.npo_beta)
    p.add_argument(
        "--relearn-steps", type=options.int_at_least(0, " (0 = no attack)"), default=d.relearn_steps
    )
    p.add_argument("--relearn-fraction", type=options.fraction, default=d.relearn_fraction,
                   help="share of the forget facts the attack relearns")  # fmt: skip
    p.add_argument("--relearn-lr", type=pos_float, default=d.relearn_lr)
    p.add_argument("--device", type=options.device, default=d.device, help="cpu, cuda or cuda:N")
    p.add_argument(
        "--threads",
        type=pos_int,
        default=None,
        help="torch CPU threads (default: 1 for the embedded tiny model, whose kernels are too small to "
        "split; torch's default with --pretrained)",
    )
    p.add_argument("--out", default=d.out)
    p.add_argument(
        "--cache-dir", default=d.cache_dir, help="where target/retain models are cached ($MUNBA_CACHE_DIR)"
    )
    p.add_argument("--quick", action="store_true", help="smoke run in well under a minute: tiny everything")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    real = p.add_argument_group("real models and data")
    real.add_argument(
        "--pretrained",
        default=None,
        help="local Hugging Face causal-LM folder: the target (never downloaded)",
    )
    real.add_argument(
        "--retain-model",
        default=None,
        help="local folder of the gold-standard retain model (with --pretrained)",
    )
    real.add_argument("--forget-file", default=None, help='JSONL of {"question", "answer"} to forget')
    real.add_argument("--retain-file", default=None, help="JSONL of question/answer pairs to keep")
    real.add_argument(
        "--holdout-file", default=None, help="JSONL never trained on (membership-inference non-members)"
    )
    real.add_argument("--lora", action="store_true", help="unlearn with LoRA adapters only (peft)")
    real.add_argument("--lora-r", type=pos_int, default=d.lora_r)
    real.add_argument(
        "--distributed", choices=("fsdp2",), default=None, help="under torchrun: shard decoder layers"
    )
    return p


def _lr_list(parser, text: str) -> list[float]:
    try:
        values = [options.positive_float(t.strip()) for t in text.split(",") if t.strip()]
    except argparse.ArgumentTypeError as err:
        parser.error(f"--lrs: {err}")
    if not values:
        parser.error(f"--lrs: no learning rate in {text!r}")
    return values


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> Config:
    p = parser or build_parser()
    a = p.parse_args(argv)
    if not 1 <= a.facts_per_person <= len(lm_data.PERSON_FACTS):
        p.error(f"--facts-per-person must be in 1..{len(lm_data.PERSON_FACTS)}, got {a.facts_per_person}")
    if round(a.forget_ratio * a.people) >= a.people - round(a.forget_ratio * a.people):
        p.error(f"--forget-ratio {a.forget_ratio} with --people {a.people}: nobody would be left to retain")
    if (a.forget_file is None) != (a.retain_file is None):
        p.error("--forget-file and --retain-file go together")
    if a.pretrained is not None and a.forget_file is None:
        p.error(
            "--pretrained needs --forget-file and --retain-file (the embedded people are not in a real model)"
        )
    if a.retain_model is not None and a.pretrained is None:
        p.error("--retain-model is for --pretrained runs (the embedded run trains its own)")
    cfg = options.config_from_args(
        Config,
        a,
        methods=options.method_list(p, a.methods, list(METHODS)),
        lrs=_lr_list(p, a.lrs),
        progress=not a.no_progress,
    )
    if cfg.quick:
        cfg.people, cfg.facts_per_person, cfg.countries = min(cfg.people, 10), min(cfg.facts_per_person, 4), 4
        cfg.hidden, cfg.layers, cfg.finetune_steps = 32, 2, min(cfg.finetune_steps, 40)
        cfg.lrs, cfg.steps, cfg.curve_points = cfg.lrs[-1:], min(cfg.steps, 4), 2
        cfg.eval_retain, cfg.relearn_steps, cfg.max_new_tokens = 8, min(cfg.relearn_steps, 2), 12
    return cfg


# ------------------------------------------------------------ data and models
def load_corpus(cfg: Config, seed: int) -> lm_data.Corpus:
    """The embedded corpus for ``seed``, or the JSONL files (the same for every seed)."""
    if cfg.forget_file is None:
        return lm_data.generate(seed, cfg.people, cfg.facts_per_person, cfg.forget_ratio, cfg.countries)
    corpus = lm_data.Corpus(
        forget=lm_data.load_jsonl(cfg.forget_file, "--forget-file"),
        retain=lm_data.load_jsonl(cfg.retain_file, "--retain-file"),
        holdout=lm_data.load_jsonl(cfg.holdout_file, "--holdout-file") if cfg.holdout_file else [],
    )
    corpus.check()
    return corpus


def check_local_model_dir(option: str, path: str) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise options.OptionError(
            f"{option} {path!r} is not a local Hugging Face model folder (no config.json). Nothing is "
            "downloaded: fetch the model yourself (e.g. `huggingface-cli download ID --local-dir DIR`) "
            f"and pass {option} DIR"
        )
    return folder


def load_pretrained(path: str, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
    return tok, model.to(device).eval()


def check_tokenizer(tokenizer, model, option: str) -> None:
    from munba_kernels.integrations.transformers import check_tokenizer as check

    try:
        check(tokenizer, model)
    except ValueError as err:
        raise options.OptionError(f"{option}: {err}") from None


def prepare_models(cfg: Config, corpus: lm_data.Corpus, seed: int):
    """``(tokenizer, target, retain or None, seconds)``: loaded (--pretrained) or fine-tuned and cached."""
    if cfg.pretrained is not None:
        tok, target = load_pretrained(cfg.pretrained, cfg.device)
        check_tokenizer(tok, target, "--pretrained")
        retain = None
        if cfg.retain_model is not None:
            _, retain = load_pretrained(cfg.retain_model, cfg.device)
            check_tokenizer(tok, retain, "--retain-model")
        return tok, target, retain, {}
    tok = lm_models.build_tokenizer(corpus.texts())
    size = lm_models.ModelSize(hidden=cfg.hidden, layers=cfg.layers, heads=4, intermediate=3 * cfg.hidden)
    common = dict(
        cache_dir=cfg.cache_dir, key={"version": CACHE_VERSION}, tokenizer=tok, size=size,
        steps=cfg.finetune_steps, lr=cfg.finetune_lr, batch_size=cfg.finetune_batch, seed=seed,
        device=cfg.device, progress=cfg.progress,
    )  # fmt: skip
    everyone = lm_models.examples(tok, corpus.forget + corpus.retain + corpus.general)
    kept = lm_models.examples(tok, corpus.retain + corpus.general)
    target, t_s, t_loss = lm_models.cached_finetune(kind="target", items=everyone, **common)
    retain, r_s, r_loss = lm_models.cached_finetune(kind="retain", items=kept, **common)
    info = {"target_seconds": t_s, "retain_seconds": r_s, "target_final_loss": t_loss, "retain_final_loss": r_loss,
            "parameters": sum(p.numel() for p in target.parameters()), "vocab": len(tok)}  # fmt: skip
    return tok, target, retain, info


# ------------------------------------------------------------ evaluation
@dataclass
class EvalSets:
    forget: list
    retain: list
    general: list
    holdout: list
    relearn_rest: list  # forget facts the relearning attack does not see


def _ratios(model, tok, qas, device) -> list[float] | None:
    usable = [qa for qa in qas if qa.paraphrase and qa.perturbed]
    if not usable:
        return None
    questions = [qa.question for qa in usable]
    para = M.answer_token_logprobs(model, tok, questions, [qa.paraphrase for qa in usable], device=device)
    width = min(len(qa.perturbed) for qa in usable)
    pert = [
        M.answer_token_logprobs(model, tok, questions, [qa.perturbed[j] for qa in usable], device=device)
        for j in range(width)
    ]
    return [M.truth_ratio(para[i], [pert[j][i] for j in range(width)]) for i in range(len(usable))]


def _score(model, tok, qas, cfg: Config, *, rouge=True, ratios=True) -> dict:
    if not qas:
        return {}
    questions = [qa.question for qa in qas]
    lps = M.answer_token_logprobs(model, tok, questions, [qa.answer for qa in qas], device=cfg.device)
    out = {"prob": statistics.fmean(M.normalised_probability(t) for t in lps), "logprobs": lps}
    if rouge:
        generated = M.greedy_answers(
            model, tok, questions, max_new_tokens=cfg.max_new_tokens, device=cfg.device
        )
        out["rouge"] = statistics.fmean(M.rouge_l_recall(generated, [qa.answer for qa in qas]))
    if ratios:
        out["ratios"] = _ratios(model, tok, qas, cfg.device)
        out["truth"] = M.truth_ratio_utility(out["ratios"]) if out["ratios"] else None
    return out


def evaluate(model, tok, sets: EvalSets, cfg: Config, reference: dict | None) -> dict:
    """Every metric of one model; ``reference``: the retain model's forget truth ratios and MIA AUC."""
    forget = _score(model, tok, sets.forget, cfg)
    retain = _score(model, tok, sets.retain, cfg)
    general = _score(model, tok, sets.general, cfg)
    terms = [s.get(k) for s in (retain, general) for k in ("prob", "rouge", "truth") if s]
    row = {
        "model_utility": M.model_utility([t for t in terms if t is not None]),
        "forget_rouge": forget["rouge"],
        "forget_truth": forget["truth"],
        "forget_prob": forget["prob"],
        "retain_prob": retain["prob"], "retain_rouge": retain["rouge"], "retain_truth": retain["truth"],
        "general_prob": general.get("prob"), "general_rouge": general.get("rouge"),
        "general_truth": general.get("truth"),
        "forget_ratios": forget["ratios"],
    }  # fmt: skip
    row["forget_quality"] = (
        M.forget_quality(forget["ratios"], reference["forget_ratios"])
        if reference and reference.get("forget_ratios") and forget["ratios"]
        else None
    )
    if sets.holdout:
        holdout = M.answer_token_logprobs(
            model,
            tok,
            [qa.question for qa in sets.holdout],
            [qa.answer for qa in sets.holdout],
            device=cfg.device,
        )
        row["mia_auc"] = M.mia_auc(
            [M.min_k_score(t, cfg.mia_k) for t in forget["logprobs"]],
            [M.min_k_score(t, cfg.mia_k) for t in holdout],
        )
        base = reference.get("mia_auc") if reference else None
        row["privleak"] = (row["mia_auc"] - base) / base * 100 if base else None
    return row


def relearn_metrics(model, tok, sets: EvalSets, slice_items, cfg: Config, seed: int) -> dict:
    """The relearning attack on ``model``; ROUGE-L and truth preference on the facts not relearned."""
    if cfg.relearn_steps == 0 or not sets.relearn_rest:
        return {}
    attacked = relearn(model, slice_items, steps=cfg.relearn_steps, lr=cfg.relearn_lr, batch_size=8,
                       seed=seed, device=cfg.device, pad_token_id=tok.pad_token_id or 0)  # fmt: skip
    rest = _score(attacked, tok, sets.relearn_rest, cfg)
    return {"relearn_rouge": rest["rouge"], "relearn_truth": rest["truth"]}


def select(runs: dict[float, dict]) -> float:
    """The learning rate chosen by SELECTION_RULE from ``{lr: final row}``."""
    fq = {
        lr: (row["forget_quality"] if row["forget_quality"] is not None else -1.0) for lr, row in runs.items()
    }
    passing = [lr for lr in runs if fq[lr] >= FQ_THRESHOLD]
    if passing:
        return max(passing, key=lambda lr: (runs[lr]["model_utility"], -lr))
    return max(runs, key=lambda lr: (fq[lr], runs[lr]["model_utility"], -lr))


# ------------------------------------------------------------ one seed
def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "forget_ratios"}


def _lora(cfg: Config):
    if not cfg.lora:
        return None
    import peft

    def wrap(model):
        config = peft.LoraConfig(
            r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, target_modules="all-linear", lora_dropout=0.0
        )
        return peft.get_peft_model(model, config)

    return wrap


def _fsdp2(ranks: parallel.Ranks, make_plain):
    """``(wrap, shard, gather)`` for FSDP2 data parallelism over ``ranks`` (all None without it).

    wrap: rank 0's weights broadcast, then every decoder layer and the root sharded with
    ``fully_shard``; shard: this rank's rows of a batch; gather: the full weights in a plain copy
    from ``make_plain()`` on rank 0 (a collective every rank calls; None elsewhere)."""
    if ranks.mode != "fsdp2":
        return None, None, None
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    def wrap(model):
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t, src=0)
        for module in list(model.modules()):
            if type(module).__name__.endswith("DecoderLayer"):
                fully_shard(module)
        return fully_shard(model)

    def shard(batch):
        return {k: v[ranks.rank :: ranks.world] for k, v in batch.items()}

    def gather(model):
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not ranks.lead:
            return None
        plain = make_plain()
        plain.load_state_dict(state)
        return plain.eval()

    return wrap, shard, gather


def run_seed(cfg: Config, seed: int, ranks: parallel.Ranks = parallel.SINGLE_PROCESS) -> dict | None:
    """Every method over the grid for one seed; rank 0 returns the rows (other ranks: None)."""
    corpus = load_corpus(cfg, seed)
    if ranks.world > 1:  # rank 0 fine-tunes and caches; the others then load the cached models
        import torch.distributed as dist

        if ranks.lead:
            prepared = prepare_models(cfg, corpus, seed)
        dist.barrier()
        if not ranks.lead:
            prepared = prepare_models(cfg, corpus, seed)
    else:
        prepared = prepare_models(cfg, corpus, seed)
    tok, target, retain_model, info = prepared
    rng = random.Random(seed + 7)
    n_slice = max(1, math.ceil(cfg.relearn_fraction * len(corpus.forget)))
    slice_idx = set(rng.sample(range(len(corpus.forget)), n_slice)) if len(corpus.forget) > 1 else set()
    sets = EvalSets(
        forget=corpus.forget,
        retain=rng.sample(corpus.retain, min(cfg.eval_retain, len(corpus.retain))),
        general=corpus.general,
        holdout=corpus.holdout,
        relearn_rest=[qa for i, qa in enumerate(corpus.forget) if i not in slice_idx],
    )
    slice_items = lm_models.examples(tok, [qa for i, qa in enumerate(corpus.forget) if i in slice_idx])
    forget_items = lm_models.examples(tok, corpus.forget)
    retain_items = lm_models.examples(tok, corpus.retain)

    rows, grid, curves, bargains = {}, {}, {}, {}
    reference, start_row = None, None
    if ranks.lead:
        if retain_model is not None:
            reference = evaluate(retain_model, tok, sets, cfg, None)
            reference["forget_quality"] = 1.0  # its own distribution
            reference["privleak"] = 0.0
            rows["Retain"] = {**_public(reference), **relearn_metrics(retain_model, tok, sets, slice_items, cfg, seed),
                              "seconds": info.get("retain_seconds")}  # fmt: skip
        start_row = evaluate(target, tok, sets, cfg, reference)
        rows["Target"] = {**_public(start_row), **relearn_metrics(target, tok, sets, slice_items, cfg, seed),
                          "seconds": info.get("target_seconds")}  # fmt: skip
    budget = Budget(steps=cfg.steps, forget_batch=cfg.forget_batch, retain_batch=cfg.retain_batch,
                    max_grad_norm=cfg.max_grad_norm, npo_beta=cfg.npo_beta, seed=seed)  # fmt: skip
    eval_at = tuple(
        sorted({max(1, round(cfg.steps * (i + 1) / cfg.curve_points)) for i in range(cfg.curve_points)})
    )
    lora = _lora(cfg)
    make_plain = (lambda: lora(copy.deepcopy(target))) if lora else (lambda: copy.deepcopy(target))
    fsdp_wrap, shard, gather = _fsdp2(ranks, make_plain)
    wrap = (lambda m: fsdp_wrap(lora(m))) if (lora and fsdp_wrap) else (fsdp_wrap or lora)
    last = {}

    def evaluate_run(model):
        plain = gather(model) if gather else model
        last["model"] = plain
        return evaluate(plain, tok, sets, cfg, reference) if ranks.lead else {}

    progress = cfg.progress and ranks.lead
    for method in tqdm(cfg.methods, desc=f"seed {seed}: methods", disable=not progress):
        runs = {}
        for lr in cfg.lrs:
            run = unlearn(
                method, target, forget_items, retain_items, lr=lr, budget=budget, device=cfg.device,
                pad_token_id=tok.pad_token_id or 0, eval_at=eval_at, wrap=wrap, shard=shard,
                evaluate=evaluate_run, progress=progress,
            )  # fmt: skip
            run.model = last.pop("model")
            runs[lr] = run
            if ranks.lead:
                grid.setdefault(method, {})[lr] = {**_public(run.curve[-1]), "seconds": run.seconds}
                curves.setdefault(method, {})[lr] = [
                    {"step": 0, "forget_quality": start_row["forget_quality"], "model_utility": start_row["model_utility"]},
                    *({k: c[k] for k in ("step", "forget_quality", "model_utility")} for c in run.curve),
                ]  # fmt: skip
        if ranks.lead:
            lr = select(grid[method])
            run = runs[lr]
            attack = relearn_metrics(run.model, tok, sets, slice_items, cfg, seed)
            rows[method] = {**grid[method][lr], **attack, "lr": lr, "settings": run.settings}
            if run.bargain:
                bargains[method] = run.bargain
        runs.clear()  # one method's models at a time
    if not ranks.lead:
        return None
    return {"rows": rows, "grid": grid, "curves": curves, "bargain": bargains, "info": info}


# ------------------------------------------------------------ seeds, report
def aggregate(per_seed: list[dict]) -> dict[str, dict]:
    """Mean and standard deviation over seeds of every numeric entry, per-seed rows alongside."""
    out = {}
    for name in per_seed[0]["rows"]:
        rows = [s["rows"][name] for s in per_seed]
        agg = {}
        for key, value in rows[0].items():
            values = [r.get(key) for r in rows]
            if key == "lr":
                agg["lr"] = values[0] if len(set(values)) == 1 else values
            elif key == "settings":
                agg["settings"] = value
            elif isinstance(value, (int, float)) and all(isinstance(v, (int, float)) for v in values):
                agg[key] = statistics.fmean(values)
                agg[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            else:
                agg[key] = None
        agg["per_seed"] = [{k: v for k, v in r.items() if k != "settings"} for r in rows]
        out[name] = agg
    return out


def results_table(methods: dict, seeds: int, title: str) -> str:
    cells = {}
    for name, row in methods.items():
        cells[name] = {}
        for col in REPORT_COLUMNS:
            value = row.get(col)
            if isinstance(value, list):  # per-seed learning rates
                cells[name][col] = ", ".join(f"{v:g}" for v in value)
            elif isinstance(value, float) and seeds > 1 and f"{col}_std" in row:
                cells[name][col] = f"{_fmt(value, col)} ± {_fmt(row[f'{col}_std'], col)}"
            else:
                cells[name][col] = (
                    None if value is None else (_fmt(value, col) if isinstance(value, float) else value)
                )
    return markdown_table(cells, REPORT_COLUMNS, title)


def _fmt(value: float, col: str) -> str:
    if col == "lr":
        return f"{value:g}"
    if col == "forget_quality":
        return f"{value:.2g}" if value < 0.01 else f"{value:.3f}"
    if col in ("seconds", "privleak"):
        return f"{value:.1f}"
    return f"{value:.3f}"


def check_before_work(cfg: Config, ranks: parallel.Ranks = parallel.SINGLE_PROCESS) -> None:
    """Up-front checks (one-line errors naming the option): --out and --cache-dir writable (on the
    rank that writes them), model folders local, JSONL files readable."""
    if ranks.lead:
        options.check_writable_dir("--out", cfg.out)
    if cfg.pretrained is None:
        if ranks.lead:
            options.check_writable_dir("--cache-dir", cfg.cache_dir)
    else:
        check_local_model_dir("--pretrained", cfg.pretrained)
    if cfg.retain_model is not None:
        check_local_model_dir("--retain-model", cfg.retain_model)
    if cfg.forget_file is not None:
        load_corpus(cfg, 0)
    if cfg.lora:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise options.OptionError("--lora needs peft (the optional extra [hf])") from None


FRONTIER_THRESHOLDS = (0.05, 0.1, 0.3, 0.5)


def frontier(curves: list[dict], thresholds=FRONTIER_THRESHOLDS) -> dict[str, dict]:
    """The trade-off frontier: per method and seed, the highest model utility of any evaluated point
    (any learning rate of the grid, any step along training) whose forget quality reaches each
    threshold; ``None`` where no point does.  Dominance reads off it: higher utility at equal or
    better forget quality.  Every method gets the same points per run, so the (optimistic) choice
    is the same for all."""
    out = {}
    for method in curves[0]:
        out[method] = {}
        for t in thresholds:
            best = []
            for seed_curves in curves:
                points = [p for pts in seed_curves[method].values() for p in pts if p["step"] > 0]
                ok = [
                    p["model_utility"]
                    for p in points
                    if p["forget_quality"] is not None and p["forget_quality"] >= t
                ]
                best.append(max(ok) if ok else None)
            out[method][f"{t:g}"] = best
    return out


def frontier_table(front: dict) -> str:
    thresholds = list(next(iter(front.values())))
    lines = ["| method | " + " | ".join(f"utility at FQ ≥ {t}" for t in thresholds) + " |",
             "|---|" + "---:|" * len(thresholds)]  # fmt: skip
    for method, row in front.items():
        cells = []
        for t in thresholds:
            values = [v for v in row[t] if v is not None]
            if len(values) < len(row[t]):
                cells.append(f"– ({len(row[t]) - len(values)} seed(s) never reach it)" if values else "–")
            elif len(values) > 1:
                cells.append(f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}")
            else:
                cells.append(f"{values[0]:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(cfg: Config, results: dict, per_seed: list[dict]) -> str:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    title = (
        f"TOFU-style unlearning, forget {cfg.forget_ratio:.0%} of {cfg.people} people, "
        f"{cfg.seeds} seed(s){', mean ± std' if cfg.seeds > 1 else ''}"
        if cfg.forget_file is None
        else f"unlearning {cfg.forget_file}, {cfg.seeds} seed(s)"
    )
    table = results_table(results["methods"], cfg.seeds, title)
    table += (
        f"\nforget_quality: KS p-value of the forget-set truth ratios against the retain model's (↑); "
        "model_utility: harmonic mean of probability, ROUGE-L and truth preference on retained people and "
        "general facts (↑); forget_rouge / forget_truth: on the forget set (the retain model's values are the "
        "goal); mia_auc: min-k% MIA, forget vs holdout (0.5 = no leak); relearn_*: on forget facts not "
        f"relearned, after the relearning attack; seconds: unlearning only. Selection: {SELECTION_RULE}.\n"
    )
    if results.get("frontier"):
        table += (
            "\n### Trade-off frontier: the best model utility at a given forget quality\n\n"
            "Any learning rate of the grid, any evaluated step (tradeoff.png); mean ± std over seeds.\n\n"
            + frontier_table(results["frontier"])
        )
    (out / "results.md").write_text(table)
    plot_rows = {
        n: {m: r.get(m) for m in PLOT_METRICS if r.get(m) is not None} for n, r in results["methods"].items()
    }
    for row, full in zip(plot_rows.values(), results["methods"].values()):
        if full.get("seconds") is not None:
            row["seconds"] = full["seconds"]
    plot_metric_bars(plot_rows, PLOT_METRICS, out / "metrics.png", title, ylabel="value", ylim=(0, 1.25))
    chosen = {m: per_seed[0]["rows"][m]["lr"] for m in cfg.methods}
    plot_tradeoff(
        per_seed[0]["curves"], chosen, out / "tradeoff.png", "utility against forget quality (seed 0)"
    )
    for method, trace in per_seed[0]["bargain"].items():
        name = method.lower().replace("+", "_")
        plot_bargain_trace(
            trace, out / f"{name}_bargain.png", f"{method}: bargaining weights and cos φ (seed 0)"
        )
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    cfg = parse_args(argv, parser)
    ranks = parallel.SINGLE_PROCESS
    if cfg.distributed:
        ranks, cfg.device = parallel.init(cfg.distributed, cfg.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or (1 if cfg.pretrained is None and cfg.device == "cpu" else threads))
    try:
        with options.usage_errors(parser):
            check_before_work(cfg, ranks)
        start = time.perf_counter()
        per_seed = []
        for seed in range(cfg.seeds):
            with options.usage_errors(parser):  # e.g. a tokenizer that does not match --pretrained
                per_seed.append(run_seed(cfg, seed, ranks))
        if not ranks.lead:
            return {}
        methods = aggregate(per_seed)
        results = {
            "config": asdict(cfg),
            "selection_rule": SELECTION_RULE,
            "methods": methods,
            "grid": [s["grid"] for s in per_seed],
            "curves": [s["curves"] for s in per_seed],
            "frontier": frontier([s["curves"] for s in per_seed]),
            "bargain": [s["bargain"] for s in per_seed],
            "models": [s["info"] for s in per_seed],
            "wall_seconds": time.perf_counter() - start,
        }
        table = write_report(cfg, results, per_seed)
        print("\n" + table)
        print(
            f"wrote {Path(cfg.out) / 'results.json'}, results.md, metrics.png, tradeoff.png "
            f"({results['wall_seconds']:.0f}s)"
            + (f"; fsdp2 over {ranks.world} ranks" if ranks.world > 1 else "")
        )
        return results
    finally:
        torch.set_num_threads(threads)
        parallel.shutdown(ranks)


if __name__ == "__main__":
    main()
