"""The search a user gets by default (`python -m pipeline.sweep -S ... --trials N`: TPE after its
covering start, Hyperband's pruner) against the exhaustive grid of the same space, on three spaces:
one of lists, one of ranges (`interval`, `tag(log, ...)`), one mixed; each search with several
sampler seeds. Every command runs in a fresh clone of this repository's HEAD, on the same part of
an IDX mirror, one after another, so the wall times compare.

The budget: for the list space, --trials equal to its grid's points, so that pruning, not luck,
decides; for a space with ranges, under half the points of a 27-point grid over the same ranges
(each range at its two bounds and its middle, on a log scale where the range is one).

For each search: the distinct points it trained, where its best (of the trials that trained every
epoch) ranks among the grid's trials, its gap to the grid's best, its trial-epochs and wall time
over the grid's, and its wall time over its winner's alone: `dvc exp run -S <the winner's params>`
in a fresh clone, every stage from scratch, as a user who knew the answer would have run it. The
part of the data is the params' own (`data.train_images`, `data.test_images`).

    python bench/search.py ../shared/data/fashion-mnist --train-images 3000 --test-images 500 \\
        --epochs 9 --seeds 3 --out bench/results/search-default-cpu-2core.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from clones import clone, experiment_refs, run  # the sibling module

from pipeline.history import OBJECTIVE

LEARNING_RATES = "tag(log, interval(0.0002, 0.01))"
SPACES = {  # name -> the search's -S, the grid's -S, the search's --trials
    "lists": (
        ["train.learning_rate=0.0005,0.002,0.008", "train.beta=1,4", "model.latent_dim=2,8"],
        ["train.learning_rate=0.0005,0.002,0.008", "train.beta=1,4", "model.latent_dim=2,8"],
        12,
    ),
    "ranges": (
        [f"train.learning_rate={LEARNING_RATES}", "train.beta=interval(0.5, 4)", "model.latent_dim=interval(2, 16)"],
        ["train.learning_rate=0.0002,0.0014142,0.01", "train.beta=0.5,2.25,4", "model.latent_dim=2,9,16"],
        13,
    ),
    "mixed": (
        [f"train.learning_rate={LEARNING_RATES}", "train.beta=1,2,4", "model.latent_dim=2,8,16"],
        ["train.learning_rate=0.0002,0.0014142,0.01", "train.beta=1,2,4", "model.latent_dim=2,8,16"],
        13,
    ),
}


def landed(project: Path, keys: list[str]) -> dict[str, dict]:
    """Each experiment's values of the searched `keys`, its epochs and its objective, from its commit."""
    trials = {}
    for name, ref in experiment_refs(project).items():
        params = yaml.safe_load(run(["git", "show", f"{ref}:params.yaml"], project))
        metrics = json.loads(run(["git", "show", f"{ref}:metrics/train.json"], project))
        config = []
        for key in keys:
            node = params
            for part in key.split("."):
                node = node[part]
            config.append(node)
        trials[name] = {"config": config, "epochs": metrics["epochs"], OBJECTIVE: metrics[OBJECTIVE]}
    return trials


def sweep(folder: Path, name: str, sets: list[str], options: list[str], settings: dict, epochs: int) -> dict:
    """`python -m pipeline.sweep` in a fresh clone: its trials, trial-epochs, wall time and best."""
    project = clone(folder / name, settings)
    command = [sys.executable, "-m", "pipeline.sweep", *(a for s in sets for a in ("-S", s)), *options, "-n", name]
    started = time.monotonic()
    said = run(command, project, ok=(0, 1))  # 1: a trial failed (a diverged loss), the others landed
    seconds = time.monotonic() - started
    trials = landed(project, [s.split("=", 1)[0] for s in sets])
    full = [t for t in trials.values() if t["epochs"] == epochs and not math.isnan(t[OBJECTIVE])]
    best = min(full, key=lambda t: t[OBJECTIVE])
    return {
        "command": " ".join(command[1:]),
        "trials": len(trials),
        "distinct_points": len({json.dumps(t["config"]) for t in trials.values()}),
        "failed": re.findall(r"^(\S+ failed: .*)$", said, re.MULTILINE),  # their epochs are not counted
        "trial_epochs": sum(t["epochs"] for t in trials.values()),
        "wall_seconds": round(seconds, 1),
        "best_objective": best[OBJECTIVE],
        "best_config": best["config"],
        "landed": trials,
    }


def alone(folder: Path, name: str, keys: list[str], config: list, settings: dict) -> float:
    """The seconds of `dvc exp run` of one configuration in a fresh clone: every stage, from scratch."""
    project = clone(folder / name, settings)
    sets = [a for key, value in zip(keys, config) for a in ("-S", f"{key}={value}")]
    started = time.monotonic()
    run(["dvc", "exp", "run", "--quiet", *sets], project)
    return round(time.monotonic() - started, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mirror", type=Path, help="a folder with the four IDX files (Fashion-MNIST's, say)")
    parser.add_argument("--dataset", default="fashion_mnist", choices=["mnist", "fashion_mnist"])
    parser.add_argument("--train-images", type=int, default=3000, help="the part of the training images used")
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=9, help="train.epochs: the grid's, and the search's most")
    parser.add_argument("--seeds", type=int, default=3, help="searches of each space, --sampler-seed 0, 1, ...")
    parser.add_argument("--spaces", nargs="+", default=list(SPACES), choices=list(SPACES))
    parser.add_argument("--pruner", help="the search's --pruner (default: none given, the search's default)")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()

    grids, runs = {}, []
    with tempfile.TemporaryDirectory(prefix="bench-search-") as folder:
        settings = {
            "data.dataset": args.dataset,
            "data.mirror": str(args.mirror.resolve()),
            "data.train_images": args.train_images,
            "data.test_images": args.test_images,
            "train.epochs": args.epochs,
            "evaluate.iw_samples": 1,
        }
        for space in args.spaces:
            searched, gridded, trials = SPACES[space]
            grid = sweep(Path(folder), f"grid-{space}", gridded, [], settings, args.epochs)
            grids[space] = grid
            print(f"{space} grid: {json.dumps({k: v for k, v in grid.items() if k != 'landed'})}", flush=True)
            ranked = sorted(t[OBJECTIVE] for t in grid["landed"].values() if not math.isnan(t[OBJECTIVE]))
            for seed in range(args.seeds):
                options = ["--trials", str(trials), "--sampler-seed", str(seed)]
                options += ["--pruner", args.pruner] if args.pruner else []
                found = sweep(Path(folder), f"search-{space}-{seed}", searched, options, settings, args.epochs)
                best = found["best_objective"]
                keys = [s.split("=", 1)[0] for s in searched]
                winner = alone(Path(folder), f"winner-{space}-{seed}", keys, found["best_config"], settings)
                result = {
                    "space": space,
                    "seed": seed,
                    "trials": found["trials"],
                    "distinct_points": found["distinct_points"],
                    "failed": found["failed"],
                    "best_config": found["best_config"],
                    "best_objective": best,
                    "rank": 1 + sum(objective < best for objective in ranked),
                    "grid_points": len(grid["landed"]),
                    "gap": round(best / grid["best_objective"] - 1, 5),
                    "trial_epochs": found["trial_epochs"],
                    "trial_epochs_ratio": round(found["trial_epochs"] / grid["trial_epochs"], 3),
                    "wall_seconds": found["wall_seconds"],
                    "wall_seconds_ratio": round(found["wall_seconds"] / grid["wall_seconds"], 3),
                    "winner_alone_seconds": winner,
                    "wall_over_winner_alone": round(found["wall_seconds"] / winner, 3),
                    "command": found["command"],
                    "landed": found["landed"],
                }
                runs.append(result)
                print(
                    f"{space} seed {seed}: {result['distinct_points']} distinct points of {result['trials']} trials, "
                    f"best {best:.4f} ({result['gap']:+.2%} to the grid's), rank {result['rank']} of "
                    f"{result['grid_points']}, {result['trial_epochs_ratio']:.2f}x the trial-epochs, "
                    f"{result['wall_seconds_ratio']:.2f}x the wall time, {result['wall_over_winner_alone']:.2f}x "
                    f"its winner's alone ({winner:.0f} s)",
                    flush=True,
                )
    within = sum(r["gap"] <= 0.01 for r in runs)
    found_best = sum(r["rank"] == 1 for r in runs)
    print(
        f"\n{within} of {len(runs)} searches within 1% of the grid's best, {found_best} at its best or better; "
        f"trial-epochs at most {max(r['trial_epochs_ratio'] for r in runs):.2f}x the grid's, wall time at most "
        f"{max(r['wall_seconds_ratio'] for r in runs):.2f}x the grid's and "
        f"{max(r['wall_over_winner_alone'] for r in runs):.2f}x its winner's alone"
    )
    if args.out:
        result = {
            "date": datetime.date.today().isoformat(),
            "machine": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "settings": {k: v for k, v in settings.items() if k != "data.mirror"},
            "train_images": args.train_images,
            "test_images": args.test_images,
            "pruner": args.pruner or "the default",
            "grids": {space: {k: v for k, v in grid.items()} for space, grid in grids.items()},
            "runs": runs,
            "within_1_percent": within,
            "at_the_grid_best": found_best,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
