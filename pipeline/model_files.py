"""The model's files on disk: the trained model (models/model.pt) and the checkpoint of a run in
progress (models/checkpoint.pt). Both are read as tensors and plain values only, never arbitrary
pickles, and written atomically, the same weights always giving the same bytes."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
from pathlib import Path

import torch

from pipeline import atomic
from pipeline.data_parts import images_file
from pipeline.errors import PipelineError
from pipeline.model import VAE
from pipeline.params import Params
from pipeline.paths import CHECKPOINT_FILE, MODEL_FILE


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_torch(path: Path, device: torch.device | str):
    """Read a checkpoint or model as tensors and plain containers only: a file that needs arbitrary
    unpickling (and could run code) is refused, and a truncated one is named."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise PipelineError(
            f"{path} holds objects other than tensors and plain values; refusing to unpickle it "
            f"({str(exc).splitlines()[0]}). Delete it and rerun the stage that writes it"
        ) from None
    except (RuntimeError, EOFError, KeyError) as exc:  # what torch.load raises on a cut-short or garbled file
        reason = f" ({str(exc).split('. ')[0]})" if isinstance(exc, RuntimeError) else ""
        raise PipelineError(
            f"{path} is not a complete PyTorch file{reason}; it is truncated or corrupt. `dvc checkout --force "
            f"{path}` restores the version dvc.lock records; or delete it and rerun the stage that writes it"
        ) from None


def save_torch(obj, target: Path) -> None:
    """Serialise in memory first: torch.save records the file name it writes to, and a temp name
    would make every save of the same weights different bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic.write_bytes(target, buffer.getvalue())


def save_model(model: VAE, path: Path = MODEL_FILE) -> None:
    """The weights (on the CPU, contiguous) and the config that builds the model they fit."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_torch({"config": model.config, "state_dict": state}, path)


def load_model(path: Path = MODEL_FILE, device: torch.device | str = "cpu", channels_last: bool = False) -> VAE:
    """The trained model, in eval mode, read without unpickling arbitrary objects; in channels_last
    layout if asked (`train.channels_last`: the layout it trained in)."""
    saved = load_torch(path, device)
    model = VAE(**saved["config"]).to(device)
    model.load_state_dict(saved["state_dict"])
    return (model.to(memory_format=torch.channels_last) if channels_last else model).eval()


def training_fingerprint(params: Params, precision: str) -> dict:
    """What a checkpoint must match to be resumed: every param that shapes the weights, the precision
    `train.precision` resolved to (a resume never mixes precisions), and the data. Not
    `train.epochs`: the first epochs do not depend on how many follow, so a killed run can be
    resumed with more epochs."""
    train = dataclasses.asdict(params.train) | {"precision": precision}
    del train["epochs"]
    return {
        "seed": params.seed,
        "model": dataclasses.asdict(params.model),
        "train": train,
        "data": file_sha256(images_file("train")) + file_sha256(images_file("val")),
    }


def save_checkpoint(fingerprint: dict, model: VAE, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                    history: list[dict], run_id: str | None) -> None:
    """All a killed run needs to go on as if it had not stopped: weights, optimizer, every random
    state (the CPU's, the data order's, the GPU's), the epochs' history and the MLflow run."""
    rng = {"cpu": torch.get_rng_state(), "permutation": generator.get_state()}
    if generator.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(generator.device)
    save_torch({"fingerprint": fingerprint, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": rng, "history": history, "run_id": run_id}, CHECKPOINT_FILE)


def load_checkpoint(fingerprint: dict, epochs: int) -> dict | None:
    """The checkpoint of an interrupted run of these same params and data, if there is one. Read
    onto the CPU, where random states must be; restoring copies the weights to their device."""
    if not CHECKPOINT_FILE.exists():
        return None
    checkpoint = load_torch(CHECKPOINT_FILE, "cpu")
    if checkpoint["fingerprint"] != fingerprint or len(checkpoint["history"]) > epochs:
        print(f"discarding {CHECKPOINT_FILE}: it was written with other params or data")
        CHECKPOINT_FILE.unlink(missing_ok=True)  # every rank reads it; the first one removes it
        return None
    return checkpoint


def restore_checkpoint(checkpoint: dict, model: VAE, optimizer: torch.optim.Optimizer,
                       generator: torch.Generator) -> None:
    """Put the weights, optimizer and every random state back as `save_checkpoint` found them."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"]["cpu"])
    generator.set_state(checkpoint["rng"]["permutation"])
    if generator.device.type == "cuda":
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], generator.device)
