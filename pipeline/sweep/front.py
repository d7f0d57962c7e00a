"""The rate-distortion front of a two-objective search (`--objectives rate,distortion`). A VAE is a
point of that plane (Alemi et al., "Fixing a Broken ELBO", ICML 2018): its rate is the KL, its
distortion the reconstruction error, both on the validation images. The front is the trials that
no other trial beats on both; a pruned trial trained less, so it is drawn but never on the front.

On the sweep's parent run: search/front.json (the front, lowest rate first) and
search/rate_distortion.png (every trial, the front joined and labelled); on screen, the front."""

from __future__ import annotations

import dataclasses

import mlflow
from matplotlib.figure import Figure

from pipeline.sweep.shared import Sweep

RATE, DISTORTION = "val_kl", "val_reconstruction"  # search_options.OBJECTIVE_METRICS's rate and distortion
FRONT_TAG = "front_trials"  # on the parent run: the front's trials, lowest rate first


@dataclasses.dataclass(frozen=True)
class Point:
    trial: str  # its experiment's name
    rate: float
    distortion: float
    params: dict  # the searched params' values, by params.yaml key
    pruned: bool

    def dominates(self, other: Point) -> bool:
        """No worse on both, better on one."""
        return (
            self.rate <= other.rate
            and self.distortion <= other.distortion
            and (self.rate < other.rate or self.distortion < other.distortion)
        )

    def label(self) -> str:
        """The trial's name and its searched params, short: `lr-3 (beta=4, latent_dim=8)`."""
        values = ", ".join(f"{key.rsplit('.', 1)[-1]}={_short(value)}" for key, value in self.params.items())
        return f"{self.trial} ({values})" if values else self.trial


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def pareto_front(points: list[Point]) -> list[Point]:
    """The points of trials that trained every epoch that no other such point dominates, lowest
    rate first (two trials on one spot are both on it)."""
    full = [point for point in points if not point.pruned]
    front = [point for point in full if not any(other.dominates(point) for other in full)]
    return sorted(front, key=lambda point: (point.rate, point.distortion))


def log_front(client: mlflow.MlflowClient, sweep: Sweep, points: list[Point], distortion_units: str) -> list[Point]:
    """The front on the parent run, as a table, a figure and a tag; returns it."""
    front = pareto_front(points)
    keys = list(dict.fromkeys(key for point in points for key in point.params))
    table = {"trial": [p.trial for p in front], "rate": [p.rate for p in front]}
    table |= {"distortion": [p.distortion for p in front]} | {k: [p.params.get(k) for p in front] for k in keys}
    mlflow.log_table(table, artifact_file="search/front.json", run_id=sweep.parent_run_id)
    client.log_figure(sweep.parent_run_id, figure(points, front, distortion_units), "search/rate_distortion.png")
    client.set_tag(sweep.parent_run_id, FRONT_TAG, " ".join(point.trial for point in front))
    return front


def figure(points: list[Point], front: list[Point], distortion_units: str) -> Figure:
    """Every trial a point of the rate-distortion plane, pruned ones marked, the front joined, each
    of its points labelled with its trial and searched params."""
    fig = Figure(figsize=(8, 6), layout="constrained")
    axes = fig.add_subplot()
    off = [point for point in points if not point.pruned and point not in front]
    pruned = [point for point in points if point.pruned]
    axes.scatter([p.rate for p in off], [p.distortion for p in off], color="tab:blue", label="off the front")
    if pruned:
        axes.scatter([p.rate for p in pruned], [p.distortion for p in pruned], marker="x", color="grey", label="pruned")
    axes.plot([p.rate for p in front], [p.distortion for p in front], "o-", color="tab:red", label="front", zorder=3)
    middle = (min(p.rate for p in points) + max(p.rate for p in points)) / 2
    for point in front:  # labels toward the middle, so none runs off the plot
        right = point.rate <= middle
        axes.annotate(
            point.label(),
            (point.rate, point.distortion),
            xytext=(6 if right else -6, 4),
            textcoords="offset points",
            ha="left" if right else "right",
            fontsize=7,
        )
    axes.set_xlabel("rate: validation KL per image (nats)")
    axes.set_ylabel(f"distortion: validation reconstruction per image ({distortion_units})")
    axes.set_title(f"Rate and distortion of {len(points)} trials; the front: {len(front)}")
    axes.legend()
    axes.grid(alpha=0.3)
    return fig


def print_front(front: list[Point]) -> None:
    """The front, lowest rate first, below the trials' table."""
    print(f"\nthe rate-distortion front, lowest rate first ({len(front)} trial{'s' if len(front) != 1 else ''}):")
    print(f"{'trial':<16}{'rate':>10}{'distortion':>12}  params")
    for point in front:
        params = " ".join(f"{key}={_short(value)}" for key, value in point.params.items())
        print(f"{point.trial:<16}{point.rate:>10.4f}{point.distortion:>12.4f}  {params}")
