"""Which paused trial goes on: ASHA's promotion rule (Li et al., "A System for Massively Parallel
Hyperparameter Tuning", MLSys 2020), applied to trials that Optuna's pruner stopped.

A pruned trial here is paused, not lost: it landed as the exact experiment of the epochs it
reached, and more epochs continue it bit for bit. ASHA promotes a trial from rung k once it is among
the top ⌊n/η⌋ of the n trials that reached rung k; as later trials reach the rung, a slow starter
that was pruned when few had can become one of them. The search asks this before it asks for a new
trial, so a promotion comes first, as in ASHA's `get_job`.

    >>> from pipeline.sweep.promotion import Reached, promotable
    >>> rung_1 = [Reached("a", 1, 30.0, paused=False), Reached("b", 1, 31.0, paused=True)]
    >>> promotable(rung_1, rungs=(1, 3), reduction_factor=3) is None  # 2 trials: the top 0 go on
    True
    >>> rung_1 += [Reached(name, 1, 40.0, paused=True) for name in "cdef"]
    >>> promotable(rung_1, rungs=(1, 3), reduction_factor=3).name  # 6 trials: the top 2, a and b
    'b'
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Reached:
    """A trial's objective at a rung it reached, and whether it is paused there."""

    name: str
    epochs: int
    objective: float
    paused: bool


def promotable(reached: list[Reached], rungs: tuple[int, ...], reduction_factor: int) -> Reached | None:
    """The paused trial to promote, from the highest rung that has one: the best of those among
    the top ⌊n/η⌋ of the n trials at their rung; None where no paused trial is."""
    for rung in sorted(rungs, reverse=True):
        at_rung = sorted((r for r in reached if r.epochs == rung), key=lambda r: r.objective)
        top = at_rung[: len(at_rung) // reduction_factor]
        paused = [r for r in top if r.paused]
        if paused:
            return paused[0]
    return None
