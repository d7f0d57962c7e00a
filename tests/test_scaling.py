"""Beyond one machine: a DVC remote shared by two clones, a team MLflow server on PostgreSQL."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import mlflow
import pytest

from tests.conftest import edit_params, free_port, make_project, run, serve_mlflow, stages_run

pytestmark = pytest.mark.slow
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]


def test_pushed_results_pull_into_a_fresh_clone_that_is_up_to_date_without_rerunning(tmp_path, mirror):
    origin = make_project(tmp_path / "origin", mirror)
    run(["dvc", "repro"], origin)
    run(["dvc", "remote", "add", "-d", "storage", str(tmp_path / "remote")], origin)
    run([*GIT, "add", "-A"], origin)
    run([*GIT, "commit", "-qm", "results"], origin)
    run(["dvc", "push"], origin)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
    assert not (clone / "models/model.pt").exists()
    run(["dvc", "pull"], clone)
    assert "Data and pipelines are up to date." in run(["dvc", "status"], clone).stdout
    for output in ("models/model.pt", "data/split/train_images.npy", "figures/manifold.png"):
        assert (clone / output).read_bytes() == (origin / output).read_bytes(), output
    assert stages_run(run(["dvc", "repro"], clone).stdout) == [], "reproduced, without re-running"


POSTGRES_BIN = Path("/usr/lib/postgresql")


def postgres_tools() -> Path | None:
    found = sorted(POSTGRES_BIN.glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.fixture
def postgres(tmp_path):
    """A real PostgreSQL on loopback, in a temporary cluster; yields its SQLAlchemy URL."""
    tools = postgres_tools()
    if tools is None:
        pytest.skip("needs PostgreSQL (Debian: apt install postgresql)")
    pytest.importorskip("psycopg", reason="needs psycopg (pip install -e '.[test]')")
    as_user, home = [], tmp_path
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as Debian's postgres user
        as_user = ["runuser", "-u", "postgres", "--"]
        home = Path(tempfile.mkdtemp(prefix="pg-"))  # outside pytest's root-only temp folders
        os.chmod(home, 0o777)
    data, port = home / "pgdata", free_port()
    subprocess.run([*as_user, tools / "initdb", "-D", data, "-U", "mlflow", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, tools / "pg_ctl", "-D", data, "-l", home / "pg.log", "-w", "-o",
                    f"-h 127.0.0.1 -p {port} -k {home}", "start"], check=True, capture_output=True)
    try:
        subprocess.run([*as_user, tools / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"],
                       check=True, capture_output=True)
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_user, tools / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        if home != tmp_path:
            shutil.rmtree(home, ignore_errors=True)


def test_pipeline_logs_to_a_team_server_on_postgresql(tmp_path, mirror, postgres):
    project = make_project(tmp_path / "p", mirror)
    with serve_mlflow(postgres, tmp_path / "artifacts") as (url, _, _):
        edit_params(project, **{"mlflow.tracking_uri": url})
        run(["dvc", "repro"], project)

        def api(path: str) -> dict:
            with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{path}", timeout=10) as response:
                return json.load(response)

        experiment = api("experiments/get-by-name?experiment_name=vae-pipeline")["experiment"]
        with urllib.request.urlopen(urllib.request.Request(
                f"{url}/api/2.0/mlflow/runs/search", data=json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode(),
                headers={"Content-Type": "application/json"}), timeout=10) as response:
            [found] = json.load(response)["runs"]
        metrics = {m["key"]: m["value"] for m in found["data"]["metrics"]}
        assert found["info"]["status"] == "FINISHED"
        assert {"train_total", "val_total", "test_total", "test_knn_accuracy"} <= set(metrics)
        artifacts = api(f"artifacts/list?run_id={found['info']['run_id']}&path=figures")["files"]
        assert len(artifacts) == 6
        assert (tmp_path / "artifacts").exists() and not (project / "mlruns/mlflow.db").exists()


def test_torchrun_trains_on_two_cpu_processes_and_rank_0_alone_writes(tmp_path, mirror):
    project = make_project(tmp_path / "p", mirror, **{"train.num_processes": 2, "train.epochs": 3, "train.device": "cpu"})
    result = run(["dvc", "repro", "train"], project)
    assert "rank 0 of 2 on cpu: training and writing every output" in result.stdout
    assert "rank 1 of 2 on cpu: training only" in result.stdout
    assert [int(e) for e in re.findall(r"^epoch (\d)/3", result.stdout, re.M)] == [1, 2, 3], \
        "each epoch reported once: by rank 0, not by every rank"
    with open(project / "metrics/history.csv") as fh:
        history = list(csv.DictReader(fh))
    assert float(history[-1]["train_total"]) < float(history[0]["train_total"])
    assert (project / "models/model.pt").exists() and not (project / "models/checkpoint.pt").exists()

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    [only] = client.search_runs([client.get_experiment_by_name("vae-pipeline").experiment_id])
    assert only.data.params["train.num_processes"] == "2"
    assert sorted(m.step for m in client.get_metric_history(only.info.run_id, "train_total")) == [1, 2, 3]
