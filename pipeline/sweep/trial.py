"""One trial of a sweep, as a Ray task on whichever node has room for it: the repository at the
sweep's commit from the git remote, the data from the DVC remote, `dvc exp run` with the trial's
params, and the experiment pushed back to both remotes, so it outlives the node that ran it. On one
machine (no RAY_ADDRESS) the clone is of this repository, on its DVC cache and MLflow store, and the
experiment is pushed straight back here: no remote and no server.

A failed trial (a diverged loss, a bad stage) raises TrialFailed, which is not run again; a lost
node is a system failure, whose task the driver runs again elsewhere, and the lost attempt's MLflow
run is marked FAILED when the next attempt starts."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import mlflow
import psutil
import ray
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline.history import EPOCHS, OBJECTIVE, kept_epoch, split_train_metrics
from pipeline.params import PARAMS_FILE, load_params
from pipeline.paths import PROJECT_ROOT_VARIABLE, RUN_FILE, TEST_METRICS, TRAIN_METRICS
from pipeline.progress import PROGRESS_FILE_VARIABLE, Follower, describe
from pipeline.provenance import PARENT_RUN_VARIABLE
from pipeline.sweep.interrupts import uninterrupted

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
    local_cache: str | None  # on one machine, the project's DVC cache the trials share (None: a cluster's remotes)
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    # On one machine, the driver's OMP_NUM_THREADS (None: unset): the threads a run alone has, which
    # a group's process gets in place of Ray's one-thread-a-CPU share, so its trials are as alone.
    threads: str | None = None


@dataclasses.dataclass(frozen=True)
class TrialResult:
    name: str
    # metrics/train.json and metrics/test.json, as `dvc exp show` shows them, but OBJECTIVE: the
    # kept epoch's (`train.keep_epoch`), as the test metrics are
    metrics: dict[str, float]
    run_id: str | None
    seconds: float  # the attempt that finished: clone, data, `dvc exp run`, push
    run_seconds: float  # of which `dvc exp run`: the rest is what a trial costs over a plain run
    epochs: int = 0  # the epochs its model trained (a pruned trial's: fewer than the search's)
    pruned: bool = False
    kept_epoch: int | None = None  # the epoch its model is, where not its last (`train.keep_epoch: best`)


@dataclasses.dataclass(frozen=True)
class Rungs:
    """A search's task: the actor that holds the study, the epochs at which a trial may be pruned
    and then its full epochs, and each trial's number in the study, by name."""

    search: object  # the Ray actor pipeline.sweep.search.Search
    epochs: tuple[int, ...]
    numbers: dict[str, int]

    def report(self, name: str, epochs: int, objective: float) -> bool:
        """The trial's objective after `epochs` told to the study; whether it is pruned there."""
        return ray.get(self.search.report.remote(self.numbers[name], epochs, objective))


class TrialFailed(Exception):
    """The trial's own failure, not its node's: reported, not retried."""

    def __init__(self, name: str, reason: str):
        super().__init__(name, reason)  # as args, so the exception pickles back to the driver
        self.name, self.reason = name, reason

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


def run_trial(sweep: Sweep, name: str, overrides: tuple[str, ...], board, cpu_only: bool) -> TrialResult:
    """The Ray task of a grid's trial: start to pushed experiment, one `dvc exp run` in a temporary
    clone. (A search's trial, which stops at rungs, is a group of one: groups.run_group.)"""
    started = time.monotonic()
    # No ray.get here: a task blocked in it lends its CPUs out, and the node would run one trial too many.
    board.start.remote(name, ray.get_runtime_context().get_node_id())
    fail_lost_attempts(sweep, [name])
    env = trial_env(sweep, cpu_only)
    overrides = with_threads(overrides, env)
    with checkout(sweep, name, env, board) as repo:
        run_started = time.monotonic()
        run_watched(["dvc", "exp", "run", "--name", name, *set_params(overrides)], name, repo, env, board)
        run_seconds = time.monotonic() - run_started
        board.doing.remote(name, "pushing")
        return push_and_report(sweep, name, repo, env, board, started, run_seconds)


def continue_paused(name: str, repo: Path, env: dict, local_cache: bool) -> None:
    """A paused trial's experiment in `repo`, to continue: its outputs (models/state.pt, ...) in
    the workspace, its params and the name given back (the name is the landed experiment's)."""
    _step(["dvc", "exp", "pull", *(["--no-cache"] if local_cache else []), "origin", name], name, repo, env)
    _step(["dvc", "exp", "apply", name], name, repo, env)
    _step(["dvc", "exp", "remove", name], name, repo, env)
    _step(["git", "checkout", "--quiet", "--", "."], name, repo, env)  # the sweep's params: the trial sets its own


def with_threads(overrides: tuple[str, ...], env: dict[str, str]) -> tuple[str, ...]:
    """The overrides, with the CPU threads Ray gives the task (OMP_NUM_THREADS: its CPUs) as
    `train.num_threads`, which the bytes of a CPU run depend on: `dvc exp apply` of the trial and
    `dvc exp run` then train with them too. A count the trial sets itself stays."""
    if "OMP_NUM_THREADS" not in env or any(o.startswith("train.num_threads=") for o in overrides):
        return overrides
    return (*overrides, f"train.num_threads={env['OMP_NUM_THREADS']}")


def set_params(overrides: tuple[str, ...]) -> list[str]:
    """The overrides as `dvc exp run` takes them."""
    return [a for o in overrides for a in ("--set-param", o)]


def push_and_report(
    sweep: Sweep,
    name: str,
    repo: Path,
    env: dict,
    board,
    started: float,
    run_seconds: float,
    rungs: Rungs | None = None,
    pruned: bool = False,
    replaces: bool = False,
) -> TrialResult:
    """The trial's finished experiment pushed (`replaces`: in place of its paused one), and landed
    on the board (and a search's trial told to its study) before the task ends. It runs to its end:
    a cancel that comes meanwhile is raised after it, so a pushed trial is never reported cancelled."""
    with uninterrupted():
        push(sweep, name, repo, env, replaces)
        metrics, run_id, kept = experiment_results(repo)
        epochs = json.loads((repo / TRAIN_METRICS).read_text())[EPOCHS]
        kept = None if kept == epochs else kept
        result = TrialResult(name, metrics, run_id, time.monotonic() - started, run_seconds, epochs, pruned, kept)
        if rungs is not None:
            landed = {
                "experiment": name,
                "epochs": epochs,
                "kept_epoch": kept,
                "mlflow_run_id": run_id,
                "metrics": metrics,
            }
            ray.get(rungs.search.tell.remote(rungs.numbers[name], metrics[OBJECTIVE], pruned, landed))
        ray.get(board.land.remote(result))  # before the driver can hear that the task ended
    return result


def trial_env(sweep: Sweep, cpu_only: bool, threads_as_alone: bool = False) -> dict[str, str]:
    """What a trial's commands run in: this environment's dvc, the sweep's run as their parent, on
    one machine the project as theirs (its MLflow store) and, for a group, the threads a run alone
    has, and no GPU for a task given none."""
    env = dict(os.environ, **{PARENT_RUN_VARIABLE: sweep.parent_run_id})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if sweep.local_cache:
        env[PROJECT_ROOT_VARIABLE] = sweep.git_url
        if threads_as_alone:  # Ray gives a task OMP_NUM_THREADS = its CPUs; a thread count changes the bytes
            env.pop("OMP_NUM_THREADS", None)
            env.update({"OMP_NUM_THREADS": sweep.threads} if sweep.threads else {})
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


@contextlib.contextmanager
def checkout(sweep: Sweep, label: str, env: dict, board) -> Iterator[Path]:
    """A temporary clone at the sweep's commit, with the data stages' outputs where they exist: from
    the project's DVC cache on one machine, from the DVC remote on a cluster (whatever neither has,
    download and split make)."""
    with tempfile.TemporaryDirectory(prefix=f"sweep-{label.replace(' ', '-')}-") as folder:
        repo = Path(folder) / "repo"
        _step(["git", "clone", "--quiet", sweep.git_url, str(repo)], label, Path(folder), env)
        _step(["git", "checkout", "--quiet", "--detach", sweep.commit], label, repo, env)
        board.doing.remote(label, "pulling data")
        if sweep.local_cache:
            _step(["dvc", "cache", "dir", "--local", sweep.local_cache], label, repo, env)
            data = ["dvc", "checkout", "--quiet", "--allow-missing", "download", "split"]
        else:
            data = ["dvc", "pull", "--quiet", "--allow-missing", "download", "split"]
        subprocess.run(data, cwd=repo, env=env, capture_output=True)
        yield repo


def push(sweep: Sweep, name: str, repo: Path, env: dict, replaces: bool = False) -> None:
    """The experiment to the repository it was cloned from (`replaces`: the experiment of that name
    there, a paused trial this one continued); on a cluster its outputs to the DVC remote too (on
    one machine they are in the shared cache already)."""
    options = [*(["--no-cache"] if sweep.local_cache else []), *(["--force"] if replaces else [])]
    _step(["dvc", "exp", "push", *options, "origin", name], name, repo, env)


def experiment_results(repo: Path) -> tuple[dict[str, float], str | None, int]:
    """What a trial's finished `dvc exp run` left in `repo`: its metrics, as `dvc exp show` shows
    them but for the OBJECTIVE of its kept epoch, its MLflow run (None with tracking off), and the
    epoch it kept."""
    metrics = {}
    for path in (TRAIN_METRICS, TEST_METRICS):
        metrics |= split_train_metrics(json.loads((repo / path).read_text()))[1]
    kept, metrics[OBJECTIVE] = kept_model(repo)
    run_file = repo / RUN_FILE
    return metrics, json.loads(run_file.read_text())["run_id"] if run_file.exists() else None, kept


def kept_model(repo: Path) -> tuple[int, float]:
    """The epoch of the model the trial's run in `repo` kept, and its OBJECTIVE."""
    keep_epoch = load_params(repo / PARAMS_FILE).train.keep_epoch
    return kept_epoch(json.loads((repo / TRAIN_METRICS).read_text()), keep_epoch)


def _step(args: list[str], name: str, cwd: Path, env: dict) -> None:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        said = (done.stdout + done.stderr).strip().splitlines()  # git's or DVC's last word: why
        reason = f"`{' '.join(args[:3])}` exited with {done.returncode}" + (f": {said[-1]}" if said else "")
        raise TrialFailed(name, reason)


def run_watched(
    args: list[str],
    label: str,
    repo: Path,
    env: dict,
    board,
    what: str = "`dvc exp run`",
    on_event: Callable[[dict, IO[str]], None] | None = None,
) -> None:
    """A trial's command (`dvc exp run`, a group's process), followed by the progress file its
    stages write (pipeline.progress): the board shows what it is doing, and `on_event` hears each
    event with the command's stdin to answer on. A cancelled task (Ctrl-C on the driver) interrupts
    it as Ctrl-C would, so its runs end KILLED. A command that fails raises TrialFailed, with the
    reason its output gave."""
    events = repo.parent / "progress.jsonl"
    events.unlink(missing_ok=True)
    tail: collections.deque[str] = collections.deque(maxlen=60)
    proc = subprocess.Popen(
        tied_to_this_process(args),
        cwd=repo,
        env=env | {PROGRESS_FILE_VARIABLE: str(events)},
        stdin=subprocess.PIPE if on_event else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, for _interrupt (POSIX; elsewhere ignored)
    )
    reader = threading.Thread(target=tail.extend, args=(proc.stdout,), daemon=True)  # its last lines, for why
    reader.start()
    follower = Follower(events)
    try:
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.25)
            for event in follower.new():
                board.doing.remote(label, describe(event))
                if on_event is not None:
                    on_event(event, proc.stdin)
            if proc.returncode is not None:
                break
        reader.join()
    except BaseException:  # KeyboardInterrupt: Ray cancelled the task
        _interrupt(proc)
        raise
    if proc.returncode != 0:
        raise TrialFailed(label, reason_from_output(list(tail), proc.returncode, what))


def tied_to_this_process(args: list[str]) -> list[str]:
    """`args` as a command that ends when this process does, killed or not. A Ray worker whose
    raylet dies exits at once, and its `dvc exp run` would train on, unseen, into the MLflow run the
    retry has marked FAILED; tied, DVC ends, and its stage with it (pipeline.stage.run_stage).
    On Linux, where Ray clusters run; elsewhere `args` as they are, said once."""
    if sys.platform != "linux":
        _say_untied()
        return args
    return [sys.executable, "-c", _TIED, str(os.getpid()), *args]


@functools.cache
def _say_untied() -> None:
    print(
        f"note: on {sys.platform} a trial is not tied to its Ray worker (Linux's PR_SET_PDEATHSIG): "
        "a trial whose worker is killed trains on until it finishes",
        file=sys.stderr,
    )


def reason_from_output(lines: list[str], returncode: int, what: str = "`dvc exp run`") -> str:
    """The stage's own one-line error (a diverged loss says so), else DVC's."""
    for prefix in ("error: ", "ERROR: "):
        found = [line.strip() for line in lines if line.startswith(prefix)]
        if found:
            return found[-1].removeprefix("error: ")
    return f"{what} exited with {returncode}"


def _interrupt(proc: subprocess.Popen) -> None:
    """SIGINT, once each, to every process of the command's group: `dvc exp run` and the stages it
    runs, also a stage DVC starts as the signal comes (it would not be in a list made before);
    SIGKILL to the group after the grace. Where there are no process groups, to its tree."""
    if os.name != "posix":
        with contextlib.suppress(psutil.Error):
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            for process in tree:
                with contextlib.suppress(psutil.Error):
                    process.send_signal(signal.SIGINT)
            _, alive = psutil.wait_procs(tree, timeout=STOP_GRACE_SECONDS)
            for process in alive:
                with contextlib.suppress(psutil.Error):
                    process.kill()
        return
    deadline, interrupted = time.monotonic() + STOP_GRACE_SECONDS, set()
    while time.monotonic() < deadline:
        proc.poll()  # reaped once it exits, so the group can empty
        members = _group(proc.pid)
        if not members:
            break
        for process in members:
            if process.pid not in interrupted:
                with contextlib.suppress(psutil.Error):
                    process.send_signal(signal.SIGINT)
                interrupted.add(process.pid)
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _group(pgid: int) -> list[psutil.Process]:
    """The live processes of process group `pgid`."""
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
    return members


def fail_lost_attempts(sweep: Sweep, names: list[str]) -> None:
    """The runs of these trials' earlier attempts still RUNNING (none on a first attempt): their
    node was lost, so FAILED."""
    client = mlflow.MlflowClient(sweep.tracking_uri)
    for name in names:
        lost = (
            f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{sweep.parent_run_id}' and attributes.run_name = '{name}' "
            "and attributes.status = 'RUNNING'"
        )
        for run in client.search_runs([sweep.experiment_id], filter_string=lost):
            client.set_terminated(run.info.run_id, "FAILED")
