"""Beyond one machine: a DVC remote shared by two clones, a team MLflow server on PostgreSQL."""

from __future__ import annotations

import csv
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import mlflow
import psutil
import pytest
import torch

from pipeline.visualize import FIGURE_COUNT
from tests.doc_blocks import doc_block
from tests.processes import epoch_ended, read_until, stage_process
from tests.projects import GIT_IDENTITY, edit_params, make_project, project_env, run, stages_run
from tests.servers import free_port, serve_mlflow
from tests.synthetic import write_mirror

pytestmark = pytest.mark.slow


def test_the_documented_dvc_remote_recipe_pulls_into_a_clone_that_is_up_to_date_without_rerunning(tmp_path, mirror):
    push, pull = doc_block("scaling.md", "dvc-remote-push"), doc_block("scaling.md", "dvc-remote-pull")
    origin = make_project(tmp_path / "origin", mirror)
    run(["dvc", "repro"], origin)
    run(
        ["bash", "-euo", "pipefail", "-c", push.replace("/mnt/shared/vae-dvc", str(tmp_path / "remote"))],
        origin,
        env=project_env() | GIT_IDENTITY,
    )
    assert run(["git", "status", "--porcelain"], origin).stdout == "", "the recipe committed everything DVC wrote"

    pulled = run(["bash", "-euo", "pipefail", "-c", pull.replace("<url>", str(origin))], tmp_path).stdout
    clone = tmp_path / "vae-pipeline"
    assert "Data and pipelines are up to date." in pulled
    assert stages_run(pulled) == [], "reproduced, without re-running"
    for output in ("models/model.pt", "data/split/train_images.npy", "figures/manifold.png", "metrics/test.json"):
        assert (clone / output).read_bytes() == (origin / output).read_bytes(), output
    assert run(["git", "status", "--porcelain"], clone).stdout == "", "the pull left the clone as committed"


def test_the_documented_dvc_remote_credentials_stay_out_of_what_git_commits(tmp_path, mirror):
    credentials = doc_block("scaling.md", "dvc-remote-credentials")
    project = make_project(tmp_path / "project", mirror)
    # A secret starting with "-" (1 in 64 of token_urlsafe's), which an option parser takes for an option.
    keys = {
        "AWS_ACCESS_KEY_ID": f"AKIA{secrets.token_hex(8).upper()}",
        "AWS_SECRET_ACCESS_KEY": "-" + secrets.token_urlsafe(30),
    }
    printed = run(["bash", "-euo", "pipefail", "-c", credentials], project, env=project_env() | keys).stdout
    assert printed.splitlines()[-1] == ".dvc/config.local", "git ignores the credentials' file"
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "remote"], project, env=project_env() | GIT_IDENTITY)
    committed = run(["git", "show", "HEAD:.dvc/config"], project).stdout
    assert "s3://team-bucket/vae-dvc" in committed
    local = (project / ".dvc/config.local").read_text()
    for value in keys.values():
        assert value in local and value not in committed
        assert run(["git", "grep", "-c", value, "HEAD"], project, check=False).stdout == "", "in no committed file"


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
    subprocess.run(
        [*as_user, tools / "initdb", "-D", data, "-U", "mlflow", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *as_user,
            tools / "pg_ctl",
            "-D",
            data,
            "-l",
            home / "pg.log",
            "-w",
            "-o",
            f"-h 127.0.0.1 -p {port} -k {home}",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            [*as_user, tools / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"],
            check=True,
            capture_output=True,
        )
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
        with urllib.request.urlopen(
            urllib.request.Request(
                f"{url}/api/2.0/mlflow/runs/search",
                data=json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode(),
                headers={"Content-Type": "application/json"},
            ),
            timeout=10,
        ) as response:
            [found] = json.load(response)["runs"]
        metrics = {m["key"]: m["value"] for m in found["data"]["metrics"]}
        assert found["info"]["status"] == "FINISHED"
        assert {"train_total", "val_total", "test_total", "test_knn_accuracy"} <= set(metrics)
        artifacts = api(f"artifacts/list?run_id={found['info']['run_id']}&path=figures")["files"]
        assert len(artifacts) == FIGURE_COUNT
        assert (tmp_path / "artifacts").exists() and not (project / "mlruns/mlflow.db").exists()


TORCHRUN = {"train.num_processes": 2, "train.epochs": 3, "train.device": "cpu"}


@pytest.fixture(scope="module")
def torchrun_mirror(tmp_path_factory) -> Path:
    return write_mirror(tmp_path_factory.mktemp("mirror"), n_train=1500, n_test=100)  # epochs of about a second


@pytest.fixture(scope="module")
def torchrun_result(tmp_path_factory, torchrun_mirror) -> tuple[Path, str]:
    """A 2-process CPU training under torchrun, uninterrupted, and what it printed."""
    project = make_project(tmp_path_factory.mktemp("torchrun") / "p", torchrun_mirror, **TORCHRUN)
    return project, run(["dvc", "repro", "train"], project).stdout


def test_torchrun_trains_on_two_cpu_processes_and_rank_0_alone_writes(torchrun_result):
    project, stdout = torchrun_result
    assert "rank 0 of 2 on cpu: training and writing every output" in stdout
    assert "rank 1 of 2 on cpu: training only" in stdout
    assert [int(e) for e in re.findall(r"^epoch (\d)/3", stdout, re.M)] == [1, 2, 3], (
        "each epoch reported once: by rank 0, not by every rank"
    )
    with open(project / "metrics/history.csv") as fh:
        history = list(csv.DictReader(fh))
    assert float(history[-1]["train_total"]) < float(history[0]["train_total"])
    assert (project / "models/model.pt").exists() and not (project / "models/checkpoint.pt").exists()

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    [only] = client.search_runs([client.get_experiment_by_name("vae-pipeline").experiment_id])
    assert only.data.params["train.num_processes"] == "2"
    assert sorted(m.step for m in client.get_metric_history(only.info.run_id, "train_total")) == [1, 2, 3]


def test_a_torchrun_run_that_stops_early_stops_every_rank_after_the_same_epoch(tmp_path, torchrun_mirror):
    """Rank 0 alone decides (no epoch betters the first by 1e6, so a patience of 1 stops the run
    after epoch 2), and every rank hears it: a rank training on would wait at its next all-reduce."""
    stopping = {"train.early_stopping": 1, "train.min_delta": 1e6, "mlflow.enabled": False}
    project = make_project(tmp_path / "p", torchrun_mirror, **TORCHRUN | stopping)
    result = run(["dvc", "repro", "train"], project, timeout=600)
    assert "stopped early after epoch 2 of 3" in result.stdout, result.stdout
    with open(project / "metrics/history.csv") as fh:
        assert [row["epoch"] for row in csv.DictReader(fh)] == ["1", "2"]


def kill_whole_job(proc) -> None:
    """SIGKILL DVC, torchrun and the ranks at once, as a lost node or a job scheduler does: torchrun
    starts each rank in a session of its own, which a signal to DVC's process group does not reach."""
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for process in tree:
        process.kill()
    psutil.wait_procs(tree, timeout=30)


def test_a_stale_checkpoint_is_discarded_once_by_rank_0(tmp_path, torchrun_mirror, started):
    project = make_project(tmp_path / "p", torchrun_mirror, **TORCHRUN | {"mlflow.enabled": False})
    proc = started(["dvc", "repro", "train"], project)
    read_until(proc, epoch_ended(1))
    kill_whole_job(proc)
    edit_params(project, **{"train.learning_rate": 0.001, "train.epochs": 1})
    result = run(["dvc", "repro", "train"], project)
    assert result.stdout.count("discarding models/checkpoint.pt: it was written with other params or data") == 1
    assert "resuming" not in result.stdout and (project / "models/state.pt").exists()


def test_a_killed_torchrun_run_resumes_each_rank_with_its_own_random_states_to_the_same_bytes(
    tmp_path, torchrun_mirror, torchrun_result, started
):
    uninterrupted, _ = torchrun_result
    project = make_project(tmp_path / "killed", torchrun_mirror, **TORCHRUN)
    proc = started(["dvc", "repro", "train"], project)
    read_until(proc, epoch_ended(1))
    kill_whole_job(proc)
    assert not (project / "models/model.pt").exists(), "killed before the end"
    rng = torch.load(project / "models/checkpoint.pt", weights_only=True)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["cpu"], rng[1]["cpu"]), "each rank's own noise, saved"

    result = run(["dvc", "repro", "train"], project)
    assert re.search(r"resuming from epoch [12] of 3", result.stdout), result.stdout
    assert (project / "models/model.pt").read_bytes() == (uninterrupted / "models/model.pt").read_bytes()
    assert (project / "metrics/history.csv").read_text() == (uninterrupted / "metrics/history.csv").read_text()


def test_torchrun_killed_alone_stops_its_ranks_and_the_next_repro_resumes(tmp_path, torchrun_mirror, started):
    """The OOM killer's SIGKILL of torchrun alone (the train stage, which runs it): its ranks, each
    in a session of its own, would train on unseen and write the outputs after DVC has failed."""
    project = make_project(tmp_path / "p", torchrun_mirror, **TORCHRUN | {"mlflow.enabled": False})
    proc = started(["dvc", "repro", "train"], project)
    read_until(proc, epoch_ended(1))
    torchrun = stage_process(proc, "train")
    ranks = torchrun.children()
    assert len(ranks) == 2, [r.cmdline() for r in ranks]
    torchrun.kill()
    _, alive = psutil.wait_procs(ranks, timeout=60)
    assert not alive, "ranks still running after torchrun was killed"
    assert not (project / "models/model.pt").exists(), "the ranks trained on to the end"
    assert (project / "models/checkpoint.pt").exists()
    assert re.search(r"resuming from epoch [12] of 3", run(["dvc", "repro", "train"], project).stdout)


def test_a_mistake_found_inside_the_ranks_is_one_line_and_exit_2_not_torchruns_dump(tmp_path, mirror):
    project = make_project(tmp_path / "p", mirror, **TORCHRUN | {"train.batch_size": 7})
    result = run(["dvc", "repro", "train"], project, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: train.batch_size 7 (the global batch) must split evenly over train.num_processes 2, "
        "with every batch at least one image per process"
    ], result.stderr
    assert "exited with 2" in result.stderr
    assert "ChildFailedError" not in result.stderr and "Traceback" not in result.stderr, result.stderr
