"""Where and how a stage runs: the device `train.device` names, the precision `train.precision`
asks for, this process's place under torchrun, and the determinism switch."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from pipeline.errors import RANK_ERRORS_VARIABLE, PipelineError


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """The device `train.device` names; under torchrun, "auto" and "cuda" mean this process's GPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"train.device is '{spec}' but PyTorch sees no CUDA device; set it to auto or cpu")
    return torch.device(f"cuda:{local_rank}" if spec == "cuda" else spec)


# CPU features that compute in bf16 natively (AVX-512's BF16 instructions, Intel's AMX tiles);
# without either, oneDNN emulates bf16 in fp32 and a bf16 step is slower than an fp32 one.
NATIVE_BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16"}
NATIVE_BF16_CUDA_CAPABILITY = (8, 0)  # Ampere and newer: bf16 tensor cores


CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags as Linux reports them; None where the OS does not (macOS, Windows)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def has_native_bf16(device: torch.device, flags: set[str] | None = None,
                    capability: tuple[int, int] | None = None) -> bool:
    """Whether `device` computes in bf16 natively: a GPU of `capability` (this one's if None), or a
    CPU with `flags` (this one's if None; a CPU whose flags cannot be read counts as without)."""
    if device.type == "cuda":
        return (capability or torch.cuda.get_device_capability(device)) >= NATIVE_BF16_CUDA_CAPABILITY
    return bool(NATIVE_BF16_CPU_FLAGS & ((cpu_flags() or set()) if flags is None else flags))


TRITON_CUDA_CAPABILITY = (7, 0)  # Volta and newer: the GPUs Triton writes kernels for


def compiles_forward(asked: bool, device: torch.device, world_size: int, capability: tuple[int, int] | None = None,
                     quiet: bool = False) -> bool:
    """Whether the training step's forward is compiled (`train.compile`): in one CUDA process whose
    GPU (of `capability`, this one's if None) Inductor can write Triton kernels for. On a CPU it
    measured no faster and costs half a minute; under DDP it would need DDP's own graph splitting.
    A GPU too old for Triton trains uncompiled, and says so (unless `quiet`)."""
    if not (asked and device.type == "cuda" and world_size == 1):
        return False
    capability = capability or torch.cuda.get_device_capability(device)
    if capability < TRITON_CUDA_CAPABILITY:
        if not quiet:
            print(f"note: train.compile is true but this GPU (compute capability {capability[0]}.{capability[1]}) "
                  "is older than Triton supports (7.0): the step runs uncompiled", file=sys.stderr)
        return False
    return True


def resolve_precision(spec: str, device: torch.device, native: bool | None = None, quiet: bool = False) -> str:
    """The precision `train.precision` means on `device`: "fp32" or "bf16". `auto` is bf16 where the
    device has it natively (`native`: has_native_bf16's answer unless given). `bf16` asked for on a
    CPU without it still runs, and says how much slower it measured there (unless `quiet`: the
    other ranks under torchrun), before any training."""
    native = has_native_bf16(device) if native is None else native
    if spec != "fp32" and device.type == "cpu" and cpu_flags() is None and not quiet:
        print("note: this OS does not tell which CPU features there are (Linux's /proc/cpuinfo), so the CPU "
              "counts as without native bf16", file=sys.stderr)
    if spec == "auto":
        return "bf16" if native else "fp32"
    if spec == "bf16" and not native and not quiet:
        if device.type == "cuda":
            print("note: train.precision is bf16 but this GPU (compute capability below 8.0) has no native bf16: "
                  "it runs, likely slower than fp32; train.precision auto picks the faster one", file=sys.stderr)
        else:
            print(f"note: train.precision is bf16 but this CPU (no AVX512_BF16 or AMX) has no native bf16: a "
                  f"convolution of this model's size measured {bf16_slowdown_on_cpu():.1f}x slower than in fp32 "
                  "here; train.precision auto picks fp32", file=sys.stderr)
    return spec


def bf16_slowdown_on_cpu() -> float:
    """How many times longer one of the model's 64-channel convolutions (forward and backward, a
    batch of 64 at 14x14) takes under bf16 autocast than in fp32 on this CPU: about a second where
    bf16 is emulated. No random numbers are drawn, so training is unchanged."""

    def seconds(dtype: torch.dtype | None) -> float:
        x = torch.ones(64, 64, 14, 14, requires_grad=True)
        weight = torch.full((64, 64, 3, 3), 0.01, requires_grad=True)
        times = []
        for _ in range(4):  # the first call sets up oneDNN's kernels; the fastest of the others counts
            started = time.perf_counter()
            with torch.autocast("cpu", dtype, enabled=dtype is not None):
                torch.nn.functional.conv2d(x, weight, padding=1).float().sum().backward()
            times.append(time.perf_counter() - started)
        return min(times[1:])

    return seconds(torch.bfloat16) / seconds(None)


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
        raise PipelineError(f"train.device is '{device_spec}', one GPU, but train.num_processes is {num_processes}: "
                            "each process needs a GPU of its own; set train.device to cuda (process i on GPU i)")
    if resolve_device(device_spec).type == "cuda" and num_processes > torch.cuda.device_count():
        raise PipelineError(f"train.num_processes is {num_processes} but PyTorch sees {torch.cuda.device_count()} "
                            f"GPU(s) (CUDA_VISIBLE_DEVICES may hide some); set it to {torch.cuda.device_count()} or fewer")


def gather_to_writer(value, ranks: Ranks) -> list | None:
    """`value` of every rank, in rank order, on rank 0 (None on the others); every rank must call it."""
    if ranks.world_size == 1:
        return [value]
    gathered = [None] * ranks.world_size if ranks.writer else None
    torch.distributed.gather_object(value, gathered, dst=0)
    return gathered


def barrier(ranks: Ranks) -> None:
    if ranks.world_size > 1:
        torch.distributed.barrier()


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
    if deterministic != torch.are_deterministic_algorithms_enabled():  # the call imports Inductor: seconds
        torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.benchmark = not deterministic


def relaunch_under_torchrun(module: str, num_processes: int) -> None:
    """The stage `module` again under PyTorch's own launcher, one process per rank. A rank stopped
    by a PipelineError is reported as the single process reports it: one line, exit status 2."""
    import torch.distributed.elastic.multiprocessing.errors  # here: only a relaunching stage needs them
    import torch.distributed.run

    args = torch.distributed.run.get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={num_processes}", "-m", module])
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
