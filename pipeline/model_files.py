"""The model's files on disk: the trained model (models/model.pt), the checkpoint of a run in
progress (models/checkpoint.pt) and the finished run's last checkpoint (models/state.pt). All are
read as tensors and plain values only, never arbitrary pickles, and written atomically, the same
weights always giving the same bytes."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
from pathlib import Path

import torch
import yaml

from pipeline import atomic
from pipeline.data_parts import images_file
from pipeline.errors import PipelineError
from pipeline.model import VAE
from pipeline.params import Params
from pipeline.paths import CHECKPOINT_FILE, DVC_FILE, MODEL_FILE, STATE_FILE


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


def save_model(model: VAE, path: Path = MODEL_FILE, weights: dict[str, torch.Tensor] | None = None) -> None:
    """The weights (on the CPU, contiguous) and the config that builds the model they fit: the
    model's own, or other `weights` of it (an earlier epoch's)."""
    state = {k: v.detach().cpu().contiguous() for k, v in (weights or model.state_dict()).items()}
    save_torch({"config": model.config, "state_dict": state}, path)


def load_model(path: Path = MODEL_FILE, device: torch.device | str = "cpu", channels_last: bool = False) -> VAE:
    """The trained model, in eval mode, read without unpickling arbitrary objects; in channels_last
    layout if asked (`train.channels_last`: the layout it trained in)."""
    saved = load_torch(path, device)
    model = VAE(**saved["config"]).to(device)
    model.load_state_dict(saved["state_dict"])
    return (model.to(memory_format=torch.channels_last) if channels_last else model).eval()


def training_fingerprint(params: Params, precision: str, device_type: str) -> dict:
    """What a checkpoint must match to be resumed or continued: every param that shapes the weights,
    the precision `train.precision` resolved to (a resume never mixes precisions), the kind of device
    it ran on (`train.device: auto` is a GPU on one machine and the CPU on another), the training
    code and the data. Not `train.epochs`: the first epochs do not depend on how many follow, so a
    killed run can be resumed, and a finished one continued, with more epochs. Nor when it stops
    early or which epoch it keeps: neither changes any epoch's weights (`train.min_delta` does count:
    it decides which epoch's weights a checkpoint holds as the best)."""
    train = dataclasses.asdict(params.train) | {"precision": precision}
    for when_to_stop_or_what_to_keep in ("epochs", "early_stopping", "keep_epoch"):
        del train[when_to_stop_or_what_to_keep]
    return {
        "seed": params.seed,
        "model": dataclasses.asdict(params.model),
        "train": train,
        "device": device_type,
        "code": training_code_sha256(),
        "data": file_sha256(images_file("train")) + file_sha256(images_file("val")),
    }


def training_code_sha256() -> str:
    """The Python files dvc.yaml names as the train stage's code, hashed together: a change to
    any of them that reruns training also means training from scratch."""
    deps = yaml.safe_load(DVC_FILE.read_text())["stages"]["train"]["deps"]
    digest = hashlib.sha256()
    for path in sorted(dep for dep in deps if dep.endswith(".py")):
        digest.update(path.encode() + b"\0" + Path(path).read_bytes())
    return digest.hexdigest()


def best_weights(model: VAE, is_best: bool, best: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The best epoch's weights once an epoch has trained: a copy of the model's if that epoch
    `is_best` (`history.best_row`), else `best`, kept from an earlier epoch."""
    if is_best or best is None:
        return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    return best


def save_checkpoint(
    fingerprint: dict,
    model: VAE,
    optimizer: torch.optim.Optimizer,
    rng_by_rank: list[dict[str, torch.Tensor]],
    history: list[list[float]],
    run_id: str | None,
    best_model: dict[str, torch.Tensor],
    path: Path = CHECKPOINT_FILE,
) -> None:
    """All a killed run needs to go on as if it had not stopped: weights, optimizer, every process's
    random states (`run_state.random_states` of each rank, in rank order), the epochs' history (`history.to_saved`),
    the best epoch's weights (`train.keep_epoch: best` keeps them) and the MLflow run. A sweep training
    trials together writes each trial's to a `path` of its own."""
    save_torch(
        {
            "fingerprint": fingerprint,
            "model": model.state_dict(),
            "best_model": best_model,
            "optimizer": optimizer.state_dict(),
            "rng": rng_by_rank,
            "history": history,
            "run_id": run_id,
        },
        path,
    )


def load_checkpoint(fingerprint: dict, epochs: int) -> dict | None:
    """The checkpoint of an interrupted run of these same params and data, if there is one; one
    of other params or data is deleted. Read onto the CPU, where random states must be; restoring
    copies the weights to their device. Under torchrun rank 0 reads it first (it alone deletes)."""
    if not CHECKPOINT_FILE.exists():
        return None
    checkpoint = load_torch(CHECKPOINT_FILE, "cpu")
    saved = checkpoint["fingerprint"]
    if (
        "device" in saved
        and saved["device"] != fingerprint["device"]
        and saved | {"device": fingerprint["device"]} == fingerprint
    ):
        raise PipelineError(
            f"{CHECKPOINT_FILE} holds a run trained on {saved['device']} and this run is on {fingerprint['device']}: "
            f"resume it where {saved['device']} is used (train.device: {saved['device']}), "
            f"or delete {CHECKPOINT_FILE} to train from scratch here"
        )
    if saved != fingerprint or len(checkpoint["history"]) > epochs:
        print(f"discarding {CHECKPOINT_FILE}: it was written with other params or data")
        CHECKPOINT_FILE.unlink()
        return None
    return checkpoint


def load_finished(fingerprint: dict, epochs: int) -> tuple[dict | None, str | None]:
    """The finished run in STATE_FILE, if this run continues it (the same fingerprint, fewer epochs
    than `epochs`); otherwise None and why training starts from scratch (None: there is no state)."""
    if not STATE_FILE.exists():
        return None, None
    state = load_torch(STATE_FILE, "cpu")
    trained = len(state["history"])
    if state["fingerprint"] != fingerprint:
        return None, f"{STATE_FILE} was trained with other params, code, device or data"
    if trained >= epochs:
        return None, f"{STATE_FILE} holds {trained} epochs, and train.epochs is {epochs}"
    return state, None


def finish_checkpoint() -> None:
    """The finished run's last checkpoint becomes STATE_FILE: nothing is left that a later run
    could resume by mistake, and a run with more epochs continues from it. Without its MLflow run
    id: a DVC output must be the same bytes on every run of the same commit."""
    save_torch(load_torch(CHECKPOINT_FILE, "cpu") | {"run_id": None}, STATE_FILE)
    CHECKPOINT_FILE.unlink()


def restore_checkpoint(
    checkpoint: dict, model: VAE, optimizer: torch.optim.Optimizer, generator: torch.Generator, rank: int = 0
) -> dict[str, torch.Tensor]:
    """Put the weights, optimizer and this rank's random states back as `save_checkpoint` found them;
    returns the best epoch's weights, on the model's device (where they were when saved)."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    rng = checkpoint["rng"][rank]
    torch.set_rng_state(rng["cpu"])
    generator.set_state(rng["permutation"])
    if generator.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], generator.device)
    device = next(model.parameters()).device
    return {name: tensor.to(device) for name, tensor in checkpoint["best_model"].items()}
