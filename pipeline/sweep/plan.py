"""A sweep's plan, and every reason to refuse it, checked cheapest first before Ray or any trial starts."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

from pipeline.errors import PipelineError
from pipeline.git import git
from pipeline.params import PARAMS_FILE, MlflowParams, Params
from pipeline.paths import DVC_FILE
from pipeline.sweep import grid, search_options, space
from pipeline.tracking.store import connect


@dataclasses.dataclass(frozen=True)
class Plan:
    """A sweep that passed every check."""

    sets: list[str]  # the grid as -S overrides, the file's included
    trials: list[grid.Trial]
    commit: str
    git_url: str  # where the trials clone the repository from: the git remote, or this repository
    local_cache: str | None  # on one machine: this project's DVC cache, which the trials share
    experiment_id: str | None  # None: tracking off (mlflow.enabled: false)
    tracking: MlflowParams
    params: list[Params]  # each trial's, checked; a search's: its shared overrides' alone
    params_text: str  # params.yaml at `commit`, which every trial's overrides apply to
    space: space.Space | None = None  # a search's (--trials), whose trials are proposed as it goes


def dvc(*args: str) -> subprocess.CompletedProcess:
    """The DVC of this interpreter's environment."""
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], capture_output=True, text=True)


def prepare(args: argparse.Namespace) -> Plan:
    """Every check that can refuse a sweep, cheapest first. On a Ray cluster (RAY_ADDRESS set) the
    trials run on other machines, so they need the git and DVC remotes and a tracking server; on
    this machine they clone this repository and share its DVC cache and MLflow store."""
    if not DVC_FILE.exists():
        raise PipelineError(f"no {DVC_FILE} here: run the sweep from the project root")
    if args.cpus_per_trial is not None and args.cpus_per_trial <= 0:
        raise PipelineError(f"--cpus-per-trial must be above 0, got {args.cpus_per_trial:g}")
    for option in ("gpus_per_trial", "max_concurrent", "retries"):
        if (getattr(args, option) or 0) < 0:
            raise PipelineError(f"--{option.replace('_', '-')} must be 0 or more, got {getattr(args, option):g}")
    if args.together < 0:
        raise PipelineError(f"--together must be 1 or more trials a process (0: each trial alone), got {args.together}")
    options = search_options.options_from(args) if args.trials is not None else None
    if options is not None:
        search_options.check_options(options)
        search_options.timeout_seconds(args.timeout)
    elif args.timeout is not None:
        raise PipelineError("--timeout is a search's budget: give --trials too, or leave it out for a grid")
    sets, trials, commit, params_text, checked, searched = _grid_at_head(args)
    if options is not None and len(options.objectives) > 1:
        if any(params.train.keep_epoch != "last" for params in checked):
            raise PipelineError(
                "train.keep_epoch: best keeps the epoch of the best val_total, and --objectives rate,distortion "
                "places each trial by its last epoch: set train.keep_epoch to last"
            )
    if args.trials is not None and any(params.train.early_stopping for params in checked):
        raise PipelineError(
            "train.early_stopping ends a trial by itself, and a search (--trials) trains each trial to the epochs "
            "its pruner chooses: set it to 0, or sweep a grid"
        )
    if (args.together or args.trials is not None) and any(params.train.num_processes > 1 for params in checked):
        raise PipelineError(
            "train.num_processes above 1 (torchrun) cannot train in a search's trial process (--trials) nor beside "
            "other trials (--together): set it to 1, or sweep a grid one trial at a time"
        )
    tracking = checked[0].mlflow
    if os.environ.get("RAY_ADDRESS"):
        git_url = _check_cluster(args, trials, commit, tracking)
        return Plan(sets, trials, commit, git_url, None, connect(tracking), tracking, checked, params_text, searched)
    if not tracking.enabled:
        raise PipelineError(
            "mlflow.enabled is false, and a sweep reports its trials under one MLflow run: "
            "set it to true (the default store is a file in this project)"
        )
    return Plan(
        sets,
        trials,
        commit,
        str(Path.cwd().resolve()),
        dvc("cache", "dir").stdout.strip(),
        connect(tracking),
        tracking,
        checked,
        params_text,
        searched,
    )


def _check_cluster(args: argparse.Namespace, trials: list[grid.Trial], commit: str, tracking: MlflowParams) -> str:
    """What trials on other machines need: a tracking server, the commit on the git remote, a
    default DVC remote, and names the remote does not have yet. Returns the remote's URL."""
    if not tracking.enabled or urlparse(tracking.tracking_uri).scheme not in ("http", "https"):
        where = tracking.tracking_uri if tracking.enabled else "nowhere (mlflow.enabled: false)"
        raise PipelineError(
            f"mlflow.tracking_uri: a sweep's trials run on other machines and cannot share {where}: point it at "
            "the team's MLflow server, in params.yaml or as -S mlflow.tracking_uri=https://host:port"
        )
    if args.git_remote not in git("remote").split():
        raise PipelineError(
            f"no git remote '{args.git_remote}', which the workers clone the repository from: "
            f"`git remote add {args.git_remote} URL` and push, or name another with --git-remote"
        )
    git_url = git("remote", "get-url", args.git_remote)
    if Path(git_url).exists():  # a folder: the workers clone it from their own working folder
        git_url = str(Path(git_url).resolve())
    if not _on_remote(commit, args.git_remote):
        raise PipelineError(
            f"commit {commit[:7]} is not on git remote '{args.git_remote}', where the workers clone "
            f"the repository from: `git push {args.git_remote}` first"
        )
    if not dvc("remote", "default", "--project").stdout.strip():
        raise PipelineError(
            "no default DVC remote in .dvc/config, where trials push their outputs: "
            "`dvc remote add -d NAME URL`, commit .dvc/config and push"
        )
    listed = dvc("exp", "list", args.git_remote, "--names-only")
    taken = sorted({trial.name for trial in trials} & set(listed.stdout.split()))
    if taken:
        raise PipelineError(
            f"experiments {', '.join(taken)} already exist on '{args.git_remote}' for commit "
            f"{commit[:7]}: give the sweep another --name"
        )
    return git_url


def experiments_here(trials: list[grid.Trial]) -> list[str]:
    """The trials that are experiments of this repository already (a sweep run again keeps them)."""
    listed = set(dvc("exp", "list", "--all-commits", "--names-only").stdout.split())
    return [trial.name for trial in trials if trial.name in listed]


def _grid_at_head(
    args: argparse.Namespace,
) -> tuple[list[str], list[grid.Trial], str, str, list[Params], space.Space | None]:
    """The grid's trials of the commit the workspace is at, each checked, all logging to one place;
    or for a search (--trials), its space, with the params its shared overrides give."""
    sets = args.sets + (grid.overrides_from_file(args.grid) if args.grid else [])
    if not sets:
        raise PipelineError("no grid: give it as -S 'train.learning_rate=0.001,0.0005' (DVC's syntax), or --grid FILE")
    commit = git("rev-parse", "HEAD")
    params_text = git("show", f"{commit}:{PARAMS_FILE}")
    searched = None
    if args.trials is None:
        trials = grid.expand(sets, args.name)
        checked = grid.check(trials, params_text)
    else:
        searched = space.parse(sets, params_text)
        if any(key.startswith("mlflow.") for key in searched.dimensions):
            raise PipelineError(
                "the space varies mlflow.*: a search's trials log to one experiment, under one parent run"
            )
        trials, checked = [], grid.check([grid.Trial(args.name, searched.fixed)], params_text)
    if any(params.mlflow != checked[0].mlflow for params in checked):
        raise PipelineError("the grid varies mlflow.*: a sweep's trials log to one experiment, under one parent run")
    if git("status", "--porcelain", "--untracked-files=no"):
        commit_them = "commit and push them" if os.environ.get("RAY_ADDRESS") else "commit them"
        raise PipelineError(
            f"the workspace has uncommitted changes, and trials run the commit, not the workspace: {commit_them}, "
            "or stash them"
        )
    return sets, trials, commit, params_text, checked, searched


def _on_remote(commit: str, remote: str) -> bool:
    """Whether a branch or tag of the remote holds `commit` (a ref we have the commit of)."""
    for line in git("ls-remote", "--heads", "--tags", remote).splitlines():
        sha = line.split()[0]
        reachable = subprocess.run(["git", "merge-base", "--is-ancestor", commit, sha], capture_output=True)
        if reachable.returncode == 0:
            return True
    return False
