"""Shared fixtures: a small IDX mirror, a copy of the project in a temp git repo, a local HTTP server."""

from __future__ import annotations

import contextlib
import dataclasses
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
import urllib.parse
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml

from pipeline.params import Params
from tests.synthetic import write_mirror

ROOT = Path(__file__).resolve().parent.parent
# The project as a user clones it, but for params.yaml: tests write theirs from the code's defaults,
# so a user's edits (another dataset, a team tracking server) never reach a test.
PROJECT_FILES = ["pipeline", "dvc.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore",
                 "mlruns/.gitignore"]


@pytest.fixture
def mirror(tmp_path) -> Path:
    return write_mirror(tmp_path / "mirror")


def project_env() -> dict[str, str]:
    """The environment DVC stages run in: this interpreter's `python` and `dvc` first on PATH, and
    DVC's usage analytics off (their reporting process would outlive a test)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "1"
    env.pop("DVC_ROOT", None)
    return env


# Who test commits are by, whatever the machine's git config (DVC's experiment commits too).
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost"}


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
    """A copy of this project in a fresh git repo, with the default params set for a fast run on `mirror`."""
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        src, dst = ROOT / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    (dest / "params.yaml").write_text(yaml.safe_dump(dataclasses.asdict(Params()), sort_keys=False))
    # On the CPU, whatever the machine: the suite compares exact bytes, which CUDA gives only in
    # deterministic mode; tests/test_cuda.py runs the pipeline on the GPU.
    # Fewer importance samples: on 60 test images, K=100 is most of evaluate's seconds on a CPU.
    edit_params(dest, **{"data.mirror": str(mirror), "train.device": "cpu", "train.epochs": 1, "train.batch_size": 32,
                         "evaluate.iw_samples": 10, "visualize.num_samples": 16, "visualize.manifold_size": 5,
                         **changes})
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "project"], dest, env=project_env() | GIT_IDENTITY)
    return dest


EPOCHS = 2  # of the end-to-end run
# MLflow's own setting: system metrics every 0.2 s instead of 10, so a training of seconds logs some.
SYSTEM_METRICS_OFTEN = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"}


# bf16 against fp32 on the same data, seed and batches, the largest relative difference of an
# epoch's loss measured on this project's 2-core AVX512_BF16 CPU: 0.21% on the tests' synthetic data
# (1,200 training images, 4 epochs, batch 32: tests/test_faults.py's run); 0.82% on real
# Fashion-MNIST over 5 epochs at batch 64 (validation total of epoch 4; docs/performance.md, "Mixed precision").
# 2% is about ten times the first, so other CPUs' bf16 kernels have room.
BF16_LOSS_TOLERANCE = 0.02


OUTPUTS = ("data/raw", "data/split", "models/model.pt", "models/state.pt", "metrics", "figures")  # every DVC output


def outputs_of(project: Path) -> dict[str, bytes]:
    """The bytes of every file of every DVC output, by path."""
    files = {}
    for name in OUTPUTS:
        path = project / name
        for file in [path] if path.is_file() else sorted(path.rglob("*")):
            if file.is_file():
                files[str(file.relative_to(project))] = file.read_bytes()
    return files


def assert_kept(project: Path, before: dict[str, bytes]) -> None:
    """Every output as it was, nothing half-written beside it, and DVC agrees nothing is missing."""
    after = outputs_of(project)
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    assert not changed, f"outputs lost or changed: {changed}"
    status = run(["dvc", "status"], project).stdout
    assert "changed outs" not in status, status


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory) -> Path:
    """One project reproduced end to end with real `dvc repro`; tests only read it (in any order)."""
    tmp = tmp_path_factory.mktemp("e2e")
    project = make_project(tmp / "project", write_mirror(tmp / "mirror"),
                           **{"train.epochs": EPOCHS, "mlflow.registered_model": "vae"})
    result = run(["dvc", "repro"], project, env=project_env() | SYSTEM_METRICS_OFTEN)
    assert stages_run(result.stdout) == ["check", "download", "split", "train", "evaluate", "visualize"]
    return project


LEARNING_RATES = ("0.001", "0.002")  # of the two experiments


@pytest.fixture(scope="session")
def experiments(tmp_path_factory) -> Path:
    """A project and two experiments on it, run as a user runs them: `dvc exp run -S ...`."""
    tmp = tmp_path_factory.mktemp("experiments")
    project = make_project(tmp / "project", write_mirror(tmp / "mirror"))
    for rate in LEARNING_RATES:
        run(["dvc", "exp", "run", "-S", f"train.learning_rate={rate}"], project)
    return project


def snapshot(client: mlflow.MlflowClient, run_id: str) -> dict:
    """Everything a run holds, as the store's API returns it: name, status, start and end time,
    params, tags, every metric's whole history, and every artifact's path and size."""
    mlrun = client.get_run(run_id)
    return {
        "info": (mlrun.info.run_name, mlrun.info.status, mlrun.info.start_time, mlrun.info.end_time),
        "params": mlrun.data.params, "tags": mlrun.data.tags,
        "metrics": {key: sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))
                    for key in mlrun.data.metrics},
        "artifacts": artifact_sizes(client, run_id),
    }


def artifact_sizes(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> list[tuple[str, int]]:
    found = []
    for artifact in client.list_artifacts(run_id, path):
        found += artifact_sizes(client, run_id, artifact.path) if artifact.is_dir else [(artifact.path, artifact.file_size)]
    return found


RERUNS = {"eval-only": "evaluate.iw_samples=5", "vis-only": "visualize.num_images=6"}  # one stage each


@pytest.fixture(scope="session")
def partial_experiments(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    """A trained experiment, then one that reruns only evaluate and one that reruns only visualize,
    run as a user runs them; with a snapshot of every run after each experiment (run name -> its
    snapshots, oldest first)."""
    tmp = tmp_path_factory.mktemp("partial")
    project = make_project(tmp / "project", write_mirror(tmp / "mirror"), **{"train.epochs": EPOCHS,
                                                                             "mlflow.registered_model": "vae"})
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    snapshots: dict[str, list[dict]] = {}
    for name, setting in [("first", None), *RERUNS.items()]:
        run(["dvc", "exp", "run", "-n", name] + (["-S", setting] if setting else []), project)
        experiment = client.get_experiment_by_name("vae-pipeline")
        for mlrun in client.search_runs([experiment.experiment_id]):
            snapshots.setdefault(mlrun.info.run_name, []).append(snapshot(client, mlrun.info.run_id))
    return project, snapshots


@pytest.fixture
def project(tmp_path, mirror) -> Path:
    return make_project(tmp_path / "project", mirror)


@pytest.fixture
def http_server():
    """Serve a folder over real HTTP on 127.0.0.1; yields a function folder -> base URL. The server
    also answers as an HTTP proxy (`http_proxy=` its URL): a request for http://any.host/a/b is
    served from folder/a/b."""
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
    def translate_path(self, path: str) -> str:
        return super().translate_path(urllib.parse.urlsplit(path).path)  # a proxy request names the whole URL

    def log_message(self, *args) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback over its own sqlite store; yields (url, store uri, process)."""
    with serve_mlflow(f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts") as server:
        yield server


@contextlib.contextmanager
def serve_mlflow(store: str, artifacts: Path, port: int | None = None):
    """`mlflow server` on loopback (on `port`, or a free one), in a process group of its own; yields
    (url, store, process), then stops the whole group (the server, its uvicorn worker and its huey
    consumers)."""
    port = port or free_port()
    artifacts.mkdir(parents=True, exist_ok=True)
    log = artifacts.parent / f"mlflow-server-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", store, "--artifacts-destination", str(artifacts)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
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


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM to the process group `proc` leads, then SIGKILL to whatever of it is left after
    `grace_s`: children that ignore SIGTERM or outlive their parent go too."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture
def started():
    """Start processes in sessions of their own (a signal to the group reaches their children, as
    Ctrl-C in a terminal does); every group still alive at the end of the test is stopped."""
    processes = []

    def start(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
        # Ctrl-C's SIGINT as a terminal's foreground job gets it: not ignored, also where pytest itself
        # ignores it (a shell started it in the background: `pytest &` ignores SIGINT, and so would its children).
        proc = subprocess.Popen(args, cwd=cwd, env=kwargs.pop("env", project_env()), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)
        processes.append(proc)
        return proc

    yield start
    for proc in processes:
        stop_process_group(proc)
        proc.stdout.close()


def epoch_ended(n: int) -> str:
    """The pattern of the line training prints once epoch `n` is over and its checkpoint written
    (a log's progress line, `epoch n/N: ... images`, comes before it and does not match)."""
    return rf"^epoch {n}/\d+  train_"


def stage_process(dvc: subprocess.Popen, stage: str, timeout: float = 120) -> psutil.Process:
    """The `python -m pipeline.<stage>` process that `dvc` started, once it runs: DVC's child where
    its shell execs the command (bash), its grandchild where it does not (dash, DVC's /bin/sh when
    SHELL is unset); torchrun's, not the ranks below it, under torchrun."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            runs_stage = {}
            for process in psutil.Process(dvc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if f"pipeline.{stage}" in process.cmdline():
                        runs_stage[process.pid] = process
            for process in runs_stage.values():
                if process.ppid() not in runs_stage:
                    return process
        time.sleep(0.05)
    raise AssertionError(f"DVC did not start the {stage} stage within {timeout} s")


def read_until(proc: subprocess.Popen, pattern: str) -> str:
    seen = ""
    for line in proc.stdout:
        seen += line
        if re.search(pattern, line):
            return seen
    raise AssertionError(f"process ended before printing {pattern!r}:\n{seen}")


def runs_of(project: Path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("vae-pipeline")
    return client, client.search_runs([experiment.experiment_id])


# Every process the tests start inherits this variable, also those that leave their parent's
# process group or are re-parented (a daemonised PostgreSQL, DVC's queue workers), so the session
# can find any that outlive it.
SESSION_MARKER = "VAE_PIPELINE_TEST_SESSION"


def pytest_configure(config) -> None:
    os.environ[SESSION_MARKER] = str(os.getpid())


def processes_started_by_this_session() -> list[psutil.Process]:
    """Every live process with this session's marker, but for pytest's own multiprocessing resource
    tracker (started by the tests that spawn gloo ranks), which ends when pytest does."""
    marker, found = os.environ.get(SESSION_MARKER), []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if proc.status() == psutil.STATUS_ZOMBIE or proc.environ().get(SESSION_MARKER) != marker:
                continue
            if proc.ppid() == os.getpid() and "multiprocessing.resource_tracker" in " ".join(proc.cmdline()):
                continue
            found.append(proc)
    return found


def pytest_sessionfinish(session, exitstatus) -> None:
    """Fail the run if any process a test started is still alive, and stop it, so none piles up."""
    if os.environ.get(SESSION_MARKER) != str(os.getpid()):
        return  # a pytest run inside a test
    leftovers = processes_started_by_this_session()
    _, leftovers = psutil.wait_procs(leftovers, timeout=5)  # a moment for what is already stopping
    if not leftovers:
        return
    described = [f"  pid {p.pid}: {' '.join(p.cmdline())[:200]}" for p in leftovers if p.is_running()]
    for proc in leftovers:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    reporter.write("\n")
    reporter.write_sep("=", f"FAILED: {len(leftovers)} process(es) started by the tests were still running", red=True)
    for line in described:
        reporter.write_line(line, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
