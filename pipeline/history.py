"""The losses of each finished epoch: one row type, written the same way whether the run trained
the epoch or resumed after it, so a resumed run's outputs are the bytes of an uninterrupted one."""

from __future__ import annotations

import csv
import dataclasses
import io

import torch

from pipeline.loss_names import LOSS_NAMES

EPOCH = "epoch"  # the history's first column, and each metric's step
EPOCHS = "epochs"  # in metrics/train.json: how many epochs the model trained
COLUMNS = tuple(f"{split}_{name}" for split in ("train", "val") for name in LOSS_NAMES)
# What a search optimises and a sweep calls best: the validation negative ELBO, reconstruction + KL
# whatever `train.beta` weighs the KL by in training, so trials of every beta compare (val_total
# does not: a smaller beta lowers it without modelling the data any better). Its units are those
# of `train.reconstruction`'s decoder, so it compares trials of one decoder only.
OBJECTIVE = "val_neg_elbo"


@dataclasses.dataclass(frozen=True)
class EpochLosses:
    epoch: int
    losses: dict[str, float]  # by COLUMNS: train_reconstruction ... val_total

    @property
    def metrics(self) -> dict[str, float]:
        """The losses and the OBJECTIVE, as the epoch is logged and written."""
        return self.losses | {OBJECTIVE: self.losses["val_reconstruction"] + self.losses["val_kl"]}

    @classmethod
    def of(cls, epoch: int, train_parts: torch.Tensor, val_parts: torch.Tensor) -> EpochLosses:
        return cls(epoch, dict(zip(COLUMNS, train_parts.tolist() + val_parts.tolist())))


def to_saved(history: list[EpochLosses]) -> list[list[float]]:
    """The history as a checkpoint holds it: a row of numbers per epoch, the epoch first. Numbers
    pickle to the same bytes however the rows were made; dicts do not (the pickle's memo follows
    which key strings are shared, and those loaded from a checkpoint are)."""
    return [[row.epoch, *(row.losses[c] for c in COLUMNS)] for row in history]


def from_saved(saved: list[list[float]]) -> list[EpochLosses]:
    return [EpochLosses(int(epoch), dict(zip(COLUMNS, losses))) for epoch, *losses in saved]


def to_csv(history: list[EpochLosses]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([EPOCH, *COLUMNS, OBJECTIVE])
    writer.writerows([row.epoch, *row.metrics.values()] for row in history)
    return out.getvalue()


def train_metrics(history: list[EpochLosses]) -> dict[str, float]:
    """metrics/train.json: the epochs trained, then the last epoch's losses and OBJECTIVE."""
    return {EPOCHS: history[-1].epoch} | {c: round(v, 6) for c, v in history[-1].metrics.items()}


def split_train_metrics(metrics: dict[str, float]) -> tuple[int, dict[str, float]]:
    """metrics/train.json's epoch count, and its losses (as MLflow and the sweep log them)."""
    return metrics.get(EPOCHS, 0), {k: v for k, v in metrics.items() if k != EPOCHS}
