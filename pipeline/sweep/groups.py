"""A sweep whose trials train together (`--together N`), on this machine: the trials in groups of
at most N that can share a process, each group trained by one process (together.py), then each
trial landed as its own DVC experiment by `dvc exp run`, whose train stage finds the trial's
finished checkpoint and only finishes (evaluate and visualize run as usual).

All of it runs in a clone of the repository at the sweep's commit, in a temporary folder, with
this project's DVC cache and MLflow store (PIPELINE_PROJECT_ROOT points the stages here, as DVC_ROOT
does for a queued experiment); the experiments are pushed back to this repository. A trial of the same name
already here is kept, so the same command again trains only what did not finish."""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.params import Params
from pipeline.paths import CHECKPOINT_FILE, PROJECT_ROOT_VARIABLE
from pipeline.provenance import PARENT_RUN_VARIABLE
from pipeline.sweep import grid
from pipeline.sweep.cluster import CANCELLED, SELECTION_METRIC, Outcome
from pipeline.sweep.plan import Plan, dvc
from pipeline.sweep.together import group_key
from pipeline.sweep.trial import TrialResult, experiment_results, reason_from_output


def groups(params_of_trials: list[Params], size: int) -> list[list[int]]:
    """The trials' indices in groups of at most `size`, each of one `group_key`, in grid order."""
    by_key: dict[str, list[int]] = collections.defaultdict(list)
    for index, params in enumerate(params_of_trials):
        by_key[group_key(params)].append(index)
    return [members[i : i + size] for members in by_key.values() for i in range(0, len(members), size)]


def finished_before(trials: list[grid.Trial]) -> list[str]:
    """The trials that are experiments of this repository already (a sweep run again keeps them)."""
    listed = set(dvc("exp", "list", "--all-commits", "--names-only").stdout.split())
    return [trial.name for trial in trials if trial.name in listed]


def run_groups(plan: Plan, trials: list[grid.Trial], args: argparse.Namespace, parent_run_id: str) -> Outcome:
    """Train each group, then land each of its trained trials as an experiment; Ctrl-C stops it all,
    keeping what landed."""
    outcome = Outcome()
    params_of = {trial.name: params for trial, params in zip(plan.trials, plan.params)}
    plan_groups = groups([params_of[trial.name] for trial in trials], args.together)
    for number, members in enumerate(plan_groups, 1):
        names = [trials[i].name for i in members]
        shared = [f"{key}={value}" for key, value in trials[members[0]].values.items()
                  if all(trials[i].values.get(key) == value for i in members)]
        print(f"group {number}: {', '.join(names)}" + (f" (all {' '.join(shared)})" if shared else ""), flush=True)
    env = dict(os.environ, **{PROJECT_ROOT_VARIABLE: plan.git_url, PARENT_RUN_VARIABLE: parent_run_id})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this environment's dvc
    left = list(trials)
    try:
        with tempfile.TemporaryDirectory(prefix=f"sweep-{args.name}-") as folder:
            clone, out = Path(folder) / "repo", Path(folder) / "trained"
            out.mkdir()
            _prepare_clone(plan, clone, env)
            for members in plan_groups:
                group = [trials[i] for i in members]
                started = time.monotonic()
                ended = _train_group(group, clone, out, env)
                share = (time.monotonic() - started) / len(group)
                for trial in group:
                    left.remove(trial)
                    if trial.name in ended:
                        outcome.failed[trial.name] = ended[trial.name]
                        print(f"{trial.name} failed: {ended[trial.name]}", flush=True)
                    else:
                        _land(trial, plan.commit, clone, out, env, share, outcome)
    except KeyboardInterrupt:
        print(f"stopped: the {len(left)} unfinished trial(s) are KILLED; the finished ones stay experiments",
              flush=True)
        outcome.failed.update({trial.name: CANCELLED for trial in left})
        outcome.cancelled = True
    except subprocess.CalledProcessError as exc:  # the clone could not be made: every trial fails alike
        said = (exc.stderr or "").strip().splitlines()
        reason = f"`{' '.join(exc.cmd[:3])}` exited with {exc.returncode}" + (f": {said[-1]}" if said else "")
        outcome.failed.update({trial.name: reason for trial in left})
    return outcome


def _prepare_clone(plan: Plan, clone: Path, env: dict) -> None:
    """The repository at the sweep's commit, on this project's DVC cache, with its data split."""
    def run(*args: str, cwd: Path = clone) -> None:
        subprocess.run(args, cwd=cwd, env=env, check=True, capture_output=True, text=True)

    run("git", "clone", "--quiet", plan.git_url, str(clone), cwd=clone.parent)
    run("git", "checkout", "--quiet", "--detach", plan.commit)
    run("dvc", "cache", "dir", "--local", dvc("cache", "dir").stdout.strip())
    print("preparing the data in the sweep's clone", flush=True)
    run("dvc", "repro", "--quiet", "split")


def _train_group(group: list[grid.Trial], clone: Path, out: Path, env: dict) -> dict[str, str]:
    """Run the group's process; returns why each trial that did not train did not."""
    spec = out / "group.json"
    spec.write_text(json.dumps({"trials": [{"name": t.name, "overrides": list(t.overrides)} for t in group],
                                "out": str(out)}))
    returncode, tail = _run_to_end([sys.executable, "-m", "pipeline.sweep.together", str(spec)], clone, env,
                                   shown=True)
    ended = {}
    for trial in group:
        failed = out / f"{trial.name}.failed"
        if failed.exists():
            ended[trial.name] = failed.read_text()
        elif not (out / f"{trial.name}.pt").exists():
            ended[trial.name] = reason_from_output(tail, returncode, "its group's process")
    return ended


def _run_to_end(args: list[str], cwd: Path, env: dict, shown: bool = False) -> tuple[int, list[str]]:
    """Run a command to its end, its output shown as it comes if `shown`; returns its exit status
    and last lines. Ctrl-C reaches it too: it is waited for, to end its MLflow runs KILLED, and
    the interrupt goes on up."""
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: collections.deque[str] = collections.deque(maxlen=60)
    try:
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if shown:
                print(line, end="", flush=True)
        proc.wait()
    except KeyboardInterrupt:
        proc.wait()
        raise
    if proc.returncode == 130:  # it was interrupted, so the sweep is
        raise KeyboardInterrupt
    return proc.returncode, list(tail)


def _land(trial: grid.Trial, commit: str, clone: Path, out: Path, env: dict, share: float, outcome: Outcome) -> None:
    """The trained trial as its DVC experiment, pushed to this repository: `dvc exp run` with its
    params, from its finished checkpoint (its MLflow run goes on in the same run)."""
    subprocess.run(["git", "checkout", "--quiet", "--force", "--detach", commit], cwd=clone, check=True)
    (clone / CHECKPOINT_FILE).parent.mkdir(exist_ok=True)
    shutil.copyfile(out / f"{trial.name}.pt", clone / CHECKPOINT_FILE)
    started = time.monotonic()
    returncode, lines = _run_to_end(["dvc", "exp", "run", "--name", trial.name,
                                     *(a for o in trial.overrides for a in ("--set-param", o))], clone, env)
    run_seconds = time.monotonic() - started
    if returncode != 0:
        outcome.failed[trial.name] = reason_from_output(lines, returncode, "`dvc exp run`")
        print(f"{trial.name} failed: {outcome.failed[trial.name]}", flush=True)
        return
    if not any(line.startswith("resuming from epoch") for line in lines):
        print(f"warning: {trial.name}'s `dvc exp run` did not find what its group trained, and trained it alone",
              flush=True)
    pushed = subprocess.run(["dvc", "exp", "push", "--no-cache", "origin", trial.name], cwd=clone, env=env,
                            capture_output=True, text=True)
    if pushed.returncode != 0:
        outcome.failed[trial.name] = reason_from_output(pushed.stderr.splitlines(), pushed.returncode,
                                                        "`dvc exp push`")
        return
    metrics, run_id = experiment_results(clone)
    outcome.finished[trial.name] = TrialResult(trial.name, metrics, run_id, share + run_seconds, run_seconds)
    print(f"{trial.name} finished: {SELECTION_METRIC} {metrics.get(SELECTION_METRIC, float('nan')):.4f}", flush=True)
