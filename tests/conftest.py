"""The suite's fixtures and hooks: a small IDX mirror, projects in temp git repos (one of each kind
built once per session, which tests only read), servers and processes stopped after each test, and
a session that fails if any process it started is still running. Helpers live in modules named for
what they do: projects.py, processes.py, servers.py, synthetic.py."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import mlflow
import psutil
import pytest
import torch

from tests.processes import SESSION_MARKER, processes_started_by_this_session, stop_process_group
from tests.projects import EPOCHS, LEARNING_RATES, RERUNS, make_project, project_env, run, stages_run
from tests.servers import SYSTEM_METRICS_OFTEN, QuietHandler, serve_mlflow, snapshot
from tests.synthetic import write_mirror


@pytest.fixture
def mirror(tmp_path) -> Path:
    return write_mirror(tmp_path / "mirror")


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory) -> Path:
    """One project reproduced end to end with real `dvc repro`; tests only read it (in any order)."""
    tmp = tmp_path_factory.mktemp("e2e")
    project = make_project(
        tmp / "project", write_mirror(tmp / "mirror"), **{"train.epochs": EPOCHS, "mlflow.registered_model": "vae"}
    )
    result = run(["dvc", "repro"], project, env=project_env() | SYSTEM_METRICS_OFTEN)
    assert stages_run(result.stdout) == ["check", "download", "split", "train", "evaluate", "visualize"]
    return project


@pytest.fixture(scope="session")
def experiments(tmp_path_factory) -> Path:
    """A project and two experiments on it, run as a user runs them: `dvc exp run -S ...`."""
    tmp = tmp_path_factory.mktemp("experiments")
    project = make_project(tmp / "project", write_mirror(tmp / "mirror"))
    for rate in LEARNING_RATES:
        run(["dvc", "exp", "run", "-S", f"train.learning_rate={rate}"], project)
    return project


@pytest.fixture(scope="session")
def partial_experiments(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    """A trained experiment, then one that reruns only evaluate and one that reruns only visualize,
    run as a user runs them; with a snapshot of every run after each experiment (run name -> its
    snapshots, oldest first)."""
    tmp = tmp_path_factory.mktemp("partial")
    project = make_project(
        tmp / "project", write_mirror(tmp / "mirror"), **{"train.epochs": EPOCHS, "mlflow.registered_model": "vae"}
    )
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
        handler = functools.partial(QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback over its own sqlite store; yields (url, store uri, process)."""
    with serve_mlflow(f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts") as server:
        yield server


@pytest.fixture
def started():
    """Start processes in sessions of their own (a signal to the group reaches their children, as
    Ctrl-C in a terminal does); every group still alive at the end of the test is stopped."""
    processes = []

    def start(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
        # Ctrl-C's SIGINT as a terminal's foreground job gets it: not ignored, also where pytest itself
        # ignores it (a shell started it in the background: `pytest &` ignores SIGINT, and so would its children).
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=kwargs.pop("env", project_env()),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            **kwargs,
        )
        processes.append(proc)
        return proc

    yield start
    for proc in processes:
        stop_process_group(proc)
        proc.stdout.close()


# The fixtures that build something many tests read, and the xdist group their tests run in: with
# `--dist loadgroup` (pyproject.toml) the tests of one build run on one worker, which builds it once.
SHARED_BUILDS = {
    "reproduced": "session-projects",
    "experiments": "session-projects",
    "partial_experiments": "session-projects",
    "uninterrupted": "uninterrupted",
    "reproduced_once": "reproduced-once",
    "team_server": "team-server",
    "bundle": "bundle",
    "swept_together": "swept-together",
    "searched": "searched",
    "budgeted": "budgeted",
    "refusing_project": "search-refusals",
}
# Where each xdist worker leaves the processes it found still running, for the session's verdict.
LEFTOVERS_VARIABLE = "VAE_PIPELINE_TEST_LEFTOVERS"


def pytest_configure(config) -> None:
    os.environ[SESSION_MARKER] = str(os.getpid())
    if not hasattr(config, "workerinput"):  # not an xdist worker: the session's first process
        os.environ[LEFTOVERS_VARIABLE] = tempfile.mkdtemp(prefix="vae-pipeline-leftovers.")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        # Each worker its share of the cores, and so the stages it starts: a PyTorch thread whose
        # core another worker holds spins, and measured, two workers of two threads each on 2 cores
        # took twice the CPU time of one.
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which writes the groups into the test ids
def pytest_collection_modifyitems(items) -> None:
    for item in items:
        groups = [SHARED_BUILDS[name] for name in item.fixturenames if name in SHARED_BUILDS]
        if groups:
            item.add_marker(pytest.mark.xdist_group(groups[0]))


def pytest_sessionfinish(session, exitstatus) -> None:
    """Fail the run if any process a test started is still alive, and stop it, so none piles up.
    Under xdist each worker looks for its own tests' processes and the controller gives the verdict."""
    worker = hasattr(session.config, "workerinput")
    leftovers = [] if session.config.pluginmanager.hasplugin("dsession") else processes_started_by_this_session()
    _, leftovers = psutil.wait_procs(leftovers, timeout=5)  # a moment for what is already stopping
    described = [f"  pid {p.pid}: {' '.join(p.cmdline())[:200]}" for p in leftovers if p.is_running()]
    for proc in leftovers:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    found = Path(os.environ[LEFTOVERS_VARIABLE])
    if worker:
        if described:
            (found / f"{os.getpid()}.txt").write_text("\n".join(described))
        return
    described += [line for report in sorted(found.glob("*.txt")) for line in report.read_text().splitlines()]
    shutil.rmtree(found, ignore_errors=True)
    if not described:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    reporter.write("\n")
    reporter.write_sep("=", f"FAILED: {len(described)} process(es) started by the tests were still running", red=True)
    for line in described:
        reporter.write_line(line, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
