"""A sweep whose trials train together (`python -m pipeline.sweep --together N`), on this machine
with no remote and no server, as docs/sweeps.md gives it: each trial the bytes of its solo `dvc exp
run`, its own DVC experiment and MLflow run, a diverged trial failed alone, Ctrl-C mid-group, and a
rerun training only what did not finish."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline.history import OBJECTIVE
from pipeline.params import Params
from pipeline.sweep import grid
from pipeline.sweep.groups import groups
from tests.processes import owner_marker, processes_started_with, read_until
from tests.projects import GIT_IDENTITY, edit_params, make_project, project_env, run
from tests.servers import logged_json
from tests.synthetic import write_mirror

SWEEP = [sys.executable, "-m", "pipeline.sweep", "--together", "4", "-n", "tg"]
# tg-1: seed 42 (the default), tg-3: seed 7, both with learning rate 0.001: two repeats of one
# configuration; tg-2 and tg-4 (learning rate 1e9) diverge in their first steps.
GRID = ["-S", "seed=42,7", "-S", "train.learning_rate=0.001,1e9"]
SOLO = "train.learning_rate=0.001"  # tg-1, trained alone


def default_params_text() -> str:
    return yaml.safe_dump(dataclasses.asdict(Params()), sort_keys=False)


def test_trials_of_one_shape_share_a_group_and_another_shape_gets_its_own():
    trials = grid.expand(["model.latent_dim=2,3", "seed=1,2,3"], "g")
    names = [[trials[i].name for i in group] for group in groups(grid.check(trials, default_params_text()), 2)]
    assert names == [["g-1", "g-2"], ["g-3"], ["g-4", "g-5"], ["g-6"]]


@dataclasses.dataclass(frozen=True)
class Swept:
    project: Path
    first: subprocess.CompletedProcess  # the sweep
    env: dict[str, str]


@pytest.fixture(scope="module")
def swept_together(tmp_path_factory) -> Swept:
    """A 2-epoch project swept together, and tg-1's params trained alone as `dvc exp run`: built
    once, read by the tests."""
    tmp = tmp_path_factory.mktemp("together")
    project = make_project(tmp / "project", write_mirror(tmp / "mirror"), **{"train.epochs": 2})
    env = project_env() | GIT_IDENTITY
    # Unset, as a user's shell has it: Ray gives a task OMP_NUM_THREADS of its CPUs, and a group on
    # other threads than a run alone would not be its bytes.
    env.pop("OMP_NUM_THREADS", None)
    first = run([*SWEEP, *GRID], project, check=False, env=env)
    run(["dvc", "exp", "run", "-n", "solo", "-S", SOLO], project, env=env)
    run(["git", "checkout", "--", "."], project)  # the workspace as committed
    return Swept(project, first, env)


def lock_md5s(project: Path, experiment: str) -> dict[str, str]:
    """Each train output's md5 in the experiment's dvc.lock."""
    ref = next(
        line.split()[1]
        for line in run(["git", "show-ref"], project).stdout.splitlines()
        if line.endswith(f"/{experiment}") and "refs/exps/" in line
    )
    train = yaml.safe_load(run(["git", "show", f"{ref}:dvc.lock"], project).stdout)["stages"]["train"]
    return {out["path"]: out["md5"] for out in train["outs"]}


@pytest.mark.slow
def test_each_trial_trained_together_is_the_bytes_of_its_solo_run(swept_together):
    first = swept_together.first
    assert first.returncode == 1, first.stdout + first.stderr  # two trials failed
    assert "group 1: tg-1, tg-2, tg-3, tg-4" in first.stdout
    assert "outside `dvc exp run` (clone, data, its share of its group's training process, push)" in first.stdout
    md5s = lock_md5s(swept_together.project, "tg-1")
    assert md5s == lock_md5s(swept_together.project, "solo")  # model.pt, state.pt, history.csv
    assert md5s != lock_md5s(swept_together.project, "tg-3")


@pytest.mark.slow
def test_each_trial_is_an_experiment_to_apply_and_continue_and_a_run_nested_under_the_sweeps(swept_together):
    project = swept_together.project
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    all_runs = mlflow.search_runs(search_all_experiments=True, output_format="list", order_by=["start_time ASC"])
    parent = next(r for r in all_runs if r.info.run_name == "tg").info.run_id  # the first sweep's
    runs = {r.info.run_name: r for r in all_runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent}
    runs["solo"] = next(r for r in all_runs if r.info.run_name == "solo")
    assert {name: runs[name].info.status for name in ("tg-1", "tg-2", "tg-3", "tg-4")} == {
        "tg-1": "FINISHED",
        "tg-2": "FAILED",
        "tg-3": "FINISHED",
        "tg-4": "FAILED",
    }
    failed = next(line for line in swept_together.first.stdout.splitlines() if line.startswith("tg-2 "))
    assert "NaN or infinite at epoch 1" in failed

    client = mlflow.MlflowClient()
    for key in ("train_total", "val_total"):
        history = {
            name: sorted((m.step, m.value) for m in client.get_metric_history(runs[name].info.run_id, key))
            for name in ("tg-1", "solo")
        }
        assert history["tg-1"] == history["solo"] and len(history["solo"]) == 2
    # The model's metrics alike; not the system's, which a run gets only if it lasts past a sample
    # (10 s), and which a group's training logs on the sweep's run.
    model_metrics = {name: {m for m in runs[name].data.metrics if not m.startswith("system/")} for name in runs}
    assert model_metrics["tg-1"] == model_metrics["solo"]

    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    experiments = {e["name"]: e for baseline in shown for e in baseline.get("experiments") or []}
    assert {"tg-1", "tg-3"} <= experiments.keys() and "tg-2" not in experiments
    for name in ("tg-1", "tg-3"):
        metrics = {}
        for file in experiments[name]["revs"][0]["data"]["metrics"].values():
            metrics |= file["data"]
        for key in ("val_total", "test_total"):
            assert runs[name].data.metrics[key] == pytest.approx(metrics[key], rel=1e-6)

    run(["dvc", "exp", "apply", "tg-1"], project, env=swept_together.env)
    assert "up to date" in run(["dvc", "status"], project).stdout
    more = run(["dvc", "exp", "run", "-n", "tg-1-more", "-S", "train.epochs=3"], project, env=swept_together.env)
    assert "continuing from epoch 2 of 3" in more.stdout
    run(["git", "checkout", "--", "."], project)


@pytest.mark.slow
def test_repeats_over_the_seed_get_their_mean_and_spread_on_the_sweeps_run_and_screen(swept_together):
    client = mlflow.MlflowClient(f"sqlite:///{swept_together.project / 'mlruns' / 'mlflow.db'}")
    all_runs = client.search_runs(
        [client.get_experiment_by_name("vae-pipeline").experiment_id], order_by=["start_time ASC"]
    )
    parent = next(r for r in all_runs if r.info.run_name == "tg").info.run_id
    objectives = [
        next(r for r in all_runs if r.info.run_name == name).data.metrics[OBJECTIVE] for name in ("tg-1", "tg-3")
    ]
    table = logged_json(client, parent, "repeats.json")
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [(row["train.learning_rate"], row["finished"]) for row in rows] == [("0.001", 2), ("1000000000.0", 0)]
    assert rows[0][f"{OBJECTIVE}_mean"] == pytest.approx(statistics.fmean(objectives))
    assert rows[0][f"{OBJECTIVE}_std"] == pytest.approx(statistics.stdev(objectives))
    assert rows[0]["test_total_std"] > 0 and "seed" not in table["columns"]
    lines = swept_together.first.stdout.splitlines()
    below = lines[next(i for i, line in enumerate(lines) if line.startswith("repeats")) + 1 :]
    assert below[0].split() == [
        "2",
        f"{statistics.fmean(objectives):.4f}",
        f"{statistics.stdev(objectives):.4f}",
        "train.learning_rate=0.001",
    ]


def runs_under(client: mlflow.MlflowClient, parent_name: str) -> list[tuple[dict[str, str], str]]:
    """For each run named `parent_name` (each time the sweep ran), oldest first: its trials' runs'
    statuses by name, and its own status."""
    experiment_id = client.get_experiment_by_name("vae-pipeline").experiment_id
    parents = client.search_runs(
        [experiment_id], filter_string=f"attributes.run_name = '{parent_name}'", order_by=["start_time ASC"]
    )
    return [
        (
            {
                r.info.run_name: r.info.status
                for r in client.search_runs(
                    [experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'"
                )
            },
            parent.info.status,
        )
        for parent in parents
    ]


@pytest.mark.slow
def test_ctrl_c_mid_group_keeps_what_landed_and_the_same_command_trains_only_the_rest(project, started):
    """Two groups, one at a time; Ctrl-C while the second trains. The first group's trials stay
    experiments, the second's run ends KILLED, and the same command again trains only that trial."""
    sweep = [*SWEEP[:4], "2", "-n", "cc", "--max-concurrent", "1", "-S", "seed=1,2,3", "-S", "train.epochs=12"]
    marker = owner_marker()
    env = project_env() | GIT_IDENTITY | marker | {"PIPELINE_PROGRESS_SECONDS": "0"}
    first = started(sweep, project, env=env)
    seen = read_until(first, r"group 2: training epoch \d")
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the driver's whole process group
    output = seen + first.stdout.read()
    assert first.wait(timeout=300) == 130, output
    assert "group 1: cc-1, cc-2" in output and "group 2: cc-3" in output
    assert "Token authentication" not in output, "Ray's warning of a default the sweep chose"
    assert "cancelling the 1 unfinished trial(s)" in output
    assert re.search(r"^cc-3 +KILLED", output, re.MULTILINE), output
    assert run(["dvc", "exp", "list", "--names-only"], project).stdout.split() == ["cc-1", "cc-2"]
    left = [
        p.cmdline()
        for p in processes_started_with(marker)
        if re.search(r"pipeline\.sweep|dvc exp run|raylet|gcs_server", " ".join(p.cmdline()))
    ]
    assert not left, f"still running after the sweep ended: {left}"

    again = run(sweep, project, env=env, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "kept from before: cc-1, cc-2" in again.stdout and "group 1: cc-3" in again.stdout
    assert sorted(run(["dvc", "exp", "list", "--names-only"], project).stdout.split()) == ["cc-1", "cc-2", "cc-3"]
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    assert runs_under(client, "cc") == [
        ({"cc-1": "FINISHED", "cc-2": "FINISHED", "cc-3": "KILLED"}, "KILLED"),
        ({"cc-3": "FINISHED"}, "FINISHED"),
    ]


@pytest.mark.slow
def test_a_sweep_together_is_refused_in_one_line_before_any_work(project):
    def refusal(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.sweep", *args, "-S", "seed=1,2"],
            cwd=project,
            env=project_env() | GIT_IDENTITY,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        return done.stderr

    assert "--together must be 1 or more" in refusal("--together", "-1")
    assert "train.num_processes above 1" in refusal("--together", "2", "-S", "train.num_processes=2")
    assert "mlflow.enabled is false" in refusal("--together", "2", "-S", "mlflow.enabled=false")
    edit_params(project, **{"train.epochs": 3})  # on one machine the trials clone this repository: no push
    assert "not the workspace: commit them, or stash them" in refusal("--together", "2")


# A group's loop as the stall guard sees it: progress longer than the guard's limit, a wait for the
# sweep's answer longer than it too, then a wait that never ends, as on a GPU that never finishes a step.
STALLING_GROUP = """
import sys, threading, time
from pathlib import Path
from pipeline.sweep.stall import StallGuard

def stalled(reason, stacks):
    Path(sys.argv[1]).write_text(reason)

def busy(seconds, beat=lambda: None):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        beat()

with StallGuard(stalled, floor=1.0) as guard:
    busy(3.0, guard.beat)
    print("progressed", flush=True)
    with guard.paused():
        busy(3.0)
    print("answered", flush=True)
    threading.Event().wait()
"""


def test_a_group_that_stops_making_progress_stops_with_one_line_and_every_threads_stack(tmp_path):
    from pipeline.sweep.stall import STALLED_EXIT

    reason_file = tmp_path / "reason"
    proc = subprocess.run(
        [sys.executable, "-c", STALLING_GROUP, str(reason_file)],
        capture_output=True,
        text=True,
        timeout=300,
        env=project_env(),
    )
    assert proc.returncode == STALLED_EXIT, proc.stdout + proc.stderr
    assert proc.stdout.split() == ["progressed", "answered"], "neither progress nor a paused wait is a stall"
    reason = reason_file.read_text()
    assert re.fullmatch(
        r"its group made no progress for \d+ s, over its limit of 1 s \(at least 1 s\): "
        r"stopped, with every thread's stack in its log",
        reason,
    ), reason
    [said] = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert said == f"error: {reason}"
    stuck_at = STALLING_GROUP.splitlines().index("    threading.Event().wait()") + 1
    assert f'File "<string>", line {stuck_at} in <module>' in proc.stderr, "the stuck main thread's stack"
    assert "stall.py" in proc.stderr, "the guard's own thread's stack"


def test_the_stall_limit_is_ten_first_epochs_and_never_under_its_floor():
    from pipeline.sweep.stall import StallGuard

    guard = StallGuard(lambda reason, stacks: None, floor=2.0)
    assert guard.limit == 2.0, "before the first epoch ends: the floor"
    guard.epoch_ended(0.5)
    assert guard.limit == 5.0
    guard.epoch_ended(30.0)
    assert guard.limit == 5.0, "set by the first epoch alone"
    short = StallGuard(lambda reason, stacks: None, floor=2.0)
    short.epoch_ended(0.01)
    assert short.limit == 2.0
