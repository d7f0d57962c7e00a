"""A search's options (`--trials`, `--sampler`, `--pruner`, ...): what they are, what they refuse,
the rungs they make, and how they are said."""

from __future__ import annotations

import dataclasses
import re

from pipeline.errors import PipelineError
from pipeline.history import OBJECTIVE
from pipeline.sweep.space import Space

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("asha", "hyperband", "none")
TPE_START_TRIALS = 10  # Optuna's TPE default start; a smaller budget gets a third of itself
# What a search minimises, by the names --objectives takes, and the metric of each: the negative
# ELBO alone, or a VAE's two, its rate and distortion (Alemi et al., "Fixing a Broken ELBO", 2018):
# the KL and the reconstruction, on the validation images, of the trial's last epoch.
OBJECTIVE_METRICS = {OBJECTIVE: OBJECTIVE, "rate": "val_kl", "distortion": "val_reconstruction"}
RATE_DISTORTION = ("rate", "distortion")


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    trials: int  # the budget: trials that trained, finished, were pruned or failed on their own
    sampler: str
    seed: int
    pruner: str  # one of PRUNERS
    min_epochs: int  # the first rung
    reduction_factor: int  # each rung is this many times the last; 1/this of a rung's trials go on
    objectives: tuple[str, ...] = (OBJECTIVE,)  # keys of OBJECTIVE_METRICS

    @property
    def prune(self) -> bool:
        return self.pruner != "none"

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metric of each objective, as a trial's metrics name it."""
        return tuple(OBJECTIVE_METRICS[objective] for objective in self.objectives)

    def start_trials(self) -> int:
        """TPE's start: Optuna's 10 trials, or a third of a smaller budget, so most of it is modelled."""
        return min(TPE_START_TRIALS, max(1, self.trials // 3)) if self.sampler == "tpe" else 0

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
        """What a search of one name must keep to go on (not its budget: more trials may be asked).
        The objectives only where not the default, as a study started before they could be chosen."""
        described = {k: v for k, v in dataclasses.asdict(self).items() if k != "trials"}
        if self.objectives == (OBJECTIVE,):
            del described["objectives"]
        else:
            described["objectives"] = list(self.objectives)
        return described


def options_from(args) -> SearchOptions:
    """The search's options as `python -m pipeline.sweep` takes them. The pruner's default is
    Hyperband with one objective, and none with two (check_options says why)."""
    objectives = tuple(name.strip() for name in args.objectives.split(","))
    pruner = args.pruner or ("hyperband" if len(objectives) == 1 else "none")
    return SearchOptions(
        args.trials, args.sampler, args.sampler_seed, pruner, args.min_epochs, args.reduction_factor, objectives
    )


def check_options(options: SearchOptions) -> None:
    """What the options alone can refuse."""
    if options.trials < 1:
        raise PipelineError(f"--trials must be 1 or more (a search of that many trials), got {options.trials}")
    if options.sampler not in SAMPLERS:
        raise PipelineError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {options.sampler}")
    if options.pruner not in PRUNERS:
        raise PipelineError(f"--pruner must be one of {', '.join(PRUNERS)}, got {options.pruner}")
    if options.objectives not in ((OBJECTIVE,), RATE_DISTORTION, RATE_DISTORTION[::-1]):
        raise PipelineError(
            f"--objectives takes {OBJECTIVE} (the default) or rate,distortion, got {','.join(options.objectives)}"
        )
    if len(options.objectives) > 1 and options.prune:
        raise PipelineError(
            f"--pruner {options.pruner} ranks a rung's trials by one number, and --objectives rate,distortion has "
            "two: a trial behind at a rung can end on the front. Leave --pruner out (none with two objectives)"
        )
    if options.prune and options.reduction_factor < 2:
        raise PipelineError(f"--reduction-factor must be 2 or more, got {options.reduction_factor}")


DURATION = re.compile(r"(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s?)?")


def timeout_seconds(timeout: str | None) -> float | None:
    """--timeout in seconds: `90`, `90s`, `30m`, `2h`, `1h30m` (None: no budget)."""
    if timeout is None:
        return None
    matched = DURATION.fullmatch(timeout.strip())  # an empty text matches, as 0 s
    seconds = sum(float(matched[u] or 0) * scale for u, scale in (("h", 3600), ("m", 60), ("s", 1))) if matched else 0
    if seconds <= 0:
        raise PipelineError(f"--timeout takes a duration above 0, such as 90s, 30m, 2h or 1h30m, got '{timeout}'")
    return seconds


def check_against_space(options: SearchOptions, space: Space, epochs: int) -> None:
    """What the options and the space (and its train.epochs) refuse together."""
    if options.prune and not 1 <= options.min_epochs <= epochs:
        raise PipelineError(
            f"--min-epochs {options.min_epochs}, the first rung, must be from 1 to train.epochs ({epochs}): "
            "lower it, or raise train.epochs"
        )


def describe_sampling(options: SearchOptions, start: int) -> str:
    """How the search proposes, in words, and what its budget leaves to the model."""
    if options.sampler == "random":
        return "random sampling"
    if options.sampler == "grid":
        return "each point of the grid once, in a seeded order"
    if options.trials <= start:
        return f"random sampling: --trials {options.trials} is within TPE's start of {start} (a Latin hypercube)"
    return f"TPE, after a start that covers the space (a Latin hypercube of {start} trial{'s' if start > 1 else ''})"
