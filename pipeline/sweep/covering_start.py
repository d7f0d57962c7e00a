"""A sampler whose first trials cover the space, then hand over to a model-based sampler.

TPE's own start draws its first trials at random, and on a space of lists a random draw repeats:
on a 12-point space, 8 draws covered 5 points. This start is a Latin hypercube (McKay, Beckman and
Conover, 1979): each dimension cut into as many strata as the start has trials, one trial in each,
so every value of a list comes up as evenly as the start's size allows, and a finite space's points
are all different. Then the model (TPE) proposes from the results.

    >>> import optuna
    >>> from pipeline.sweep.covering_start import CoveringStart
    >>> from pipeline.sweep.space import Space
    >>> space = Space({"x": optuna.distributions.CategoricalDistribution([1, 2, 3, 4])}, ())
    >>> sampler = CoveringStart(space, 4, optuna.samplers.TPESampler(n_startup_trials=4, seed=0), seed=0)
    >>> study = optuna.create_study(sampler=sampler)
    >>> sorted(study.ask(dict(space.dimensions)).params["x"] for _ in range(4))
    [1, 2, 3, 4]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from pipeline.sweep.space import Space

# A study trial with this user attribute continues another's training: it takes no point of the start.
CONTINUES_ATTR = "continues"


class CoveringStart(BaseSampler):
    """The first `count` trials of the study from a seeded Latin hypercube of `space`; every later
    trial, and every call the start does not answer, from `model`."""

    def __init__(self, space: Space, count: int, model: BaseSampler, seed: int):
        self.space, self.count, self.model = space, count, model
        self.design = space.latin_hypercube(count, np.random.default_rng(seed)) if count else []

    def _start_index(self, study: optuna.Study, trial: FrozenTrial) -> int | None:
        """This trial's point of the start, by how many trials before it took one; None past it."""
        index = sum(
            1
            for earlier in study.get_trials(deepcopy=False)
            if earlier.number < trial.number and CONTINUES_ATTR not in earlier.user_attrs
        )
        return index if index < self.count else None

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if self._start_index(study, trial) is not None:
            return dict(self.space.dimensions)
        return self.model.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        index = self._start_index(study, trial)
        if index is not None:
            return {key: value for key, value in self.design[index].items() if key in search_space}
        return self.model.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self.model.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.model.before_trial(study, trial)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: list[float] | None
    ) -> None:
        self.model.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.model.reseed_rng()
