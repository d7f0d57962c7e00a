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
# Each epoch, how much of the latent space the model uses on the validation images: a posterior
# collapsing shows here as training goes, not only in evaluate's active_units at the end.
ACTIVE_UNITS = "val_active_units"
DIMENSION = "dimension"  # metrics/latent.csv: a row per epoch and latent dimension, with its KL
# What early stopping watches and the best epoch is best by: the training loss on the validation
# images, as Lightning's EarlyStopping and ModelCheckpoint would monitor it.
BEST_BY = "val_total"
BEST_EPOCH = "best_epoch"


@dataclasses.dataclass(frozen=True)
class EpochLosses:
    epoch: int
    losses: dict[str, float]  # by COLUMNS: train_reconstruction ... val_total
    kl_per_dim: tuple[float, ...]  # the validation KL of each latent dimension
    active_units: int  # of the validation images' posterior means

    @property
    def metrics(self) -> dict[str, float]:
        """The losses, the OBJECTIVE and the ACTIVE_UNITS, as the epoch is logged and written."""
        objective = self.losses["val_reconstruction"] + self.losses["val_kl"]
        return self.losses | {OBJECTIVE: objective, ACTIVE_UNITS: self.active_units}

    @property
    def run_metrics(self) -> dict[str, float]:
        """What the MLflow run logs at the epoch's step: the metrics and each latent dimension's KL
        (too many for train.json's table where model.latent_dim is large)."""
        return self.metrics | {f"val_kl_dim{dim}": kl for dim, kl in enumerate(self.kl_per_dim)}

    @classmethod
    def of(cls, epoch: int, train_parts: torch.Tensor, validation) -> EpochLosses:
        """The epoch's row from its training loss parts and its validation, a `losses.DatasetLoss`
        (not imported: what only reads the history does not depend on the loss's arithmetic)."""
        losses = dict(zip(COLUMNS, train_parts.tolist() + validation.parts.tolist()))
        return cls(epoch, losses, tuple(validation.kl_per_dim.tolist()), int(validation.active_units))


def to_saved(history: list[EpochLosses]) -> list[list[float]]:
    """The history as a checkpoint holds it: a row of numbers per epoch, the epoch first. Numbers
    pickle to the same bytes however the rows were made; dicts do not (the pickle's memo follows
    which key strings are shared, and those loaded from a checkpoint are)."""
    return [[row.epoch, *(row.losses[c] for c in COLUMNS), row.active_units, *row.kl_per_dim] for row in history]


def from_saved(saved: list[list[float]]) -> list[EpochLosses]:
    rows = []
    for epoch, *numbers in saved:
        losses, (active_units, *kl_per_dim) = numbers[: len(COLUMNS)], numbers[len(COLUMNS) :]
        rows.append(EpochLosses(int(epoch), dict(zip(COLUMNS, losses)), tuple(kl_per_dim), int(active_units)))
    return rows


def to_csv(history: list[EpochLosses]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([EPOCH, *COLUMNS, OBJECTIVE, ACTIVE_UNITS])
    writer.writerows([row.epoch, *row.metrics.values()] for row in history)
    return out.getvalue()


def from_csv(text: str) -> list[EpochLosses]:
    """metrics/history.csv read back (to_csv's), without the KL per dimension it does not hold."""
    return [
        EpochLosses(int(row[EPOCH]), {c: float(row[c]) for c in COLUMNS}, (), int(float(row[ACTIVE_UNITS])))
        for row in csv.DictReader(io.StringIO(text))
    ]


def latent_to_csv(history: list[EpochLosses]) -> str:
    """metrics/latent.csv: each epoch's validation KL of each latent dimension, a row each (the
    long form, so one chart draws a line per dimension whatever model.latent_dim is)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([EPOCH, DIMENSION, "kl"])
    writer.writerows([row.epoch, dim, kl] for row in history for dim, kl in enumerate(row.kl_per_dim))
    return out.getvalue()


def best_row(history: list[EpochLosses], min_delta: float = 0.0) -> EpochLosses:
    """The best epoch by BEST_BY: the last whose value was below every earlier epoch's best by more
    than `min_delta` (`train.min_delta`), the one rule for early stopping and the kept epoch."""
    best = history[0]
    for row in history[1:]:
        if row.losses[BEST_BY] < best.losses[BEST_BY] - min_delta:
            best = row
    return best


def last_is_best(history: list[EpochLosses], min_delta: float = 0.0) -> bool:
    return best_row(history, min_delta) is history[-1]


def stops_early(history: list[EpochLosses], patience: int, min_delta: float = 0.0) -> bool:
    """Whether a run with this history stops after its last epoch: `patience` epochs
    (`train.early_stopping`, 0: never) without a best epoch."""
    return patience > 0 and bool(history) and history[-1].epoch - best_row(history, min_delta).epoch >= patience


def stopped_before_last(history: list[EpochLosses], patience: int, min_delta: float = 0.0) -> int | None:
    """The epoch before the history's last at which this patience would have stopped the run (None
    if none): such a history cannot be resumed or continued as a run of this patience."""
    return next((n for n in range(1, len(history)) if stops_early(history[:n], patience, min_delta)), None)


def train_metrics(history: list[EpochLosses], min_delta: float = 0.0) -> dict[str, float]:
    """metrics/train.json: the epochs trained, the last epoch's losses, OBJECTIVE and ACTIVE_UNITS,
    then the best epoch and its BEST_BY and OBJECTIVE (a runs table shows both, last and best)."""
    best = best_row(history, min_delta)
    return (
        {EPOCHS: history[-1].epoch}
        | {c: round(v, 6) for c, v in history[-1].metrics.items()}
        | {BEST_EPOCH: best.epoch}
        | {f"best_{name}": round(best.metrics[name], 6) for name in (BEST_BY, OBJECTIVE)}
    )


def kept_epoch(metrics: dict[str, float], keep_epoch: str) -> tuple[int, float]:
    """From metrics/train.json, the epoch whose weights models/model.pt holds (`train.keep_epoch`)
    and its OBJECTIVE: what a sweep ranks its trials by, and a search prunes them by."""
    if keep_epoch == "best":
        return metrics[BEST_EPOCH], metrics[f"best_{OBJECTIVE}"]
    return metrics[EPOCHS], metrics[OBJECTIVE]


def split_train_metrics(metrics: dict[str, float]) -> tuple[int, dict[str, float]]:
    """metrics/train.json's epoch count, and its losses (as MLflow and the sweep log them)."""
    return metrics.get(EPOCHS, 0), {k: v for k, v in metrics.items() if k != EPOCHS}
