"""`python -m pipeline.sweep -S 'train.learning_rate=0.001,0.0005' -S 'train.beta=1,4'`: every point
of the grid as a DVC experiment, run as a Ray task on the cluster RAY_ADDRESS names (or on a Ray
started on this machine), pushed to the git and DVC remotes, and logged as an MLflow run nested
under the sweep's run. Everything that can be refused is refused before any task starts.

Ray's own task retries, not Ray Tune's trial restarts: Ray retries a task whose node was lost and
does not retry one that raised, which is the rule a sweep wants (a lost node reruns its trials
elsewhere, a diverged trial is reported once). The grid is DVC's, so Tune's search spaces add
nothing; the concurrency limit is a few lines here."""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import ray
from dvc.repo.experiments.utils import gen_random_name
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import (
    MLFLOW_GIT_COMMIT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NOTE,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import pipeline
from pipeline.errors import PipelineError
from pipeline.params import PARAMS_FILE, MlflowParams
from pipeline.paths import DVC_FILE
from pipeline.progress import seconds_between_lines
from pipeline.sweep import grid
from pipeline.sweep.board import Board
from pipeline.sweep.trial import (
    STOP_GRACE_SECONDS,
    Sweep,
    TrialFailed,
    TrialResult,
    run_trial,
)
from pipeline.tracking.store import connect

CANCELLED = "cancelled"  # why a trial did not finish, when Ctrl-C stopped it
SELECTION_METRIC = "val_total"  # the best trial has the lowest: chosen on validation, never on test


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("-S", "--set-param", dest="sets", action="append", default=[], metavar="KEY=V1,V2",
                        help="as `dvc exp run --queue -S` takes it: a list of values sweeps, one value sets")
    parser.add_argument("--grid", type=Path, help="a YAML file of `key: [values]`, added to the -S grid")
    parser.add_argument("-n", "--name", help="the sweep's name; its trials are NAME-1, NAME-2, ... (default: a "
                                             "name DVC makes up)")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="Ray CPUs a trial takes (default 1)")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0,
                        help="GPUs a trial takes, fractions sharing one (0.25: four trials a GPU); default 0")
    parser.add_argument("--max-concurrent", type=int, default=0,
                        help="trials running at once at most (default 0: as many as the cluster fits)")
    parser.add_argument("--retries", type=int, default=3, help="runs again of a trial whose node was lost (default 3)")
    parser.add_argument("--git-remote", default="origin", help="the git remote workers clone from and push to")
    return parser.parse_args(argv)


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise PipelineError(f"`git {' '.join(args)}` failed: {done.stderr.strip() or done.returncode}")
    return done.stdout.strip()


def _dvc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], capture_output=True, text=True)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A sweep that passed every check."""

    sets: list[str]  # the grid as -S overrides, the file's included
    trials: list[grid.Trial]
    commit: str
    git_url: str
    experiment_id: str
    tracking: MlflowParams


def prepare(args: argparse.Namespace) -> Plan:
    """Every check that can refuse the sweep, cheapest first, before Ray or any task starts."""
    if not DVC_FILE.exists():
        raise PipelineError(f"no {DVC_FILE} here: run the sweep from the project root")
    if args.cpus_per_trial <= 0:
        raise PipelineError(f"--cpus-per-trial must be above 0, got {args.cpus_per_trial:g}")
    for option in ("gpus_per_trial", "max_concurrent", "retries"):
        if getattr(args, option) < 0:
            raise PipelineError(f"--{option.replace('_', '-')} must be 0 or more, got {getattr(args, option):g}")
    sets = args.sets + (grid.overrides_from_file(args.grid) if args.grid else [])
    if not sets:
        raise PipelineError("no grid: give it as -S 'train.learning_rate=0.001,0.0005' (DVC's syntax), or --grid FILE")
    trials = grid.expand(sets, args.name)
    commit = _git("rev-parse", "HEAD")
    checked = grid.check(trials, _git("show", f"{commit}:{PARAMS_FILE}"))
    tracking = checked[0].mlflow
    if any(params.mlflow != tracking for params in checked):
        raise PipelineError("the grid varies mlflow.*: a sweep's trials log to one experiment, under one parent run")
    if not tracking.enabled or urlparse(tracking.tracking_uri).scheme not in ("http", "https"):
        where = tracking.tracking_uri if tracking.enabled else "nowhere (mlflow.enabled: false)"
        raise PipelineError(
            f"mlflow.tracking_uri: a sweep's trials run on other machines and cannot share {where}: point it at "
            "the team's MLflow server, in params.yaml or as -S mlflow.tracking_uri=https://host:port")
    if _git("status", "--porcelain", "--untracked-files=no"):
        raise PipelineError("the workspace has uncommitted changes, and trials run the commit, not the workspace: "
                            "commit them (and push), or stash them")
    if args.git_remote not in _git("remote").split():
        raise PipelineError(f"no git remote '{args.git_remote}', which the workers clone the repository from: "
                            f"`git remote add {args.git_remote} URL` and push, or name another with --git-remote")
    git_url = _git("remote", "get-url", args.git_remote)
    if Path(git_url).exists():  # a folder: the workers clone it from their own working folder
        git_url = str(Path(git_url).resolve())
    if not _on_remote(commit, args.git_remote):
        raise PipelineError(f"commit {commit[:7]} is not on git remote '{args.git_remote}', where the workers clone "
                            f"the repository from: `git push {args.git_remote}` first")
    if not _dvc("remote", "default", "--project").stdout.strip():
        raise PipelineError("no default DVC remote in .dvc/config, where trials push their outputs: "
                            "`dvc remote add -d NAME URL`, commit .dvc/config and push")
    listed = _dvc("exp", "list", args.git_remote, "--names-only")
    taken = sorted({trial.name for trial in trials} & set(listed.stdout.split()))
    if taken:
        raise PipelineError(f"experiments {', '.join(taken)} already exist on '{args.git_remote}' for commit "
                            f"{commit[:7]}: give the sweep another --name")
    return Plan(sets, trials, commit, git_url, connect(tracking), tracking)


def _on_remote(commit: str, remote: str) -> bool:
    """Whether a branch or tag of the remote holds `commit` (a ref we have the commit of)."""
    for line in _git("ls-remote", "--heads", "--tags", remote).splitlines():
        sha = line.split()[0]
        reachable = subprocess.run(["git", "merge-base", "--is-ancestor", commit, sha], capture_output=True)
        if reachable.returncode == 0:
            return True
    return False


def start_ray(cpus_per_trial: float, gpus_per_trial: float) -> None:
    """Join the cluster RAY_ADDRESS names, or start a Ray on this machine; the workers import this
    package as the driver has it. A trial no node can hold is refused now, not left pending."""
    address = os.environ.get("RAY_ADDRESS")
    # "local": Ray would otherwise join the cluster its last `ray start --head` here recorded, gone or not.
    ray.init(address=address or "local", log_to_driver=False, logging_level=logging.WARNING, configure_logging=True,
             runtime_env={"py_modules": [str(Path(pipeline.__file__).parent)]},
             **({} if address else {"include_dashboard": False}))
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    print(f"ray: {'the cluster at ' + address if address else 'a Ray on this machine'}, {len(nodes)} node(s), "
          f"{sum(n.get('CPU', 0) for n in nodes):g} CPUs, {sum(n.get('GPU', 0) for n in nodes):g} GPUs", flush=True)
    if not any(n.get("CPU", 0) >= cpus_per_trial and n.get("GPU", 0) >= gpus_per_trial for n in nodes):
        raise PipelineError(f"no node of the Ray cluster has {cpus_per_trial:g} CPUs and {gpus_per_trial:g} GPUs for a "
                            "trial: lower --cpus-per-trial / --gpus-per-trial, or add a node")


def open_parent_run(client: mlflow.MlflowClient, plan: Plan, args: argparse.Namespace) -> str:
    """The sweep's run: the grid, the commit, the trial count and the resources a trial gets."""
    run = client.create_run(plan.experiment_id, run_name=args.name, tags={
        MLFLOW_GIT_COMMIT: plan.commit, MLFLOW_SOURCE_NAME: "python -m pipeline.sweep", MLFLOW_SOURCE_TYPE: "LOCAL",
        MLFLOW_USER: getpass.getuser(), "sweep": "true"})
    params = {"sweep.grid": " ".join(f"-S '{s}'" for s in plan.sets), "sweep.trials": len(plan.trials),
              "sweep.commit": plan.commit,
              "sweep.cpus_per_trial": args.cpus_per_trial, "sweep.gpus_per_trial": args.gpus_per_trial,
              "sweep.max_concurrent": args.max_concurrent, "sweep.retries": args.retries}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run.info.run_id


class Progress:
    """The driver's lines: each trial's end as it comes, and what runs where, when that changes
    (how far the running trials are, at most every PIPELINE_PROGRESS_SECONDS, as a stage's progress)."""

    def __init__(self, total: int):
        self.total, self.started = total, time.monotonic()
        self.every = seconds_between_lines()
        self.last_counts, self.last_line, self.printed = None, None, 0.0

    def show(self, board: dict[str, dict], running: list[str], finished: int, failed: int) -> None:
        active = [name for name in running if name in board]
        counts = (finished, failed, tuple(active))
        parts = [f"{name}: {board[name]['doing']}" + (f" (attempt {board[name]['attempt']})"
                                                      if board[name]["attempt"] > 1 else "") for name in active]
        line = (f"{finished} finished, {len(active)} running" + (f" ({', '.join(parts)})" if parts else "")
                + f", {failed} failed, {self.total - finished - failed - len(active)} waiting")
        now = time.monotonic()
        if counts != self.last_counts or (line != self.last_line and now - self.printed >= self.every):
            elapsed = int(now - self.started)
            print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {line}", flush=True)
            self.last_counts, self.last_line, self.printed = counts, line, now


def run_sweep(sweep: Sweep, trials: list[grid.Trial], args: argparse.Namespace
              ) -> tuple[dict[str, TrialResult], dict[str, str], bool]:
    """Submit the trials (at most --max-concurrent at once), report as they go; Ctrl-C cancels the
    rest. Returns the finished trials, the failed ones with why, and whether it was cancelled."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    board = Board.options(scheduling_strategy=here).remote()
    task = ray.remote(run_trial)
    waiting, running = list(trials), {}
    finished: dict[str, TrialResult] = {}
    failed: dict[str, str] = {}
    progress = Progress(len(trials))

    def submit() -> None:
        while waiting and (not args.max_concurrent or len(running) < args.max_concurrent):
            trial = waiting.pop(0)
            ref = task.options(name=trial.name, num_cpus=args.cpus_per_trial, num_gpus=args.gpus_per_trial,
                               max_retries=args.retries, retry_exceptions=False
                               ).remote(sweep, trial.name, trial.overrides, board, args.gpus_per_trial == 0)
            running[ref] = trial

    def collect(refs) -> None:
        for ref in refs:
            trial = running.pop(ref)
            try:
                result = ray.get(ref)
            except TrialFailed as exc:
                failed[trial.name] = exc.reason
            except ray.exceptions.TaskCancelledError:
                failed[trial.name] = CANCELLED
            except ray.exceptions.RayTaskError as exc:
                failed[trial.name] = str(exc.cause).splitlines()[0] if exc.cause else str(exc).splitlines()[0]
            except ray.exceptions.RayError as exc:  # its node lost more often than --retries allows
                failed[trial.name] = f"lost ({type(exc).__name__}) after {args.retries} retries"
            else:
                finished[trial.name] = result
                print(f"{trial.name} finished in {result.seconds:.0f} s ({result.run_seconds:.0f} s of `dvc exp run`): "
                      f"{SELECTION_METRIC} {result.metrics.get(SELECTION_METRIC, float('nan')):.4f}", flush=True)
                continue
            print(f"{trial.name} failed: {failed[trial.name]}", flush=True)

    submit()
    try:
        while running:
            done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            collect(done)
            submit()
            progress.show(ray.get(board.snapshot.remote()), [t.name for t in running.values()], len(finished),
                          len(failed))
    except KeyboardInterrupt:
        print(f"cancelling the {len(running) + len(waiting)} unfinished trial(s); the finished ones stay pushed and "
              "logged", flush=True)
        failed.update({trial.name: CANCELLED for trial in waiting})
        waiting.clear()
        for ref in running:
            ray.cancel(ref)
        ray.wait(list(running), num_returns=len(running), timeout=STOP_GRACE_SECONDS + 30)
        collect(list(running))
        return finished, failed, True
    return finished, failed, False


def report(client: mlflow.MlflowClient, sweep: Sweep, trials: list[grid.Trial], finished: dict[str, TrialResult],
           failed: dict[str, str], cancelled: bool, wall_seconds: float) -> str | None:
    """The table of trials, the best one and the time it all took, on the parent run and on screen;
    the status every run ends with. Returns the best trial's name."""
    keys = list(dict.fromkeys(key for trial in trials for key in trial.values))
    metric_names = sorted({name for result in finished.values() for name in result.metrics})
    table: dict[str, list] = {column: [] for column in
                              ["trial", *keys, "status", *metric_names, "seconds", "run_seconds", "run_id"]}
    for trial in trials:
        result = finished.get(trial.name)
        table["trial"].append(trial.name)
        for key in keys:
            table[key].append(trial.values.get(key))
        table["status"].append("FINISHED" if result else failed.get(trial.name, "not run"))
        for name in metric_names:
            table[name].append(result.metrics.get(name) if result else None)
        table["seconds"].append(round(result.seconds, 1) if result else None)
        table["run_seconds"].append(round(result.run_seconds, 1) if result else None)
        table["run_id"].append(result.run_id if result else None)
    mlflow.log_table(table, artifact_file="trials.json", run_id=sweep.parent_run_id)

    # Only the run of each trial's pushed experiment stays FINISHED: a lost attempt's run, or the run
    # of a trial cancelled or failed between its stages or in its push, does not count as a result.
    kept = {result.run_id for result in finished.values()}
    for trial_run in client.search_runs([sweep.experiment_id], filter_string=(
            f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{sweep.parent_run_id}'")):
        if trial_run.info.run_id not in kept and trial_run.info.status in ("RUNNING", "FINISHED"):
            cancelled_trial = failed.get(trial_run.info.run_name) == CANCELLED
            client.set_terminated(trial_run.info.run_id, "KILLED" if cancelled_trial else "FAILED")

    now = int(time.time() * 1000)
    trial_seconds = sum(result.seconds for result in finished.values())
    overhead = (trial_seconds - sum(result.run_seconds for result in finished.values())) / max(len(finished), 1)
    metrics = [Metric(name, value, now, 0) for name, value in (
        ("trials_finished", len(finished)), ("trials_failed", len(failed)), ("wall_seconds", wall_seconds),
        ("trial_seconds_sum", trial_seconds), ("overhead_seconds_per_trial", overhead))]
    best = min(finished.values(), key=lambda r: r.metrics.get(SELECTION_METRIC, float("inf")), default=None)
    summary = (f"Sweep of {len(trials)} trials at commit {sweep.commit[:7]}: {len(finished)} finished, "
               f"{len(failed)} failed.")
    tags = []
    if best is not None:
        metrics += [Metric(f"best_{name}", value, now, 0) for name, value in best.metrics.items()
                    if name == SELECTION_METRIC or name.startswith("test_")]
        tags += [RunTag("best_trial", best.name)] + ([RunTag("best_trial_run_id", best.run_id)] if best.run_id else [])
        summary += (f" Best by validation loss ({SELECTION_METRIC}): **{best.name}**, "
                    f"{best.metrics[SELECTION_METRIC]:.4f}; its test metrics are the sweep's `best_test_*`.")
    client.log_batch(sweep.parent_run_id, metrics=metrics, tags=tags + [RunTag(MLFLOW_RUN_NOTE, summary)])
    client.set_terminated(sweep.parent_run_id, "KILLED" if cancelled else "FAILED" if failed else "FINISHED")

    print(f"\n{'trial':<16}{'status':<12}{SELECTION_METRIC:>12}  params")
    for trial in trials:
        result = finished.get(trial.name)
        score = f"{result.metrics.get(SELECTION_METRIC, float('nan')):.4f}" if result else "-"
        mark = "  <- best" if best is not None and trial.name == best.name else ""
        status = "FINISHED" if result else "CANCELLED" if failed.get(trial.name) == CANCELLED else "FAILED"
        print(f"{trial.name:<16}{status:<12}{score:>12}  {' '.join(trial.overrides)}{mark}")
    print(f"\n{wall_seconds:.0f} s in all; the finished trials took {trial_seconds:.0f} s together, each "
          f"{overhead:.0f} s of it outside `dvc exp run` (clone, data, push)")
    return best.name if best else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.name = args.name or gen_random_name()
    started = time.monotonic()
    try:
        plan = prepare(args)
        start_ray(args.cpus_per_trial, args.gpus_per_trial)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before any trial started", file=sys.stderr)
        return 130
    client = mlflow.MlflowClient()
    parent_run_id = open_parent_run(client, plan, args)
    sweep = Sweep(plan.git_url, plan.commit, mlflow.get_tracking_uri(), plan.experiment_id, parent_run_id)
    print(f"sweep {args.name}: {len(plan.trials)} trials of commit {plan.commit[:7]}, MLflow run {parent_run_id} in "
          f"experiment '{plan.tracking.experiment_name}'", flush=True)
    try:
        finished, failed, cancelled = run_sweep(sweep, plan.trials, args)
    except BaseException:
        client.set_terminated(parent_run_id, "FAILED")
        raise
    finally:
        ray.shutdown()
    best = report(client, sweep, plan.trials, finished, failed, cancelled, time.monotonic() - started)
    if finished:
        pulled = _dvc("exp", "pull", args.git_remote, *finished)
        print(f"\n`dvc exp show` lists the {len(finished)} finished trials" + (f"; the best is {best}" if best else "")
              if pulled.returncode == 0 else f"warning: `dvc exp pull` failed: {pulled.stderr.strip()}", flush=True)
    return 130 if cancelled else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
