"""Seconds per epoch: the loop a user would write against the pipeline's own loop and its
variants, side by side.

All train the reference model (batch 64, Adam 5e-4) from the same seed on the same 80/20 split of
a local IDX mirror, on the same device, alternating epoch by epoch so drift in the machine hits all
alike. An epoch is training plus validation. The variants change one thing each against the
pipeline's default: `train.precision` bf16 (the forward pass under autocast), and on a GPU the
forward not compiled (`train.compile: false`), the step not captured (`train.cuda_graph: false`),
NCHW instead of channels_last, Adam's multi-tensor (foreach) update instead of the fused kernel, a
larger validation batch.
Each variant's losses per round are printed beside its time, so a change that alters the loss
curve shows. Prints a table and writes the result as JSON.

    python bench/benchmark.py /path/to/fashion-mnist --rounds 3 --out bench/results/cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gzip
import json
import platform
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Subset

from pipeline.device import (
    compiles_forward,
    configure_determinism,
    has_native_bf16,
    resolve_device,
)
from pipeline.idx import FILES, read_split
from pipeline.losses import dataset_loss
from pipeline.model import EVAL_BATCH_SIZE, VAE
from pipeline.step import TrainStep, make_optimizer, train_epoch

BATCH, LR, SEED = 64, 5e-4, 0


def torchvision_root(mirror: Path, into: Path) -> Path:
    """The mirror laid out the way torchvision's MNIST class reads it (root/MNIST/raw, unzipped)."""
    raw = into / "MNIST" / "raw"  # the mirror's content, whichever dataset it is
    raw.mkdir(parents=True)
    for name in FILES.values():
        source = mirror / name if (mirror / name).exists() else mirror / f"{name}.gz"
        opener = gzip.open if source.suffix == ".gz" else open
        with opener(source, "rb") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return into


class UserLoop:
    """torchvision dataset + ToTensor + DataLoader, the loss read with .item() every step."""

    def __init__(self, root: Path, train_index, val_index, device, workers: int):
        dataset = torchvision.datasets.MNIST(root, train=True, transform=torchvision.transforms.ToTensor())
        options = dict(
            batch_size=BATCH, num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0
        )
        self.train = DataLoader(Subset(dataset, train_index), shuffle=True, **options)
        self.val = DataLoader(Subset(dataset, val_index), **options)
        self.device = device
        torch.manual_seed(SEED)
        self.model = VAE().to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)

    def loss(self, x):
        recon, mean, log_var = self.model(x)
        kl = -0.5 * torch.sum(1 + log_var - mean.pow(2) - log_var.exp())
        return (F.mse_loss(recon, x, reduction="sum") + kl) / len(x)

    def epoch(self) -> float:
        self.model.train()
        total = 0.0
        for x, _ in self.train:
            x = x.to(self.device)
            loss = self.loss(x)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += loss.item() * len(x)
        self.model.eval()
        with torch.no_grad():
            val = sum(self.loss(x.to(self.device)).item() * len(x) for x, _ in self.val)
        return total / len(self.train.dataset), val / len(self.val.dataset)


@dataclasses.dataclass(frozen=True)
class Variant:
    """How the pipeline's loop is run; the defaults are what `dvc repro` does."""

    name: str
    compile: bool = True  # where pipeline.train compiles (compiles_forward): one CUDA process
    cuda_graph: bool = True
    channels_last: bool = True
    fused_adam: bool = True
    precision: str = "fp32"
    val_batch: int = EVAL_BATCH_SIZE


PIPELINE = Variant("pipeline")
BF16 = Variant("pipeline bf16", precision="bf16")
VARIANTS = {
    "cuda": [
        PIPELINE,
        BF16,
        Variant("not compiled", compile=False),
        Variant("no CUDA graph", cuda_graph=False),
        Variant("NCHW", channels_last=False),
        Variant("foreach Adam", fused_adam=False),
        Variant("val batch 12000", val_batch=12_000),
    ],
    "cpu": [PIPELINE, BF16],
}


class PipelineLoop:
    """pipeline.train's own epoch (device-resident uint8 data, device-side sums, channels_last; on a
    GPU the forward compiled and the step a CUDA graph), run as `variant` says."""

    def __init__(self, train_images, val_images, device, variant: Variant):
        self.val_images, self.variant = val_images.to(device), variant
        torch.manual_seed(SEED)
        self.model = VAE().to(device)
        if variant.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(self.model, LR, device, fused=variant.fused_adam)
        self.step = TrainStep(
            self.model,
            optimizer,
            train_images.to(device),
            batch_size=BATCH,
            channels_last=variant.channels_last,
            cuda_graph=variant.cuda_graph,
            precision=variant.precision,
            compile=compiles_forward(variant.compile, device, world_size=1),
        )
        self.generator = torch.Generator(device=device).manual_seed(SEED)

    def epoch(self) -> float:
        parts, _ = train_epoch(self.step, self.generator)
        val = dataset_loss(
            self.model, self.val_images, self.variant.channels_last, batch_size=self.variant.val_batch
        ).parts
        return parts[2].item(), val[2].item()


def timed(loop, device) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    train_total, val_total = loop.epoch()
    if device.type == "cuda":
        torch.cuda.synchronize()
    result = {"seconds": time.perf_counter() - started, "train_total": train_total, "val_total": val_total}
    if device.type == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def kernels_per_step(loop: PipelineLoop, steps: int) -> dict:
    """`gpu_profile` of `steps` full training steps of `loop`."""
    index = torch.arange(BATCH, device=loop.val_images.device)
    return gpu_profile(lambda: [loop.step(index) for _ in range(steps)], steps)


def gpu_profile(run: Callable[[], object], steps: int) -> dict:
    """The GPU kernels one call of `run` launches (inside a CUDA graph's replay too), read by
    PyTorch's profiler, per each of the `steps` training steps it takes: how many, the GPU's busy
    time (kernel time summed), the wall time, their ratio (above 1: kernels ran side by side),
    and the costliest kernels by name."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        started = time.perf_counter()
        run()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - started) * 1e6
    by_name: dict[str, list[float]] = {}
    for event in profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_name.setdefault(event.name, []).append(event.time_range.elapsed_us())
    costliest = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:15]
    busy_us = sum(map(sum, by_name.values()))
    return {
        "kernels_per_step": sum(map(len, by_name.values())) / steps,
        "busy_us_per_step": busy_us / steps,
        "wall_us_per_step": wall_us / steps,
        "concurrency": busy_us / wall_us,
        "costliest": [
            {"kernel": name[:100], "us_per_step": sum(times) / steps, "calls_per_step": len(times) / steps}
            for name, times in costliest
        ],
    }


def shared_options(description: str, profiled: str) -> argparse.ArgumentParser:
    """The options this benchmark and bench/together.py both take: the mirror, the device, the
    rounds, a part of the data, and a GPU profile afterwards of `profiled`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mirror", type=Path, help="folder with the four IDX files (.gz or not)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3, help="epochs of each, alternating (default 3)")
    parser.add_argument(
        "--train-images",
        type=int,
        default=None,
        help="use only the first N of the mirror's training images (a quick rehearsal)",
    )
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help=f"on a GPU, afterwards profile this many steps of {profiled} (kernels per step)",
    )
    return parser


def main() -> None:
    parser = shared_options(__doc__, "each variant's loop")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the user's loop")
    parser.add_argument("--out", type=Path, default=Path("bench/results/benchmark.json"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    configure_determinism(False)  # as `dvc repro` runs by default: cuDNN picks its fastest kernels

    with tempfile.TemporaryDirectory() as tmp:
        root = torchvision_root(args.mirror, Path(tmp))
        images = torch.from_numpy(read_split(root / "MNIST" / "raw", "train")[0].copy())[: args.train_images]
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SEED))
        n_val = round(len(images) * 0.2)
        val_index, train_index = order[:n_val], order[n_val:]
        loops = {"user": UserLoop(root, train_index, val_index, device, args.workers)}
        for variant in VARIANTS[device.type]:
            loops[variant.name] = PipelineLoop(images[train_index], images[val_index], device, variant)
        timings = {name: [] for name in loops}
        for round_ in range(1, args.rounds + 1):
            for name, loop in loops.items():
                timings[name].append(timed(loop, device))
                t = timings[name][-1]
                print(
                    f"round {round_}  {name:16s} {t['seconds']:7.2f} s  train_total {t['train_total']:.3f}"
                    f"  val_total {t['val_total']:.3f}",
                    flush=True,
                )
        profiles = {
            name: kernels_per_step(loop, args.profile_steps)
            for name, loop in loops.items()
            if args.profile_steps and device.type == "cuda" and name != "user"
        }

    # The first epoch of each loop includes warm-up (allocator, cuDNN autotuning, the graph's
    # capture); report the median.
    summary = {name: statistics.median(t["seconds"] for t in runs) for name, runs in timings.items()}
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "native_bf16": has_native_bf16(device),
        "train_images": len(train_index),
        "val_images": len(val_index),
        "batch_size": BATCH,
        "rounds": args.rounds,
        "user_workers": args.workers,
        "variants": {v.name: dataclasses.asdict(v) for v in VARIANTS[device.type]},
        "seconds_per_epoch": summary,
        "speedup": summary["user"] / summary[PIPELINE.name],
        "speedup_over_user": {name: summary["user"] / s for name, s in summary.items()},
        "images_per_second": {name: len(images) / s for name, s in summary.items()},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "epochs": timings,
        "profile": profiles,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\nseconds per epoch, median of {args.rounds} ({result['device']}, torch {torch.__version__}, "
        f"native bf16: {'yes' if result['native_bf16'] else 'no'}):"
    )
    for name, seconds in summary.items():
        last = timings[name][-1]
        print(
            f"  {name:16s} {seconds:7.3f} s  {summary['user'] / seconds:6.2f}x the user's loop"
            f"  {len(images) / seconds:9.0f} images/s  last val_total {last['val_total']:.3f}"
        )
    for name, profile in profiles.items():
        print(
            f"  {name:16s} {profile['kernels_per_step']:5.1f} kernels a step, the GPU busy"
            f" {profile['busy_us_per_step']:6.1f} us a step; costliest: "
            + ", ".join(f"{k['kernel'][:40]} {k['us_per_step']:.1f} us" for k in profile["costliest"][:3])
        )
    print(f"peak RSS {result['peak_rss_mib']:.0f} MiB  -> {args.out}")


if __name__ == "__main__":
    main()
