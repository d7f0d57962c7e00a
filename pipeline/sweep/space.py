"""A search's space, in the `-S` syntax DVC takes from Hydra: a list or `choice(...)` is a choice,
`range(start, stop[, step])` the numbers Hydra's range gives, `interval(low, high)` every number
between, `tag(log, interval(...))` the same on a log scale; one value sets a key for every trial.
Each dimension becomes an Optuna distribution, checked against params.yaml before any trial."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import optuna
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from pipeline.errors import PipelineError
from pipeline.provenance import yaml_value
from pipeline.sweep import grid

# Params a search may not vary: the pruner spends train.epochs, and the objective is in the units
# of train.reconstruction's decoder, so trials of two decoders do not compare.
FIXED_IN_A_SEARCH = {
    "train.epochs": "it is the budget each trial trains to, and the pruner stops trials short of it",
    "train.reconstruction": "the objective, val_neg_elbo, is in the units of each decoder (squared error "
    "against cross-entropy), so trials of two decoders do not compare: search each decoder on its own",
}


@dataclasses.dataclass(frozen=True)
class Space:
    """The searched dimensions, by params.yaml key, and the overrides every trial shares."""

    dimensions: dict[str, BaseDistribution]
    fixed: tuple[str, ...]

    def overrides(self, values: dict) -> tuple[str, ...]:
        """A proposed point as `-S` overrides: the shared ones, then the searched keys' values."""
        return (*self.fixed, *(f"{key}={yaml_value(values[key])}" for key in self.dimensions))

    def has_ranges(self) -> bool:
        return any(not isinstance(d, CategoricalDistribution) for d in self.dimensions.values())

    def grid(self) -> dict[str, list]:
        """Every dimension's values, for Optuna's GridSampler (choices only)."""
        return {key: list(d.choices) for key, d in self.dimensions.items()}

    def size(self) -> float:
        """How many points the space has: inf where a dimension is a continuous interval."""
        return math.prod(_count(d) for d in self.dimensions.values())

    def point(self, params: dict) -> tuple:
        """A proposal's values in dimension order: equal for the same point of the space."""
        return tuple(params[key] for key in self.dimensions)

    def latin_hypercube(self, count: int, rng: np.random.Generator) -> list[dict]:
        """`count` points that cover the space: each dimension cut into `count` equal strata (its
        choices dealt out in turn), one point in each, the strata of each dimension shuffled apart
        (McKay, Beckman and Conover, 1979). A finite space's points are all different where it has
        as many."""
        columns = {key: _strata(d, count, rng) for key, d in self.dimensions.items()}
        points = [{key: column[i] for key, column in columns.items()} for i in range(count)]
        if self.size() < math.inf:  # a repeat where the strata coincide: an unused point in its place
            seen: set[tuple] = set()
            for i, values in enumerate(points):
                while self.point(values) in seen and len(seen) < self.size():
                    values = self.random_point(rng)
                points[i] = values
                seen.add(self.point(values))
        return points

    def random_point(self, rng: np.random.Generator) -> dict:
        """A point drawn uniformly from each dimension (on a log scale where it is one)."""
        return {key: _value_at(d, rng.random()) for key, d in self.dimensions.items()}

    def describe(self) -> str:
        """One line, stable across runs: what a search of this name was started with."""
        return json.dumps(
            {"space": {k: optuna.distributions.distribution_to_json(d) for k, d in self.dimensions.items()}}
            | {"fixed": list(self.fixed)},
            sort_keys=True,
        )


def parse(sets: list[str], params_text: str) -> Space:
    """The `-S` overrides as a space, each dimension refused in one line if params.yaml would refuse
    one of its values or if it cannot be searched."""
    defaults = yaml.safe_load(params_text)
    parser = OverridesParser.create()
    dimensions: dict[str, BaseDistribution] = {}
    texts: dict[str, str] = {}
    fixed: list[str] = []
    for text in sets:
        try:
            override = parser.parse_override(text)
        except Exception as exc:  # Hydra's parser errors name the bad override
            raise PipelineError(f"-S '{text}' is not valid -S syntax: {str(exc).splitlines()[0]}") from None
        key = override.key_or_group
        if not override.is_sweep_override():
            fixed.append(text)
            continue
        if key in FIXED_IN_A_SEARCH:
            raise PipelineError(f"-S '{text}': a search cannot vary {key}: {FIXED_IN_A_SEARCH[key]}")
        dimensions[key] = _distribution(text, key, override.value(), _default(defaults, key))
        texts[key] = text
    if not dimensions:
        raise PipelineError(
            "nothing to search: give at least one -S with a list, a range or an interval, "
            "e.g. -S 'train.learning_rate=tag(log, interval(0.0001, 0.01))'"
        )
    space = Space(dimensions, tuple(fixed))
    _check_values(space, texts, params_text)
    return space


def _default(defaults: dict, key: str):
    node = defaults
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None  # an unknown key: the check of its values names it, and the key meant
        node = node[part]
    return node


def _distribution(text: str, key: str, sweep, default) -> BaseDistribution:
    if isinstance(sweep, ChoiceSweep):
        return CategoricalDistribution(sweep.list)
    number = isinstance(default, (int, float)) and not isinstance(default, bool)
    if not number:
        raise PipelineError(
            f"-S '{text}': {key} is not a number ({yaml_value(default)} in params.yaml), so it has no range: "
            f"list its values instead, -S '{key}=a,b'"
        )
    whole = isinstance(default, int)
    if isinstance(sweep, RangeSweep):
        values = list(grid_range(sweep))
        if not values:
            raise PipelineError(f"-S '{text}': an empty range, it gives no value (stop must be past start)")
        if whole and any(value != int(value) for value in values):
            raise PipelineError(f"-S '{text}': {key} takes whole numbers, and this range gives fractions")
        kind = IntDistribution if whole else FloatDistribution
        low, high, step = values[0], values[-1], sweep.step
        return kind(int(low), int(high), step=int(step)) if whole else kind(low, high, step=step)
    if not isinstance(sweep, IntervalSweep):
        raise PipelineError(f"-S '{text}': a search takes a list, choice(), range() or interval() here")
    log = "log" in sweep.tags
    low, high = sweep.start, sweep.end
    if not low < high:
        raise PipelineError(f"-S '{text}': an empty range: its low bound ({low:g}) must be below its high ({high:g})")
    if log and low <= 0:
        raise PipelineError(f"-S '{text}': a log range needs bounds above 0, got {low:g}")
    if whole:
        if low != int(low) or high != int(high):
            raise PipelineError(f"-S '{text}': {key} takes whole numbers: give whole bounds")
        return IntDistribution(int(low), int(high), log=log)
    return FloatDistribution(float(low), float(high), log=log)


def grid_range(sweep: RangeSweep) -> list[float]:
    """The values Hydra's `range(start, stop, step)` gives: stop excluded."""
    values, value = [], sweep.start
    while (value < sweep.stop) if sweep.step > 0 else (value > sweep.stop):
        values.append(value)
        value = round(value + sweep.step, 12)
    return values


def _check_values(space: Space, texts: dict[str, str], params_text: str) -> None:
    """Each choice, and each range's bounds, as params.yaml checks a trial's params."""
    for key, distribution in space.dimensions.items():
        if isinstance(distribution, CategoricalDistribution):
            values = distribution.choices
        else:
            values = (distribution.low, distribution.high)
        for value in values:
            probe = grid.Trial("", (*space.fixed, f"{key}={yaml_value(value)}"))
            try:
                grid.check([probe], params_text)
            except PipelineError as exc:
                reason = str(exc).split("): ", 1)[-1]  # grid.check's own words, less its trial
                raise PipelineError(f"-S '{texts[key]}': at {key}={yaml_value(value)}, {reason}") from None


def _count(distribution: BaseDistribution) -> float:
    """How many values a dimension has (inf for a continuous interval)."""
    if isinstance(distribution, CategoricalDistribution):
        return len(distribution.choices)
    if distribution.step is None:  # a float interval without a step (an integer's is 1 at least)
        return math.inf
    return int(round((distribution.high - distribution.low) / distribution.step)) + 1


def _strata(distribution: BaseDistribution, count: int, rng: np.random.Generator) -> list:
    """A dimension's `count` values of a Latin hypercube, in shuffled order."""
    if isinstance(distribution, CategoricalDistribution):
        choices = list(distribution.choices)
        start = int(rng.integers(len(choices)))  # which choices a count short of a multiple leaves out
        dealt = [choices[(start + i) % len(choices)] for i in range(count)]
        return [dealt[i] for i in rng.permutation(count)]
    return [_value_at(distribution, (i + rng.random()) / count) for i in rng.permutation(count)]


def _value_at(distribution: BaseDistribution, u: float):
    """The value at quantile `u` of a dimension: uniform between its bounds, or on a log scale,
    rounded to its step (a whole number for an integer param)."""
    if isinstance(distribution, CategoricalDistribution):
        return distribution.choices[min(int(u * len(distribution.choices)), len(distribution.choices) - 1)]
    low, high = distribution.low, distribution.high
    if distribution.log:
        value = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    else:
        value = low + u * (high - low)
    step = distribution.step
    if step is not None:
        value = low + round((value - low) / step) * step
        value = round(min(max(value, low), high), 12)
    return int(value) if isinstance(distribution, IntDistribution) else float(value)
