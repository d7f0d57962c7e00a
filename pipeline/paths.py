"""Where each stage reads and writes, relative to the project root (dvc.yaml names the same paths)."""

from __future__ import annotations

import os
from pathlib import Path

RAW_DIR = Path("data/raw")
SPLIT_DIR = Path("data/split")
MODEL_FILE = Path("models/model.pt")
RUN_FILE = Path("models/mlflow_run.json")  # not a DVC output: a run id differs on every run
CHECKPOINT_FILE = Path("models/checkpoint.pt")  # the run in progress: what a killed run resumes from
STATE_FILE = Path("models/state.pt")  # the finished run's last checkpoint: what more epochs continue from
DVC_FILE = Path("dvc.yaml")
TRAIN_METRICS = Path("metrics/train.json")
TRAIN_HISTORY = Path("metrics/history.csv")
TRAIN_LATENT = Path("metrics/latent.csv")  # each epoch's KL per latent dimension
TEST_METRICS = Path("metrics/test.json")
FIGURES_DIR = Path("figures")
# Set by a sweep whose trials run in a clone of the user's repository: that repository. (DVC sets
# DVC_ROOT to the clone for the clone's own `dvc exp run`.)
PROJECT_ROOT_VARIABLE = "PIPELINE_PROJECT_ROOT"


def project_root() -> Path:
    """The user's repository, also when `dvc exp run --queue` or a sweep runs us in a copy of it."""
    return Path(os.environ.get(PROJECT_ROOT_VARIABLE) or os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def from_root(path: str | Path) -> Path:
    """A user-given path made absolute against the project root (relative paths in params.yaml mean that)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_root() / path
