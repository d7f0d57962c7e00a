"""MLflow wiring shared by the stages: one store per project, one run per trained model.

Relative paths in `mlflow.tracking_uri` are resolved against the project root (DVC_ROOT when DVC
runs us in a temporary copy), so queued experiments log into the user's own store.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse, urlunparse

import mlflow
import mlflow.data
import mlflow.pytorch
import numpy as np
import torch
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.models import ModelSignature
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from pipeline import atomic, provenance
from pipeline.errors import PipelineError
from pipeline.params import PARAMS_FILE, MlflowParams, Params
from pipeline.paths import RUN_FILE, from_root

T = TypeVar("T")


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


# A dead server should cost seconds, not MLflow's default of minutes of retries; users may override.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def connect(params: MlflowParams) -> str | None:
    """Point MLflow at the store and return the experiment id (None when tracking is off).

    Called before any long work, so an unreachable store stops the stage at once, naming the URI.
    """
    if not params.enabled:
        return None
    for name, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    uri = resolve_tracking_uri(params.tracking_uri)
    mlflow.set_tracking_uri(uri)
    try:
        with _store_lock(uri):
            return _experiment_id(params.experiment_name, uri)
    except Exception as exc:
        reason = str(exc).replace(uri, redact(uri)).splitlines()[0][:300]
        raise PipelineError(
            f"cannot reach the MLflow tracking store {redact(uri)} ({type(exc).__name__}: {reason}). "
            "Start the server, fix mlflow.tracking_uri in params.yaml, or set mlflow.enabled: false"
        ) from None


@contextlib.contextmanager
def _store_lock(uri: str):
    """Parallel stages (`dvc queue start -j 2`) must not create or migrate a new sqlite store at
    the same moment: its schema migration is not safe against itself."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri[len("sqlite:///"):])
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _experiment_id(name: str, uri: str) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=_artifact_location(uri))
    except mlflow.exceptions.MlflowException:  # created meanwhile by a run on another machine
        return mlflow.get_experiment_by_name(name).experiment_id


class TrackedRun:
    """One MLflow run that logging can never break: the first failure (a server that died, a full
    disk) prints a warning, and what could not be logged from then on is listed at the end, while
    the stage finishes and writes its DVC outputs. With tracking off (run_id None) it does nothing."""

    def __init__(self, run_id: str | None):
        self.run_id = run_id
        self.not_logged: list[str] = []

    def _call(self, what: str, action: Callable[[mlflow.MlflowClient], T]) -> T | None:
        """`action(client)`, unless tracking is off (no client is made then: making one would open
        MLflow's default store, a new mlflow.db in the working folder) or has failed before."""
        if self.run_id is None:
            return None
        if self.not_logged:
            self.not_logged.append(what)
            return None
        try:
            return action(mlflow.MlflowClient())
        except Exception as exc:
            print(f"warning: MLflow stopped accepting logs ({type(exc).__name__}); the stage goes on without it",
                  file=sys.stderr)
            self.not_logged.append(what)
            return None

    def log_params(self, params: dict) -> None:
        self._call("params", lambda client: client.log_batch(
            self.run_id, params=[Param(k, str(v)) for k, v in params.items()]))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call("tags", lambda client: client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()]))

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self._call(f"metrics at step {step}", lambda client: client.log_batch(
            self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()]))

    def logged_steps(self, key: str) -> set[int]:
        if self.not_logged:
            return set()
        history = self._call(f"history of {key}", lambda client: client.get_metric_history(self.run_id, key))
        return {m.step for m in history or []}

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        self._call(f"artifacts {artifact_path}/",
                   lambda client: client.log_artifacts(self.run_id, str(folder), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call(f"artifact {artifact_file}", lambda client: client.log_text(self.run_id, text, artifact_file))

    def describe(self) -> None:
        """(Re)write the run's description from what the run holds now (`provenance.describe`)."""
        self._call("description", lambda client: client.set_tag(
            self.run_id, MLFLOW_RUN_NOTE, provenance.describe(client.get_run(self.run_id))))

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        self._call(f"image {key} at step {step}",
                   lambda client: client.log_image(self.run_id, image, key=key, step=step))

    def log_dataset(self, array: np.ndarray, name: str, source: str, context: str) -> None:
        """The data as the run's input, with MLflow's digest of its content."""
        with warnings.catch_warnings():  # MLflow registers its local-path source twice and says so
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
            dataset = mlflow.data.from_numpy(array, source=source, name=name)
        entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
        self._call(f"dataset {name}", lambda client: client.log_inputs(self.run_id, [entity]))

    def monitor_system(self, resumed: bool) -> contextlib.AbstractContextManager:
        """CPU, memory and (with nvidia-ml-py) GPU utilisation and memory, sampled while training."""
        if self.run_id is None:
            return contextlib.nullcontext()
        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=10, resume_logging=resumed)
        return _started(monitor)

    def log_history(self, history: list[dict]) -> None:
        """Log the epochs the run does not have yet (those trained before a resume, if any), so a
        resumed run never holds a step twice."""
        last_logged = max(self.logged_steps("train_total"), default=0)
        for row in history:
            if row["epoch"] > last_logged:
                self.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])

    def log_trained_model(self, model_file: Path, model: torch.nn.Module, input_example: np.ndarray,
                          registered_name: str | None) -> None:
        """Tie the run to the model file (its sha256, and the md5 dvc.lock records) and log the model."""
        if self.run_id is None:
            return
        content = model_file.read_bytes()
        model_sha256 = hashlib.sha256(content).hexdigest()
        self.set_tags({"model.sha256": model_sha256, "dvc.model_md5": hashlib.md5(content).hexdigest()})
        record_run(self.run_id, model_sha256)
        self._call("model", lambda _: self._log_model(model, input_example, registered_name))

    def _log_model(self, model, input_example, registered_name) -> None:
        """As a torch.export program: it loads back without our code and without unpickling. It is
        exported on the CPU, and MLflow cannot move an exported program's weights, so MLflow's
        check that the input example predicts runs on the CPU too, even where CUDA is present."""
        spec = TensorSpec(np.dtype(np.float32), (-1, *input_example.shape[1:]))
        with _environment(MLFLOW_DEFAULT_PREDICTION_DEVICE="cpu"), mlflow.start_run(run_id=self.run_id):
            mlflow.pytorch.log_model(
                model, name="model", serialization_format="pt2", input_example=input_example,
                signature=ModelSignature(inputs=Schema([spec]), outputs=Schema([spec])),
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
                registered_model_name=registered_name,
            )

    def finish(self, status: str = "FINISHED") -> None:
        self._call("run status", lambda client: client.set_terminated(self.run_id, status))
        if self.not_logged:
            print(f"warning: not logged to MLflow run {self.run_id}: {', '.join(self.not_logged)}; "
                  "every DVC output was written", file=sys.stderr)


@contextlib.contextmanager
def _environment(**values: str):
    """These environment variables set for the duration, then put back as they were."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _started(monitor):
    monitor.start()
    try:
        yield monitor
    finally:
        monitor.finish()


def training_run(experiment_id: str | None, run_id: str | None, params: Params, device: torch.device,
                 datasets: dict[str, torch.Tensor]) -> TrackedRun:
    """The run to train into: `run_id` again when training resumes, otherwise a new run, named and
    labelled: its params, params.yaml and the packages it ran with, where it comes from (MLflow's
    source and git tags), where it runs, and its data (`datasets`: context -> uint8 images)."""
    if experiment_id is None:
        return TrackedRun(None)
    client = mlflow.MlflowClient()
    if run_id is not None:
        try:
            client.update_run(run_id, status="RUNNING")
            return TrackedRun(run_id)
        except mlflow.exceptions.MlflowException:
            print(f"warning: the checkpoint's MLflow run {run_id} is not in this store; logging into a new run",
                  file=sys.stderr)
    source = provenance.source()
    tracked = TrackedRun(client.create_run(experiment_id, run_name=provenance.run_name(params, source)).info.run_id)
    uri = params.mlflow.tracking_uri
    tracked.log_params(provenance.flat_yaml(params) | {"mlflow.tracking_uri": provenance.yaml_value(redact(uri))})
    tracked.set_tags(runtime_tags(device) | provenance.source_tags(source, "train") | dvc_tags())
    tracked.log_text(PARAMS_FILE.read_text().replace(uri, redact(uri)), PARAMS_FILE.name)
    tracked.log_text(provenance.environment(), "environment/requirements.txt")
    data_source = params.data.mirror or f"torchvision://{params.data.dataset}"  # the official download
    for context, images in datasets.items():
        tracked.log_dataset(images.cpu().numpy(), f"{params.data.dataset}-{context}", data_source, context)
    return tracked


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


def dvc_tags() -> dict[str, str]:
    """What ties the run to DVC: the experiment name under `dvc exp run`, and the dvc.lock the
    stage started from (DVC writes the new one after the stage)."""
    tags = {}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    lock = Path("dvc.lock")
    if lock.exists():
        tags["dvc.lock.parent_sha256"] = hashlib.sha256(lock.read_bytes()).hexdigest()
    return tags


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


def run_for_model(experiment_id: str | None, model_sha256: str) -> TrackedRun:
    """The MLflow run that trained this model; a new one (with a warning) if it cannot be found.

    The run id is not a DVC output (it differs on every run), so after `dvc pull` or a checkout the
    record may be gone; the run is then found again by the model hash it is tagged with.
    """
    if experiment_id is None:
        return TrackedRun(None)
    run_id = recorded_run(model_sha256)
    if run_id is None:
        found = mlflow.search_runs(
            [experiment_id], filter_string=f"tags.`model.sha256` = '{model_sha256}'", max_results=1, output_format="list"
        )
        if found:
            run_id = found[0].info.run_id
        else:
            print("warning: no MLflow run found for this model; logging into a new run", file=sys.stderr)
            run_id = mlflow.MlflowClient().create_run(experiment_id, tags={"model.sha256": model_sha256}).info.run_id
        record_run(run_id, model_sha256)
    return TrackedRun(run_id)
