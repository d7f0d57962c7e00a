"""What a trial's Ray task does around its training (groups.py): the repository at the sweep's
commit from the git remote, the data from the DVC remote, and the landed experiment pushed back to
both remotes, so it outlives the node that ran it; and the whole task of a trial that trains under
torchrun (`train.num_processes` > 1), `dvc exp run` with its params. On one machine (no RAY_ADDRESS)
the clone is of this repository, on its DVC cache and MLflow store, and the experiment is pushed
straight back here: no remote and no server.

A failed trial (a diverged loss, a bad stage) raises TrialFailed, which is not run again; a lost
node is a system failure, whose task the driver runs again elsewhere, and the lost attempt's MLflow
run is marked FAILED when the next attempt starts."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import ray
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline.history import EPOCHS, OBJECTIVE, kept_epoch, split_train_metrics
from pipeline.params import PARAMS_FILE, load_params
from pipeline.paths import PROJECT_ROOT_VARIABLE, RUN_FILE, TEST_METRICS, TRAIN_METRICS
from pipeline.provenance import PARENT_RUN_VARIABLE
from pipeline.sweep.interrupts import uninterrupted
from pipeline.sweep.shared import Rungs, Sweep, TrialFailed, TrialResult
from pipeline.sweep.watch import run_watched


def run_trial(sweep: Sweep, name: str, overrides: tuple[str, ...], board, cpu_only: bool) -> TrialResult:
    """The Ray task of a grid's trial of `train.num_processes` > 1, which trains under torchrun:
    start to pushed experiment, one `dvc exp run` in a temporary clone. (Every other trial trains
    in one process, a group of one or more: groups.run_group.)"""
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
        timed_out = False
        if rungs is not None:
            landed = {
                "experiment": name,
                "epochs": epochs,
                "kept_epoch": kept,
                "mlflow_run_id": run_id,
                "metrics": metrics,
            }
            timed_out = ray.get(rungs.search.tell.remote(rungs.numbers[name], metrics, pruned, landed))
        seconds = time.monotonic() - started
        result = TrialResult(name, metrics, run_id, seconds, run_seconds, epochs, pruned, timed_out, kept_epoch=kept)
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
