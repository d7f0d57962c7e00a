"""A training under torchrun: this process's rank, the checks before torchrun starts any process,
what ranks exchange, and the stage relaunched under torchrun with a rank's one-line error relayed."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from pipeline.device import resolve_device
from pipeline.errors import PipelineError
from pipeline.stage import RANK_ERRORS_VARIABLE


class Ranks(NamedTuple):
    rank: int
    world_size: int
    local_rank: int

    @property
    def writer(self) -> bool:
        """Rank 0 alone writes checkpoints, outputs and MLflow records; the others only train."""
        return self.rank == 0


def join_process_group(device_spec: str) -> Ranks:
    """This process's place under torchrun (a single process otherwise): NCCL between GPUs, gloo on CPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ranks = Ranks(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if world_size > 1:
        device = resolve_device(device_spec, ranks.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ranks


def check_processes(device_spec: str, num_processes: int) -> None:
    """Before torchrun starts any process: one GPU per process, and no more processes than GPUs."""
    if num_processes < 2:
        return
    if device_spec.startswith("cuda:"):
        raise PipelineError(
            f"train.device is '{device_spec}', one GPU, but train.num_processes is {num_processes}: "
            "each process needs a GPU of its own; set train.device to cuda (process i on GPU i)"
        )
    if resolve_device(device_spec).type == "cuda" and num_processes > torch.cuda.device_count():
        raise PipelineError(
            f"train.num_processes is {num_processes} but PyTorch sees {torch.cuda.device_count()} "
            f"GPU(s) (CUDA_VISIBLE_DEVICES may hide some); set it to {torch.cuda.device_count()} or fewer"
        )


def gather_to_writer(value, ranks: Ranks) -> list | None:
    """`value` of every rank, in rank order, on rank 0 (None on the others); every rank must call it."""
    if ranks.world_size == 1:
        return [value]
    gathered = [None] * ranks.world_size if ranks.writer else None
    torch.distributed.gather_object(value, gathered, dst=0)
    return gathered


def from_writer(value, ranks: Ranks):
    """Rank 0's `value`, on every rank (what rank 0 alone can decide, as whether to stop); every
    rank must call it."""
    if ranks.world_size == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ranks: Ranks) -> None:
    if ranks.world_size > 1:
        torch.distributed.barrier()


def leave_process_group(ranks: Ranks) -> None:
    if ranks.world_size > 1:
        torch.distributed.destroy_process_group()


def relaunch_under_torchrun(module: str, num_processes: int) -> None:
    """The stage `module` again under PyTorch's own launcher, one process per rank. A rank stopped
    by a PipelineError is reported as the single process reports it: one line, exit status 2."""
    import torch.distributed.elastic.multiprocessing.errors  # here: only a relaunching stage needs them
    import torch.distributed.run

    args = torch.distributed.run.get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={num_processes}", "-m", module]
    )
    # torchrun logs each failed rank as an error of its own; the failure is reported below instead.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="pipeline-rank-errors.") as errors:
        os.environ[RANK_ERRORS_VARIABLE] = errors  # for the ranks, which inherit it
        try:
            torch.distributed.run.run(args)
        except torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
            reported = sorted(Path(errors).iterdir(), key=lambda path: int(path.name))
            if not reported:
                raise  # a crash, not a mistake to fix: torchrun's account of it, with the tracebacks
            raise PipelineError(reported[0].read_text()) from None
        finally:
            del os.environ[RANK_ERRORS_VARIABLE]
