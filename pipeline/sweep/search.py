"""A search (`--trials N`): Optuna proposes each trial from the results so far (TPE after a start
that covers the space, covering_start.py), and its pruner (Hyperband's brackets of successive
halving by default, or successive halving alone, asynchronous as ASHA) stops a trial at a rung where
it is not among the best 1/reduction_factor of the trials that reached it. A proposal of a point
the study holds already trains nothing: it takes that trial's result, now or when it ends. The
study lives in the project, in `mlruns/optuna.db` beside the MLflow store, so the same command
again goes on from every trial it has; on Ray it is an actor on the driver's node, which every
node's trials reach.

A trial climbs its rungs in one process (groups.py, training.py), stopping at each for the study's
answer, and lands as the experiment of the epochs it reached, with `train.epochs` that count, by
one `dvc exp run`; the bytes are those of its run alone, which more epochs continue bit for bit."""

from __future__ import annotations

import collections
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import ray
from optuna.trial import TrialState

from pipeline.errors import PipelineError
from pipeline.sweep import grid
from pipeline.sweep.covering_start import CONTINUES_ATTR, CoveringStart
from pipeline.sweep.promotion import Reached, promotable
from pipeline.sweep.search_options import SearchOptions
from pipeline.sweep.shared import TrialResult
from pipeline.sweep.space import Space

SEARCH_STORE = Path("mlruns") / "optuna.db"
# Tags of each trial in the study (Optuna's user attributes), read back by a search run again.
SAME_AS_ATTR = "same_as"  # a proposal of a point another trial holds: that trial's result, no training
IMPORTED_ATTR = "taken_from_project"  # an experiment the project held already (warm_start.py)
TIMED_OUT_ATTR = "stopped_by_timeout"  # paused at a rung once --timeout was spent: the search again continues it
# Proposals in a row of points the study holds before the search proposes an untried one at random.
REPEATS_BEFORE_AN_UNTRIED_POINT = 20


def open_study(name: str, space: Space, options: SearchOptions, storage: str, epochs: int) -> optuna.Study:
    """The search's study, created or, for a name searched before, loaded if it was started with this
    same space and these options (else refused: its trials would not be of one search). The start's
    size is the first run's, so a run again with a larger budget proposes what the first would have."""
    if options.sampler == "grid" and space.has_ranges():
        raise PipelineError("--sampler grid takes lists of values only: a range or interval has no grid")
    pruners = {
        "asha": lambda: optuna.pruners.SuccessiveHalvingPruner(
            min_resource=options.min_epochs, reduction_factor=options.reduction_factor, min_early_stopping_rate=0
        ),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(
            min_resource=options.min_epochs, max_resource=epochs, reduction_factor=options.reduction_factor
        ),
        "none": optuna.pruners.NopPruner,
    }
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            pruner=pruners[options.pruner](),
            directions=["minimize"] * len(options.objectives),
            load_if_exists=True,
        )
    started_with = {"space": space.describe(), "options": options.describe()}
    if "started_with" not in study.user_attrs:
        study.set_user_attr("started_with", started_with)
        study.set_user_attr("start_trials", options.start_trials())
    elif study.user_attrs["started_with"] != started_with:
        raise PipelineError(
            f"search '{name}' was started with another space or other options (in {SEARCH_STORE}): run it "
            "again as it was, or give this one another --name"
        )
    study.sampler = sampler(space, options, study.user_attrs.get("start_trials", 0), len(study.trials))
    return study


def sampler(space: Space, options: SearchOptions, start: int, number: int) -> optuna.samplers.BaseSampler:
    """The sampler that proposes trial `number`, seeded by --sampler-seed and that number: the
    proposal of a trial is the same whether its search ran without a stop or went on after one
    (a sampler seeded once would have drawn its numbers in another order)."""
    seed = int(np.random.SeedSequence([options.seed, number]).generate_state(1)[0])
    samplers = {
        "tpe": lambda: CoveringStart(
            space, start, optuna.samplers.TPESampler(n_startup_trials=start, seed=seed), options.seed
        ),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "grid": lambda: optuna.samplers.GridSampler(space.grid(), seed=seed),
    }
    return samplers[options.sampler]()


def counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that count against --trials: trained and ended (not stopped by Ctrl-C), not a paused
    trial's promotion (it trains a point the budget counted already), and not an experiment the
    project held already (it cost the search nothing)."""
    return [
        trial
        for trial in trained(study)
        if trial.state.is_finished()
        and CONTINUES_ATTR not in trial.user_attrs
        and not trial.user_attrs.get(IMPORTED_ATTR)
    ]


def trained(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's trials that trained (or train now) as experiments: not the repeated proposals."""
    return [trial for trial in study.get_trials(deepcopy=False) if "experiment" in trial.user_attrs]


def _paused(trial: optuna.trial.FrozenTrial) -> bool:
    """Pruned at its last rung, as the experiment of that rung's epochs, so it can go on."""
    return trial.state == TrialState.PRUNED and not trial.user_attrs.get(IMPORTED_ATTR)


def _stopped_by_timeout(trial: optuna.trial.FrozenTrial) -> bool:
    """Paused at a rung because --timeout was spent, not pruned: the search run again continues it."""
    return trial.state == TrialState.PRUNED and bool(trial.user_attrs.get(TIMED_OUT_ATTR))


class SearchStudy:
    """The study, as every trial of the search reaches it: asked for a point, told a rung's value
    (and answered whether to stop there), told the trial's end. On Ray, the actor `Search`.

    A point is trained once. A proposal of a point that a trial holds (ended, or training now) is a
    copy: it takes that trial's result, now or when it ends, so the sampler learns the point's
    value again, and it trains nothing and does not count against --trials.

    A trial that Ctrl-C or a killed driver stopped stays RUNNING in the study, and a run again of
    the search resumes it first, as the same trial: the same number, rungs and pruner's bracket, so
    what the search proposes and prunes after it is what it would have without the stop."""

    def __init__(self, name: str, space: Space, options: SearchOptions, storage: str, epochs: int):
        self.study = open_study(name, space, options, storage, epochs)
        self.name, self.space, self.options, self.metrics = name, space, options, options.metrics
        self.start = self.study.user_attrs.get("start_trials", 0)  # TPE's start, as the search's first run set it
        self.rungs, self.reduction_factor = options.rungs(epochs), options.reduction_factor
        self.asked: dict[int, optuna.Trial] = {}
        self.deadline: float | None = None  # --timeout's end, on this node's clock
        self.copies: dict[int, list[int]] = collections.defaultdict(list)  # a training trial -> its copies
        stopped = self.study.get_trials(deepcopy=False, states=[TrialState.RUNNING])  # by Ctrl-C, or a killed driver
        self.stopped = [trial for trial in stopped if "experiment" in trial.user_attrs]
        for trial in stopped:
            self.asked[trial.number] = optuna.trial.Trial(self.study, trial._trial_id)
        by_name = {trial.user_attrs["experiment"]: trial.number for trial in self.stopped}
        for trial in stopped:  # a copy waits for the trial it copies, as before the stop
            if SAME_AS_ATTR in trial.user_attrs:
                self.copies[by_name[trial.user_attrs[SAME_AS_ATTR]]].append(trial.number)

    def counted(self) -> int:
        return len(counted(self.study))

    def held(self) -> dict[tuple, optuna.trial.FrozenTrial]:
        """The points tried: those of trials that trained, train now, or wait to go on after a stop."""
        return {self.space.point(trial.params): trial for trial in trained(self.study)}

    def tried(self) -> int:
        return len(self.held())

    def resume(self) -> tuple[int, grid.Trial, int] | None:
        """The next trial a stop left RUNNING, to go on as itself: its number, the trial, and the
        epochs of the paused experiment it continues (0: it continues none). None: no such trial."""
        if not self.stopped:
            return None
        trial = self.stopped.pop(0)
        name, overrides = trial.user_attrs["experiment"], tuple(trial.user_attrs["overrides"])
        continues = trial.user_attrs.get(CONTINUES_ATTR)
        paused = 0 if continues is None else self.study.get_trials(deepcopy=False)[continues].last_step
        return trial.number, grid.Trial(name, overrides), paused

    def ask(self) -> tuple[int, grid.Trial, list[str]] | None:
        """The next trial's number in the study, the trial (named as DVC names a sweep's experiments,
        with the overrides that make it) and the trials whose points were proposed again before it;
        None once every point of a finite space has been tried."""
        held, repeated = self.held(), []
        while len(held) < self.space.size():
            self.study.sampler = sampler(self.space, self.options, self.start, len(self.study.trials))
            if len(repeated) < REPEATS_BEFORE_AN_UNTRIED_POINT:
                trial = self.study.ask(dict(self.space.dimensions))
            else:  # the sampler keeps to the points it has: an untried one, drawn as the seed and count say
                rng = np.random.default_rng([self.options.seed, len(self.study.trials)])
                point = self.space.random_point(rng)
                while self.space.point(point) in held:
                    point = self.space.random_point(rng)
                self.study.enqueue_trial(point)
                trial = self.study.ask(dict(self.space.dimensions))
            same = held.get(self.space.point(trial.params))
            if same is None:
                break
            self._copy(trial, same)
            repeated.append(same.user_attrs["experiment"])
        else:
            return None
        self.asked[trial.number] = trial
        ours = [
            t for t in trained(self.study) if CONTINUES_ATTR not in t.user_attrs and not t.user_attrs.get(IMPORTED_ATTR)
        ]
        names, count = {t.user_attrs["experiment"] for t in trained(self.study)}, len(ours) + 1
        while f"{self.name}-{count}" in names:  # a name an experiment the project held has
            count += 1
        proposed = grid.Trial(f"{self.name}-{count}", self.space.overrides(trial.params))
        trial.set_user_attr("experiment", proposed.name)
        trial.set_user_attr("overrides", list(proposed.overrides))
        return trial.number, proposed, repeated

    def spend_by(self, deadline: float) -> None:
        """From `deadline` (time.time()) on, a trial that reaches a rung stops there (--timeout)."""
        self.deadline = deadline

    def promote(self) -> tuple[int, grid.Trial, int, bool] | None:
        """A paused trial that goes on now, as a new trial of the study that continues it: one that
        --timeout stopped, else one that ASHA's rule promotes (promotion.py). Its number, the trial
        (its experiment's name and overrides), the epochs it reached and whether --timeout stopped
        it; None where none goes on."""
        latest: dict[str, optuna.trial.FrozenTrial] = {}  # each experiment's last trial: a promotion's, or its own
        for trial in trained(self.study):
            if trial.state != TrialState.FAIL:
                latest[trial.user_attrs["experiment"]] = trial
        timed_out = [t for t in latest.values() if _stopped_by_timeout(t)]
        if timed_out:
            paused = timed_out[0]
        else:
            reached = [
                Reached(name, step, value, paused=_paused(trial) and step == trial.last_step)
                for name, trial in latest.items()
                for step, value in trial.intermediate_values.items()
            ]
            chosen = promotable(reached, self.rungs[:-1], self.reduction_factor)
            if chosen is None:
                return None
            paused = latest[chosen.name]
        name = paused.user_attrs["experiment"]
        attrs = {"experiment": name, "overrides": paused.user_attrs["overrides"], CONTINUES_ATTR: paused.number}
        self.study.enqueue_trial(paused.params, user_attrs=attrs)
        trial = self.study.ask(dict(self.space.dimensions))
        for step, value in sorted(paused.intermediate_values.items()):  # its rungs so far, for the pruner
            trial.report(value, step)
            trial.should_prune()
        self.asked[trial.number] = trial
        return trial.number, grid.Trial(name, tuple(attrs["overrides"])), paused.last_step, bool(timed_out)

    def _copy(self, trial: optuna.Trial, same: optuna.trial.FrozenTrial) -> None:
        """A proposal of `same`'s point: its result told now, or when it ends."""
        trial.set_user_attr(SAME_AS_ATTR, same.user_attrs["experiment"])
        self.asked[trial.number] = trial
        if same.state == TrialState.RUNNING:
            self.copies[same.number].append(trial.number)
        else:
            self._tell_copy(trial.number, same)

    def _tell_copy(self, number: int, same: optuna.trial.FrozenTrial) -> None:
        copy = self.asked.pop(number)
        for step, value in sorted(same.intermediate_values.items()):
            copy.report(value, step)
        self._tell(number, same.values if same.state == TrialState.COMPLETE else None, state=same.state)

    def _copies_of(self, number: int) -> None:
        """The copies that waited for trial `number`'s end, told it."""
        if number in self.copies:
            same = self.study.get_trials(deepcopy=False)[number]
            for copy in self.copies.pop(number):
                self._tell_copy(copy, same)

    def report(self, number: int, epochs: int, value: float) -> bool:
        """The trial's objective after `epochs`; whether it stops there: pruned, or paused there
        once --timeout is spent (then tagged, for the search run again to continue it)."""
        trial = self.asked[number]
        trial.report(value, epochs)
        if self.deadline is not None and time.time() >= self.deadline:
            trial.set_user_attr(TIMED_OUT_ATTR, True)
            return True
        return trial.should_prune()

    def tell(self, number: int, metrics: dict[str, float], pruned: bool, attrs: dict) -> bool:
        """A landed trial, by its `metrics`: COMPLETE with its objectives, or PRUNED at its last
        reported rung. Returns whether it stopped there because --timeout was spent, not pruned."""
        trial = self.asked[number]
        timed_out = pruned and bool(trial.user_attrs.get(TIMED_OUT_ATTR))
        for key, attr in attrs.items():
            trial.set_user_attr(key, attr)
        state = TrialState.PRUNED if pruned else TrialState.COMPLETE
        self._tell(number, None if pruned else [metrics[name] for name in self.metrics], state=state)
        self._copies_of(number)
        return timed_out

    def fail(self, number: int, reason: str) -> None:
        """A trial that failed on its own: FAIL, counted. (One that Ctrl-C stopped is not told: it
        stays RUNNING, for the search run again to resume, and its copies wait for it.)"""
        self.asked[number].set_user_attr("reason", reason)
        self._tell(number, state=TrialState.FAIL)
        self._copies_of(number)

    def _tell(self, number: int, values: list[float] | None = None, state: TrialState = TrialState.COMPLETE) -> None:
        try:
            self.study.tell(number, values, state=state, skip_if_finished=True)
        except RuntimeError as exc:  # the grid sampler stops a study after its last point, as if in optimize()
            if "Study.stop" not in str(exc):
                raise


Search = ray.remote(num_cpus=0)(SearchStudy)


def storage_url() -> str:
    """The study's storage: SQLite in the project, beside the MLflow store."""
    SEARCH_STORE.parent.mkdir(exist_ok=True)
    return f"sqlite:///{SEARCH_STORE.resolve()}"


def imported(study: optuna.Study) -> set[str]:
    """The experiments the study took from the project (warm_start.py)."""
    return {t.user_attrs["experiment"] for t in trained(study) if t.user_attrs.get(IMPORTED_ATTR)}


def landed_before(study: optuna.Study) -> dict[str, tuple[grid.Trial, TrialResult]]:
    """The study's trials that landed in an earlier run of the search, by experiment name."""
    landed = {}
    for trial in trained(study):
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        attrs = trial.user_attrs
        name = attrs["experiment"]
        result = TrialResult(
            name,
            attrs["metrics"],
            attrs["mlflow_run_id"],
            0.0,
            0.0,
            attrs["epochs"],
            pruned=trial.state == TrialState.PRUNED,
            timed_out=_stopped_by_timeout(trial),
            kept_epoch=attrs.get("kept_epoch"),
        )
        landed[name] = (grid.Trial(name, tuple(attrs["overrides"])), result)
    return landed
