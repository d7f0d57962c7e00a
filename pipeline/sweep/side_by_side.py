"""Several trials' epochs side by side in one process, on one device: `train_epoch` of each, their
batches interleaved and, on CUDA, each trial's step on a stream of its own, so the GPU runs their
small kernels (or CUDA graphs) together; and which trials can (`group_key`)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
from collections.abc import Callable, Sequence

import torch

from pipeline.losses import LOSS_PARAMS
from pipeline.params import Params
from pipeline.step import TrainStep

# What every trial of a group must share to train in one process: all but these are one for all
# (each trial has its own Adam, and its own loss: every param the loss reads).
PER_TRIAL_KEYS = {
    "seed": None,
    "train": ("learning_rate", *LOSS_PARAMS),
    "evaluate": None,
    "visualize": None,
}


def group_key(params: Params) -> str:
    """The params a group's trials share (the model's shape, batch, precision, device, epochs, data):
    trials of one key can train together, trials of two keys cannot."""
    shared = dataclasses.asdict(params)
    for section, keys in PER_TRIAL_KEYS.items():
        if keys is None:
            shared.pop(section)
        else:
            shared[section] = {k: v for k, v in shared[section].items() if k not in keys}
    return json.dumps(shared, sort_keys=True)


def train_together(
    steps: Sequence[TrainStep], generators: Sequence[torch.Generator], beat: Callable[[], None] | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of each step (a trial: its own model, optimizer and noise generator), with
    `generators[i]` drawing step i's data order: what `train_epoch` returns for each, each the
    same bytes as alone. The trials' batches are interleaved; on CUDA each trial runs on a stream
    of its own, so the GPU runs their small kernels (or CUDA graphs) side by side. `beat()` is
    called after each step (a StallGuard's heartbeat)."""
    if len(steps) > 1 and any(step.noise_generator is None for step in steps):
        raise ValueError("trials trained together each need their own noise_generator (run_state.Training.noise)")
    device = steps[0].images.device
    main = torch.cuda.current_stream(device) if device.type == "cuda" else None
    streams = [step.stream for step in steps]
    orders = []
    for step, generator, stream in zip(steps, generators, streams):
        with on_stream(stream, after=main):
            orders.append(torch.randperm(len(step.images), generator=generator, device=device))
            step.start_epoch()
    batch_starts = (range(0, len(step.images), step.batch_size) for step in steps)
    for starts in itertools.zip_longest(*batch_starts):  # a trial of fewer batches drops out early
        for step, order, stream, start in zip(steps, orders, streams, starts):
            if start is not None:
                with on_stream(stream):
                    step(order[start : start + step.batch_size])
                if beat is not None:
                    beat()
    for stream in streams:
        if stream is not None:
            main.wait_stream(stream)
    return [(step.sums / len(step.images), step.first_bad_step.clone()) for step in steps]


def on_stream(stream: torch.cuda.Stream | None, after: torch.cuda.Stream | None = None):
    """Run the block's work on `stream` (None: where it would run anyway), once `after` has done its own."""
    if stream is None:
        return contextlib.nullcontext()
    if after is not None:
        stream.wait_stream(after)
    return torch.cuda.stream(stream)
