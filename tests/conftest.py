"""Shared fixtures: a small IDX mirror, a copy of the project in a temp git repo, a local HTTP server."""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.synthetic import write_mirror

ROOT = Path(__file__).resolve().parent.parent
PROJECT_FILES = ["pipeline", "params.yaml", "dvc.yaml", ".dvc/config", ".dvcignore", ".gitignore", "mlruns/.gitignore"]


@pytest.fixture
def mirror(tmp_path) -> Path:
    return write_mirror(tmp_path / "mirror")


def project_env() -> dict[str, str]:
    """The environment DVC stages run in: this interpreter's `python` and `dvc` first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("DVC_ROOT", None)
    return env


def run(args: list[str], cwd: Path, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=kwargs.pop("env", project_env()), capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def edit_params(project: Path, **changes) -> None:
    """Set dotted keys in the project's params.yaml, e.g. edit_params(p, **{"train.epochs": 1})."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(dest: Path, mirror: Path, **changes) -> Path:
    """A copy of this project in a fresh git repo, set for a fast run on `mirror`."""
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        src, dst = ROOT / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    edit_params(dest, **{"data.mirror": str(mirror), "train.epochs": 1, "train.batch_size": 32,
                         "visualize.num_samples": 16, "visualize.manifold_size": 5, **changes})
    run(["git", "init", "-q"], dest)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "add", "-A"], dest)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "project"], dest)
    return dest


EPOCHS = 2  # of the end-to-end run


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory) -> Path:
    """One project reproduced end to end with real `dvc repro`; tests read it (test_pipeline's last
    test edits it and adds runs, so readers pick the first run)."""
    tmp = tmp_path_factory.mktemp("e2e")
    project = make_project(tmp / "project", write_mirror(tmp / "mirror"),
                           **{"train.epochs": EPOCHS, "mlflow.registered_model": "vae"})
    result = run(["dvc", "repro"], project)
    assert stages_run(result.stdout) == ["download", "split", "train", "evaluate", "visualize"]
    return project


@pytest.fixture
def project(tmp_path, mirror) -> Path:
    return make_project(tmp_path / "project", mirror)


@pytest.fixture
def http_server():
    """Serve a folder over real HTTP on 127.0.0.1; yields a function folder -> base URL."""
    servers = []

    def serve(folder: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback over its own sqlite store; yields (url, store uri, process)."""
    yield from serve_mlflow(f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts")


def serve_mlflow(store: str, artifacts: Path):
    """Start `mlflow server` on a free loopback port; yields (url, store, process), then stops it."""
    port = free_port()
    artifacts.mkdir(parents=True, exist_ok=True)
    log = artifacts.parent / f"mlflow-server-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", store, "--artifacts-destination", str(artifacts)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    else:
        raise AssertionError(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
    yield url, store, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
