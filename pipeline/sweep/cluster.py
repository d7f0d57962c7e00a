"""The trials on Ray: joining or starting the cluster, submitting at most --max-concurrent tasks
(a trial each, or with --together a group each), collecting each trial's end as it comes, and
cancelling the rest on Ctrl-C.

Ray tasks, not Ray Tune's trials: a task whose node was lost runs again elsewhere, with whatever
of it had not landed yet, and a task that raised is not run again, which is the rule a sweep wants
(a lost node reruns its trials, a diverged trial is reported once). The grid is DVC's and a
search's sampler and pruner are Optuna's (search.py); the concurrency limit and the reruns are a
few lines here."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import threading
import time
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import pipeline
from pipeline.errors import PipelineError
from pipeline.history import OBJECTIVE
from pipeline.params import Params
from pipeline.progress import seconds_between_lines
from pipeline.sweep import grid
from pipeline.sweep.board import Board
from pipeline.sweep.groups import groups, run_group
from pipeline.sweep.shared import CANCELLED, Outcome, Resources, Sweep, Task, TaskSource, TrialFailed, TrialResult
from pipeline.sweep.trial import run_trial
from pipeline.sweep.watch import STOP_GRACE_SECONDS


def tasks(trials: list[grid.Trial], params: list[Params], together: int) -> list[Task]:
    """A task per trial; with `together`, a task per group of trials that can share a process."""
    if not together:
        return [
            Task(trial.name, (trial,), False, torchrun=params.train.num_processes > 1)
            for trial, params in zip(trials, params)
        ]
    return [
        Task(f"group {number}", tuple(trials[i] for i in members), True)
        for number, members in enumerate(groups(params, together), 1)
    ]


def start_ray(args: argparse.Namespace) -> Resources:
    """Join the cluster RAY_ADDRESS names, or start a Ray on this machine; the workers import this
    package as the driver has it. Without --gpus-per-trial, a group trained together takes a whole
    GPU where the cluster has one, and a trial alone none; without --cpus-per-trial, a group on the
    CPU takes a whole node (its trials use every core, as a run alone does), and anything else one
    CPU. A task no node can hold is refused now, not left pending. Returns what each task gets, and
    how many run at once."""
    address = os.environ.get("RAY_ADDRESS")
    if not address:  # a Ray of our own
        # Ray runs its workers at nice 15, and a trial's `dvc exp run` is its worker's child: beside
        # any other work on the machine, the sweep crawled (a one-machine sweep beside two busy
        # cores: a 12-epoch group at 3% of a core). A trial here runs at the priority of a run alone.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # Ray's own default, token authentication, without its notice that one may opt out of it
        # (RAY_AUTH_MODE=disabled): a sweep of one machine has no reason to.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            lambda record: not record.getMessage().startswith("Token authentication is enabled")
        )
    # "local": Ray would otherwise join the cluster its last `ray start --head` here recorded, gone or not.
    ray.init(
        address=address or "local",
        log_to_driver=False,
        logging_level=logging.WARNING,
        configure_logging=True,
        runtime_env={"py_modules": [str(Path(pipeline.__file__).parent)]},
        **({} if address else {"include_dashboard": False}),
    )
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    gpus = sum(n.get("GPU", 0) for n in nodes)
    print(
        f"ray: {'the cluster at ' + address if address else 'a Ray on this machine'}, {len(nodes)} node(s), "
        f"{sum(n.get('CPU', 0) for n in nodes):g} CPUs, {gpus:g} GPUs",
        flush=True,
    )
    gpus_per_trial = args.gpus_per_trial if args.gpus_per_trial is not None else 1.0 if args.together and gpus else 0.0
    cpus_per_trial = args.cpus_per_trial
    if cpus_per_trial is None:
        on_cpu = args.together and not gpus_per_trial
        cpus_per_trial = max(n.get("CPU", 0) for n in nodes) if on_cpu else 1.0
    if not any(n.get("CPU", 0) >= cpus_per_trial and n.get("GPU", 0) >= gpus_per_trial for n in nodes):
        raise PipelineError(
            f"no node of the Ray cluster has {cpus_per_trial:g} CPUs and {gpus_per_trial:g} "
            "GPUs for a task: lower --cpus-per-trial / --gpus-per-trial, or add a node"
        )
    max_concurrent = args.max_concurrent
    if args.trials is not None:  # a search: each proposal waits for room, so the sampler sees every result before it
        fits = sum(
            int(min(n.get("CPU", 0) // cpus_per_trial, n.get("GPU", 0) // gpus_per_trial if gpus_per_trial else 1e9))
            for n in nodes
        )
        max_concurrent = min(max_concurrent or fits, fits) or 1
    return Resources(cpus_per_trial, gpus_per_trial, max_concurrent)


class Progress:
    """The driver's lines: each trial's end as it comes, and what runs where, when that changes
    (how far the running tasks are, at most every PIPELINE_PROGRESS_SECONDS, as a stage's progress)."""

    def __init__(self, total: int):
        self.total, self.started = total, time.monotonic()
        self.every = seconds_between_lines()
        self.last_counts, self.last_line, self.printed = None, None, 0.0

    def show(self, board: dict[str, dict], running: list[Task], finished: int, failed: int) -> None:
        active = [task for task in running if task.label in board]
        counts = (finished, failed, tuple(task.label for task in active))
        states = [board[task.label] for task in active]
        parts = [
            f"{task.label}: {state['doing']}" + (f" (attempt {state['attempt']})" if state["attempt"] > 1 else "")
            for task, state in zip(active, states)
        ]
        trials = sum(len(task.trials) for task in active)
        line = (
            f"{finished} finished, {trials} running"
            + (f" ({', '.join(parts)})" if parts else "")
            + f", {failed} failed, {max(self.total - finished - failed - trials, 0)} waiting"
        )
        now = time.monotonic()
        if counts != self.last_counts or (line != self.last_line and now - self.printed >= self.every):
            elapsed = int(now - self.started)
            print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {line}", flush=True)
            self.last_counts, self.last_line, self.printed = counts, line, now


def run_sweep(
    sweep: Sweep,
    all_tasks: list[Task],
    resources: Resources,
    retries: int,
    ctrl_c: threading.Event,
    proposals: TaskSource | None = None,
) -> Outcome:
    """Submit the tasks (at most --max-concurrent at once), then a search's `proposals` as room
    frees, and report as they go; once `ctrl_c` is set (read between steps, so every task Ray
    accepted is in `running`), cancel the rest."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    board = Board.options(scheduling_strategy=here).remote()
    trial_task, group_task = ray.remote(run_trial), ray.remote(run_group)
    waiting, running = list(all_tasks), {}
    outcome = Outcome()
    finished, failed = outcome.finished, outcome.failed
    progress = Progress(sum(len(task.trials) for task in all_tasks) + (proposals.left if proposals else 0))

    def submit() -> None:
        while not ctrl_c.is_set() and (not resources.max_concurrent or len(running) < resources.max_concurrent):
            task = waiting.pop(0) if waiting else proposals.next() if proposals else None
            if task is None:
                break
            options = {
                "name": task.label,
                "num_cpus": resources.cpus_per_trial,
                "num_gpus": resources.gpus_per_trial,
                "max_retries": 0,
            }  # a lost node's task runs again from here, less what it had landed
            cpu_only = resources.cpu_only
            running[
                trial_task.options(**options).remote(sweep, task.label, task.trials[0].overrides, board, cpu_only)
                if task.torchrun
                else group_task.options(**options).remote(
                    sweep, task.label, list(task.trials), board, cpu_only, task.rungs, task.continues, task.together
                )
            ] = task

    def collect(refs) -> None:
        if not refs:
            return
        landed = ray.get(board.snapshot.remote())[1]
        for ref in refs:
            task = running.pop(ref)
            try:
                ended = ray.get(ref)
            except TrialFailed as exc:
                ended = exc.reason
            except ray.exceptions.TaskCancelledError:
                ended = CANCELLED
            except ray.exceptions.RayTaskError as exc:
                ended = str(exc.cause).splitlines()[0] if exc.cause else str(exc).splitlines()[0]
            except ray.exceptions.RayError as exc:  # its node was lost, or Ctrl-C's cancel killed its worker
                left = tuple(trial for trial in task.trials if trial.name not in landed)
                if ctrl_c.is_set():
                    ended = CANCELLED
                elif task.attempt <= retries:
                    if left:
                        waiting.insert(0, dataclasses.replace(task, trials=left, attempt=task.attempt + 1))
                    ended = {trial.name: landed[trial.name] for trial in task.trials if trial not in left}
                else:
                    ended = f"lost ({type(exc).__name__}) after {retries} retries"
            if isinstance(ended, TrialResult):
                ended = {ended.name: ended}
            elif isinstance(ended, str):
                ended = {trial.name: landed.get(trial.name, ended) for trial in task.trials}
            for name, end in ended.items():
                if isinstance(end, TrialResult):
                    if name in finished:  # a paused trial, promoted and landed again
                        outcome.paused.append(finished[name])
                    finished[name] = end
                    if end.timed_out:
                        how = f"stopped by --timeout at epoch {end.epochs}, landed paused"
                    elif end.pruned:
                        how = f"pruned at epoch {end.epochs}, landed"
                    else:
                        how = "finished"
                    print(
                        f"{name} {how} in {end.seconds:.0f} s ({end.run_seconds:.0f} s of `dvc exp run`): "
                        f"{OBJECTIVE} {end.metrics.get(OBJECTIVE, float('nan')):.4f}",
                        flush=True,
                    )
                else:
                    failed[name] = end
                    print(f"{name} failed: {end}", flush=True)

    submit()
    while running and not ctrl_c.is_set():
        done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
        collect(done)
        submit()
        progress.show(ray.get(board.snapshot.remote())[0], list(running.values()), len(finished), len(failed))
    unproposed = 0
    if proposals is not None:  # a search's: those asked but not started, and those never asked
        withdrawn, unproposed = proposals.withdraw()
        waiting += withdrawn
    if running or waiting or unproposed:  # Ctrl-C came before they ended (or started)
        print(
            f"cancelling the {sum(len(t.trials) for t in [*running.values(), *waiting]) + unproposed} unfinished "
            "trial(s); the finished ones stay pushed and logged",
            flush=True,
        )
        failed.update({trial.name: CANCELLED for task in waiting for trial in task.trials})
        waiting.clear()
        for ref in running:
            ray.cancel(ref)
        _, unended = ray.wait(list(running), num_returns=len(running), timeout=STOP_GRACE_SECONDS + 30)
        for ref in unended:  # past the grace: its worker is killed, and with it what the worker started
            ray.cancel(ref, force=True)
        collect(list(running))
        outcome.cancelled = True
    return outcome
