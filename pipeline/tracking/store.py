"""The MLflow store: where it is (a local SQLite file beside the project, or a server), reaching it
before any long work, its experiment, and a URI safe to print."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import mlflow

from pipeline.errors import PipelineError
from pipeline.params import MlflowParams
from pipeline.paths import from_root


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
