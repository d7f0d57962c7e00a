"""A search's next trials, asked of its study (the Ray actor search.Search) as room frees on the
cluster: the tasks the cluster runs (shared.TaskSource), a promoted trial first, as in ASHA, until
--timeout is spent."""

from __future__ import annotations

import time

import ray

from pipeline.sweep import grid
from pipeline.sweep.groups import groups
from pipeline.sweep.search_options import SearchOptions
from pipeline.sweep.shared import CANCELLED, Outcome, Rungs, Task


class Proposals:
    """The search's next trials, asked of the study as room frees, until --trials count: a task
    each, or with --together a task per group of up to that many that can train together."""

    def __init__(
        self,
        search,
        name: str,
        options: SearchOptions,
        epochs: int,
        together: int,
        params_text: str,
        timeout: float | None = None,
    ):
        self.search, self.name, self.together, self.params_text = search, name, together, params_text
        self.timeout, self.deadline = timeout, None  # the budget, in seconds from the first trial's start
        self.rungs = options.rungs(epochs)
        self.budget = options.trials
        self.promotes = options.prune and not together  # a paused trial continues alone, as it trained
        self.left = max(options.trials - ray.get(search.counted.remote()), 0)
        self.asked: dict[str, int] = {}  # trial name -> its number in the study
        self.tasks: list[Task] = []
        self.ready: list[Task] = []  # asked together, in groups of one key, not yet handed out

    def next(self) -> Task | None:
        """A paused trial that goes on now (one --timeout stopped, or one ASHA's rule promotes),
        else the next trial asked; while trials are left to ask (a promotion comes first, as in
        ASHA) and --timeout is not spent. The budget counts from the first trial's start: Ray's
        start and the checks before are not the trials' time."""
        spent = self.deadline is not None and time.time() >= self.deadline
        if spent:
            self._spent()
        if not self.ready and not spent:
            resumed = ray.get(self.search.resume.remote())
            if resumed is not None:
                self.ready = [self._resumed(*resumed)]
        if not self.ready and self.left and self.promotes:
            promoted = ray.get(self.search.promote.remote())
            if promoted is not None:
                self.ready = [self._continuation(*promoted)]
        if not self.ready:
            self.ready = self._ask(min(max(self.together, 1), self.left))
        if self.ready and self.timeout is not None and self.deadline is None:
            self.deadline = time.time() + self.timeout
            ray.get(self.search.spend_by.remote(self.deadline))
        return self.ready.pop(0) if self.ready else None

    def _resumed(self, number: int, trial: grid.Trial, continues: int) -> Task:
        """The task of a trial a stop left unlanded: it goes on from the last epoch it finished (the
        checkpoint its task kept in the project), as the same trial of the study."""
        self.asked[trial.name] = number
        if not continues:  # a promotion does not count against --trials; this trial does, once it ends
            self.left = max(self.left - 1, 0)
        print(f"{trial.name} resumes: it was stopped before it landed, and goes on from its last epoch", flush=True)
        rungs = Rungs(self.search, self.rungs, {trial.name: number})
        task = Task(trial.name, (trial,), bool(self.together), rungs=rungs, continues=continues)
        self.tasks.append(task)
        return task

    def _spent(self) -> None:
        """--timeout is spent: no trial starts, and those running stop at their next rung and land."""
        if self.left or self.ready:
            print(
                f"--timeout {self.timeout:g} s is spent: no trial starts, and those running stop at their next rung "
                "and land; the same command with a larger --timeout goes on from there",
                flush=True,
            )
        self.withdraw()

    def _continuation(self, number: int, trial: grid.Trial, epochs: int, timed_out: bool) -> Task:
        """The task that continues a paused trial from the experiment it paused as."""
        self.asked[trial.name] = number
        why = "--timeout stopped it there" if timed_out else "and is now among the best there"
        print(
            f"{trial.name} {'continues' if timed_out else 'promoted'}: it paused at epoch {epochs}, {why}", flush=True
        )
        task = Task(
            trial.name, (trial,), False, rungs=Rungs(self.search, self.rungs, {trial.name: number}), continues=epochs
        )
        self.tasks.append(task)
        return task

    def withdraw(self) -> tuple[list[Task], int]:
        """Stop proposing: the tasks asked but not handed out, and the count of trials never asked."""
        withdrawn, unasked = self.ready, self.left
        self.ready, self.left = [], 0
        return withdrawn, unasked

    def _ask(self, count: int) -> list[Task]:
        numbers = {}
        for _ in range(count):
            asked = ray.get(self.search.ask.remote())
            if asked is None:
                self._say_exhausted()
                break
            self.left -= 1
            number, trial, repeated = asked
            numbers[trial] = self.asked[trial.name] = number
            if repeated:
                print(
                    f"{trial.name}: proposed after {len(repeated)} point(s) already tried ({', '.join(repeated)}), "
                    "which take those trials' results: no training, not counted against --trials",
                    flush=True,
                )
        trials = list(numbers)
        if not self.together:
            batches = [[trial] for trial in trials]
        else:  # trials of another model shape, batch, ... cannot share a process
            params = grid.check(trials, self.params_text)
            batches = [[trials[i] for i in members] for members in groups(params, self.together)]
        tasks = [
            Task(
                f"group {len(self.tasks) + i}" if self.together else batch[0].name,
                tuple(batch),
                bool(self.together),
                rungs=Rungs(self.search, self.rungs, {trial.name: numbers[trial] for trial in batch}),
            )
            for i, batch in enumerate(batches, 1)
        ]
        self.tasks += tasks
        for task in tasks if self.together else []:
            print(f"{task.label}: {', '.join(trial.name for trial in task.trials)}", flush=True)
        return tasks

    def _say_exhausted(self) -> None:
        tried = ray.get(self.search.tried.remote())
        print(
            f"every point of the space has been tried ({tried}): the search ends with "
            f"{self.budget - self.left} of --trials {self.budget}",
            flush=True,
        )
        self.left = 0

    def trials(self) -> list[grid.Trial]:
        """Every trial asked, in the order first asked (a promoted one once)."""
        return list({trial.name: trial for task in self.tasks for trial in task.trials}.values())

    def settle(self, outcome: Outcome) -> None:
        """Each asked trial that failed on its own told to the study; one Ctrl-C cancelled is left
        as it is, RUNNING, for the search run again to resume."""
        for name, number in self.asked.items():
            reason = outcome.failed.get(name, CANCELLED) if name not in outcome.finished else None
            if reason not in (None, CANCELLED):
                ray.get(self.search.fail.remote(number, reason))
