"""Option validation shared by the drivers' command lines (classify, diffusion, toy).

Bad values get a one-line argparse error naming the option (exit code 2), never a traceback,
and before any work: the ``argparse`` types below reject a value while the command line is
parsed; checks that need the file system or the loaded data raise :class:`OptionError`, which
:func:`usage_errors` turns into ``parser.error``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from .data import NEEDS_DATA_DIR, DataError


class OptionError(ValueError):
    """A command-line value that cannot work; the message names the option."""


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_at_least(minimum: int, note: str = ""):
    """argparse type: an integer ≥ ``minimum`` (``note`` explains a special value, e.g. 0 = all)."""

    def parse(text: str) -> int:
        value = _number(int, text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer of at least {minimum}{note}, got {text!r}")
        return value

    return parse


positive_int = int_at_least(1)


def finite_float(text: str) -> float:
    """argparse type: a finite number (not nan or inf)."""
    return _number(float, text)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (learning rates)."""
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1 (a share of the data)."""
    value = _number(float, text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text!r}")
    return value


def clip_norm(text: str) -> float | None:
    """argparse type of ``--max-grad-norm``: a positive number, or ``none``/``off`` for no clip."""
    if text.lower() in ("none", "off"):
        return None
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--max-grad-norm must be positive or 'none', got {text}")
    return value


def device(text: str) -> str:
    """argparse type: ``cpu``, ``cuda`` or ``cuda:N``, where CUDA (device N) is available."""
    kind, colon, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (colon and (kind == "cpu" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text} was requested but no CUDA device is available")
        if colon and int(index) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text} was requested but only {torch.cuda.device_count()} CUDA device(s) are available"
            )
    return text


def method_list(parser: argparse.ArgumentParser, text: str, known) -> list[str]:
    """``--methods``: 'all' or a comma list of ``known`` (at least one)."""
    chosen = list(known) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in known]
    if unknown or not chosen:
        what = f"unknown {unknown}" if unknown else f"none given in {text!r}"
        parser.error(f"--methods: {what}; choose from {', '.join(known)} or 'all'")
    return chosen


def check_data_dir(parser: argparse.ArgumentParser, dataset: str, data_dir: str | None) -> None:
    if data_dir is None and dataset in NEEDS_DATA_DIR:
        parser.error(
            f"--dataset {dataset} needs --data-dir pointing at its local files (nothing is downloaded)"
        )


def check_writable_dir(option: str, path: str | Path) -> None:
    """Create ``path`` if needed and write a probe file in it; :class:`OptionError` when that fails."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise OptionError(
            f"{option} {str(path)!r} is not a writable directory ({err.strerror or err})"
        ) from None


@contextmanager
def usage_errors(parser: argparse.ArgumentParser):
    """Report an :class:`OptionError`, an unusable data file or a missing file raised inside as
    ``parser.error`` (one line, exit code 2).  Wrap only the up-front checks and data loading."""
    try:
        yield
    except (OptionError, DataError, FileNotFoundError) as err:
        parser.error(str(err))


def config_from_args(cls, args: argparse.Namespace, **derived):
    """A driver's dataclass ``cls`` from parsed ``args``: every field named like an option's
    destination (``--forget-ratio`` -> ``forget_ratio``) takes its value, ``derived`` the rest
    (values computed or spelled differently), so the CLI-to-config mapping lives in the parser."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **derived})

