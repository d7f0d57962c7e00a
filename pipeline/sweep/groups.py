"""Trials trained in one process: each trial alone (a group of one; a search's climbs every rung in
that process), or with `--together N` the grid or a search's proposals in groups of at most N trials
that can share a process. The Ray task of a group: in a temporary
clone at the sweep's commit, one process trains the group (training.py), then each trial lands as
its own DVC experiment by one `dvc exp run`, whose train stage finds the trial's finished
checkpoint and only finishes (evaluate and visualize run as usual), and is pushed as a trial is. A
search's group trains on with the trials its study does not prune at each rung; a pruned one lands
as the experiment of the epochs it reached."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import ray

from pipeline.params import PARAMS_FILE, Params
from pipeline.paths import CHECKPOINT_FILE
from pipeline.sweep import grid
from pipeline.sweep.shared import Rungs, Sweep, TrialFailed, TrialResult
from pipeline.sweep.side_by_side import group_key
from pipeline.sweep.training import UNLANDED
from pipeline.sweep.trial import (
    checkout,
    continue_paused,
    fail_lost_attempts,
    push_and_report,
    set_params,
    trial_env,
    with_threads,
)
from pipeline.sweep.watch import run_watched


def groups(params_of_trials: list[Params], size: int) -> list[list[int]]:
    """The trials' indices in groups of at most `size`, each of one `group_key`, in grid order."""
    by_key: dict[str, list[int]] = collections.defaultdict(list)
    for index, params in enumerate(params_of_trials):
        by_key[group_key(params)].append(index)
    return [members[i : i + size] for members in by_key.values() for i in range(0, len(members), size)]


def run_group(
    sweep: Sweep,
    label: str,
    trials: list[grid.Trial],
    board,
    cpu_only: bool,
    rungs: Rungs | None = None,
    continues: int = 0,
    threads_as_alone: bool = True,
) -> dict[str, TrialResult | str]:
    """The Ray task: the group trained, then each trained trial landed and pushed. Returns each
    trial's result, or why it has none; each landed trial is on the board as soon as it lands. A
    search's group (`rungs`) asks the study at each rung which trials stop there; those land as
    the experiments of the epochs they reached. A search's paused trial promoted (`continues`: the
    epochs it reached, a group of one) goes on from its experiment, and replaces it. A group of
    `--together` has the threads of a run alone (`threads_as_alone`); a trial alone, Ray's."""
    started = time.monotonic()
    board.start.remote(label, ray.get_runtime_context().get_node_id())
    fail_lost_attempts(sweep, [trial.name for trial in trials])
    env = trial_env(sweep, cpu_only, threads_as_alone)
    trials = [grid.Trial(trial.name, with_threads(trial.overrides, env)) for trial in trials]
    with checkout(sweep, label, env, board) as repo:
        if continues:
            board.doing.remote(label, f"continuing from epoch {continues}")
            continue_paused(trials[0].name, repo, env, bool(sweep.local_cache))
        split_as(trials[0], repo, env)
        out = repo.parent / "trained"
        out.mkdir()
        keep = Path(sweep.git_url) / UNLANDED if sweep.local_cache else None  # on one machine: in the project
        pruned_at: dict[str, int] = {}  # a search's trial -> the rung it was pruned at
        ended: dict[str, TrialResult | str] = _train(
            label, trials, repo, out, env, board, rungs, continues, pruned_at, keep
        )
        share = (time.monotonic() - started) / len(trials)  # each trial's part of the clone and the training
        for trial in trials:
            if trial.name not in ended:
                epochs = pruned_at.get(trial.name)
                landing = grid.Trial(trial.name, grid.at_epochs(trial.overrides, epochs)) if epochs else trial
                ended[trial.name] = _land(
                    sweep, label, landing, repo, out, env, board, share, rungs, bool(epochs), bool(continues)
                )
            if keep:  # landed, or failed on its own: nothing to go on from
                (keep / f"{trial.name}.pt").unlink(missing_ok=True)
    return ended


def split_as(trial: grid.Trial, repo: Path, env: dict) -> None:
    """The clone's data split by the trial's `data.*` params (a group's trials share them), as its
    `dvc exp run` splits it: `-S data.train_images=6000` trains the group on those 6,000 images."""
    params_file = repo / PARAMS_FILE
    committed = params_file.read_text()
    data_only = grid.Trial(trial.name, tuple(o for o in trial.overrides if o.lstrip("+~").startswith("data.")))
    params_file.write_text(grid.applied(data_only, committed))
    try:
        subprocess.run(["dvc", "repro", "--quiet", "split"], cwd=repo, env=env, check=True, capture_output=True)
    finally:
        params_file.write_text(committed)


def _train(
    label: str,
    trials: list[grid.Trial],
    repo: Path,
    out: Path,
    env: dict,
    board,
    rungs: Rungs | None,
    continues: int,
    pruned_at: dict[str, int],
    keep: Path | None,
) -> dict[str, str]:
    """Run the group's process, and answer it at each rung of a search; returns why each trial that
    did not train did not."""
    spec = out / "group.json"
    spec.write_text(
        json.dumps(
            {
                "trials": [{"name": t.name, "overrides": list(t.overrides)} for t in trials],
                "out": str(out),
                "rungs": list(rungs.epochs[:-1]) if rungs else [],
                "continues": continues,
                "keep": str(keep) if keep else None,
            }
        )
    )

    def decide(event: dict, answer: IO[str]) -> None:
        """At a rung, the group's objectives told to the study best first (each then meets the
        better ones of its group as well as every earlier trial); the trials it prunes stop."""
        if event["event"] != "rung":
            return
        ordered = sorted(event["objectives"].items(), key=lambda item: item[1])
        stop = [name for name, objective in ordered if rungs.report(name, event["epoch"], objective)]
        pruned_at.update(dict.fromkeys(stop, event["epoch"]))
        answer.write(json.dumps({"stop": stop}) + "\n")
        answer.flush()

    board.doing.remote(label, "training together" if len(trials) > 1 else "training")
    try:
        run_watched(
            [sys.executable, "-m", "pipeline.sweep.training", str(spec)],
            label,
            repo,
            env,
            board,
            "its group's process",
            decide if rungs else None,
        )
        why_not = ""
    except TrialFailed as exc:
        why_not = exc.reason
    ended = {}
    for trial in trials:
        failed = out / f"{trial.name}.failed"
        if failed.exists():
            ended[trial.name] = failed.read_text()
        elif not (out / f"{trial.name}.pt").exists():
            ended[trial.name] = why_not or "its group's process wrote no checkpoint for it"
    return ended


def _land(
    sweep: Sweep,
    label: str,
    trial: grid.Trial,
    repo: Path,
    out: Path,
    env: dict,
    board,
    share: float,
    rungs: Rungs | None,
    pruned: bool,
    replaces: bool,
) -> TrialResult | str:
    """The trained trial as its DVC experiment, pushed (`replaces`: in place of its paused one):
    `dvc exp run` with its params (a pruned trial's `train.epochs` those it reached), from its
    finished checkpoint (its MLflow run goes on in the same run)."""
    board.doing.remote(label, f"landing {trial.name}")
    subprocess.run(["git", "checkout", "--quiet", "--force", "--detach", sweep.commit], cwd=repo, check=True)
    (repo / CHECKPOINT_FILE).parent.mkdir(exist_ok=True)
    shutil.copyfile(out / f"{trial.name}.pt", repo / CHECKPOINT_FILE)
    run_started = time.monotonic()
    try:
        run_watched(
            ["dvc", "exp", "run", "--name", trial.name, *set_params(trial.overrides)],
            label,
            repo,
            env,
            board,
        )
        started = run_started - share  # its share of the group's clone and training counts as its own
        run_seconds = time.monotonic() - run_started
        return push_and_report(sweep, trial.name, repo, env, board, started, run_seconds, rungs, pruned, replaces)
    except TrialFailed as exc:
        return exc.reason
