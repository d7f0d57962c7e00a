"""A training run's state, and what an epoch does to it, written once for the train stage and for a
sweep's training process (pipeline.sweep.training): the seeded start, a checkpoint's restore, an
epoch's end (validation, the history, the best weights), the early-stopping rule and the checkpoint.

A run draws its reparameterisation noise, in training and validation alike, from a generator of its
own (`Training.noise`), a copy of the default generator as the seed left it: the very numbers the
default generator would give, whatever else in the process draws, so several runs can share one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pipeline import history, model_files
from pipeline.history import EpochLosses
from pipeline.losses import dataset_loss
from pipeline.model import VAE
from pipeline.params import Params, TrainParams
from pipeline.paths import CHECKPOINT_FILE
from pipeline.step import seeded_start


@dataclasses.dataclass
class Training:
    """What a run trains and how far it has got."""

    model: VAE
    step_model: torch.nn.Module  # what a training step calls: the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    order: torch.Generator  # draws each epoch's data order
    noise: torch.Generator  # draws the reparameterisation noise
    cpu_state: torch.Tensor  # on CUDA, the CPU's random state, as the seed left it (nothing draws from it)
    history: list[EpochLosses] = dataclasses.field(default_factory=list)  # a row per finished epoch
    run_id: str | None = None  # the MLflow run an interrupted run was logging into
    continued: bool = False  # from a finished run's state, with more epochs
    best_model: dict[str, torch.Tensor] | None = None  # the best epoch's weights (history.best_row)


def seeded(params: Params, device: torch.device, rank: int = 0, world_size: int = 1) -> Training:
    """The run as its seed starts it. Under DistributedDataParallel each rank draws noise of its own."""
    model, optimizer, order = seeded_start(params, device)
    step_model = model
    if world_size > 1:
        torch.manual_seed(params.seed + rank)
        step_model = torch.nn.parallel.DistributedDataParallel(model)
    return Training(model, step_model, optimizer, order, copy_of_default_generator(device), torch.get_rng_state())


def copy_of_default_generator(device: torch.device) -> torch.Generator:
    """A generator in the state `device`'s default generator is in now."""
    generator = torch.Generator(device)
    generator.set_state(default_generator_state(device))
    return generator


def default_generator_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def random_states(state: Training) -> dict[str, torch.Tensor]:
    """The run's random states, as a checkpoint keeps them: the CPU's, the data order's, the GPU's."""
    on_cuda = state.noise.device.type == "cuda"
    rng = {"cpu": state.cpu_state if on_cuda else state.noise.get_state(), "permutation": state.order.get_state()}
    return rng | ({"cuda": state.noise.get_state()} if on_cuda else {})


def restore(state: Training, checkpoint: dict, rank: int = 0) -> None:
    """The weights, optimizer, random states, history and best weights a checkpoint holds."""
    state.best_model = model_files.restore_checkpoint(checkpoint, state.model, state.optimizer, state.order, rank)
    state.noise.set_state(default_generator_state(state.noise.device))  # as restore_checkpoint left it
    state.cpu_state = torch.get_rng_state()
    state.history = history.from_saved(checkpoint["history"])


def end_epoch(
    state: Training, epoch: int, train_parts: torch.Tensor, validation: torch.Tensor, cfg: TrainParams, loss
) -> EpochLosses:
    """A trained epoch validated (with the run's `loss`) and added to the history; the best
    weights kept. Returns the epoch's row."""
    validated = dataset_loss(state.model, validation, cfg.channels_last, loss, noise_generator=state.noise)
    row = EpochLosses.of(epoch, train_parts, validated)
    state.history.append(row)
    is_best = history.last_is_best(state.history, cfg.min_delta)
    state.best_model = model_files.best_weights(state.model, is_best, state.best_model)
    return row


def stops_early(rows: list[EpochLosses], cfg: TrainParams) -> bool:
    """Whether `train.early_stopping` ends the run after these epochs (`history.stops_early`)."""
    return history.stops_early(rows, cfg.early_stopping, cfg.min_delta)


def save_checkpoint(
    state: Training,
    fingerprint: dict,
    rng_by_rank: list[dict],
    run_id: str | None,
    path: Path = CHECKPOINT_FILE,
) -> None:
    """All the run needs to go on from its last epoch (model_files.save_checkpoint)."""
    model_files.save_checkpoint(
        fingerprint,
        state.model,
        state.optimizer,
        rng_by_rank,
        history.to_saved(state.history),
        run_id,
        state.best_model,
        path=path,
    )
