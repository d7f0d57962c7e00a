"""Stage train: fit the reference VAE on the split's training images, validating every epoch.

The data lives on the device as uint8 and is converted per batch; each epoch's order is a seeded
permutation drawn on the device; losses are summed on the device and read once per epoch. A
checkpoint is written atomically at every epoch end, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from pipeline import atomic, history, model_files, run_state, torchrun, tracking
from pipeline.data_parts import TrainingData, check_training_data, training_data
from pipeline.device import (
    compiles_forward,
    configure_determinism,
    resolve_device,
    resolve_precision,
    set_cpu_threads,
)
from pipeline.epoch_report import report_epoch
from pipeline.errors import PipelineError
from pipeline.history import EpochLosses
from pipeline.model import Reconstructor, to_input
from pipeline.params import Params, TrainParams, load_params
from pipeline.paths import (
    CHECKPOINT_FILE,
    MODEL_FILE,
    STATE_FILE,
    TRAIN_HISTORY,
    TRAIN_LATENT,
    TRAIN_METRICS,
)
from pipeline.progress import progress
from pipeline.run_state import Training, stops_early
from pipeline.stage import run_stage
from pipeline.step import TrainStep, divergence, train_epoch
from pipeline.torchrun import Ranks

KEPT_EPOCH_TAG = "kept_epoch"  # the epoch whose weights models/model.pt holds (train.keep_epoch)
STOPPED_EARLY_TAG = "stopped_early"  # why the run stopped before train.epochs (train.early_stopping)


class DivergedError(PipelineError):
    """The loss became NaN or infinite."""


def train(params: Params) -> None:
    """A run, top to bottom: prepare, start or resume, the epoch loop, finish. Under torchrun every
    rank trains; rank 0 alone validates and writes the checkpoint, the outputs and the MLflow run."""
    cfg = params.train
    ranks = torchrun.join_process_group(cfg.device)
    device = resolve_device(cfg.device, ranks.local_rank)
    precision = resolve_precision(cfg.precision, device, quiet=not ranks.writer)
    configure_determinism(cfg.deterministic)
    set_cpu_threads(cfg.num_threads)
    data = training_data(device)
    check_training_data(params, data, ranks.world_size)
    experiment_id = tracking.connect(params.mlflow) if ranks.writer else None  # an unreachable store stops here
    fingerprint = model_files.training_fingerprint(params, precision, device.type)
    state = start_or_resume(params, ranks, device, fingerprint)
    compiles = compiles_forward(cfg.compile, device, ranks.world_size, quiet=not ranks.writer)
    step = TrainStep.from_params(
        cfg,
        state.step_model,
        state.optimizer,
        data.train,
        precision=precision,
        compile=compiles,
        rank=ranks.rank,
        world_size=ranks.world_size,
        noise_generator=state.noise,
    )
    step.resume_after(len(state.history))  # where beta's warm-up is
    if ranks.writer and cfg.kl_warmup_epochs > cfg.epochs:
        print(
            f"note: train.kl_warmup_epochs {cfg.kl_warmup_epochs} is above train.epochs {cfg.epochs}: beta reaches "
            f"{cfg.epochs / cfg.kl_warmup_epochs:.0%} of train.beta by the last epoch, never train.beta itself",
            flush=True,
        )
    continues_run_id = tracking.run_that_trained(experiment_id) if state.continued else None
    identity = tracking.Identity.of_this_execution()
    tracked = tracking.training_run(
        experiment_id, state.run_id, params, device, precision, data._asdict(), identity, continues_run_id
    )
    tracked.log_history(state.history)
    if ranks.writer and not state.history:  # a run from scratch: its step 0
        tracked.log_untrained(state.model, data.validation)
    status = "FAILED"
    try:
        with tracked.monitor_system(resumed=state.run_id is not None):
            for epoch in range(len(state.history) + 1, cfg.epochs + 1):
                if torchrun.from_writer(ranks.writer and stops_early(state.history, cfg), ranks):
                    break
                started = time.perf_counter()
                row = run_epoch(epoch, state, step, data, cfg, ranks)
                rng_by_rank = torchrun.gather_to_writer(run_state.random_states(state), ranks)
                if ranks.writer:
                    run_state.save_checkpoint(state, fingerprint, rng_by_rank, tracked.run_id)
                    report_epoch(tracked, row, time.perf_counter() - started, state.model, data.validation, cfg.epochs)
            if ranks.writer:
                finish(state, tracked, data.validation, cfg)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"  # MLflow's status for a run stopped by its user
        if ranks.writer and CHECKPOINT_FILE.exists():
            print(f"the next `dvc repro` resumes from the last finished epoch, in {CHECKPOINT_FILE}", file=sys.stderr)
        raise
    finally:
        tracked.finish(status)
        torchrun.leave_process_group(ranks)
    if ranks.writer:
        # For the later stages of this execution.
        tracking.record_trained_model(tracked, model_files.file_sha256(MODEL_FILE))
        if CHECKPOINT_FILE.exists():  # none where a run continued from models/state.pt had no epoch to train
            model_files.finish_checkpoint()


def start_or_resume(params: Params, ranks: Ranks, device: torch.device, fingerprint: dict) -> Training:
    """The model, optimizer and data order built from the seed; then, if a killed run of the same
    params and data left a checkpoint, its weights, optimizer, random states and history; or else,
    if a finished run of them trained fewer epochs than asked, all of those from its last epoch."""
    cfg = params.train
    if ranks.world_size > 1:
        print(
            f"rank {ranks.rank} of {ranks.world_size} on {device}: "
            + ("training and writing every output" if ranks.writer else "training only"),
            flush=True,
        )
    state = run_state.seeded(params, device, ranks.rank, ranks.world_size)

    # Rank 0 reads the checkpoint first and alone deletes a stale one; the others read after it.
    checkpoint = model_files.load_checkpoint(fingerprint, cfg.epochs) if ranks.writer else None
    torchrun.barrier(ranks)
    if not ranks.writer:
        checkpoint = model_files.load_checkpoint(fingerprint, cfg.epochs)
    if checkpoint is not None and not (why_not := trained_past_its_stop(checkpoint, CHECKPOINT_FILE, cfg)):
        run_state.restore(state, checkpoint, ranks.rank)
        state.run_id = checkpoint["run_id"]
        if ranks.writer:
            print(f"resuming from epoch {len(state.history)} of {cfg.epochs} ({CHECKPOINT_FILE})")
        return state
    if checkpoint is None:
        finished, why_not = model_files.load_finished(fingerprint, cfg.epochs)
        if finished is not None:
            why_not = trained_past_its_stop(finished, STATE_FILE, cfg)
        if finished is not None and not why_not:  # a new run (the finished run's record is its own), from its epochs
            run_state.restore(state, finished, ranks.rank)
            state.continued = True
            if ranks.writer:
                print(f"continuing from epoch {len(state.history)} of {cfg.epochs} ({STATE_FILE})")
            return state
    if why_not and ranks.writer:
        print(f"training from scratch: {why_not}")
    return state


def trained_past_its_stop(checkpoint: dict, path: Path, cfg: TrainParams) -> str | None:
    """Why a checkpoint cannot go on as this run: it trained past the epoch where this run's
    `train.early_stopping` stops (None if it did not)."""
    epoch = history.stopped_before_last(history.from_saved(checkpoint["history"]), cfg.early_stopping, cfg.min_delta)
    if epoch is None:
        return None
    return f"{path} trained past epoch {epoch}, where train.early_stopping {cfg.early_stopping} stops this run"


def run_epoch(
    epoch: int, state: Training, step: TrainStep, data: TrainingData, cfg: TrainParams, ranks: Ranks
) -> EpochLosses | None:
    """Train one epoch and stop if the loss diverged; then, on rank 0, validate and add it to the
    history. Returns the epoch's row (None on the other ranks)."""
    with progress(len(data.train), f"epoch {epoch}/{cfg.epochs}", "images", leave=False, shown=ranks.writer) as advance:
        train_parts, first_bad_step = train_epoch(step, state.order, advance)
    if why := divergence(first_bad_step.item(), epoch, cfg.learning_rate):
        raise DivergedError(
            why + (f". The last good epoch ({epoch - 1}) is kept in {CHECKPOINT_FILE}" if epoch > 1 else "")
        )
    if not ranks.writer:
        return None
    return run_state.end_epoch(state, epoch, train_parts, data.validation, cfg, step.loss)


def finish(state: Training, tracked: tracking.TrackedRun, validation: torch.Tensor, cfg: TrainParams) -> None:
    """Write the DVC outputs (the model of the epoch `train.keep_epoch` keeps, the final metrics,
    the histories), then log the model to the run as a LoggedModel and describe the run. A run that
    stopped early says so, in a line and in its run."""
    model_files.save_model(state.model, weights=state.best_model if cfg.keep_epoch == "best" else None)
    metrics = history.train_metrics(state.history, cfg.min_delta)
    atomic.write_text(TRAIN_METRICS, json.dumps(metrics, indent=2) + "\n")
    atomic.write_text(TRAIN_HISTORY, history.to_csv(state.history))
    atomic.write_text(TRAIN_LATENT, history.latent_to_csv(state.history))
    kept = history.kept_epoch(metrics, cfg.keep_epoch)[0]
    stopped = early_stop_note(state.history, cfg) if stops_early(state.history, cfg) else None
    if stopped:
        print(stopped, flush=True)
    if tracked.run_id is not None:
        tracked.log_metrics({k: v for k, v in metrics.items() if k.startswith("best_")}, step=state.history[-1].epoch)
        tags = (
            tracking.model_tags(MODEL_FILE)
            | {KEPT_EPOCH_TAG: str(kept)}
            | ({STOPPED_EARLY_TAG: stopped} if stopped else {})
        )
        tracked.set_tags(tags)
        example = to_input(validation[:4]).cpu().numpy()
        tracked.log_model(Reconstructor(model_files.load_model(MODEL_FILE)), example, tags)
        tracked.describe()


def early_stop_note(rows: list[EpochLosses], cfg: TrainParams) -> str:
    """The one line that says why the run stopped before train.epochs."""
    best = history.best_row(rows, cfg.min_delta)
    return (
        f"stopped early after epoch {rows[-1].epoch} of {cfg.epochs}: {history.BEST_BY} has not improved on "
        f"epoch {best.epoch}'s {best.losses[history.BEST_BY]:.4f} by more than {cfg.min_delta:g} in "
        f"{cfg.early_stopping} epochs (train.early_stopping)"
    )


def main() -> None:
    params = load_params()
    if params.train.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        torchrun.check_processes(params.train.device, params.train.num_processes)
        torchrun.relaunch_under_torchrun("pipeline.train", params.train.num_processes)
    else:
        train(params)


if __name__ == "__main__":
    run_stage(main)
