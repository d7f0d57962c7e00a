"""Typed, validated view of params.yaml.

Every stage loads the whole file, so a typo anywhere stops the pipeline at its first stage with one
message that names the key, before any download or training starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from pipeline.errors import PipelineError

PARAMS_FILE = Path("params.yaml")
LARGEST_INTEGER = 2**63 - 1  # an int64: a seed, a size or a count beyond it overflows in PyTorch and NumPy


class ParamsError(PipelineError):
    """params.yaml holds an unknown key, a wrong type or an out-of-range value."""


def _check(predicate, requirement: str, shown=repr) -> dict:
    """A value's range check; `shown` writes the refused value into the message."""
    return {"check": predicate, "requirement": requirement, "shown": shown}


_positive = _check(lambda v: v > 0, "must be greater than 0")
_non_negative = _check(lambda v: v >= 0, "must be 0 or more")


@dataclass(frozen=True)
class DataParams:
    dataset: Literal["mnist", "fashion_mnist"] = "mnist"
    mirror: str | None = None
    val_fraction: float = field(default=0.2, metadata=_check(lambda v: 0 < v < 1, "must be strictly between 0 and 1"))
    split_seed: int = field(default=42, metadata=_non_negative)  # apart from `seed`: sweeping that keeps the split
    train_images: int | None = field(default=None, metadata=_positive)  # a seeded part of them (None: all)
    test_images: int | None = field(default=None, metadata=_positive)  # the first of them (None: all)


@dataclass(frozen=True)
class ModelParams:
    input_dim: int = field(default=1, metadata=_positive)
    hidden_dim: int = field(default=64, metadata=_positive)
    latent_dim: int = field(default=2, metadata=_positive)
    leaky_relu: float = field(default=0.01, metadata=_non_negative)


@dataclass(frozen=True)
class TrainParams:
    batch_size: int = field(default=64, metadata=_positive)
    learning_rate: float = field(default=0.0005, metadata=_positive)
    epochs: int = field(default=200, metadata=_positive)
    device: str = field(
        default="auto",
        metadata=_check(lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v), "must be auto, cpu, cuda or cuda:N"),
    )
    num_processes: int = field(default=1, metadata=_positive)
    beta: float = field(default=1.0, metadata=_non_negative)
    reconstruction: Literal["mse", "bce"] = "mse"
    kl_warmup_epochs: int = field(default=0, metadata=_non_negative)  # beta rises from 0 over these; 0: off
    free_bits: float = field(default=0.0, metadata=_non_negative)  # nats per latent dimension; 0: off
    channels_last: bool = True
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    deterministic: bool = False
    num_threads: int = field(default=0, metadata=_non_negative)  # a CPU run's threads; 0: torch's default
    cuda_graph: bool = True
    compile: bool = True
    early_stopping: int = field(default=0, metadata=_non_negative)  # patience in epochs; 0: off
    min_delta: float = field(default=0.0, metadata=_non_negative)  # what counts as an improvement
    keep_epoch: Literal["last", "best"] = "last"  # whose weights become models/model.pt


@dataclass(frozen=True)
class EvaluateParams:
    iw_samples: int = field(default=100, metadata=_positive)
    knn_neighbours: int = field(default=5, metadata=_positive)


@dataclass(frozen=True)
class VisualizeParams:
    num_images: int = field(default=10, metadata=_positive)
    num_samples: int = field(default=100, metadata=_positive)
    manifold_size: int = field(default=20, metadata=_positive)
    interpolation_steps: int = field(default=10, metadata=_check(lambda v: v >= 2, "must be 2 or more"))


def _holds_no_credentials(uri: str) -> bool:
    parts = urlsplit(uri)
    return parts.username is None and parts.password is None


def _without_credentials(uri: str) -> str:
    """The URI with its user:password@ masked: a refused password is not echoed into a log."""
    parts = urlsplit(uri)
    return repr(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl())


# params.yaml is committed, and pushed with every DVC experiment: a secret in it is a published one.
_NO_CREDENTIALS = _check(
    _holds_no_credentials,
    "must not hold a user or password, as params.yaml is committed and pushed with every experiment: "
    "remove them, and set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
    "in the environment instead",
    shown=_without_credentials,
)


@dataclass(frozen=True)
class MlflowParams:
    enabled: bool = True
    tracking_uri: str = field(default="sqlite:///mlruns/mlflow.db", metadata=_NO_CREDENTIALS)
    experiment_name: str = field(default="vae-pipeline", metadata=_check(lambda v: v.strip(), "must not be empty"))
    registered_model: str | None = None


@dataclass(frozen=True)
class Params:
    seed: int = field(default=42, metadata=_non_negative)
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    visualize: VisualizeParams = VisualizeParams()
    mlflow: MlflowParams = MlflowParams()

    def flat(self) -> dict[str, Any]:
        """Dotted keys to values, the way DVC and MLflow name params."""
        return flatten(dataclasses.asdict(self))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys to leaf values."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if isinstance(tp, types.UnionType):
        return " or ".join("null" if a is type(None) else a.__name__ for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, tp.__name__)


def _matches(value, tp) -> bool:
    if typing.get_origin(tp) is Literal:
        return value in typing.get_args(tp)
    if isinstance(tp, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:  # YAML reads 1 as int and 5e-4 as str; accept both spellings of a number
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _build(cls, raw: Any, prefix: str):
    hints = typing.get_type_hints(cls)
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix.rstrip('.') or 'params.yaml'}: expected a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            raise ParamsError(f"unknown key '{prefix}{key}'{hint}")
    values = {}
    for name, f in fields.items():
        tp, key = hints[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, raw.get(name, {}), f"{key}.")
            continue
        if name not in raw:
            continue  # the dataclass default applies
        value = raw[name]
        if isinstance(value, str) and tp is float:
            value = _parse_float(value, key)
        if not _matches(value, tp):
            raise ParamsError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        if tp is float and not math.isfinite(value):
            raise ParamsError(f"{key}: must be a finite number, got {value}")
        if "check" in f.metadata and value is not None and not f.metadata["check"](value):
            raise ParamsError(f"{key}: {f.metadata['requirement']}, got {f.metadata['shown'](raw[name])}")
        if tp is int and abs(value) > LARGEST_INTEGER:  # after the field's own check, which bounds it below
            raise ParamsError(
                f"{key}: must be at most {LARGEST_INTEGER:,} (2^63 - 1, the largest integer PyTorch "
                f"and NumPy take), got {value}"
            )
        values[name] = float(value) if tp is float else value
    return cls(**values)


def _parse_float(text: str, key: str) -> float:
    """PyYAML reads '5e-4' (no dot) as a string; accept it as the number it plainly is."""
    try:
        return float(text)
    except ValueError:
        raise ParamsError(f"{key}: expected a number, got {text!r}") from None


def parse_params(raw: Any) -> Params:
    return _build(Params, {} if raw is None else raw, "")


def load_params(path: Path = PARAMS_FILE) -> Params:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path} not found: run the stage from the project root, where params.yaml lives") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    return parse_params(raw)
