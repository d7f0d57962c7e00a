"""A search's warm start: the project's DVC experiments that lie in its space, taken into its study
as finished trials (Optuna's `add_trial`), so a search of a space the user has explored starts from
what they ran, and proposes none of those points again (search.py). `--no-warm-start` leaves them.

An experiment is taken where it is a trial this search could have run: of the sweep's commit (its
code and data), every param the search fixes as the trial would have it, each searched param in
the space, and at least the first rung trained, at most train.epochs. It is told to the study as it
would have been had it trained here: its objective at each rung it reached, COMPLETE at
train.epochs, else PRUNED. A taken trial does not count against --trials (it cost this search
nothing), and a pruned one is never promoted (its experiment is not at the rung it paused at)."""

from __future__ import annotations

import json

import optuna
import yaml
from optuna.distributions import CategoricalDistribution, IntDistribution

from pipeline.errors import PipelineError
from pipeline.git import git
from pipeline.history import best_row, from_csv, split_train_metrics
from pipeline.params import PARAMS_FILE, ParamsError, parse_params
from pipeline.paths import RUN_FILE, TEST_METRICS, TRAIN_HISTORY, TRAIN_METRICS
from pipeline.sweep import grid
from pipeline.sweep.search import IMPORTED_ATTR
from pipeline.sweep.search_options import SearchOptions
from pipeline.sweep.space import Space

# Params that may differ from the search's trial: the epochs (a rung reached is enough) and the
# threads, which change a model's bytes but not what it is worth.
MAY_DIFFER = {"train.epochs", "train.num_threads"}


def experiments() -> dict[str, tuple[str, str]]:
    """The project's DVC experiments: name -> (their baseline commit, their git ref)."""
    found = {}
    for ref in git("for-each-ref", "--format=%(refname)", "refs/exps/").split():
        parts = ref.split("/")  # refs/exps/ab/cdef.../name; DVC's own refs (exec/, stash) are shorter
        if len(parts) == 5 and len(parts[2] + parts[3]) == 40:
            found[parts[4]] = (parts[2] + parts[3], ref)
    return found


def _in(distribution, value) -> bool:
    if isinstance(distribution, CategoricalDistribution):
        return value in distribution.choices
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(distribution, IntDistribution):
        return value == int(value) and distribution.low <= value <= distribution.high
    return distribution.low <= value <= distribution.high


def _trial(name: str, ref: str, space: Space, options: SearchOptions, epochs: int, params_text: str):
    """The study trial experiment `name` is, or why it is not one of this search's."""
    try:
        params = parse_params(yaml.safe_load(git("show", f"{ref}:{PARAMS_FILE}")))
        trained, metrics = split_train_metrics(json.loads(git("show", f"{ref}:{TRAIN_METRICS}")))
        history = from_csv(git("show", f"{ref}:{TRAIN_HISTORY}"))
    except (PipelineError, ParamsError, json.JSONDecodeError, yaml.YAMLError):
        return "unreadable"
    flat = params.flat()
    values = {key: flat[key] for key in space.dimensions}
    if not all(_in(space.dimensions[key], value) for key, value in values.items()):
        return "outside the space"
    try:
        expected = grid.check([grid.Trial(name, space.overrides(values))], params_text)[0].flat()
    except PipelineError:
        return "outside the space"
    if any(value != flat[key] for key, value in expected.items() if key not in MAY_DIFFER):
        return "with other fixed params"
    rungs = options.rungs(epochs)
    if not rungs[0] <= trained <= epochs:
        return "with other epochs"

    def at(epoch: int) -> dict[str, float]:  # the metrics of the model the run kept after `epoch`
        seen = history[:epoch]
        return (best_row(seen, params.train.min_delta) if params.train.keep_epoch == "best" else seen[-1]).metrics

    try:
        metrics |= json.loads(git("show", f"{ref}:{TEST_METRICS}"))
    except PipelineError:  # an experiment of the train stage alone has no test metrics
        pass
    metrics |= {name: value for name, value in at(trained).items() if name in options.metrics}
    try:
        run_id = json.loads(git("show", f"{ref}:{RUN_FILE}"))["run_id"]
    except (PipelineError, json.JSONDecodeError, KeyError):
        run_id = None
    complete = trained == epochs
    return optuna.trial.create_trial(
        params=values,
        distributions=dict(space.dimensions),
        values=[metrics[name] for name in options.metrics] if complete else None,
        state=optuna.trial.TrialState.COMPLETE if complete else optuna.trial.TrialState.PRUNED,
        intermediate_values={
            rung: at(rung)[options.metrics[0]] for rung in rungs[:-1] if rung <= trained and len(options.metrics) == 1
        },
        user_attrs={
            "experiment": name,
            "overrides": list(space.overrides(values)),
            "epochs": trained,
            "kept_epoch": None,
            "mlflow_run_id": run_id,
            "metrics": metrics,
            IMPORTED_ATTR: True,
        },
    )


def take(study: optuna.Study, space: Space, options: SearchOptions, epochs: int, commit: str, params_text: str) -> None:
    """The project's experiments that are trials of this search, added to its study (once: those it
    holds already are not taken again), and a line each for what was taken and what was not."""
    held = {trial.user_attrs.get("experiment") for trial in study.get_trials(deepcopy=False)}
    taken, other_commit, not_taken = [], 0, {}
    for name, (baseline, ref) in sorted(experiments().items()):
        if name in held:
            continue
        if baseline != commit:
            other_commit += 1
            continue
        trial = _trial(name, ref, space, options, epochs, params_text)
        if isinstance(trial, str):
            not_taken[trial] = not_taken.get(trial, 0) + 1
            continue
        study.add_trial(trial)
        taken.append(name)
    if taken:
        print(
            f"warm start: took {len(taken)} of the project's experiments as finished trials ({', '.join(taken)}); "
            "they do not count against --trials (--no-warm-start leaves them)",
            flush=True,
        )
    if other_commit:
        print(
            f"warm start: {other_commit} experiment(s) of other commits not taken: a trial's result is its code's "
            f"and data's, and the search runs {commit[:7]}",
            flush=True,
        )
    if not_taken:
        print(
            "warm start: not taken, of this commit: "
            + ", ".join(f"{count} {why}" for why, count in sorted(not_taken.items())),
            flush=True,
        )
