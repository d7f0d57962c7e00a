"""Faults with real processes, signals, servers and files: each ends in a clear message or a correct
result, never in lost work or a half-written output."""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from tests.conftest import edit_params, free_port, make_project, project_env, run
from tests.synthetic import write_mirror

pytestmark = pytest.mark.slow
EPOCHS = 4


@pytest.fixture(scope="module")
def bigger_mirror(tmp_path_factory) -> Path:
    """Enough images that an epoch lasts about a second, so a kill can land inside one."""
    return write_mirror(tmp_path_factory.mktemp("mirror"), n_train=1500, n_test=100)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, bigger_mirror) -> Path:
    project = make_project(tmp_path_factory.mktemp("uninterrupted") / "p", bigger_mirror, **{"train.epochs": EPOCHS})
    run(["dvc", "repro", "train"], project)
    return project


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    """A process in its own session (so a signal reaches its children), stdout and stderr merged."""
    return subprocess.Popen(args, cwd=cwd, env=project_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def read_until(proc: subprocess.Popen, pattern: str) -> str:
    seen = ""
    for line in proc.stdout:
        seen += line
        if re.search(pattern, line):
            return seen
    raise AssertionError(f"process ended before printing {pattern!r}:\n{seen}")


def runs_of(project: Path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("vae-pipeline")
    return client, client.search_runs([experiment.experiment_id])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_training_resumes_to_bit_identical_weights_in_the_same_run(tmp_path, bigger_mirror, uninterrupted, sig):
    project = make_project(tmp_path / "p", bigger_mirror, **{"train.epochs": EPOCHS})
    proc = start(["dvc", "repro", "train"], project)
    read_until(proc, r"^epoch 2/")
    time.sleep(0.3)  # into epoch 3
    os.killpg(proc.pid, sig)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert not (project / "models/model.pt").exists()
    assert (project / "models/checkpoint.pt").exists()

    result = run(["dvc", "repro", "train"], project)
    assert re.search(r"resuming from epoch [23] of 4", result.stdout), result.stdout
    assert (project / "models/model.pt").read_bytes() == (uninterrupted / "models/model.pt").read_bytes()
    assert (project / "metrics/history.csv").read_text() == (uninterrupted / "metrics/history.csv").read_text()
    assert not (project / "models/checkpoint.pt").exists(), "a finished stage leaves no checkpoint"

    client, runs = runs_of(project)
    assert len(runs) == 1, "the resumed training logs into the run it started"
    assert runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_total")]
    assert sorted(steps) == [1, 2, 3, 4], "every epoch logged exactly once"


def test_checkpoint_of_other_params_is_not_resumed(tmp_path, bigger_mirror):
    project = make_project(tmp_path / "p", bigger_mirror, **{"train.epochs": EPOCHS})
    proc = start(["dvc", "repro", "train"], project)
    read_until(proc, r"^epoch 1/")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    edit_params(project, **{"train.learning_rate": 0.001, "train.epochs": 1})
    result = run(["dvc", "repro", "train"], project)
    assert "discarding models/checkpoint.pt" in result.stdout
    assert "resuming" not in result.stdout


def test_divergence_names_epoch_step_and_learning_rate(project):
    edit_params(project, **{"train.learning_rate": 1.0e6})
    result = run(["dvc", "repro", "train"], project, check=False)
    assert result.returncode != 0
    assert re.search(r"error: loss became NaN or infinite at epoch 1, step \d+; train.learning_rate 1000000.0",
                     result.stderr), result.stderr
    assert not (project / "models/model.pt").exists()
    _, runs = runs_of(project)
    assert [r.info.status for r in runs] == ["FAILED"]


def test_unreachable_tracking_server_fails_fast_naming_it_without_credentials(project):
    run(["dvc", "repro", "split"], project)
    uri = f"http://alice:s3cret@127.0.0.1:{free_port()}"
    edit_params(project, **{"mlflow.tracking_uri": uri})
    started = time.monotonic()
    result = run([sys.executable, "-m", "pipeline.train"], project, check=False)
    seconds = time.monotonic() - started
    assert result.returncode == 2
    assert f"cannot reach the MLflow tracking store http://***@127.0.0.1:{uri.rsplit(':', 1)[1]}" in result.stderr
    assert "s3cret" not in result.stdout + result.stderr
    assert seconds < 30, f"took {seconds:.0f} s to give up"
    assert not (project / "models/model.pt").exists() and not (project / "models/checkpoint.pt").exists()


def test_tracking_disabled_runs_the_whole_pipeline_without_a_store(project):
    edit_params(project, **{"mlflow.enabled": False})
    run(["dvc", "repro"], project)
    assert (project / "metrics/test.json").exists() and (project / "figures/manifold.png").exists()
    assert not (project / "mlruns/mlflow.db").exists()


def test_server_dying_mid_run_still_writes_every_output(tmp_path, bigger_mirror, mlflow_server):
    url, store, server = mlflow_server
    project = make_project(tmp_path / "p", bigger_mirror, **{"train.epochs": 5})
    run(["dvc", "repro", "split"], project)
    edit_params(project, **{"mlflow.tracking_uri": url.replace("http://", "http://alice:s3cret@")})
    proc = start([sys.executable, "-m", "pipeline.train"], project)
    seen = read_until(proc, r"^epoch 2/")
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    seen += proc.stdout.read()
    proc.stdout.close()
    assert proc.wait(timeout=300) == 0, seen
    assert "warning: MLflow stopped accepting logs" in seen
    assert re.search(r"warning: not logged to MLflow run \w+: metrics at step \d", seen), seen
    assert (project / "models/model.pt").exists() and (project / "metrics/history.csv").exists()
    assert not (project / "models/checkpoint.pt").exists()

    client = mlflow.MlflowClient(tracking_uri=store)
    [logged] = client.search_runs([client.get_experiment_by_name("vae-pipeline").experiment_id])
    steps = sorted(m.step for m in client.get_metric_history(logged.info.run_id, "train_total"))
    assert steps[:2] == [1, 2] and steps == list(range(1, len(steps) + 1)), "what was logged is intact"
    assert logged.data.params["mlflow.tracking_uri"] == url.replace("http://", "http://***@")
    assert "s3cret" not in Path(store[len("sqlite:///"):]).read_bytes().decode("latin-1")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_crafted_pickle_in_place_of_the_model_is_refused(project):
    run(["dvc", "repro", "split"], project)
    (project / "models").mkdir(exist_ok=True)
    (project / "models/model.pt").write_bytes(pickle.dumps({"config": _RunsCode()}))
    result = run([sys.executable, "-m", "pipeline.evaluate"], project, check=False)
    assert result.returncode == 2
    assert "models/model.pt holds objects other than tensors and plain values; refusing to unpickle it" in result.stderr
    assert not (project / "pwned").exists()


def test_queued_experiments_run_in_parallel_into_the_projects_own_store(project):
    rates = ("0.001", "0.002")
    for rate in rates:
        run(["dvc", "exp", "run", "--queue", "-S", f"train.learning_rate={rate}"], project)
    run(["dvc", "queue", "start", "-j", "2"], project)
    deadline = time.monotonic() + 600
    while True:
        status = run(["dvc", "queue", "status"], project).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        assert time.monotonic() < deadline, f"queued experiments did not finish:\n{status}"
        time.sleep(3)
    assert len(re.findall(r"\bSuccess\b", status)) == 2, status

    client, runs = runs_of(project)
    assert sorted(r.data.params["train.learning_rate"] for r in runs) == sorted(rates)
    for mlrun in runs:
        assert mlrun.info.status == "FINISHED"
        assert mlrun.data.tags.get("dvc.exp_name"), "a queued run names its DVC experiment"
        assert {"test_total", "val_total"} <= set(mlrun.data.metrics), "every stage logged into the one run"
        assert len(client.list_artifacts(mlrun.info.run_id, "figures")) == 6
    leftovers = list((project / ".dvc/tmp").rglob("mlflow.db")) if (project / ".dvc/tmp").exists() else []
    assert leftovers == [], "no second store inside DVC's temporary copies"


def test_batch_larger_than_the_training_set_is_refused_before_training(project):
    edit_params(project, **{"train.batch_size": 512})
    result = run(["dvc", "repro", "train"], project, check=False)
    assert result.returncode != 0
    assert "error: train.batch_size 512 is larger than the 192 training images; lower it" in result.stderr
    assert not (project / "models/model.pt").exists() and not (project / "models/checkpoint.pt").exists()
