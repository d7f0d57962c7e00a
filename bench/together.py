"""Seconds per epoch of N trials trained one after another against N trained together, on one
device, alternating round by round, for each N asked (1, 4 and 16 by default).

The trials are repeats of the reference model (batch 64, Adam 5e-4) that differ in their seed, on
the same 80/20 split of a local IDX mirror; an epoch is training plus validation. Alone, each trial
runs the pipeline's own step (`pipeline.step.TrainStep`: on a GPU the forward compiled and the
whole step a CUDA graph). Together, by route:

- `streams` (a): `pipeline.sweep.side_by_side.train_together`, each trial's own step on a CUDA stream of its own,
  so the GPU runs the trials' small kernels side by side. The same kernels as alone: the same bytes
  in deterministic mode (tests/test_training_loop.py checks that on the device).
- `vmap` (b): the trials' weights stacked and run through `torch.func.vmap`, which turns each
  convolution into one grouped convolution over all trials: fewer, larger kernels, one Adam over the
  stacked weights (so one learning rate), on a GPU captured as one CUDA graph. Other kernels, so
  not the same bytes: its per-epoch losses are compared with the trials' alone, and the largest
  relative difference is reported against LOSS_TOLERANCE.

Prints the table and writes JSON: per N and route, seconds per epoch, and the ratio to one trial
alone (the goal: 16 trials in at most 2x one trial's epoch).

    python bench/together.py /path/to/fashion-mnist --device cuda --out bench/results/together-gpu.json
"""

from __future__ import annotations

import copy
import datetime
import faulthandler
import json
import platform
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from benchmark import BATCH, LR, gpu_profile, shared_options, torchvision_root  # the sibling script
from torch.func import functional_call, stack_module_state, vmap

from pipeline.device import compiles_forward, configure_determinism, resolve_device
from pipeline.idx import read_split
from pipeline.loss_names import LOSS_NAMES
from pipeline.losses import dataset_loss, vae_loss
from pipeline.model import VAE, to_input
from pipeline.run_state import copy_of_default_generator
from pipeline.step import TrainStep, make_optimizer, own_stream
from pipeline.sweep.side_by_side import train_together

ROUTES = ("streams", "vmap")
LOSS_TOLERANCE = 0.01  # vmap's per-epoch losses against alone, relative, over a benchmark's epochs (streams: 0)


class Trial:
    """One repeat: the pipeline's model, Adam and step, seeded as `dvc exp run -S seed=...` seeds them."""

    def __init__(self, seed: int, train: torch.Tensor, val: torch.Tensor):
        device = train.device
        torch.manual_seed(seed)
        self.model = VAE().to(device).to(memory_format=torch.channels_last)
        self.noise = copy_of_default_generator(device)
        self.step = TrainStep(
            self.model,
            make_optimizer(self.model, LR, device),
            train,
            batch_size=BATCH,
            channels_last=True,
            cuda_graph=True,
            compile=compiles_forward(True, device, 1),
            noise_generator=self.noise,
        )
        self.order = torch.Generator(device).manual_seed(seed)
        self.val = val

    def validate(self) -> torch.Tensor:
        return dataset_loss(self.model, self.val, True, noise_generator=self.noise).parts


def alone(trials: list[Trial]) -> list[float]:
    """An epoch of each trial, one after another; the train and validation totals of each."""
    totals = []
    for trial in trials:
        ((parts, _),) = train_together([trial.step], [trial.order])
        totals.append([parts[2].item(), trial.validate()[2].item()])
    return totals


def streams(trials: list[Trial]) -> list[float]:
    """An epoch of the trials together; their totals read once, at the end."""
    results = train_together([t.step for t in trials], [t.order for t in trials])
    return torch.stack(
        [torch.stack([parts[2], trial.validate()[2]]) for (parts, _), trial in zip(results, trials)]
    ).tolist()


class StackedTrials:
    """The trials' weights stacked along a new first dimension, each trial's forward and loss one
    vmapped call; on CUDA a full batch's step captured once as a CUDA graph (after 3 eager warm-up
    steps, as TrainStep does), each trial's noise generator registered with it."""

    def __init__(self, seeds: list[int], train: torch.Tensor, val: torch.Tensor):
        self.trials = [Trial(seed, train, val) for seed in seeds]  # the same initial weights and generators
        self.base = copy.deepcopy(self.trials[0].model).to("meta")
        self.params, self.buffers = stack_module_state([t.model for t in self.trials])
        for value in self.params.values():
            value.requires_grad_(True)
        device = train.device
        self.optimizer = torch.optim.Adam(
            self.params.values(), lr=LR, **({"capturable": True, "fused": True} if device.type == "cuda" else {})
        )
        self.train, self.val, self.device = train, val, device
        self.sums = torch.zeros(len(seeds), len(LOSS_NAMES), device=device)
        self.batch = torch.empty(len(seeds), BATCH, dtype=torch.long, device=device)
        self.warmup_left, self.graph = 3, None
        self.stream = own_stream(device, self) if device.type == "cuda" else None  # warm-up and capture

    def losses(self, params: dict, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x = to_input(images)  # NCHW: vmap cannot batch a channels_last convolution
        return torch.stack(vae_loss(x, *functional_call(self.base, (params, self.buffers), (x, noise))))

    def run(self, index: torch.Tensor) -> None:
        images = self.train[index]  # trials x batch x 28 x 28
        noise = torch.stack(
            [torch.randn(index.shape[1], 2, device=self.device, generator=t.noise) for t in self.trials]
        )
        parts = vmap(self.losses, in_dims=(0, 0, 0), randomness="error")(self.params, images, noise)  # trials x parts
        self.optimizer.zero_grad(set_to_none=True)
        parts[:, 2].sum().backward()  # each trial's gradient is its own loss's
        self.optimizer.step()
        self.sums += parts.detach() * index.shape[1]

    def step(self, index: torch.Tensor) -> None:
        """One step of every trial on `index` (trials x batch), as TrainStep steps one trial."""
        if self.device.type != "cuda" or index.shape[1] < BATCH:  # the ragged last batch: eagerly
            self.run(index)
        elif self.graph is not None:
            self.batch.copy_(index)
            self.graph.replay()
        elif self.warmup_left > 0:
            self.warmup_left -= 1
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                self.run(index)
            torch.cuda.current_stream().wait_stream(self.stream)
        else:
            self.batch.copy_(index)
            self.optimizer.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            for trial in self.trials:
                self.graph.register_generator_state(trial.noise)
            with torch.cuda.graph(self.graph, stream=self.stream, capture_error_mode="thread_local"):
                self.run(self.batch)
            self.graph.replay()

    def train_epoch(self) -> torch.Tensor:
        """An epoch of every trial, each in its own data order. Each trial's mean total."""
        n = len(self.train)
        orders = torch.stack([torch.randperm(n, generator=t.order, device=self.device) for t in self.trials])
        self.sums.zero_()
        for start in range(0, n, BATCH):
            self.step(orders[:, start : start + BATCH])
        return self.sums[:, 2] / n

    def epoch(self) -> list[float]:
        train_totals = self.train_epoch()
        with torch.no_grad():  # the stacked weights back into each trial's model, to validate it
            for i, trial in enumerate(self.trials):
                for name, param in trial.model.named_parameters():
                    param.copy_(self.params[name][i])
        val_totals = torch.stack([trial.validate()[2] for trial in self.trials])
        return torch.stack([train_totals, val_totals], dim=1).tolist()


def timed(epoch: Callable[[], list], device: torch.device, stall_seconds: float) -> tuple[float, list]:
    """The epoch's seconds and totals. An epoch still running after `stall_seconds` has every
    thread's stack written to stderr and ends the benchmark (a hang says where it hangs)."""
    faulthandler.dump_traceback_later(stall_seconds, exit=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    totals = epoch()
    if device.type == "cuda":
        torch.cuda.synchronize()
    faulthandler.cancel_dump_traceback_later()
    return time.perf_counter() - started, totals


def largest_relative_difference(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) / abs(y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def main() -> None:
    parser = shared_options(__doc__, "the largest N's routes")
    parser.add_argument("--trials", type=int, nargs="+", default=[1, 4, 16], help="the Ns to measure")
    parser.add_argument("--routes", nargs="+", choices=ROUTES, default=list(ROUTES))
    parser.add_argument(
        "--stall-seconds",
        type=float,
        default=600,
        help="an epoch running longer is taken for a hang: stacks to stderr, exit (default 600)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/together.json"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    configure_determinism(False)  # as `dvc repro` runs by default

    with tempfile.TemporaryDirectory() as tmp:
        images = torch.from_numpy(
            read_split(torchvision_root(args.mirror, Path(tmp)) / "MNIST" / "raw", "train")[0].copy()
        )[: args.train_images]
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    n_val = round(len(images) * 0.2)
    val, train = images[order[:n_val]].to(device), images[order[n_val:]].to(device)

    results, errors, profiles = {}, {}, {}
    for n in args.trials:
        seeds = list(range(n))
        contenders = {"alone": (lambda trials: lambda: alone(trials))([Trial(s, train, val) for s in seeds])}
        if "streams" in args.routes:
            contenders["streams"] = (lambda trials: lambda: streams(trials))([Trial(s, train, val) for s in seeds])
        if "vmap" in args.routes:
            contenders["vmap"] = StackedTrials(seeds, train, val).epoch
        runs = {name: [] for name in contenders}
        for round_ in range(1, args.rounds + 1):
            for name, epoch in list(contenders.items()):
                try:
                    seconds, totals = timed(epoch, device, args.stall_seconds)
                except Exception:  # a route that fails is reported and dropped; the others go on
                    errors[f"{name} N={n}"] = traceback.format_exc(limit=3).strip().splitlines()[-1]
                    print(f"N={n:2d} round {round_} {name}: FAILED {errors[f'{name} N={n}']}", flush=True)
                    del contenders[name]
                    continue
                runs[name].append({"seconds": seconds, "totals": totals})
                print(
                    f"N={n:2d} round {round_} {name:8s} {seconds:7.2f} s  train_total of trial 0 {totals[0][0]:.3f}",
                    flush=True,
                )
        # The first round includes the warm-up (compiling, cuDNN's autotuning, capturing the graphs).
        one_alone = statistics.median(r["seconds"] for r in runs["alone"][1:] or runs["alone"]) / n
        results[n] = {"one_trial_alone_s": one_alone}
        for name, measured in runs.items():
            if name == "alone" or not measured:
                continue
            seconds = statistics.median(r["seconds"] for r in measured[1:] or measured)
            difference = max(
                largest_relative_difference(r["totals"], a["totals"]) for r, a in zip(measured, runs["alone"])
            )
            results[n][name] = {
                "seconds": seconds,
                "ratio_to_one_alone": seconds / one_alone,
                "speedup_over_one_after_another": one_alone * n / seconds,
                "largest_relative_loss_difference": difference,
                "within_tolerance": difference == 0 if name == "streams" else difference <= LOSS_TOLERANCE,
            }
        if args.profile_steps and device.type == "cuda" and n == max(args.trials):
            profiles = profile(seeds, train, val, args.routes, args.profile_steps)

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "train_images": len(train),
        "val_images": len(val),
        "batch_size": BATCH,
        "rounds": args.rounds,
        "loss_tolerance_vmap": LOSS_TOLERANCE,
        "seconds_per_epoch": results,
        "errors": errors,
        "profile": profiles,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nseconds per epoch, median of rounds 2-{args.rounds} ({report['device']}, torch {torch.__version__}):")
    for n, row in results.items():
        print(f"  N={n:2d}  one trial alone {row['one_trial_alone_s']:6.3f} s")
        for name in ROUTES:
            if name in row:
                r = row[name]
                print(
                    f"        {name:8s} {r['seconds']:7.3f} s  {r['ratio_to_one_alone']:5.2f}x one alone, "
                    f"{r['speedup_over_one_after_another']:5.2f}x one after another; "
                    f"losses within {r['largest_relative_loss_difference']:.1e} of alone"
                )
    for name, p in profiles.items():
        print(
            f"  N={max(args.trials)} {name}: {p['kernels_per_step']:.0f} kernels a step, the GPU busy "
            f"{p['busy_us_per_step']:.0f} us of {p['wall_us_per_step']:.0f} us a step, "
            f"concurrency {p['concurrency']:.2f}"
        )
    print(f"-> {args.out}")


def profile(seeds: list[int], train: torch.Tensor, val: torch.Tensor, routes: list[str], steps: int) -> dict:
    """Kernels and GPU time a step of one trial alone and of all trials by each route, over an
    epoch of `steps` batches after a warm-up epoch (which compiles and captures)."""
    few = train[: steps * BATCH]
    alone_trial = Trial(seeds[0], few, val)
    trials = [Trial(s, few, val) for s in seeds]
    stacked = StackedTrials(seeds, few, val) if "vmap" in routes else None
    epochs = {
        "one alone": lambda: train_together([alone_trial.step], [alone_trial.order]),
        "streams": lambda: train_together([t.step for t in trials], [t.order for t in trials]),
        "vmap": lambda: stacked.train_epoch(),
    }
    profiles = {}
    for name, epoch in epochs.items():
        if name == "one alone" or name in routes:
            epoch()
            profiles[name] = gpu_profile(epoch, steps)
    return profiles


if __name__ == "__main__":
    main()
