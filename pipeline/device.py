"""The device a stage runs on, and how it computes there: the device `train.device` names, the
precision `train.precision` resolves to, whether the forward is compiled, deterministic kernels,
and noise drawn alike on every device."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from pipeline.errors import PipelineError


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
# An epoch in bf16 against fp32 where oneDNN emulates bf16 (bench/results/train-cpu-2core-emulated-bf16.json):
# measured once, not at every start, which cost a second and told no more.
EMULATED_BF16_SLOWDOWN = 7


CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags as Linux reports them; None where the OS does not (macOS, Windows)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def has_native_bf16(
    device: torch.device, flags: set[str] | None = None, capability: tuple[int, int] | None = None
) -> bool:
    """Whether `device` computes in bf16 natively: a GPU of `capability` (this one's if None), or a
    CPU with `flags` (this one's if None; a CPU whose flags cannot be read counts as without)."""
    if device.type == "cuda":
        return (capability or torch.cuda.get_device_capability(device)) >= NATIVE_BF16_CUDA_CAPABILITY
    return bool(NATIVE_BF16_CPU_FLAGS & ((cpu_flags() or set()) if flags is None else flags))


TRITON_CUDA_CAPABILITY = (7, 0)  # Volta and newer: the GPUs Triton writes kernels for


def compiles_forward(
    asked: bool, device: torch.device, world_size: int, capability: tuple[int, int] | None = None, quiet: bool = False
) -> bool:
    """Whether the training step's forward is compiled (`train.compile`): in one CUDA process whose
    GPU (of `capability`, this one's if None) Inductor can write Triton kernels for. On a CPU it
    measured no faster and costs half a minute; under DDP it would need DDP's own graph splitting.
    A GPU too old for Triton trains uncompiled, and says so (unless `quiet`)."""
    if not (asked and device.type == "cuda" and world_size == 1):
        return False
    capability = capability or torch.cuda.get_device_capability(device)
    if capability < TRITON_CUDA_CAPABILITY:
        if not quiet:
            print(
                f"note: train.compile is true but this GPU (compute capability {capability[0]}.{capability[1]}) "
                "is older than Triton supports (7.0): the step runs uncompiled",
                file=sys.stderr,
            )
        return False
    return True


def resolve_precision(spec: str, device: torch.device, native: bool | None = None, quiet: bool = False) -> str:
    """The precision `train.precision` means on `device`: "fp32" or "bf16". `auto` is bf16 where the
    device has it natively (`native`: has_native_bf16's answer unless given). `bf16` asked for on a
    CPU without it still runs, and says how much slower it measured (unless `quiet`: the other
    ranks under torchrun), before any training."""
    native = has_native_bf16(device) if native is None else native
    if spec != "fp32" and device.type == "cpu" and cpu_flags() is None and not quiet:
        print(
            "note: this OS does not tell which CPU features there are (Linux's /proc/cpuinfo), so the CPU "
            "counts as without native bf16",
            file=sys.stderr,
        )
    if spec == "auto":
        return "bf16" if native else "fp32"
    if spec == "bf16" and not native and not quiet:
        if device.type == "cuda":
            print(
                "note: train.precision is bf16 but this GPU (compute capability below 8.0) has no native bf16: "
                "it runs, likely slower than fp32; train.precision auto picks the faster one",
                file=sys.stderr,
            )
        else:
            print(
                f"note: train.precision is bf16 but this CPU (no AVX512_BF16 or AMX) has no native bf16: oneDNN "
                f"emulates it, and an epoch measured {EMULATED_BF16_SLOWDOWN:g}x slower than fp32 where it did "
                "(docs/performance.md); train.precision auto picks fp32",
                file=sys.stderr,
            )
    return spec


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


def set_cpu_threads(threads: int) -> None:
    """The threads of the CPU's kernels, where `train.num_threads` names them (0: PyTorch's own
    count, the cores or OMP_NUM_THREADS). A CPU run is the same bytes again at the same count, and
    other bytes at another: a sweep records the count its trial trained with, so the experiment
    run again as typed trains with it too."""
    if threads:
        torch.set_num_threads(threads)
