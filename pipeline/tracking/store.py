"""The MLflow store: where it is (a local SQLite file beside the project, or a server), reaching it
before any long work, with a login that may log runs to its experiment."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from filelock import FileLock
from mlflow.utils.credentials import get_default_host_creds, read_mlflow_creds
from mlflow.utils.rest_utils import http_request

from pipeline.errors import PipelineError
from pipeline.params import MlflowParams
from pipeline.paths import from_root, project_root


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative sqlite path or plain folder absolute; leave server URIs as they are."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite" and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{from_root(uri[len('sqlite:///') :])}"
    if parsed.scheme in ("", "file"):
        return from_root(parsed.path if parsed.scheme else uri).as_uri()
    return uri


def _artifact_location(tracking_uri: str) -> str | None:
    """Artifacts beside a local store (mlruns/artifacts); a server keeps its own default."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///") :]).parent / "artifacts").as_uri()
    return None


# A dead server should cost seconds, not MLflow's default of minutes of retries; users may override.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def connect(params: MlflowParams) -> str | None:
    """Point MLflow at the store and return the experiment id (None when tracking is off).

    Called before any long work, so an unreachable store, a refused login or a login that may not
    log runs stops the stage at once, in one line that names the URI, the user and the fix.
    """
    if not params.enabled:
        return None
    for name, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    uri = resolve_tracking_uri(params.tracking_uri)
    mlflow.set_tracking_uri(uri)
    server = urlparse(uri).scheme in ("http", "https")
    try:
        if server:
            _check_login(uri, params.experiment_name)
        with _store_lock(uri):
            experiment_id = _experiment_id(params.experiment_name, uri)
        if server:
            _check_may_log(uri, params.experiment_name, experiment_id)
        return experiment_id
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(_why_not_reached(uri, exc)) from None


def _why_not_reached(uri: str, exc: Exception) -> str:
    """What is wrong with the store, and what to do, by what the store is: a server, a SQLite file
    (damaged, or not writable), or another URI."""
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return (
            f"cannot verify the certificate of the MLflow server {uri}: set MLFLOW_TRACKING_SERVER_CERT_PATH "
            "to the certificate of the CA that signed it"
        )
    if urlparse(uri).scheme in ("http", "https"):
        return (
            f"cannot reach the MLflow tracking server {uri} ({reason}). Start the server, fix "
            "mlflow.tracking_uri in params.yaml, or set mlflow.enabled: false"
        )
    if uri.startswith("sqlite:///"):
        database = _shown(Path(uri[len("sqlite:///") :]))
        damage = _sqlite_damage(Path(uri[len("sqlite:///") :]))
        if damage:
            return (
                f"the MLflow store {database} is damaged ({damage}), so no run can be read from it or logged to "
                f"it. Move it aside (`mv {database} {database}.damaged`) and run again to start an empty store, "
                f"or put back a copy from a backup; `sqlite3 {database} .recover` often saves the runs it holds"
            )
        return (
            f"cannot open the MLflow store {database} ({reason}): check that it and its folder can be read and "
            "written, point mlflow.tracking_uri in params.yaml elsewhere, or set mlflow.enabled: false"
        )
    return (
        f"cannot open the MLflow tracking store {uri} ({reason}): fix mlflow.tracking_uri in params.yaml, or "
        "set mlflow.enabled: false"
    )


def _sqlite_damage(database: Path) -> str | None:
    """SQLite's own word on a store file that is not a sound database, read-only ("database disk
    image is malformed", "file is not a database"); None for a sound file, or none at all."""
    if not database.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)) as connection:
            found = [row[0] for row in connection.execute("PRAGMA quick_check(3)")]
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return None if found == ["ok"] else "; ".join(found)


def _shown(path: Path) -> str:
    """`path` as the user wrote it: relative to the project root when inside it."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(project_root()))
    return str(path)


ANONYMOUS = "an anonymous user"


def _login() -> str:
    """Who the requests log in as, for messages (never the password): a user, a token, or ANONYMOUS."""
    username = read_mlflow_creds().username
    if username:
        return f"user '{username}'"
    return "the token in MLFLOW_TRACKING_TOKEN" if os.environ.get("MLFLOW_TRACKING_TOKEN") else ANONYMOUS


def _status(uri: str, endpoint: str, method: str, **request) -> int:
    """The HTTP status the server answers a request with, logged in as MLflow's client would be
    (MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN, MLFLOW_TRACKING_SERVER_CERT_PATH)."""
    return http_request(get_default_host_creds(uri), endpoint, method, **request).status_code


def _check_login(uri: str, experiment_name: str) -> None:
    """The server accepts the login (an authenticating server answers 401 otherwise) and lets it
    read the experiment (403 otherwise)."""
    status = _status(uri, "/api/2.0/mlflow/experiments/get-by-name", "GET", params={"experiment_name": experiment_name})
    login = _login()
    if status == 401 and login == ANONYMOUS:
        raise PipelineError(
            f"the MLflow server {uri} requires a login to log runs to experiment '{experiment_name}': set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment"
        )
    if status == 401:
        raise PipelineError(
            f"the MLflow server {uri} refused the login of {login}, so no run can be logged to experiment "
            f"'{experiment_name}': check MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), and ask the server's "
            "admin whether the user exists"
        )
    if status == 403:
        raise PipelineError(
            f"{login} may not read MLflow experiment '{experiment_name}' on {uri}: ask the server's admin "
            "for EDIT permission on it"
        )


def _check_may_log(uri: str, experiment_name: str, experiment_id: str) -> None:
    """The login may create runs in the experiment, asked of the server without creating one: a
    run-create request whose start time is not a number. The server authorises a request before
    it reads it, so it answers 403 to a login without EDIT permission, and 400 (a bad request,
    nothing created) to one with it."""
    status = _status(
        uri, "/api/2.0/mlflow/runs/create", "POST", json={"experiment_id": experiment_id, "start_time": "not a time"}
    )
    if status == 403:
        raise PipelineError(
            f"{_login()} may read MLflow experiment '{experiment_name}' on {uri} but not log runs to it: ask the "
            "server's admin for EDIT permission on it"
        )


@contextlib.contextmanager
def _store_lock(uri: str):
    """Parallel stages (`dvc queue start -j 2`) must not create or migrate a new sqlite store at
    the same moment: its schema migration is not safe against itself."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri[len("sqlite:///") :])
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(database.with_name(database.name + ".lock")):
        yield


def _experiment_id(name: str, uri: str) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=_artifact_location(uri))
    except mlflow.exceptions.MlflowException:  # created meanwhile by a run on another machine
        return mlflow.get_experiment_by_name(name).experiment_id
