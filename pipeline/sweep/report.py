"""What a sweep leaves: its parent MLflow run (the grid, the table of trials, the best trial, the
repeats' mean and spread, and the times), each trial run's final status, and the tables on screen."""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import time

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import (
    MLFLOW_GIT_COMMIT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NOTE,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
)

from pipeline.history import OBJECTIVE
from pipeline.provenance import CONTINUED_RUN_TAG, TRAINING_RUN_TAG
from pipeline.sweep import grid, repeats, search_options
from pipeline.sweep.plan import Plan
from pipeline.sweep.shared import Outcome, Resources, Sweep, TrialResult

BEST_ALIAS = "best"  # of the registered model: the version of a sweep's best trial


def open_parent_run(client: mlflow.MlflowClient, plan: Plan, args: argparse.Namespace, resources: Resources) -> str:
    """The sweep's run: the grid, the commit, the trial count and the resources a trial gets."""
    run = client.create_run(
        plan.experiment_id,
        run_name=args.name,
        tags={
            MLFLOW_GIT_COMMIT: plan.commit,
            MLFLOW_SOURCE_NAME: "python -m pipeline.sweep",
            MLFLOW_SOURCE_TYPE: "LOCAL",
            MLFLOW_USER: getpass.getuser(),
            "sweep": "true",
        },
    )
    params = {
        "sweep.grid": " ".join(f"-S '{s}'" for s in plan.sets),
        "sweep.trials": args.trials if plan.space is not None else len(plan.trials),
        "sweep.commit": plan.commit,
        "sweep.cpus_per_trial": resources.cpus_per_trial,
        "sweep.gpus_per_trial": resources.gpus_per_trial,
        "sweep.max_concurrent": resources.max_concurrent,
        "sweep.retries": args.retries,
        "sweep.together": args.together,
    }
    if plan.space is not None:
        options = search_options.options_from(args)
        params |= {
            "sweep.sampler": args.sampler,
            "sweep.sampler_seed": args.sampler_seed,
            "sweep.objective": ",".join(options.objectives),
            "sweep.pruner": options.pruner,
            "sweep.min_epochs": args.min_epochs,
            "sweep.reduction_factor": args.reduction_factor,
            "sweep.rungs": " ".join(map(str, options.rungs(plan.params[0].train.epochs))),
        }
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run.info.run_id


@dataclasses.dataclass(frozen=True)
class Summary:
    best: TrialResult | None  # the lowest OBJECTIVE of the finished trials
    wall_seconds: float
    trial_seconds: float  # the finished trials', added up
    overhead_seconds: float  # a finished trial's mean outside `dvc exp run` (clone, data, push, its group)
    trial_epochs: int  # the epochs the finished trials trained, added up


def finish(
    client: mlflow.MlflowClient,
    sweep: Sweep,
    trials: list[grid.Trial],
    outcome: Outcome,
    wall_seconds: float,
    comparable: bool = True,
    registered_model: str | None = None,
    trained: str = "alone",
    ranked_by: tuple[str, ...] = (OBJECTIVE,),
) -> Summary:
    """Everything a sweep leaves once its trials have ended, on the parent run and on screen. Where
    the trials are not `comparable` (their decoders differ), or are `ranked_by` two metrics (a
    front, not a best: front.py), none is named best. With a `registered_model`, its alias `best`
    points at the best trial's version. `trained`: alone, searched, together or torchrun
    (OUTSIDE_DVC_EXP_RUN)."""
    summary = summarize(outcome, wall_seconds, comparable and len(ranked_by) == 1)
    configurations = repeats.repeats(trials, outcome)
    log_trials_table(sweep, trials, outcome)
    if configurations:
        repeats.log_repeats_table(sweep, configurations)
    settle_trial_runs(client, sweep, outcome)
    log_summary(client, sweep, trials, outcome, summary)
    print_table(trials, outcome, summary, trained, ranked_by)
    if registered_model and summary.best is not None:
        point_best_alias(client, sweep, registered_model, summary.best.name)
    if not comparable:
        print(
            f"\nno trial is named best: the grid varies train.reconstruction, and {OBJECTIVE} is in the "
            "units of each trial's decoder (squared error against cross-entropy)"
        )
    if configurations:
        repeats.print_repeats(configurations)
    return summary


def summarize(outcome: Outcome, wall_seconds: float, comparable: bool = True) -> Summary:
    results = outcome.finished.values()
    trial_seconds = sum(result.seconds for result in results)
    overhead = (trial_seconds - sum(result.run_seconds for result in results)) / max(len(results), 1)
    full = [result for result in (*results, *outcome.kept.values()) if not result.pruned]  # a pruned one trained less
    best = min(full, key=lambda r: r.metrics.get(OBJECTIVE, float("inf")), default=None) if comparable else None
    return Summary(best, wall_seconds, trial_seconds, overhead, sum(result.epochs for result in results))


def log_trials_table(sweep: Sweep, trials: list[grid.Trial], outcome: Outcome) -> None:
    """trials.json on the parent run: a row per trial, its values, status, metrics and times."""
    keys = list(dict.fromkeys(key for trial in trials for key in trial.values))
    metric_names = sorted(
        {name for result in (*outcome.finished.values(), *outcome.kept.values()) for name in result.metrics}
    )
    table: dict[str, list] = {
        column: []
        for column in ["trial", *keys, "status", "epochs", "pruned", "reason", *metric_names, "seconds", "run_seconds"]
        + ["run_id"]
    }
    for trial in trials:
        result = outcome.result(trial.name)
        table["trial"].append(trial.name)
        for key in keys:
            table[key].append(trial.values.get(key))
        table["status"].append(outcome.status(trial.name))
        table["epochs"].append(result.epochs if result else None)
        table["pruned"].append(result.pruned if result else None)
        table["reason"].append(outcome.failed.get(trial.name))
        for name in metric_names:
            table[name].append(result.metrics.get(name) if result else None)
        table["seconds"].append(round(result.seconds, 1) if result and result.seconds else None)
        table["run_seconds"].append(round(result.run_seconds, 1) if result and result.run_seconds else None)
        table["run_id"].append(result.run_id if result else None)
    mlflow.log_table(table, artifact_file="trials.json", run_id=sweep.parent_run_id)


def settle_trial_runs(client: mlflow.MlflowClient, sweep: Sweep, outcome: Outcome) -> None:
    """Only the run of each trial's pushed experiment stays FINISHED: a lost attempt's run, or the
    run of a trial cancelled or failed between its stages or in its push, does not count as a result."""
    trial_runs = client.search_runs(
        [sweep.experiment_id], filter_string=(f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{sweep.parent_run_id}'")
    )
    kept = {result.run_id for result in (*outcome.finished.values(), *outcome.paused)}
    # A promoted trial: the run of its pause, continued by the run of its experiment.
    came_from = {
        run.info.run_id: run.data.tags.get(CONTINUED_RUN_TAG) or run.data.tags.get(TRAINING_RUN_TAG)
        for run in trial_runs
    }
    for run_id in list(kept):
        while came_from.get(run_id) and came_from[run_id] not in kept:
            run_id = came_from[run_id]
            kept.add(run_id)
    for trial_run in trial_runs:
        if trial_run.info.run_id not in kept and trial_run.info.status in ("RUNNING", "FINISHED"):
            status = outcome.status(trial_run.info.run_name)
            client.set_terminated(trial_run.info.run_id, "FAILED" if status == "FINISHED" else status)


def log_summary(
    client: mlflow.MlflowClient, sweep: Sweep, trials: list[grid.Trial], outcome: Outcome, summary: Summary
) -> None:
    """The counts, times and best trial on the parent run, its description, and its end."""
    now = int(time.time() * 1000)
    metrics = [
        Metric(name, value, now, 0)
        for name, value in (
            ("trials_finished", len(outcome.finished)),
            ("trials_failed", len(outcome.failed)),
            ("wall_seconds", summary.wall_seconds),
            ("trial_seconds_sum", summary.trial_seconds),
            ("overhead_seconds_per_trial", summary.overhead_seconds),
            ("trial_epochs", summary.trial_epochs),
        )
    ]
    note = (
        f"Sweep of {len(trials)} trials at commit {sweep.commit[:7]}: {len(outcome.finished)} finished, "
        f"{len(outcome.failed)} failed."
    )
    tags = []
    best = summary.best
    if best is not None:
        metrics += [
            Metric(f"best_{name}", value, now, 0)
            for name, value in best.metrics.items()
            if name == OBJECTIVE or name.startswith("test_")
        ]
        tags += [RunTag("best_trial", best.name)] + ([RunTag("best_trial_run_id", best.run_id)] if best.run_id else [])
        note += (
            f" Best by the validation negative ELBO, reconstruction + KL whatever its beta ({OBJECTIVE}): "
            f"**{best.name}**, "
            f"{best.metrics[OBJECTIVE]:.4f}; its test metrics are the sweep's `best_test_*`."
        )
    client.log_batch(sweep.parent_run_id, metrics=metrics, tags=tags + [RunTag(MLFLOW_RUN_NOTE, note)])
    client.set_terminated(
        sweep.parent_run_id, "KILLED" if outcome.cancelled else "FAILED" if outcome.failed else "FINISHED"
    )


def point_best_alias(client: mlflow.MlflowClient, sweep: Sweep, registered_model: str, best: str) -> None:
    """The alias `best` of the registered model moved to the version the best trial's evaluate
    registered (tagged with its experiment's name; the newest, if the name was evaluated again),
    and that version on the parent run. `candidate` stays the newest evaluated version."""
    versions = client.search_model_versions(f"name = '{registered_model}' and tags.`dvc.exp_name` = '{best}'")
    if not versions:
        print(f"warning: no version of registered model {registered_model} is {best}'s: alias best not set")
        return
    version = max(versions, key=lambda v: int(v.version)).version
    client.set_registered_model_alias(registered_model, BEST_ALIAS, version)
    client.set_tag(sweep.parent_run_id, "best_model_version", f"{registered_model}/{version}")
    print(f"registered model {registered_model}: alias {BEST_ALIAS} -> version {version} ({best})", flush=True)


# What a finished trial's seconds outside `dvc exp run` hold, by how the sweep's trials trained.
OUTSIDE_DVC_EXP_RUN = {
    "alone": "clone, data, its training process, push",
    "searched": "clone, data, its training process, which climbs its rungs, push",
    "together": "clone, data, its share of its group's training process, push",
    "torchrun": "clone, data, push",
}


def print_table(
    trials: list[grid.Trial],
    outcome: Outcome,
    summary: Summary,
    trained: str = "alone",
    ranked_by: tuple[str, ...] = (OBJECTIVE,),
) -> None:
    """The trials' table, each row with the metrics they are `ranked_by` and the params that differ
    between trials (those every trial sets alike said once, above it), then the times: `trained`
    (a key of OUTSIDE_DVC_EXP_RUN) says where a trial's seconds outside `dvc exp run` went."""
    alike = set.intersection(*(set(trial.overrides) for trial in trials)) if len(trials) > 1 else set()
    if alike:
        print(f"\nevery trial: {' '.join(o for o in trials[0].overrides if o in alike)}")
    widths = {name: max(14, len(name) + 2) for name in ranked_by}
    print(f"\n{'trial':<16}{'status':<12}{'epochs':>7}{''.join(f'{n:>{w}}' for n, w in widths.items())}  params")
    for trial in trials:
        swept = " ".join(o for o in trial.overrides if o not in alike)
        result = outcome.result(trial.name)
        scores = {n: f"{result.metrics.get(n, float('nan')):.4f}" if result else "-" for n in ranked_by}
        score = "".join(f"{scores[n]:>{w}}" for n, w in widths.items())
        epochs = f"{result.epochs}" if result else "-"
        status = "PRUNED" if result and result.pruned else outcome.status(trial.name)
        mark = "  <- best" if summary.best is not None and trial.name == summary.best.name else ""
        mark += "  (kept from before)" if trial.name in outcome.kept else ""
        print(f"{trial.name:<16}{status:<12}{epochs:>7}{score}  {swept}{mark}")
    earlier = [f"{r.name} epoch {r.kept_epoch}" for t in trials if (r := outcome.result(t.name)) and r.kept_epoch]
    if earlier:
        print(f"{OBJECTIVE} of the epoch each trial kept (train.keep_epoch: best), not its last: {', '.join(earlier)}")
    print(
        f"\n{summary.wall_seconds:.0f} s in all; the finished trials took {summary.trial_seconds:.0f} s added up, "
        f"each {summary.overhead_seconds:.0f} s of it outside `dvc exp run` ({OUTSIDE_DVC_EXP_RUN[trained]})"
    )
