"""Repeats over `seed`: the trials of one configuration, their results' mean and spread, logged on
the sweep's parent run (repeats.json) and printed under the trials' table."""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics

import mlflow

from pipeline.history import OBJECTIVE
from pipeline.sweep import grid
from pipeline.sweep.shared import Outcome, Sweep


@dataclasses.dataclass(frozen=True)
class Configuration:
    """Trials that differ only in `seed`: repeats of one configuration, and their results' spread."""

    values: dict[str, str]  # the swept params but the seed
    trials: list[str]
    finished: int
    mean: dict[str, float]  # OBJECTIVE and the test metrics, over the finished trials
    std: dict[str, float]  # their sample standard deviation (n - 1); NaN for fewer than two


def repeats(trials: list[grid.Trial], outcome: Outcome) -> list[Configuration]:
    """The grid's configurations when it repeats any over `seed` (none otherwise), in grid order.
    MLflow's UI groups runs by a param with their mean, min and max; this adds the spread (n - 1)
    and the finished count, per configuration of every swept param but the seed."""
    by_values: dict[tuple, list[str]] = collections.defaultdict(list)
    for trial in trials:
        by_values[tuple((k, v) for k, v in trial.values.items() if k != "seed")].append(trial.name)
    if all(len(names) == 1 for names in by_values.values()):
        return []
    configurations = []
    for values, names in by_values.items():
        results = [outcome.finished[name].metrics for name in names if name in outcome.finished]
        summarised = [m for m in (results[0] if results else {}) if m == OBJECTIVE or m.startswith("test_")]
        mean = {m: statistics.fmean(r[m] for r in results) for m in summarised}
        std = {m: statistics.stdev(r[m] for r in results) if len(results) > 1 else math.nan for m in summarised}
        configurations.append(Configuration(dict(values), names, len(results), mean, std))
    return configurations


def log_repeats_table(sweep: Sweep, configurations: list[Configuration]) -> None:
    """repeats.json on the parent run: a row per configuration, its values, counts, means and spreads."""
    keys = list(dict.fromkeys(key for c in configurations for key in c.values))
    metric_names = list(dict.fromkeys(name for c in configurations for name in c.mean))
    table: dict[str, list] = {
        column: []
        for column in [*keys, "trials", "finished", *(f"{m}_{s}" for m in metric_names for s in ("mean", "std"))]
    }
    for configuration in configurations:
        for key in keys:
            table[key].append(configuration.values.get(key))
        table["trials"].append(" ".join(configuration.trials))
        table["finished"].append(configuration.finished)
        for name in metric_names:
            table[f"{name}_mean"].append(configuration.mean.get(name))
            std = configuration.std.get(name)
            table[f"{name}_std"].append(None if std is None or math.isnan(std) else std)
    mlflow.log_table(table, artifact_file="repeats.json", run_id=sweep.parent_run_id)


def print_repeats(configurations: list[Configuration]) -> None:
    print(f"\n{'repeats':<8}{OBJECTIVE + ' mean':>16}{'std':>10}  configuration")
    for configuration in configurations:
        mean = configuration.mean.get(OBJECTIVE, math.nan)
        std = configuration.std.get(OBJECTIVE, math.nan)
        described = " ".join(f"{k}={v}" for k, v in configuration.values.items()) or "(the grid's one)"
        print(f"{configuration.finished:<8}{mean:>16.4f}{std:>10.4f}  {described}")
