"""Wall-clock seconds of a sweep's trials three ways, each in a fresh clone of this repository's
HEAD on the same IDX mirror: one after another as `dvc exp run`s, as a plain sweep (`python -m
pipeline.sweep`: a Ray task per trial, as many at once as the cores hold), and trained together
(`--together N`); and whether each trial's `models/model.pt` is the same bytes each way (the md5
DVC records for it).

Every way pays what a user pays: the stages' processes, imports, MLflow runs, the model logged, the
evaluation and the figures. The data are downloaded and split before any clock starts.

    python bench/sweep_together.py ../shared/data/fashion-mnist --dataset fashion_mnist \
        -S train.learning_rate=0.001,0.0005 -S seed=1,2 --set train.epochs=1 evaluate.iw_samples=1
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from clones import clone, experiment_refs, run  # the sibling module

from pipeline.sweep import grid


def model_md5s(project: Path) -> dict[str, str]:
    """Experiment name -> the md5 its dvc.lock records for models/model.pt."""
    md5s = {}
    for name, ref in experiment_refs(project).items():
        lock = yaml.safe_load(run(["git", "show", f"{ref}:dvc.lock"], project))
        [out] = [o for o in lock["stages"]["train"]["outs"] if o["path"] == "models/model.pt"]
        md5s[name] = out["md5"]
    return md5s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mirror", type=Path, help="a folder with the four IDX files")
    parser.add_argument("--dataset", default="fashion_mnist", choices=["mnist", "fashion_mnist"])
    parser.add_argument("-S", dest="sets", action="append", required=True, help="the grid, as the sweep takes it")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="params every trial shares")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()
    settings = {key: yaml.safe_load(value) for key, value in (s.split("=", 1) for s in args.set)}
    settings |= {"data.dataset": args.dataset, "data.mirror": str(args.mirror.resolve())}
    trials = grid.expand(args.sets, "bench")

    sweep = [sys.executable, "-m", "pipeline.sweep", *(a for s in args.sets for a in ("-S", s)), "--name", "bench"]
    ways = {
        "alone": [
            ["dvc", "exp", "run", "--name", trial.name, *(a for o in trial.overrides for a in ("-S", o))]
            for trial in trials
        ],
        "sweep": [sweep],
        "together": [[*sweep, "--together", str(len(trials))]],
    }
    seconds, md5s = {}, {}
    with tempfile.TemporaryDirectory(prefix="sweep-together-") as folder:
        for way, commands in ways.items():
            project = clone(Path(folder) / way, settings)
            started = time.monotonic()
            for command in commands:
                run(command, project)
            seconds[way] = time.monotonic() - started
            md5s[way] = model_md5s(project)
            print(f"{way}: {seconds[way]:.1f} s", flush=True)
    same = {way: md5s[way] == md5s["alone"] and len(md5s[way]) == len(trials) for way in ("sweep", "together")}

    result = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "grid": args.sets,
        "settings": settings,
        "trials": len(trials),
        **{f"{way}_seconds": round(value, 1) for way, value in seconds.items()},
        "together_over_alone": round(seconds["together"] / seconds["alone"], 3),
        "together_over_sweep": round(seconds["together"] / seconds["sweep"], 3),
        "same_model_bytes_as_alone": same,
    }
    print(
        f"{len(trials)} trials one after another: {seconds['alone']:.1f} s; as a sweep: {seconds['sweep']:.1f} s; "
        f"together: {seconds['together']:.1f} s ({result['together_over_alone']:.2f}x alone, "
        f"{result['together_over_sweep']:.2f}x the sweep); the same model bytes as alone: {same}"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
