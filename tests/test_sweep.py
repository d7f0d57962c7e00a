"""Sweeps as a user runs them, with the sweep command as docs/sweeps.md gives it, and what they
leave in DVC, git and MLflow: on a Ray cluster (a Ray head and a second Ray node started as `ray
start` processes, a bare git remote, a local DVC remote and an `mlflow server`), a trial a task or a
group trained together a task; and on one machine with none of those."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import optuna
import psutil
import pytest
import yaml
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline.history import OBJECTIVE
from pipeline.params import flatten
from tests.processes import owner_marker, processes_started_with, read_until
from tests.projects import GIT_IDENTITY, ROOT, make_project, project_env, run
from tests.servers import HeldDownloads, free_port, logged_json, serve_mlflow
from tests.synthetic import write_mirror

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")
GRID = ["-S", "train.learning_rate=0.001,0.0005", "-S", "train.beta=1,4"]  # 4 trials


# The cluster's token, as a team's cluster has one (Ray's token authentication), from the environment
# of every node and of the driver: whatever ~/.ray holds on this machine, the tests' cluster is their own.
RAY_TOKEN = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def cluster_env() -> dict[str, str]:
    """What every Ray node runs in, and so every trial: this environment, a git identity for DVC's
    experiment commits, the cluster's token, no RAY_ADDRESS of the user's."""
    env = project_env() | GIT_IDENTITY | RAY_TOKEN
    env.pop("RAY_ADDRESS", None)
    return env


@dataclasses.dataclass(frozen=True)
class Cluster:
    address: str  # RAY_ADDRESS
    tracking_uri: str  # the MLflow server
    ray_temp: str  # Ray's sockets and logs
    folder: Path  # the server's store, the nodes' logs, and trials/, where trials clone the repository
    marker: dict[str, str]  # in the environment of every node, and so of everything they start


def start_node(args: list[str], cluster_folder: Path, log: Path, marker: dict[str, str]) -> subprocess.Popen:
    """`ray start ... --block` in a session of its own; returns once the node says it is up."""
    # Workers at the niceness of the processes beside them, as the sweep's own Ray runs them (Ray's
    # default, nice 15, starves a trial on a machine kept busy by other work).
    env = cluster_env() | marker | {"TMPDIR": str(cluster_folder / "trials"), "RAY_worker_niceness": "0"}
    proc = subprocess.Popen(
        [RAY, "start", *args, "--block", "--disable-usage-stats"],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while "will now block" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_node(proc)
            raise AssertionError(f"ray start {' '.join(args)} did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc


def stop_node(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """The node and everything it started (raylet, GCS, workers and what they run), as a machine
    going away takes them: `sig` to every process of the tree, SIGKILL to what outlives 5 s."""
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
        for process in tree:
            with contextlib.suppress(psutil.Error):
                process.send_signal(sig)
        _, alive = psutil.wait_procs(tree, timeout=5)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
    proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head with 1 CPU and an MLflow server. After
    the tests: no raylet, GCS or worker of it is left."""
    folder = tmp_path_factory.mktemp("cluster")
    port = free_port()
    # Ray's files (sockets, logs, the record of the last head) in a folder of the test's own, short
    # enough for Unix socket paths, and removed after: nothing of this cluster is found by a later `ray.init()`.
    ray_temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    (folder / "trials").mkdir()
    marker = owner_marker()
    with serve_mlflow(f"sqlite:///{folder}/mlflow.db", folder / "artifacts") as (url, _, _):
        head = start_node(
            ["--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false", f"--temp-dir={ray_temp}"],
            folder,
            folder / "head.log",
            marker,
        )
        try:
            yield Cluster(f"127.0.0.1:{port}", url, ray_temp, folder, marker)
        finally:
            stop_node(head)
            shutil.rmtree(ray_temp)
    ray_left = [
        p
        for p in processes_started_with(marker)
        if re.search(r"raylet|gcs_server|ray::|ray/_private", " ".join(p.cmdline()))
    ]
    assert not ray_left, f"Ray processes left running: {[' '.join(p.cmdline())[:120] for p in ray_left]}"


@pytest.fixture
def second_node(cluster, tmp_path):
    """A second Ray node with 1 CPU, joined to the head as a user's `ray start --address` joins it."""
    node = start_node(
        [f"--address={cluster.address}", "--num-cpus=1", f"--temp-dir={cluster.ray_temp}"],
        cluster.folder,
        tmp_path / "node.log",
        cluster.marker,
    )
    yield node
    stop_node(node)


@pytest.fixture
def sweep_project(cluster, tmp_path):
    """The project as a team has it before a sweep: committed and pushed to a bare git remote, its
    data in a local DVC remote, params.yaml pointing at the MLflow server."""
    mirror = write_mirror(tmp_path / "mirror")
    project = make_project(
        tmp_path / "project", mirror, **{"mlflow.tracking_uri": cluster.tracking_uri, "train.epochs": 2}
    )
    run(["git", "init", "-q", "--bare", str(tmp_path / "remote.git")], tmp_path)
    run(["git", "remote", "add", "origin", str(tmp_path / "remote.git")], project)
    run(["dvc", "remote", "add", "-d", "store", str(tmp_path / "dvc-store")], project)
    run(["dvc", "repro", "split"], project)
    run(["dvc", "push"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "data"], project, env=project_env() | GIT_IDENTITY)
    run(["git", "push", "-q", "origin", "HEAD"], project)
    return project


def sweep_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.sweep", *args]


def sweep_env(cluster) -> dict[str, str]:
    return cluster_env() | {"RAY_ADDRESS": cluster.address, "PIPELINE_PROGRESS_SECONDS": "0"}


def experiments_on_remote(project: Path) -> list[str]:
    """The names of the experiments the git remote holds, one per ref."""
    refs = run(["git", "ls-remote", "origin", "refs/exps/*"], project).stdout.split("\n")
    return sorted(line.rsplit("/", 1)[1] for line in refs if line.strip())


def exp_show(project: Path) -> dict[str, dict]:
    """`dvc exp show --json` as name -> {params, metrics} (flat, dotted keys)."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                params = data["params"]["params.yaml"]["data"]
                metrics = {k: v for file in data["metrics"].values() for k, v in file["data"].items()}
                found[rev["name"]] = {"params": flatten(params), "metrics": metrics}
    return found


def nested_runs(tracking_uri: str, parent_name: str):
    """The sweep's parent run and every run nested under it."""
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("vae-pipeline")
    parents = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{parent_name}'")
    assert len(parents) == 1, [p.info.run_name for p in parents]
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parents[0].info.run_id}'"
    )
    return client, parents[0], children


def test_a_grid_lands_as_pushed_dvc_experiments_nested_in_mlflow_though_a_node_is_lost(
    cluster, second_node, sweep_project, started
):
    """The 4-point grid, and mid-sweep (both nodes training a trial) the second node goes, SIGKILLed
    with all it runs: its trial runs again on the head, and every trial still lands once."""
    sweep = started(
        sweep_command(*GRID, "-S", "train.epochs=10", "--name", "grid"), sweep_project, env=sweep_env(cluster)
    )
    read_until(sweep, r"2 running \(.*training epoch.*training epoch")
    stop_node(second_node, signal.SIGKILL)
    output = sweep.stdout.read()
    assert sweep.wait(timeout=600) == 0, output
    assert "4 finished, 0 running, 0 failed, 0 waiting" in output, output
    assert "(attempt 2)" in output, "the lost trial ran again"
    assert re.search(r"outside `dvc exp run` \(clone, data, its training process, push\)$", output, re.MULTILINE)

    names = [f"grid-{i}" for i in range(1, 5)]
    assert experiments_on_remote(sweep_project) == names, "each trial pushed once"
    shown = exp_show(sweep_project)
    assert sorted(shown) == names, "dvc exp pull brought every trial to the driver's `dvc exp show`"
    expected = {"grid-1": (0.001, 1), "grid-2": (0.001, 4), "grid-3": (0.0005, 1), "grid-4": (0.0005, 4)}
    for name, (learning_rate, beta) in expected.items():
        params = shown[name]["params"]
        assert (params["train.learning_rate"], params["train.beta"]) == (learning_rate, beta), name

    client, parent, children = nested_runs(cluster.tracking_uri, "grid")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.trials"] == "4"
    assert parent.data.params["sweep.commit"] == run(["git", "rev-parse", "HEAD"], sweep_project).stdout.strip()
    finished = [child for child in children if child.info.status == "FINISHED"]
    lost = [child for child in children if child.info.status != "FINISHED"]
    assert sorted(child.info.run_name for child in finished) == names, "each trial FINISHED once, named as in DVC"
    # Each lost attempt's run is FAILED: one for every retry the sweep reported (a retry may be
    # lost as well, its trial then reaching attempt 3).
    attempts: dict[str, int] = {}
    for name, attempt in re.findall(r"(grid-\d): [^,)]*\(attempt (\d+)\)", output):
        attempts[name] = max(attempts.get(name, 0), int(attempt))
    assert attempts and [c.info.status for c in lost] == ["FAILED"] * len(lost), "the lost attempts' runs"
    assert sorted(c.info.run_name for c in lost) == sorted(n for n, a in attempts.items() for _ in range(a - 1))
    for child in finished:
        name = child.info.run_name
        assert float(child.data.params["train.learning_rate"]) == expected[name][0]
        assert float(child.data.params["train.beta"]) == expected[name][1]
        for metric, value in shown[name]["metrics"].items():
            if metric != "epochs":
                assert child.data.metrics[metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, metric)

    table = logged_json(client, parent.info.run_id, "trials.json")
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [row["trial"] for row in rows] == names
    assert {row["run_id"] for row in rows} == {child.info.run_id for child in finished}
    assert parent.data.metrics["trial_seconds_sum"] == pytest.approx(sum(row["seconds"] for row in rows), abs=1)
    assert all(0 < row["run_seconds"] < row["seconds"] for row in rows)
    assert parent.data.metrics["wall_seconds"] > max(row["seconds"] for row in rows)
    best = min(names, key=lambda name: shown[name]["metrics"][OBJECTIVE])
    assert parent.data.tags["best_trial"] == best
    assert parent.data.metrics[f"best_{OBJECTIVE}"] == pytest.approx(shown[best]["metrics"][OBJECTIVE], rel=1e-5)
    assert parent.data.metrics["best_test_total"] == pytest.approx(shown[best]["metrics"]["test_total"], rel=1e-5)


BAD_GRIDS = [  # a grid, and what its refusal says
    (
        ["-S", "train.learning_rate=0.001,-1"],
        "trial bad-2 (train.learning_rate=-1): train.learning_rate: must be greater than 0",
    ),
    (["-S", "train.lerning_rate=0.001,0.01"], "unknown key 'train.lerning_rate'; did you mean 'train.learning_rate'?"),
    (["-S", "train.epochs=2,two"], "train.epochs: expected an integer, got 'two'"),
    (
        ["-S", "train.beta=1,4", "-S", "mlflow.tracking_uri=sqlite:///mlruns/mlflow.db"],
        "a sweep's trials run on other machines and cannot share sqlite:///mlruns/mlflow.db",
    ),
]


def test_a_bad_grid_is_refused_before_any_task_starts(cluster, sweep_project):
    for grid, refusal in BAD_GRIDS:
        done = run(sweep_command(*grid, "--name", "bad"), sweep_project, env=sweep_env(cluster), check=False)
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr.strip().splitlines() == [f"error: {done.stderr.strip().removeprefix('error: ')}"]
        assert refusal in done.stderr
        assert "ray:" not in done.stdout, "refused before joining the Ray cluster"
    assert experiments_on_remote(sweep_project) == []
    client = mlflow.MlflowClient(cluster.tracking_uri)
    experiment = client.get_experiment_by_name("vae-pipeline")
    assert experiment is None or not client.search_runs(
        [experiment.experiment_id], filter_string="attributes.run_name LIKE 'bad%'"
    )


def test_a_group_trained_together_is_one_task_on_the_cluster_and_lands_on_the_remotes(cluster, sweep_project):
    done = run(
        sweep_command("--together", "2", "-S", "seed=1,2", "--name", "tog"),
        sweep_project,
        env=sweep_env(cluster),
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "on the Ray cluster in groups of up to 2" in done.stdout and "group 1: tog-1, tog-2" in done.stdout
    assert experiments_on_remote(sweep_project) == ["tog-1", "tog-2"]
    shown = exp_show(sweep_project)
    assert sorted(shown) == ["tog-1", "tog-2"], "pulled from the remote"
    _, parent, children = nested_runs(cluster.tracking_uri, "tog")
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.together"] == "2"
    assert sorted((c.info.run_name, c.info.status) for c in children) == [("tog-1", "FINISHED"), ("tog-2", "FINISHED")]
    for child in children:
        assert child.data.metrics["val_total"] == pytest.approx(
            shown[child.info.run_name]["metrics"]["val_total"], rel=1e-6
        )


def test_a_search_on_the_cluster_prunes_and_lands_on_the_remotes_its_study_with_the_driver(cluster, sweep_project):
    """The search of test_search.py on the cluster: its study an actor on the driver's node, its
    storage in the driver's project, its trials clone from the remote, climb their rungs on the
    cluster's node, and land on the remotes, the worse one pruned at its first rung."""
    done = run(
        sweep_command(
            *("-S", "train.learning_rate=0.002,0.000001", "--trials", "2", "--sampler", "grid", "--sampler-seed", "2"),
            *("--pruner", "asha", "--min-epochs", "1", "--reduction-factor", "2", "--name", "srch"),
        ),
        sweep_project,
        env=sweep_env(cluster),
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^srch-2 pruned at epoch 1, landed", done.stdout, re.MULTILINE), done.stdout
    assert experiments_on_remote(sweep_project) == ["srch-1", "srch-2"]
    shown = exp_show(sweep_project)
    assert {name: shown[name]["params"]["train.epochs"] for name in shown} == {"srch-1": 2, "srch-2": 1}
    study = optuna.load_study(study_name="srch", storage=f"sqlite:///{sweep_project / 'mlruns' / 'optuna.db'}")
    assert sorted((t.user_attrs["experiment"], t.state.name) for t in study.trials) == [
        ("srch-1", "COMPLETE"),
        ("srch-2", "PRUNED"),
    ]
    _, parent, _ = nested_runs(cluster.tracking_uri, "srch")
    assert parent.data.params["sweep.rungs"] == "1 2" and parent.data.tags["best_trial"] == "srch-1"


def test_on_one_machine_a_diverged_trial_is_reported_once_and_ctrl_c_keeps_what_finished(tmp_path, started):
    """No RAY_ADDRESS, no remote, no server: the trials clone this repository and land in it, their
    runs in its own MLflow store. One trial at a time: the first diverges and is reported, not
    retried; the second finishes; Ctrl-C the moment it has, when the third is waiting, being
    submitted or downloading, cancels the third. Its download is held from the moment the second's
    is done, so it cannot finish first, however fast or slow the machine."""
    marker = owner_marker()
    with HeldDownloads(write_mirror(tmp_path / "mirror")) as mirror:
        project = make_project(tmp_path / "project", mirror.url, **{"train.epochs": 2})
        sweep = started(
            sweep_command("-S", "train.learning_rate=1e8,0.001,0.002", "--name", "stop", "--max-concurrent", "1"),
            project,
            env=cluster_env() | marker | {"PIPELINE_PROGRESS_SECONDS": "0"},
        )
        seen = read_until(sweep, r"stop-2: (split|train|evaluate|visualize|pushing)")  # stop-3 not yet submitted
        mirror.hold()
        seen += read_until(sweep, r"^stop-2 finished")
        os.killpg(sweep.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the driver's whole process group
        output = seen + sweep.stdout.read()
        assert sweep.wait(timeout=300) == 130, output
    assert "a Ray on this machine" in output and "on this machine, MLflow run" in output
    assert "stop-1 failed: loss became NaN or infinite at epoch 1" in output, output
    assert "(attempt 2)" not in output, "a trial that failed by itself is not retried"
    assert "cancelling the 1 unfinished trial(s)" in output, output
    assert re.search(r"^stop-3 +KILLED", output, re.MULTILINE), output

    assert run(["dvc", "exp", "list", "--names-only"], project).stdout.split() == ["stop-2"]
    _, parent, children = nested_runs(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}", "stop")
    assert parent.info.status == "KILLED"
    statuses = sorted((child.info.run_name, child.info.status) for child in children)
    assert statuses == [("stop-1", "FAILED"), ("stop-2", "FINISHED")], "stop-3 never reached its training"
    left = [
        p.cmdline()
        for p in processes_started_with(marker)
        if re.search(
            r"dvc exp run|pipeline\.(download|train|evaluate|visualize)|raylet|gcs_server", " ".join(p.cmdline())
        )
    ]
    assert not left, f"the cancelled trial's stages, or the sweep's Ray, still run: {left}"


def test_a_grid_trial_trains_in_its_process_stops_early_and_lands_as_its_run_alone(tmp_path):
    """A grid's trial trains in one process, then lands by one `dvc exp run`: with
    `train.early_stopping` it stops where its run alone stops (epoch 1 is the last that improves
    by more than train.min_delta, so patience 1 stops after epoch 2 of 3), with the same bytes, in
    one MLflow run that says why it stopped."""
    project = make_project(tmp_path / "project", write_mirror(tmp_path / "mirror"), **{"train.epochs": 3})
    stopping = ["-S", "train.early_stopping=1", "-S", "train.min_delta=1e9"]
    done = run(sweep_command("-S", "seed=1,2", *stopping, "--name", "es"), project, env=cluster_env(), check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^es-1 +FINISHED +2 ", done.stdout, re.MULTILINE), done.stdout
    assert "outside `dvc exp run` (clone, data, its training process, push)" in done.stdout
    # As the trial's task has it: Ray's one thread, which the sweep sets as train.num_threads.
    alone = ["-S", "seed=1", *stopping, "-S", "train.num_threads=1"]
    run(["dvc", "exp", "run", "-n", "alone", *alone], project, env=cluster_env())

    def train_outs(experiment: str) -> dict[str, str]:
        ref = next(
            r
            for r in run(["git", "for-each-ref", "--format=%(refname)"], project).stdout.split()
            if r.endswith(f"/{experiment}")
        )
        lock = yaml.safe_load(run(["git", "show", f"{ref}:dvc.lock"], project).stdout)
        return {out["path"]: out["md5"] for out in lock["stages"]["train"]["outs"]}

    assert train_outs("es-1") == train_outs("alone"), "model.pt, state.pt and the histories"
    client, _, children = nested_runs(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}", "es")
    assert sorted(child.info.run_name for child in children) == ["es-1", "es-2"], "one run a trial"
    for child in children:
        assert child.data.tags["stopped_early"].startswith("stopped early after epoch 2 of 3"), child.data.tags
        assert [m.step for m in client.get_metric_history(child.info.run_id, OBJECTIVE)] == [1, 2]


def test_what_a_trial_starts_ends_when_its_ray_worker_is_killed():
    """A Ray worker exits at once when its raylet dies; a trial's `dvc exp run` must not train on
    without it. Here the worker is a Python process that starts a command as the trial does."""
    worker_code = (
        "import subprocess, sys, time\n"
        "from pipeline.sweep.watch import tied_to_this_process\n"
        "command = tied_to_this_process([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print(subprocess.Popen(command).pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", worker_code],
        cwd=ROOT,
        env=project_env(),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    command = psutil.Process(int(worker.stdout.readline()))
    try:
        deadline = time.monotonic() + 60
        while "time.sleep(600)" not in " ".join(command.cmdline()):  # tied, then exec'd
            assert time.monotonic() < deadline, command.cmdline()
            time.sleep(0.05)
        worker.kill()  # the worker alone, not its group, as its raylet's death ends it
        worker.wait()
        deadline = time.monotonic() + 30
        while command.is_running() and command.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the command outlived the worker that started it"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(psutil.Error):
            command.kill()
        worker.stdout.close()


def test_on_one_machine_a_trial_runs_at_the_priority_of_a_run_alone():
    """Ray runs its workers at nice 15; beside other work (two busy cores) a sweep's trials then
    got a few percent of a core. The sweep's own Ray runs them at the niceness `dvc exp run` has."""
    probe = (
        "import argparse, os, ray\n"
        "from pipeline.sweep import cluster\n"
        "options = dict(gpus_per_trial=None, cpus_per_trial=None, together=0, max_concurrent=0, trials=None)\n"
        "cluster.start_ray(argparse.Namespace(**options))\n"
        "print('worker niceness', ray.get(ray.remote(lambda: os.nice(0)).remote()), flush=True)\n"
    )
    done = run([sys.executable, "-c", probe], ROOT, env=cluster_env())
    assert f"worker niceness {os.nice(0)}" in done.stdout, done.stdout + done.stderr
