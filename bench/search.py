"""A search with pruning against the exhaustive grid of the same space, both in one invocation,
each as `python -m pipeline.sweep` in a fresh clone of this repository's HEAD on the same part of
an IDX mirror: the trial-epochs of the trials that landed (a failed trial's are left out, and it
is listed), the wall time (every trial's clone, rungs, landing, evaluate and visualize counted),
the best objective (val_neg_elbo of a trial trained to every epoch) and where the search's best
ranks in the grid.

    python bench/search.py ../shared/data/fashion-mnist --train-images 6000 --test-images 1000
        --epochs 27 --trials 16 --out bench/results/search-cpu-2core-27-epochs.json
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
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
from pipeline.idx import FILES, read_idx, write_idx

SPACE = [  # 4 x 2 x 2 = 16 configurations
    "train.learning_rate=0.0003,0.001,0.003,0.01",
    "train.beta=1,4",
    "model.latent_dim=2,8",
]


def part_of(mirror: Path, dest: Path, train_images: int, test_images: int) -> Path:
    """The first `train_images` and `test_images` of each IDX file of `mirror`, as a mirror."""
    dest.mkdir()
    for key, name in FILES.items():
        count = train_images if key.startswith("train") else test_images
        packed = mirror / f"{name}.gz"
        with tempfile.NamedTemporaryFile() as plain:
            plain.write(gzip.decompress(packed.read_bytes()) if packed.exists() else (mirror / name).read_bytes())
            plain.flush()
            write_idx(dest / f"{name}.gz", read_idx(Path(plain.name), 3 if key.endswith("images") else 1)[:count])
    return dest


def landed(project: Path) -> dict[str, dict]:
    """Each experiment's searched params, epochs and objective, from its commit."""
    trials = {}
    for name, ref in experiment_refs(project).items():
        params = yaml.safe_load(run(["git", "show", f"{ref}:params.yaml"], project))
        metrics = json.loads(run(["git", "show", f"{ref}:metrics/train.json"], project))
        config = (params["train"]["learning_rate"], params["train"]["beta"], params["model"]["latent_dim"])
        trials[name] = {"config": config, "epochs": metrics["epochs"], OBJECTIVE: metrics[OBJECTIVE]}
    return trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mirror", type=Path, help="a folder with the four IDX files (Fashion-MNIST's, say)")
    parser.add_argument("-S", dest="space", action="append", help="the space, as the sweep takes it (default: SPACE)")
    parser.add_argument("--dataset", default="fashion_mnist", choices=["mnist", "fashion_mnist"])
    parser.add_argument("--train-images", type=int, default=12000, help="the part of the training images used")
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=9, help="train.epochs: the grid's, and the search's most")
    parser.add_argument("--trials", type=int, default=16, help="the search's budget")
    parser.add_argument("--sampler", default="grid", help="the search's sampler (default grid: each point once)")
    parser.add_argument("--min-epochs", type=int, default=1)
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--together", type=int, default=0, help="both ways: trials trained together (default 0)")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()

    space = args.space or SPACE
    sweep = [
        *(sys.executable, "-m", "pipeline.sweep", "--together", str(args.together)),
        *(a for s in space for a in ("-S", s)),
    ]
    search = [
        *("--trials", str(args.trials), "--sampler", args.sampler, "--sampler-seed", "0"),
        *("--min-epochs", str(args.min_epochs), "--reduction-factor", str(args.reduction_factor)),
    ]
    ways = {"grid": [*sweep, "--name", "grid"], "search": [*sweep, *search, "--name", "search"]}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-search-") as folder:
        mirror = part_of(args.mirror, Path(folder) / "mirror", args.train_images, args.test_images)
        settings = {
            "data.dataset": args.dataset,
            "data.mirror": str(mirror),
            "train.epochs": args.epochs,
            "evaluate.iw_samples": 1,
        }
        for way, command in ways.items():
            project = clone(Path(folder) / way, settings)
            started = time.monotonic()
            said = run(command, project, ok=(0, 1))  # 1: a trial failed (a diverged loss), the others landed
            seconds = time.monotonic() - started
            trials = landed(project)
            failed = re.findall(r"^(\S+) failed: (.*)$", said, re.MULTILINE)
            full = [t for t in trials.values() if t["epochs"] == args.epochs]
            best = min(full, key=lambda t: t[OBJECTIVE])
            results[way] = {
                "trials": len(trials),
                "failed": [f"{name}: {why}" for name, why in failed],  # their epochs are not in trial_epochs
                "trial_epochs": sum(t["epochs"] for t in trials.values()),
                "wall_seconds": round(seconds, 1),
                "best_objective": best[OBJECTIVE],
                "best_config": best["config"],
            }
            print(f"{way}: {json.dumps(results[way])}", flush=True)
            results[way]["landed"] = trials
    grid_order = sorted(results["grid"]["landed"].values(), key=lambda t: t[OBJECTIVE])
    rank = 1 + [t["config"] for t in grid_order].index(results["search"]["best_config"])
    gap = results["search"]["best_objective"] / results["grid"]["best_objective"] - 1
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "space": space,
        "settings": {k: v for k, v in settings.items() if k != "data.mirror"},
        "train_images": args.train_images,
        "search_options": search,
        "together": args.together,
        "grid": results["grid"],
        "search": results["search"],
        "rank_of_search_best": rank,
        "search_best_over_grid_best": round(gap, 5),
        "trial_epochs_ratio": round(results["search"]["trial_epochs"] / results["grid"]["trial_epochs"], 3),
        "wall_seconds_ratio": round(results["search"]["wall_seconds"] / results["grid"]["wall_seconds"], 3),
    }
    print(
        f"grid: {results['grid']['trial_epochs']} trial-epochs, {results['grid']['wall_seconds']:.0f} s, best "
        f"{results['grid']['best_objective']:.4f}; search: {results['search']['trial_epochs']} trial-epochs "
        f"({result['trial_epochs_ratio']:.2f}x), {results['search']['wall_seconds']:.0f} s "
        f"({result['wall_seconds_ratio']:.2f}x), best {results['search']['best_objective']:.4f} "
        f"({gap:+.2%}), rank {rank} of {len(grid_order)} in the grid"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
