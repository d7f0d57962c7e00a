"""Servers the tests start on loopback: a folder over HTTP, and `mlflow server`; and what an MLflow
store holds, read through its API."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import mlflow

from tests.processes import stop_process_group

# MLflow's own setting: system metrics every 0.2 s instead of 10, so a training of seconds logs some.
SYSTEM_METRICS_OFTEN = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"}


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """A folder served without a log line per request, also as an HTTP proxy serves it."""

    def translate_path(self, path: str) -> str:
        return super().translate_path(urllib.parse.urlsplit(path).path)  # a proxy request names the whole URL

    def log_message(self, *args) -> None:
        pass


class HeldDownloads:
    """A folder over HTTP that serves its files until the test calls `hold`; every download after
    that goes on, a byte a second, until the test ends: a download certain to be under way, and not
    done, whenever the test acts."""

    def __init__(self, folder: Path):
        self.holding, self.released = threading.Event(), threading.Event()
        outer = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                if not outer.holding.is_set():
                    return super().do_GET()
                self.send_response(200)
                self.send_header("Content-Length", str(2**30))
                self.end_headers()
                while not outer.released.wait(1):  # a byte a second: under way, never done or timed out
                    self.wfile.write(b"\0")
                    self.wfile.flush()

        self.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder))
        )
        self.server.handle_error = lambda *_: None  # a held client that gave up has closed its socket
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def hold(self) -> None:
        self.holding.set()

    def __enter__(self) -> HeldDownloads:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_mlflow(store: str, artifacts: Path, port: int | None = None):
    """`mlflow server` on loopback (on `port`, or a free one), in a process group of its own; yields
    (url, store, process), then stops the whole group (the server, its uvicorn worker and its huey
    consumers)."""
    port = port or free_port()
    artifacts.mkdir(parents=True, exist_ok=True)
    log = artifacts.parent / f"mlflow-server-{port}.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            store,
            "--artifacts-destination",
            str(artifacts),
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # as docs/scaling.md's team server
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
        yield f"http://127.0.0.1:{port}", store, proc
    finally:
        stop_process_group(proc)


def runs_of(project: Path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("vae-pipeline")
    return client, client.search_runs([experiment.experiment_id])


def snapshot(client: mlflow.MlflowClient, run_id: str) -> dict:
    """Everything a run holds, as the store's API returns it: name, status, start and end time,
    params, tags, every metric's whole history, and every artifact's path and size."""
    mlrun = client.get_run(run_id)
    return {
        "info": (mlrun.info.run_name, mlrun.info.status, mlrun.info.start_time, mlrun.info.end_time),
        "params": mlrun.data.params,
        "tags": mlrun.data.tags,
        "metrics": {
            key: sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))
            for key in mlrun.data.metrics
        },
        "artifacts": artifact_sizes(client, run_id),
    }


def artifact_sizes(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> list[tuple[str, int]]:
    found = []
    for artifact in client.list_artifacts(run_id, path):
        found += (
            artifact_sizes(client, run_id, artifact.path) if artifact.is_dir else [(artifact.path, artifact.file_size)]
        )
    return found


def logged_json(client: mlflow.MlflowClient, run_id: str, path: str):
    """A JSON artifact of the run, downloaded into a folder removed after it is read
    (`download_artifacts` without a destination leaves one in the system's temp folder)."""
    with tempfile.TemporaryDirectory() as folder:
        return json.loads(Path(client.download_artifacts(run_id, path, folder)).read_text())
