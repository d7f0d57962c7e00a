"""Where and how a stage runs: the device `train.device` names, this process's place under
torchrun, and the determinism switch."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from pipeline.errors import PipelineError


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """The device `train.device` names; under torchrun, "auto" and "cuda" mean this process's GPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"train.device is '{spec}' but PyTorch sees no CUDA device; set it to auto or cpu")
    return torch.device(f"cuda:{local_rank}" if spec == "cuda" else spec)


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


def leave_process_group(ranks: Ranks) -> None:
    if ranks.world_size > 1:
        torch.distributed.destroy_process_group()


def standard_normal(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """N(0, 1) noise drawn by the CPU's seeded generator, then moved to `device`. A GPU's generator
    draws other numbers from the same seed; drawn here, a seeded evaluation sees the same noise on
    any device, and its results agree across devices up to float rounding."""
    return torch.randn(shape).to(device)


def configure_determinism(deterministic: bool) -> None:
    """CPU runs are bit-reproducible regardless; on CUDA this trades speed for identical runs.

    cuBLAS needs a fixed workspace for reproducible matmuls, set before its first call (PyTorch
    raises in deterministic mode without it); a value the user set is kept."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.benchmark = not deterministic
