"""A search (`--trials N`): Optuna proposes each trial from the results so far, and its
successive-halving pruner (asynchronous, as ASHA) stops a trial at a rung where it is not among the
best 1/reduction_factor of the trials that reached it. The study lives in the project, in
`mlruns/optuna.db` beside the MLflow store, so the same command again goes on from every trial it
has; on Ray it is an actor on the driver's node, which every node's trials reach.

A trial climbs its rungs as a user would: `dvc exp run train -S train.epochs=<rung>` continues the
trial's last rung (more epochs continue a finished run, bit for bit), and the trial lands as the
experiment of the epochs it reached, with `train.epochs` that count."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import optuna
import ray
from optuna.trial import TrialState

from pipeline.errors import PipelineError
from pipeline.sweep import grid
from pipeline.sweep.cluster import CANCELLED, Outcome, Task
from pipeline.sweep.groups import groups
from pipeline.sweep.space import Space
from pipeline.sweep.trial import Rungs, TrialResult

SEARCH_STORE = Path("mlruns") / "optuna.db"
SAMPLERS = ("tpe", "random", "grid")
# Tags of each trial in the study (Optuna's user attributes), read back by a search run again.
CANCELLED_ATTR = "cancelled"  # a FAIL that Ctrl-C caused: it does not count against --trials


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    trials: int  # the budget: trials that finished, were pruned or failed on their own
    sampler: str
    seed: int
    prune: bool
    min_epochs: int  # the first rung
    reduction_factor: int  # each rung is this many times the last; 1/this of a rung's trials go on

    def rungs(self, epochs: int) -> tuple[int, ...]:
        """The epochs at which a trial may be pruned, then `epochs`: min_epochs x factor^k below it."""
        if not self.prune:
            return (epochs,)
        rungs, rung = [], self.min_epochs
        while rung < epochs:
            rungs.append(rung)
            rung *= self.reduction_factor
        return (*rungs, epochs)

    def describe(self) -> dict:
        """What a search of one name must keep to go on (not its budget: more trials may be asked)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "trials"}


def options_from(args) -> SearchOptions:
    """The search's options as `python -m pipeline.sweep` takes them."""
    return SearchOptions(
        args.trials, args.sampler, args.sampler_seed, args.prune, args.min_epochs, args.reduction_factor
    )


def check_options(options: SearchOptions) -> None:
    """What the options alone can refuse."""
    if options.trials < 1:
        raise PipelineError(f"--trials must be 1 or more (a search of that many trials), got {options.trials}")
    if options.sampler not in SAMPLERS:
        raise PipelineError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {options.sampler}")
    if options.prune and options.reduction_factor < 2:
        raise PipelineError(f"--reduction-factor must be 2 or more, got {options.reduction_factor}")


def check_against_space(options: SearchOptions, space: Space, epochs: int) -> None:
    """What the options and the space (and its train.epochs) refuse together."""
    if options.sampler == "grid" and options.trials > space.size():
        raise PipelineError(f"--trials {options.trials} is more than the {space.size()} points of the grid: lower it")
    if options.prune and not 1 <= options.min_epochs <= epochs:
        raise PipelineError(
            f"--min-epochs {options.min_epochs}, the first rung, must be from 1 to train.epochs ({epochs}): "
            "lower it, or raise train.epochs"
        )


def open_study(name: str, space: Space, options: SearchOptions, storage: str) -> optuna.Study:
    """The search's study, created or, for a name searched before, loaded if it was started with this
    same space and these options (else refused: its trials would not be of one search)."""
    if options.sampler == "grid" and space.has_ranges():
        raise PipelineError("--sampler grid takes lists of values only: a range or interval has no grid")
    samplers = {  # seeded by --sampler-seed and the count of trials the study has already
        "tpe": lambda done=0: optuna.samplers.TPESampler(seed=options.seed + done),
        "random": lambda done=0: optuna.samplers.RandomSampler(seed=options.seed + done),
        "grid": lambda done=0: optuna.samplers.GridSampler(space.grid(), seed=options.seed + done),
    }
    pruner = (
        optuna.pruners.SuccessiveHalvingPruner(
            min_resource=options.min_epochs, reduction_factor=options.reduction_factor, min_early_stopping_rate=0
        )
        if options.prune
        else optuna.pruners.NopPruner()
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            sampler=samplers[options.sampler](),
            pruner=pruner,
            direction="minimize",
            load_if_exists=True,
        )
    if study.trials:  # going on: a sampler seeded afresh would propose the first run's points again
        study.sampler = samplers[options.sampler](len(study.trials))
    started_with = {"space": space.describe(), "options": options.describe()}
    if "started_with" not in study.user_attrs:
        study.set_user_attr("started_with", started_with)
    elif study.user_attrs["started_with"] != started_with:
        raise PipelineError(
            f"search '{name}' was started with another space or other options (in {SEARCH_STORE}): run it "
            "again as it was, or give this one another --name"
        )
    return study


def counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that count against --trials: ended, and not by Ctrl-C."""
    return [
        trial
        for trial in study.get_trials(deepcopy=False)
        if trial.state.is_finished() and not trial.user_attrs.get(CANCELLED_ATTR)
    ]


class SearchStudy:
    """The study, as every trial of the search reaches it: asked for a point, told a rung's value
    (and answered whether to stop there), told the trial's end. On Ray, the actor `Search`."""

    def __init__(self, name: str, space: Space, options: SearchOptions, storage: str):
        self.study = open_study(name, space, options, storage)
        self.name, self.space = name, space
        self.asked: dict[int, optuna.Trial] = {}
        for trial in self.study.get_trials(deepcopy=False, states=[TrialState.RUNNING]):
            self.study.set_trial_user_attr(trial._trial_id, CANCELLED_ATTR, True)  # an earlier Ctrl-C's
            self._tell(trial.number, state=TrialState.FAIL)

    def counted(self) -> int:
        return len(counted(self.study))

    def ask(self) -> tuple[int, grid.Trial]:
        """The next trial's number in the study, and the trial, named as DVC names a sweep's
        experiments, with the overrides that make it."""
        trial = self.study.ask(dict(self.space.dimensions))
        self.asked[trial.number] = trial
        proposed = grid.Trial(f"{self.name}-{trial.number + 1}", self.space.overrides(trial.params))
        trial.set_user_attr("experiment", proposed.name)
        trial.set_user_attr("overrides", list(proposed.overrides))
        return trial.number, proposed

    def report(self, number: int, epochs: int, value: float) -> bool:
        """The trial's objective after `epochs`; whether the pruner stops it there."""
        trial = self.asked[number]
        trial.report(value, epochs)
        return trial.should_prune()

    def tell(self, number: int, value: float | None, pruned: bool, attrs: dict) -> None:
        """A landed trial: COMPLETE with its objective, or PRUNED at its last reported rung."""
        for key, attr in attrs.items():
            self.asked[number].set_user_attr(key, attr)
        state = TrialState.PRUNED if pruned else TrialState.COMPLETE
        self._tell(number, None if pruned else value, state=state)

    def fail(self, number: int, reason: str, cancelled: bool) -> None:
        """A trial that did not land: failed on its own (counted), or cancelled by Ctrl-C (not)."""
        trial = self.asked[number]
        trial.set_user_attr("reason", reason)
        if cancelled:
            trial.set_user_attr(CANCELLED_ATTR, True)
        self._tell(number, state=TrialState.FAIL)

    def _tell(self, number: int, value: float | None = None, state: TrialState = TrialState.COMPLETE) -> None:
        try:
            self.study.tell(number, value, state=state, skip_if_finished=True)
        except RuntimeError as exc:  # the grid sampler stops a study after its last point, as if in optimize()
            if "Study.stop" not in str(exc):
                raise


Search = ray.remote(num_cpus=0)(SearchStudy)


class Proposals:
    """The search's next trials, asked of the study as room frees, until --trials count: a task
    each, or with --together a task per group of up to that many that can train together."""

    def __init__(self, search, name: str, options: SearchOptions, epochs: int, together: int, params_text: str):
        self.search, self.name, self.together, self.params_text = search, name, together, params_text
        self.rungs = options.rungs(epochs)
        self.left = max(options.trials - ray.get(search.counted.remote()), 0)
        self.asked: dict[str, int] = {}  # trial name -> its number in the study
        self.tasks: list[Task] = []
        self.ready: list[Task] = []  # asked together, in groups of one key, not yet handed out

    def next(self) -> Task | None:
        if not self.ready:
            self.ready = self._ask(min(max(self.together, 1), self.left))
        return self.ready.pop(0) if self.ready else None

    def withdraw(self) -> tuple[list[Task], int]:
        """Stop proposing: the tasks asked but not handed out, and the count of trials never asked."""
        withdrawn, unasked = self.ready, self.left
        self.ready, self.left = [], 0
        return withdrawn, unasked

    def _ask(self, count: int) -> list[Task]:
        self.left -= count
        numbers = {}
        for _ in range(count):
            number, trial = ray.get(self.search.ask.remote())
            numbers[trial] = self.asked[trial.name] = number
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

    def trials(self) -> list[grid.Trial]:
        """Every trial asked, in the order asked."""
        return [trial for task in self.tasks for trial in task.trials]

    def settle(self, outcome: Outcome) -> None:
        """Each asked trial that did not land told to the study: failed on its own, or cancelled."""
        for name, number in self.asked.items():
            if name not in outcome.finished:
                reason = outcome.failed.get(name, CANCELLED)
                ray.get(self.search.fail.remote(number, reason, reason == CANCELLED))


def storage_url() -> str:
    """The study's storage: SQLite in the project, beside the MLflow store."""
    SEARCH_STORE.parent.mkdir(exist_ok=True)
    return f"sqlite:///{SEARCH_STORE.resolve()}"


def landed_before(study: optuna.Study) -> dict[str, tuple[grid.Trial, TrialResult]]:
    """The study's trials that landed in an earlier run of the search, by experiment name."""
    landed = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        attrs = trial.user_attrs
        name = attrs["experiment"]
        result = TrialResult(
            name,
            attrs["metrics"],
            attrs["mlflow_run_id"],
            0.0,
            0.0,
            attrs["epochs"],
            trial.state == TrialState.PRUNED,
            attrs.get("kept_epoch"),
        )
        landed[name] = (grid.Trial(name, tuple(attrs["overrides"])), result)
    return landed
