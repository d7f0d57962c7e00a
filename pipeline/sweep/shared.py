"""What the parts of a sweep hand one another: the sweep every task shares, a task, a trial's
result or failure, a search's rungs, the resources a task gets, and how the trials ended. A module
of types only, so every part imports it and none imports another to reach them."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import ray

from pipeline.sweep import grid


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
    timed_out: bool = False  # pruned: stopped at its rung once --timeout was spent, not by its objective
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


@dataclasses.dataclass(frozen=True)
class Resources:
    """What a sweep's tasks get, settled once from the options and the cluster (cluster.start_ray)."""

    cpus_per_trial: float
    gpus_per_trial: float
    max_concurrent: int  # tasks at once (0: as many as Ray takes; a search's: at most what the cluster fits)

    @property
    def cpu_only(self) -> bool:
        return self.gpus_per_trial == 0


CANCELLED = "cancelled"  # why a trial did not finish, when Ctrl-C stopped it


@dataclasses.dataclass
class Outcome:
    """How the trials ended: the finished ones' results, the others' reasons, and whether Ctrl-C came."""

    finished: dict[str, TrialResult] = dataclasses.field(default_factory=dict)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    cancelled: bool = False
    kept: dict[str, TrialResult] = dataclasses.field(default_factory=dict)  # a search's, landed by an earlier run
    # A search's paused trials that a promotion continued: their experiments replaced, their runs kept.
    paused: list[TrialResult] = dataclasses.field(default_factory=list)

    def status(self, name: str) -> str:
        """The trial's end in MLflow's words: FINISHED, KILLED (by its user, as Ctrl-C is) or FAILED."""
        if name in self.finished or name in self.kept:
            return "FINISHED"
        return "KILLED" if self.failed.get(name) == CANCELLED else "FAILED"

    def result(self, name: str) -> TrialResult | None:
        return self.finished.get(name) or self.kept.get(name)


@dataclasses.dataclass(frozen=True)
class Task:
    """What one Ray task runs: one trial, or a group of trials trained together (`--together`),
    trained in one process (pipeline.sweep.training), then each landed by one `dvc exp run`. But a
    trial of `train.num_processes` > 1 (`torchrun`): its own `dvc exp run` trains it, under torchrun."""

    label: str  # the trial's name, or "group N"
    trials: tuple[grid.Trial, ...]
    together: bool
    attempt: int = 1
    rungs: Rungs | None = None  # a search's trials: where they may be pruned
    continues: int = 0  # a paused trial promoted: the epochs of the experiment it continues
    torchrun: bool = False


class TaskSource(Protocol):
    """A search's proposals, as the cluster takes them (proposals.Proposals)."""

    left: int  # trials yet to ask

    def next(self) -> Task | None: ...

    def withdraw(self) -> tuple[list[Task], int]: ...
