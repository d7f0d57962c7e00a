"""An epoch's end, reported the one way whether a run trains alone (the train stage) or in a sweep's
group (pipeline.sweep.training): to its MLflow run, to the progress file, and as a line."""

from __future__ import annotations

import torch

from pipeline.history import EpochLosses
from pipeline.model import VAE
from pipeline.progress import record
from pipeline.tracking import TrackedRun


def report_epoch(
    tracked: TrackedRun,
    row: EpochLosses,
    seconds: float,
    model: VAE,
    validation: torch.Tensor,
    epochs: int,
) -> None:
    """`row` of `epochs` to the run (`TrackedRun.log_epoch`), as an "epoch" event and as a line. In
    a group, `seconds` are the whole group's epoch."""
    tracked.log_epoch(row, seconds, model, validation)
    record("epoch", epoch=row.epoch, epochs=epochs, seconds=seconds, metrics=row.metrics)
    print(
        f"epoch {row.epoch}/{epochs}  "
        + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.metrics.items())
        + f"  ({seconds:.1f} s)",
        flush=True,
    )
