"""What a search adds to its sweep's parent run: the optimisation history and the params'
importances (fANOVA), or with two objectives the rate-distortion front (front.py), and on each
landed trial's run the tags Optuna's MLflowCallback sets."""

from __future__ import annotations

import math
import warnings

import matplotlib.pyplot as plt
import mlflow
import optuna
from mlflow.entities import RunTag
from optuna.trial import TrialState

from pipeline.history import OBJECTIVE
from pipeline.sweep import front, search
from pipeline.sweep.search_options import SearchOptions
from pipeline.sweep.shared import Outcome, Sweep

DISTORTION_UNITS = {"mse": "squared error", "bce": "cross-entropy, nats"}  # by train.reconstruction


def log_search(
    client: mlflow.MlflowClient,
    sweep: Sweep,
    study: optuna.Study,
    outcome: Outcome,
    options: SearchOptions,
    reconstruction: str,
) -> list[front.Point] | None:
    """The search on its parent run: the optimisation history and the params' importances (fANOVA,
    as Optuna computes it) as figures and tables, of the trials that trained (a repeated proposal
    adds nothing), or with two objectives the rate-distortion front, which it returns; and on each
    trial's run landed now, Optuna's trial number and state (the tags Optuna's MLflowCallback sets)
    and where it was pruned."""
    landed = search.trained(study)
    first, last = {}, {}  # experiment -> its first study trial (a promoted one's pause) and its last
    for trial in landed:
        first.setdefault(trial.user_attrs["experiment"], trial.number)
        last[trial.user_attrs["experiment"]] = trial.number
    numbered = [(r, first[r.name]) for r in outcome.paused] + [(r, last[r.name]) for r in outcome.finished.values()]
    for result, number in numbered:
        if result.run_id is not None:
            tags = {"number": str(number), "state": "PRUNED" if result.pruned else "COMPLETE"}
            client.log_batch(
                result.run_id,
                tags=[
                    RunTag(k, v)
                    for k, v in (tags | ({"pruned_at_epoch": str(result.epochs)} if result.pruned else {})).items()
                ],
            )
    ended = [t for t in landed if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if len(options.objectives) > 1:
        last_of = {trial.user_attrs["experiment"]: trial for trial in ended}  # a promoted trial's continuation
        points = [
            front.Point(
                name,
                trial.user_attrs["metrics"][front.RATE],
                trial.user_attrs["metrics"][front.DISTORTION],
                trial.params,
                trial.state == TrialState.PRUNED,
            )
            for name, trial in last_of.items()
        ]
        return front.log_front(client, sweep, points, DISTORTION_UNITS[reconstruction])
    history: dict[str, list] = {"number": [], "trial": [], "state": [], "epochs": [], OBJECTIVE: [], "best_so_far": []}
    best = float("inf")
    for trial in ended:
        if trial.state == TrialState.COMPLETE:
            best = min(best, trial.value)
        history["number"].append(trial.number)
        history["trial"].append(trial.user_attrs.get("experiment"))
        history["state"].append(trial.state.name)
        history["epochs"].append(trial.user_attrs.get("epochs"))
        history[OBJECTIVE].append(
            trial.value if trial.state == TrialState.COMPLETE else trial.user_attrs["metrics"][OBJECTIVE]
        )
        history["best_so_far"].append(None if math.isinf(best) else best)
    mlflow.log_table(history, artifact_file="search/history.json", run_id=sweep.parent_run_id)
    trained = optuna.create_study(direction="minimize")  # in memory: the trials that trained, alone
    trained.add_trials(ended)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = optuna.visualization.matplotlib.plot_optimization_history(trained, target_name=OBJECTIVE)
        client.log_figure(sweep.parent_run_id, axes.figure, "search/optimization_history.png")
        plt.close(axes.figure)
        why_not = _why_no_importances([t for t in ended if t.state == TrialState.COMPLETE])
        if why_not:
            print(f"no parameter importances: {why_not}", flush=True)
            return None
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        importances = optuna.importance.get_param_importances(trained, evaluator=evaluator)
        mlflow.log_table(
            {"param": list(importances), "importance": list(importances.values())},
            artifact_file="search/importances.json",
            run_id=sweep.parent_run_id,
        )
        axes = optuna.visualization.matplotlib.plot_param_importances(
            trained, evaluator=evaluator, target_name=OBJECTIVE
        )
        client.log_figure(sweep.parent_run_id, axes.figure, "search/param_importances.png")
        plt.close(axes.figure)
    print("importance (fANOVA): " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()), flush=True)
    return None


def _why_no_importances(complete: list[optuna.trial.FrozenTrial]) -> str | None:
    """Why fANOVA cannot weigh the params over these trials (None: it can). It needs two trials that
    trained every epoch, with objectives that differ (their params do: no point trains twice)."""
    if len(complete) < 2:
        return f"they need 2 trials that trained every epoch, and {len(complete)} did"
    if len({trial.value for trial in complete}) < 2:
        return (
            f"the {len(complete)} trials that trained every epoch all have {OBJECTIVE} {complete[0].value:.4f}, "
            "so no param explains a difference"
        )
    return None
