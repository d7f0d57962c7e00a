"""Where a run and a search's trial spend their time besides their epochs, on a small part of an
IDX mirror, beside the import floor (`python -c "import torch, mlflow, torchvision"`): each
stage's time beyond its work, `dvc exp run` of every stage, a run continued by hand by one epoch,
and a search's trials and rungs. Every command runs as a user runs it, in a fresh clone of this
repository's HEAD; each is timed --repeats times, in turn with the others, and its median kept.

A stage's work is what the progress file says it spent in its loops: train's epochs (each "epoch"
event's seconds: the training pass, the validation, the epoch's report) and the other stages'
loops (their "done" events). The rest of a command's wall time is its fixed cost: interpreters,
imports, DVC, MLflow's connections and round trips, the logged model, the exits.

    python bench/overhead.py ../shared/data/fashion-mnist --out bench/results/overhead-cpu-2core.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import torch
from clones import ENV, clone, part_of, run  # the sibling module

from pipeline.progress import PROGRESS_FILE_VARIABLE

FLOOR = [sys.executable, "-c", "import torch, mlflow, torchvision"]
STAGES = ("check", "train", "evaluate", "visualize")  # what `dvc exp run` runs after a param edit
SEARCH = ["-S", "train.learning_rate=0.0005,0.001,0.002,0.004", "--trials", "4", "--max-concurrent", "1"]
SEARCH_EPOCHS = 3  # rungs at 1 and 3 epochs (--min-epochs 1, --reduction-factor 3)
GOALS = {  # the goals: a command's wall time over the floor, or seconds beyond its epochs
    "exp_run_over_floor": 3.75,
    "rung_seconds_beyond_epochs": 1.0,
    "trial_seconds_beyond_epochs_and_landing": 3.0,
}


def timed(args: list[str], cwd: Path) -> tuple[float, float, float | None]:
    """The command's wall seconds, its work's (the loops its progress file records), and the
    seconds to its first stage's start (a stage records it once its imports are done)."""
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as events:
        started, clock = time.perf_counter(), time.time()
        done = subprocess.run(args, cwd=cwd, env=ENV | {PROGRESS_FILE_VARIABLE: events.name}, capture_output=True)
        seconds = time.perf_counter() - started
        if done.returncode:
            sys.exit(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout.decode()}\n{done.stderr.decode()}")
        recorded = [json.loads(line) for line in Path(events.name).read_text().splitlines()]
    work = sum(
        e["seconds"]
        for e in recorded
        if e["event"] == "epoch" or (e["event"] == "done" and e["stage"] != "train")  # train's "done": in its epoch
    )
    starts = [e["time"] for e in recorded if e["event"] == "start"]
    return seconds, work, starts[0] - clock if starts else None


def summary(samples: list[tuple[float, float, float | None]], floor: float) -> dict:
    """Medians of wall, work, what is beyond the work and, of that, the time to the first stage's
    start, and the wall over the floor."""
    wall = statistics.median(s for s, _, _ in samples)
    work = statistics.median(w for _, w, _ in samples)
    beyond = statistics.median(s - w for s, w, _ in samples)
    to_start = statistics.median(t for _, _, t in samples) if samples[0][2] is not None else None
    return {
        "wall": round(wall, 2),
        "work": round(work, 2),
        "beyond_work": round(beyond, 2),
        "to_first_start": None if to_start is None else round(to_start, 2),
        "over_floor": round(wall / floor, 2),
    }


def searched_trials(project: Path, name: str) -> list[dict]:
    """Each trial of sweep `name`: its seconds (clone to push), of which `dvc exp run`, its epochs,
    their seconds (each epoch's `epoch_seconds`, in whichever of the trial's runs trained it), and
    the seconds between two epochs beyond the second's own (from when each epoch's metrics were
    logged, within one run): at a rung, where the trial stops for the study's answer, and elsewhere."""
    client = mlflow.MlflowClient(f"sqlite:///{project}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("vae-pipeline").experiment_id
    (parent,) = client.search_runs([experiment], f"attributes.run_name = '{name}'")
    rungs = [int(epochs) for epochs in parent.data.params["sweep.rungs"].split()][:-1]
    with tempfile.TemporaryDirectory() as folder:
        table = json.loads(Path(client.download_artifacts(parent.info.run_id, "trials.json", folder)).read_text())
    trials = []
    for row in (dict(zip(table["columns"], row)) for row in table["data"]):
        epoch_seconds, at_rungs, elsewhere = 0.0, [], []
        for trial_run in client.search_runs([experiment], f"attributes.run_name = '{row['trial']}'"):
            ends = {
                m.step: (m.timestamp / 1000, m.value)
                for m in client.get_metric_history(trial_run.info.run_id, "epoch_seconds")
            }
            epoch_seconds += sum(seconds for _, seconds in ends.values())
            for epoch in sorted(ends):
                if epoch + 1 in ends:
                    between = ends[epoch + 1][0] - ends[epoch][0] - ends[epoch + 1][1]
                    (at_rungs if epoch in rungs else elsewhere).append(round(between, 3))
        trials.append(
            {
                "trial": row["trial"],
                "epochs": row["epochs"],
                "seconds": row["seconds"],
                "run_seconds": row["run_seconds"],
                "epoch_seconds": round(epoch_seconds, 2),
                "between_epochs_at_a_rung": at_rungs,
                "between_epochs_elsewhere": elsewhere,
            }
        )
    return trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mirror", type=Path, help="a folder with the four IDX files (Fashion-MNIST's, say)")
    parser.add_argument("--dataset", default="fashion_mnist", choices=["mnist", "fashion_mnist"])
    parser.add_argument("--train-images", type=int, default=1000, help="the part of the training images used")
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()

    samples: dict[str, list[tuple[float, float, float | None]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as folder:
        mirror = part_of(args.mirror, Path(folder) / "mirror", args.train_images, args.test_images)
        settings = {"data.dataset": args.dataset, "data.mirror": str(mirror), "train.epochs": 1}
        project = clone(Path(folder) / "project", settings)
        run(["dvc", "repro", "--quiet"], project)  # every output there, and the MLflow store made
        for repeat in range(args.repeats):
            samples.setdefault("floor", []).append(timed(FLOOR, project))
            for stage in STAGES:
                samples.setdefault(stage, []).append(timed([sys.executable, "-m", f"pipeline.{stage}"], project))
            learning_rate = f"train.learning_rate={0.0005 + 0.0001 * (repeat + 1):g}"  # a param edit: all reruns
            samples.setdefault("exp_run", []).append(
                timed(["dvc", "exp", "run", "-S", learning_rate, "-S", "train.epochs=1"], project)
            )
            # A run continued by hand: one more epoch (a user's short `dvc exp run` after a param edit).
            samples.setdefault("continue", []).append(
                timed(["dvc", "exp", "run", "-S", learning_rate, "-S", "train.epochs=2", "train"], project)
            )
            print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f} s" for k, v in samples.items()), flush=True)
        run(["git", "reset", "--quiet", "--hard"], project)  # the sweep runs a commit: the params edits go
        search = [sys.executable, "-m", "pipeline.sweep", *SEARCH, "-S", f"train.epochs={SEARCH_EPOCHS}", "-n", "ovh"]
        started = time.perf_counter()
        run(search, project)
        search_seconds = time.perf_counter() - started
        trials = searched_trials(project, "ovh")

    floor = statistics.median(s for s, _, _ in samples["floor"])
    result = {stage: summary(samples[stage], floor) for stage in (*STAGES, "exp_run", "continue")}
    landing = result["exp_run"]["beyond_work"]  # a trial lands with one `dvc exp run` of every stage
    for trial in trials:
        trial["beyond_epochs"] = round(trial["seconds"] - trial["epoch_seconds"], 2)
        trial["beyond_epochs_and_landing"] = round(trial["beyond_epochs"] - landing, 2)
    at_rungs = [gap for trial in trials for gap in trial["between_epochs_at_a_rung"]]
    elsewhere = [gap for trial in trials for gap in trial["between_epochs_elsewhere"]]
    rung_beyond = round(statistics.median(at_rungs), 2) if at_rungs else None
    trial_beyond = statistics.median(t["beyond_epochs_and_landing"] for t in trials)
    measured = {
        "exp_run_over_floor": result["exp_run"]["over_floor"],
        "rung_seconds_beyond_epochs": rung_beyond,
        "trial_seconds_beyond_epochs_and_landing": trial_beyond,
    }

    print(f"\nimport floor {floor:.2f} s; medians of {args.repeats}")
    print(f"{'command':<12}{'wall s':>9}{'work s':>9}{'beyond s':>10}{'to start s':>12}{'x floor':>9}")
    for name, row in result.items():
        start = "" if row["to_first_start"] is None else f"{row['to_first_start']:.2f}"
        print(
            f"{name:<12}{row['wall']:>9.2f}{row['work']:>9.2f}{row['beyond_work']:>10.2f}{start:>12}"
            f"{row['over_floor']:>9.2f}"
        )
    print(f"\nsearch of {len(trials)} trials, {SEARCH_EPOCHS} epochs at most: {search_seconds:.1f} s")
    for trial in trials:
        print(
            f"  {trial['trial']}: {trial['epochs']} epochs, {trial['seconds']:.1f} s, {trial['epoch_seconds']:.1f} s "
            f"of them epochs; {trial['beyond_epochs']:.1f} s beyond them, {trial['beyond_epochs_and_landing']:.1f} s "
            "beyond them and a landing `dvc exp run`"
        )
    between = f"{statistics.median(elsewhere):.2f} s" if elsewhere else "none measured"
    print(f"between two epochs beyond the second's seconds: at a rung {at_rungs}, elsewhere (median) {between}")
    met = {key: measured[key] is not None and measured[key] <= goal for key, goal in GOALS.items()}
    print("\ngoals:")
    for key, goal in GOALS.items():
        value = "none measured" if measured[key] is None else f"{measured[key]:.2f}"
        print(f"  {key}: {value} (goal {goal:g}) {'met' if met[key] else 'missed'}")

    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "date": datetime.date.today().isoformat(),
                    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                    "torch": torch.__version__,
                    "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                    "settings": {k: v for k, v in settings.items() if k != "data.mirror"}
                    | {"train_images": args.train_images, "test_images": args.test_images},
                    "repeats": args.repeats,
                    "floor_seconds": round(floor, 2),
                    **result,
                    "search": {
                        "command": " ".join(search[1:]),
                        "seconds": round(search_seconds, 1),
                        "trials": trials,
                    },
                    "rung_seconds_beyond_epochs": rung_beyond,
                    "between_epochs_elsewhere_seconds": round(statistics.median(elsewhere), 2) if elsewhere else None,
                    "trial_seconds_beyond_epochs_and_landing": trial_beyond,
                    "goals": {k: {"goal": g, "measured": measured[k], "met": met[k]} for k, g in GOALS.items()},
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
