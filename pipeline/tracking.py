"""MLflow wiring shared by the stages: one store per project, one run per trained model.

Relative paths in `mlflow.tracking_uri` are resolved against the project root (DVC_ROOT when DVC
runs us in a temporary copy), so queued experiments log into the user's own store.
"""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import mlflow
import torch

from pipeline import atomic
from pipeline.params import MlflowParams
from pipeline.paths import RUN_FILE, from_root, project_root


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative sqlite path or plain folder absolute; leave server URIs as they are."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite" and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{from_root(uri[len('sqlite:///'):])}"
    if parsed.scheme in ("", "file"):
        return from_root(parsed.path if parsed.scheme else uri).as_uri()
    return uri


def redact(uri: str) -> str:
    """The URI without any user:password part, safe to print, log or tag."""
    parsed = urlparse(uri)
    if parsed.password is None and parsed.username is None:
        return uri
    host = parsed.hostname or ""
    return urlunparse(parsed._replace(netloc=f"***@{host}" + (f":{parsed.port}" if parsed.port else "")))


def _artifact_location(tracking_uri: str) -> str | None:
    """Artifacts beside a local store (mlruns/artifacts); a server keeps its own default."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return None


def setup(params: MlflowParams) -> str:
    """Point MLflow at the store and return the experiment id, creating the experiment once."""
    uri = resolve_tracking_uri(params.tracking_uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(params.experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(params.experiment_name, artifact_location=_artifact_location(uri))
    except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent run
        return mlflow.get_experiment_by_name(params.experiment_name).experiment_id


def runtime_tags(device: torch.device) -> dict[str, str]:
    """What the run ran on: the GPU and its CUDA stack, or the CPU."""
    tags = {"torch.version": torch.__version__, "device.type": device.type, "python.version": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        tags |= {
            "cuda.device_name": props.name,
            "cuda.version": str(torch.version.cuda),
            "cudnn.version": str(torch.backends.cudnn.version()),
            "cuda.capability": f"{props.major}.{props.minor}",
            "cuda.memory_gib": f"{props.total_memory / 2**30:.1f}",
        }
    else:
        tags |= {"cpu.name": platform.processor() or platform.machine(), "cpu.threads": str(torch.get_num_threads())}
    return tags


def git_tags() -> dict[str, str]:
    """The commit the run was made from, and whether the tree had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=project_root(), capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"git.commit": git("rev-parse", "HEAD"), "git.dirty": str(bool(git("status", "--porcelain")))}
    except (OSError, subprocess.CalledProcessError):
        return {}


def record_run(run_id: str, model_sha256: str) -> None:
    """Remember which run trained the model now on disk, for the later stages to log into."""
    atomic.write_text(RUN_FILE, json.dumps({"run_id": run_id, "model_sha256": model_sha256}) + "\n")


def recorded_run(model_sha256: str) -> str | None:
    """The run that trained this exact model, or None if the record is missing or belongs to another model."""
    try:
        record = json.loads(RUN_FILE.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record["run_id"] if record.get("model_sha256") == model_sha256 else None


def run_for_model(experiment_id: str, model_sha256: str) -> str:
    """The MLflow run that trained this model; a new one (with a warning) if it cannot be found.

    The run id is not a DVC output (it differs on every run), so after `dvc pull` or a checkout the
    record may be gone; the run is then found again by the model hash it is tagged with.
    """
    run_id = recorded_run(model_sha256)
    if run_id is None:
        found = mlflow.search_runs(
            [experiment_id], filter_string=f"tags.`model.sha256` = '{model_sha256}'", max_results=1, output_format="list"
        )
        if found:
            run_id = found[0].info.run_id
        else:
            print("warning: no MLflow run found for this model; logging into a new run")
            run_id = mlflow.MlflowClient().create_run(experiment_id, tags={"model.sha256": model_sha256}).info.run_id
        record_run(run_id, model_sha256)
    return run_id
