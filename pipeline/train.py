"""Stage train: fit the reference VAE on the split's training images, validating every epoch.

The data lives on the device as uint8 and is converted per batch; each epoch's order is a seeded
permutation drawn on the device; losses are summed on the device and read once per epoch. A
checkpoint is written atomically at every epoch end, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torchvision

from pipeline import atomic, tracking
from pipeline.errors import PipelineError, run_stage
from pipeline.model import VAE, Reconstructor, dataset_loss, to_input, vae_loss
from pipeline.params import Params, TrainParams, load_params
from pipeline.paths import CHECKPOINT_FILE, MODEL_FILE, SPLIT_DIR, TRAIN_HISTORY, TRAIN_METRICS
from pipeline.split import load_part

LOSS_NAMES = ("reconstruction", "kl", "total")
WATCHED_IMAGES = 8  # validation images whose reconstructions are logged every epoch


class DivergedError(PipelineError):
    """The loss became NaN or infinite."""


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


def configure_determinism(deterministic: bool) -> None:
    """CPU runs are bit-reproducible regardless; on CUDA this trades speed for identical runs."""
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.benchmark = not deterministic


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_torch(path: Path, device: torch.device | str):
    """Read a checkpoint or model as tensors and plain containers only: a file that needs arbitrary
    unpickling (and could run code) is refused."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise PipelineError(
            f"{path} holds objects other than tensors and plain values; refusing to unpickle it "
            f"({str(exc).splitlines()[0]}). Delete it and rerun the stage that writes it"
        ) from None


def save_torch(obj, target: Path) -> None:
    """Serialise in memory first: torch.save records the file name it writes to, and a temp name
    would make every save of the same weights different bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic.write_bytes(target, buffer.getvalue())


def train_epoch(
    model, optimizer, images, batch_size, generator, channels_last, loss=vae_loss, rank: int = 0, world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over `images` in a seeded order. Returns the mean loss parts and the first step whose
    loss was not finite (-1 if none), both still on the device: nothing here waits for the GPU.

    Under DistributedDataParallel every rank draws the same permutation and takes every
    world_size-th image of each global batch of `batch_size`, so the batches, and the order the
    model sees the data in, are those of a single process."""
    n = len(images)
    order = torch.randperm(n, generator=generator, device=images.device)
    sums = torch.zeros(3, device=images.device)
    first_bad_step = torch.full((), -1, device=images.device)
    for step, start in enumerate(range(0, n, batch_size)):
        index = order[start : start + batch_size]
        x = to_input(images[index[rank::world_size]], channels_last)
        parts = loss(x, *model(x))
        optimizer.zero_grad(set_to_none=True)
        if world_size > 1:  # DDP averages over ranks; weighting by each rank's share gives the global mean
            (parts.total * (len(x) * world_size / len(index))).backward()
        else:
            parts.total.backward()
        optimizer.step()
        sums += torch.stack(parts).detach() * len(x)
        bad = ~torch.isfinite(parts.total.detach()) & (first_bad_step < 0)
        first_bad_step = torch.where(bad, step, first_bad_step)
    if world_size > 1:
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(first_bad_step, torch.distributed.ReduceOp.MAX)
    return sums / n, first_bad_step


def loss_function(cfg: TrainParams):
    """The loss these train params select, shared by training, validation and evaluation."""
    return functools.partial(vae_loss, beta=cfg.beta, kind=cfg.reconstruction)


def _history_row(epoch: int, train_parts: torch.Tensor, val_parts: torch.Tensor) -> dict[str, float]:
    row: dict[str, float] = {"epoch": epoch}
    for prefix, parts in (("train", train_parts), ("val", val_parts)):
        row |= {f"{prefix}_{name}": value for name, value in zip(LOSS_NAMES, parts.tolist())}
    return row


def _history_csv(history: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(history[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()


def _log_history(tracked: tracking.TrackedRun, history: list[dict]) -> None:
    """Log the epochs the run does not have yet (those trained before a resume, if any), so a
    resumed run never holds a step twice."""
    last_logged = max(tracked.logged_steps("train_total"), default=0)
    for row in history:
        if row["epoch"] > last_logged:
            tracked.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])


def training_fingerprint(params: Params) -> dict:
    """What a checkpoint must match to be resumed: every param that shapes the weights, and the data.
    Not `train.epochs`: the first epochs do not depend on how many follow, so a killed run can be
    resumed with more epochs."""
    train = dataclasses.asdict(params.train)
    del train["epochs"]
    return {
        "seed": params.seed,
        "model": dataclasses.asdict(params.model),
        "train": train,
        "data": file_sha256(SPLIT_DIR / "train_images.npy") + file_sha256(SPLIT_DIR / "val_images.npy"),
    }


def load_checkpoint(fingerprint: dict, epochs: int, device: torch.device) -> dict | None:
    """The checkpoint of an interrupted run of these same params and data, if there is one."""
    if not CHECKPOINT_FILE.exists():
        return None
    checkpoint = load_torch(CHECKPOINT_FILE, device)
    if checkpoint["fingerprint"] != fingerprint or len(checkpoint["history"]) > epochs:
        print(f"discarding {CHECKPOINT_FILE}: it was written with other params or data")
        CHECKPOINT_FILE.unlink(missing_ok=True)  # every rank reads it; the first one removes it
        return None
    return checkpoint


def train(params: Params) -> None:
    """Only rank 0 writes: checkpoints, outputs and MLflow records; other ranks only train."""
    cfg = params.train
    ranks = join_process_group(cfg.device)
    writer = ranks.rank == 0
    device = resolve_device(cfg.device, ranks.local_rank)
    configure_determinism(cfg.deterministic)
    train_images = torch.from_numpy(load_part("train")[0]).to(device)
    val_images = torch.from_numpy(load_part("val")[0]).to(device)
    if cfg.batch_size > len(train_images):
        raise PipelineError(
            f"train.batch_size {cfg.batch_size} is larger than the {len(train_images)} training images; lower it"
        )
    if params.model.input_dim != 1:
        raise PipelineError(f"model.input_dim is {params.model.input_dim} but the images have 1 channel; set it to 1")
    if cfg.batch_size % ranks.world_size or 0 < len(train_images) % cfg.batch_size < ranks.world_size:
        raise PipelineError(
            f"train.batch_size {cfg.batch_size} (the global batch) must split evenly over "
            f"train.num_processes {ranks.world_size}, with every batch at least one image per process"
        )

    # Fails here, before training, if the store is unreachable.
    experiment_id = tracking.connect(params.mlflow) if writer else None
    fingerprint = training_fingerprint(params)
    torch.manual_seed(params.seed)
    model = VAE(**dataclasses.asdict(params.model)).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    trained = model
    if ranks.world_size > 1:
        print(f"rank {ranks.rank} of {ranks.world_size} on {device}: "
              + ("training and writing every output" if writer else "training only"), flush=True)
        torch.manual_seed(params.seed + ranks.rank)  # each rank its own reparameterisation noise
        trained = torch.nn.parallel.DistributedDataParallel(model)
    generator = torch.Generator(device=device).manual_seed(params.seed)
    loss = loss_function(cfg)
    history: list[dict] = []
    run_id = None

    checkpoint = load_checkpoint(fingerprint, cfg.epochs, device)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"]["cpu"])
        generator.set_state(checkpoint["rng"]["permutation"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
        history, run_id = checkpoint["history"], checkpoint["run_id"]
        if writer:
            print(f"resuming from epoch {len(history)} of {cfg.epochs} ({CHECKPOINT_FILE})")

    tracked = tracking.start_run(experiment_id, run_id)
    if tracked.run_id is not None and tracked.run_id != run_id:  # a new run
        safe = {k: (tracking.redact(v) if k == "mlflow.tracking_uri" else v) for k, v in params.flat().items()}
        tracked.log_params(safe)
        tracked.set_tags(tracking.runtime_tags(device) | tracking.git_tags() | tracking.dvc_tags())
        source = params.data.mirror or f"torchvision://{params.data.dataset}"  # the official download
        for part, images in (("train", train_images), ("validation", val_images)):
            tracked.log_dataset(images.cpu().numpy(), f"{params.data.dataset}-{part}", source, part)
    _log_history(tracked, history)
    watched = val_images[:WATCHED_IMAGES]
    status = "FAILED"
    try:
        with tracked.monitor_system(resumed=run_id is not None):
            for epoch in range(len(history) + 1, cfg.epochs + 1):
                started = time.perf_counter()
                train_parts, first_bad_step = train_epoch(trained, optimizer, train_images, cfg.batch_size, generator,
                                                          cfg.channels_last, loss, ranks.rank, ranks.world_size)
                if first_bad_step.item() >= 0:
                    raise DivergedError(
                        f"loss became NaN or infinite at epoch {epoch}, step {first_bad_step.item()}; "
                        f"train.learning_rate {cfg.learning_rate} may be too high. "
                        + (f"The last good epoch ({epoch - 1}) is kept in {CHECKPOINT_FILE}" if epoch > 1 else "")
                    )
                if not writer:
                    continue
                row = _history_row(epoch, train_parts, dataset_loss(model, val_images, cfg.channels_last, loss))
                history.append(row)
                rng = {"cpu": torch.get_rng_state(), "permutation": generator.get_state()}
                if device.type == "cuda":
                    rng["cuda"] = torch.cuda.get_rng_state(device)
                save_torch(
                    {"fingerprint": fingerprint, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "rng": rng, "history": history, "run_id": tracked.run_id},
                    CHECKPOINT_FILE,
                )
                seconds = time.perf_counter() - started
                tracked.log_metrics({k: v for k, v in row.items() if k != "epoch"} | {"epoch_seconds": seconds}, step=epoch)
                if tracked.run_id is not None:
                    tracked.log_image(reconstruction_strip(model, watched), "reconstructions", epoch)
                print(f"epoch {epoch}/{cfg.epochs}  " + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "epoch")
                      + f"  ({seconds:.1f} s)", flush=True)

            if writer:
                write_outputs(model, history)
            if tracked.run_id is not None:
                _log_trained_model(tracked, watched, params.mlflow.registered_model)
        status = "FINISHED"
    finally:
        tracked.finish(status)
        if ranks.world_size > 1:
            torch.distributed.destroy_process_group()
    if writer:
        CHECKPOINT_FILE.unlink()  # finished: nothing left that a later run could resume by mistake


def _log_trained_model(tracked: tracking.TrackedRun, example_images: torch.Tensor, registered_name: str | None) -> None:
    """Tie the run to models/model.pt (its sha256, and the md5 dvc.lock records) and log the model."""
    content = MODEL_FILE.read_bytes()
    model_sha256 = hashlib.sha256(content).hexdigest()
    tracked.set_tags({"model.sha256": model_sha256, "dvc.model_md5": hashlib.md5(content).hexdigest()})
    tracking.record_run(tracked.run_id, model_sha256)
    example = to_input(example_images[:4]).cpu().numpy()
    tracked.log_model(Reconstructor(load_model(MODEL_FILE)), example, registered_name)


@torch.no_grad()
def reconstruction_strip(model: VAE, images: torch.Tensor) -> np.ndarray:
    """uint8 images (top row) above their reconstructions through the posterior mean, as one image."""
    x = to_input(images)
    grid = torchvision.utils.make_grid(torch.cat([x, model.reconstruct(x)]), nrow=len(x), padding=2, pad_value=1.0)
    return (grid[0] * 255).round().to(torch.uint8).cpu().numpy()


def write_outputs(model: VAE, history: list[dict]) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_torch({"config": model.config, "state_dict": state}, MODEL_FILE)
    final = {k: round(v, 6) for k, v in history[-1].items() if k != "epoch"}
    atomic.write_text(TRAIN_METRICS, json.dumps({"epochs": history[-1]["epoch"]} | final, indent=2) + "\n")
    atomic.write_text(TRAIN_HISTORY, _history_csv(history))


def load_model(path: Path = MODEL_FILE, device: torch.device | str = "cpu") -> VAE:
    """The trained model, read without unpickling arbitrary objects."""
    saved = load_torch(path, device)
    model = VAE(**saved["config"]).to(device)
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def main() -> None:
    params = load_params()
    if params.train.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        # Relaunch this stage under PyTorch's own launcher, one process per rank.
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={params.train.num_processes}", "-m", "pipeline.train"]
        sys.exit(subprocess.run(launcher).returncode)
    train(params)


if __name__ == "__main__":
    run_stage(main)
