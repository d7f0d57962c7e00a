"""One trial of a sweep, as a Ray task on whichever node has room for it: the repository at the
sweep's commit from the git remote, the data from the DVC remote, `dvc exp run` with the trial's
params, and the experiment pushed back to both remotes, so it outlives the node that ran it.

A failed trial (a diverged loss, a bad stage) raises TrialFailed, which Ray does not retry; a lost
node is a system failure, which Ray retries elsewhere, and the lost attempt's MLflow run is marked
FAILED when the next attempt starts."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import psutil
import ray
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline.history import split_train_metrics
from pipeline.paths import RUN_FILE, TEST_METRICS, TRAIN_METRICS
from pipeline.provenance import PARENT_RUN_VARIABLE

STOP_GRACE_SECONDS = 30  # for a cancelled trial's stages to end their MLflow run and exit

# Run in place of a command, to tie it to the process that starts it: the kernel sends it SIGTERM
# when that process dies (PR_SET_PDEATHSIG, kept across exec), then it becomes the command.
_TIED = """
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):  # that process died before the line above
    sys.exit(128 + signal.SIGTERM)
os.execvp(sys.argv[2], sys.argv[2:])
"""


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What every trial of a sweep shares."""

    git_url: str  # where the workers clone from, and push the experiments to
    commit: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str


@dataclasses.dataclass(frozen=True)
class TrialResult:
    name: str
    metrics: dict[str, float]  # metrics/train.json and metrics/test.json, as `dvc exp show` shows them
    run_id: str | None
    seconds: float  # the attempt that finished: clone, data, `dvc exp run`, push
    run_seconds: float  # of which `dvc exp run`: the rest is what a trial costs over a plain run


class TrialFailed(Exception):
    """The trial's own failure, not its node's: reported, not retried."""

    def __init__(self, name: str, reason: str):
        super().__init__(name, reason)  # as args, so the exception pickles back to the driver
        self.name, self.reason = name, reason

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


def run_trial(sweep: Sweep, name: str, overrides: tuple[str, ...], board, cpu_only: bool) -> TrialResult:
    """The Ray task: one trial, start to pushed experiment, in a temporary clone."""
    started = time.monotonic()
    # No ray.get here: a task blocked in it lends its CPUs out, and the node would run one trial too many.
    board.start.remote(name, ray.get_runtime_context().get_node_id())
    _fail_lost_attempts(sweep, name)
    env = dict(os.environ, **{PARENT_RUN_VARIABLE: sweep.parent_run_id})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this environment's dvc
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a trial given no GPU share uses none
    with tempfile.TemporaryDirectory(prefix=f"sweep-{name}-") as folder:
        repo = Path(folder)
        _step(["git", "clone", "--quiet", sweep.git_url, str(repo)], name, Path(folder).parent, env)
        _step(["git", "checkout", "--quiet", "--detach", sweep.commit], name, repo, env)
        board.doing.remote(name, "pulling data")
        # The data stages' outputs, if the DVC remote has them; whatever it lacks, download and split make.
        subprocess.run(["dvc", "pull", "--quiet", "--allow-missing", "download", "split"], cwd=repo, env=env,
                       capture_output=True)
        run_started = time.monotonic()
        _exp_run(["dvc", "exp", "run", "--name", name, *(a for o in overrides for a in ("--set-param", o))],
                 name, repo, env, board)
        run_seconds = time.monotonic() - run_started
        board.doing.remote(name, "pushing")
        _step(["dvc", "exp", "push", "origin", name], name, repo, env)
        metrics, run_id = experiment_results(repo)
    return TrialResult(name, metrics, run_id, time.monotonic() - started, run_seconds)


def experiment_results(repo: Path) -> tuple[dict[str, float], str | None]:
    """What a trial's finished `dvc exp run` left in `repo`: its metrics, as `dvc exp show` shows
    them, and its MLflow run (None with tracking off)."""
    metrics = {}
    for path in (TRAIN_METRICS, TEST_METRICS):
        metrics |= split_train_metrics(json.loads((repo / path).read_text()))[1]
    run_file = repo / RUN_FILE
    return metrics, json.loads(run_file.read_text())["run_id"] if run_file.exists() else None


def _step(args: list[str], name: str, cwd: Path, env: dict) -> None:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        said = (done.stdout + done.stderr).strip().splitlines()  # git's or DVC's last word: why
        reason = f"`{' '.join(args[:3])}` exited with {done.returncode}" + (f": {said[-1]}" if said else "")
        raise TrialFailed(name, reason)


_STAGE = re.compile(r"Running stage '(\w+)'")
_EPOCH = re.compile(r"^epoch (\d+)/(\d+)(?:  train_|: .*\((\d+%)\))")  # an epoch's end, or its progress line


def _exp_run(args: list[str], name: str, repo: Path, env: dict, board) -> None:
    """`dvc exp run`, its output read as it comes for the stage and epoch it is at; a cancelled
    task (Ctrl-C on the driver) interrupts it as Ctrl-C would, so its run ends KILLED."""
    tail: collections.deque[str] = collections.deque(maxlen=60)
    proc = subprocess.Popen(tied_to_this_process(args), cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            tail.append(line)
            if stage := _STAGE.search(line):
                board.doing.remote(name, stage[1])
            elif epoch := _EPOCH.match(line):
                board.doing.remote(name, f"train epoch {epoch[1]}/{epoch[2]}" + (f" ({epoch[3]})" if epoch[3] else ""))
        proc.wait()
    except BaseException:  # KeyboardInterrupt: Ray cancelled the task
        _interrupt(proc)
        raise
    if proc.returncode != 0:
        raise TrialFailed(name, reason_from_output(list(tail), proc.returncode))


def tied_to_this_process(args: list[str]) -> list[str]:
    """`args` as a command that ends when this process does, killed or not. A Ray worker whose
    raylet dies exits at once, and its `dvc exp run` would train on, unseen, into the MLflow run the
    retry has marked FAILED; tied, DVC ends, and its stage with it (pipeline.errors.run_stage).
    On Linux, where Ray clusters run; elsewhere `args` as they are, said once."""
    if sys.platform != "linux":
        _say_untied()
        return args
    return [sys.executable, "-c", _TIED, str(os.getpid()), *args]


@functools.cache
def _say_untied() -> None:
    print(f"note: on {sys.platform} a trial is not tied to its Ray worker (Linux's PR_SET_PDEATHSIG): "
          "a trial whose worker is killed trains on until it finishes", file=sys.stderr)


def reason_from_output(lines: list[str], returncode: int, what: str = "`dvc exp run`") -> str:
    """The stage's own one-line error (a diverged loss says so), else DVC's."""
    for prefix in ("error: ", "ERROR: "):
        found = [line.strip() for line in lines if line.startswith(prefix)]
        if found:
            return found[-1].removeprefix("error: ")
    return f"{what} exited with {returncode}"


def _interrupt(proc: subprocess.Popen) -> None:
    """SIGINT to `dvc exp run` and the stage it runs, SIGKILL to what is left after the grace."""
    with contextlib.suppress(psutil.Error):
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for process in tree:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGINT)
        _, alive = psutil.wait_procs(tree, timeout=STOP_GRACE_SECONDS)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()


def _fail_lost_attempts(sweep: Sweep, name: str) -> None:
    """The runs of this trial's earlier attempts still RUNNING (none on a first attempt): their
    node was lost, so FAILED."""
    client = mlflow.MlflowClient(sweep.tracking_uri)
    lost = (f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{sweep.parent_run_id}' and attributes.run_name = '{name}' "
            "and attributes.status = 'RUNNING'")
    for run in client.search_runs([sweep.experiment_id], filter_string=lost):
        client.set_terminated(run.info.run_id, "FAILED")
