"""The trials on Ray: joining or starting the cluster, submitting at most --max-concurrent tasks,
collecting each trial's end as it comes, and cancelling the rest on Ctrl-C.

Ray's own task retries, not Ray Tune's trial restarts: Ray retries a task whose node was lost and
does not retry one that raised, which is the rule a sweep wants (a lost node reruns its trials
elsewhere, a diverged trial is reported once). The grid is DVC's, so Tune's search spaces add
nothing; the concurrency limit is a few lines here."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import pipeline
from pipeline.errors import PipelineError
from pipeline.progress import seconds_between_lines
from pipeline.sweep import grid
from pipeline.sweep.board import Board
from pipeline.sweep.trial import STOP_GRACE_SECONDS, Sweep, TrialFailed, TrialResult, run_trial

CANCELLED = "cancelled"  # why a trial did not finish, when Ctrl-C stopped it
SELECTION_METRIC = "val_total"  # the best trial has the lowest: chosen on validation, never on test


@dataclasses.dataclass
class Outcome:
    """How the trials ended: the finished ones' results, the others' reasons, and whether Ctrl-C came."""

    finished: dict[str, TrialResult] = dataclasses.field(default_factory=dict)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    cancelled: bool = False

    def status(self, name: str) -> str:
        """The trial's end in MLflow's words: FINISHED, KILLED (by its user, as Ctrl-C is) or FAILED."""
        return "FINISHED" if name in self.finished else "KILLED" if self.failed.get(name) == CANCELLED else "FAILED"


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


def run_sweep(sweep: Sweep, trials: list[grid.Trial], args: argparse.Namespace) -> Outcome:
    """Submit the trials (at most --max-concurrent at once), report as they go; Ctrl-C cancels the rest."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    board = Board.options(scheduling_strategy=here).remote()
    task = ray.remote(run_trial)
    waiting, running = list(trials), {}
    outcome = Outcome()
    finished, failed = outcome.finished, outcome.failed
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
        outcome.cancelled = True
    return outcome
