"""One pipeline execution, one MLflow run, never rewritten, as a user meets it through `dvc exp run`:
experiments that rerun only evaluate or only visualize, experiments whose models have the same
bytes, and a tracking server that goes away mid-training and comes back."""

from __future__ import annotations

import csv
import io
import os
import re
import signal
from pathlib import Path

import mlflow
import pytest

from pipeline.visualize import FIGURE_COUNT
from tests.processes import epoch_ended, read_until
from tests.projects import EPOCHS, RERUNS, edit_params, make_project, project_env, run
from tests.servers import runs_of, serve_mlflow, snapshot
from tests.synthetic import write_mirror

pytestmark = pytest.mark.slow


def shown_metrics(project: Path) -> dict[str, dict[str, float]]:
    """`dvc exp show`'s metric columns per experiment name (the columns its metrics files define)."""
    table = list(csv.DictReader(io.StringIO(run(["dvc", "exp", "show", "--no-pager", "--csv"], project).stdout)))
    keys = [k for k in table[0] if k.startswith(("train_", "val_", "test_")) or k == "active_units"]
    return {row["Experiment"]: {k: float(row[k]) for k in keys} for row in table if row["Experiment"]}


def runs_by_name(project: Path) -> dict[str, mlflow.entities.Run]:
    client, runs = runs_of(project)
    return {r.info.run_name: r for r in runs}


def test_each_experiment_is_one_run_holding_exactly_the_metrics_dvc_shows(partial_experiments):
    project, _ = partial_experiments
    names = run(["dvc", "exp", "list", "--name-only"], project).stdout.split()
    runs = runs_by_name(project)
    assert sorted(runs) == sorted(names) == sorted(["first", *RERUNS])
    for name, metrics in shown_metrics(project).items():
        mlrun = runs[name]
        assert mlrun.info.status == "FINISHED"
        for key, value in metrics.items():
            assert mlrun.data.metrics[key] == pytest.approx(value, abs=1e-5), (name, key)
    client, _ = runs_of(project)
    for name, setting in RERUNS.items():
        key, value = setting.split("=")
        assert runs[name].data.params[key] == value, "the run's params are its own params.yaml"
        history = client.get_metric_history(runs[name].info.run_id, "val_total")
        assert [m.step for m in history] == [EPOCHS], "the training it did not run: its final values, once"


def test_a_later_experiment_never_changes_an_earlier_run(partial_experiments):
    _, snapshots = partial_experiments
    assert len(snapshots["first"]) == 3 and len(snapshots["eval-only"]) == 2
    for name, taken in snapshots.items():
        assert all(later == taken[0] for later in taken[1:]), f"run {name} changed after it finished"


def test_a_run_that_did_not_train_links_to_the_training_run_and_the_model(partial_experiments):
    project, _ = partial_experiments
    client, _ = runs_of(project)
    runs = runs_by_name(project)
    trained = runs["first"]
    model_id = trained.data.tags["model_id"]
    for name in RERUNS:
        tags = runs[name].data.tags
        assert tags["training_run_id"] == trained.info.run_id and tags["model_id"] == model_id
        assert tags["model.sha256"] == trained.data.tags["model.sha256"]
        note = tags["mlflow.note.content"]
        assert (
            f"[run {trained.info.run_id}](#/experiments/{trained.info.experiment_id}/runs/{trained.info.run_id})"
            in note
        ), "the description links to the training run"
        assert f"(#/experiments/{trained.info.experiment_id}/models/{model_id})" in note
    assert len(client.list_artifacts(runs["vis-only"].info.run_id, "figures")) == FIGURE_COUNT
    assert not client.list_artifacts(runs["eval-only"].info.run_id, "figures"), "figures are visualize's"

    evaluations = {(m.run_id, m.key, m.dataset_name) for m in client.get_logged_model(model_id).metrics}
    for name in ("first", "eval-only"):
        assert (runs[name].info.run_id, "test_log_likelihood", "mnist-test") in evaluations, (
            "the model's page lists every evaluation of it"
        )
    versions = {v.tags["dvc.exp_name"]: v for v in client.search_model_versions("name = 'vae'")}
    assert sorted(versions) == ["eval-only", "first"], "registered once evaluated, tagged with the experiment"
    assert client.get_model_version_by_alias("vae", "candidate").version == versions["eval-only"].version


def test_experiments_whose_models_have_the_same_bytes_each_log_into_their_own_run(tmp_path):
    project = make_project(tmp_path / "p", write_mirror(tmp_path / "mirror"))
    run(["dvc", "exp", "run", "-n", "once"], project)
    client, [once] = runs_of(project)
    before = snapshot(client, once.info.run_id)
    run(["dvc", "exp", "run", "-n", "again", "-f"], project)  # retrains: bit-identical on the CPU
    runs = runs_by_name(project)
    assert sorted(runs) == ["again", "once"]
    assert runs["again"].data.tags["model.sha256"] == runs["once"].data.tags["model.sha256"]
    assert snapshot(client, once.info.run_id) == before
    again = runs["again"].info.run_id
    assert [m.step for m in client.get_metric_history(again, "train_total")] == [1]
    assert "test_total" in runs["again"].data.metrics and "training_run_id" not in runs["again"].data.tags


def test_a_server_gone_mid_training_gets_every_epoch_the_model_and_the_description_when_back(tmp_path, started):
    store, artifacts = f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts"
    project = make_project(tmp_path / "p", write_mirror(tmp_path / "mirror", n_train=1500), **{"train.epochs": 5})
    env = project_env() | {"PIPELINE_TRACKING_RETRY_SECONDS": "300"}
    with serve_mlflow(store, artifacts) as (url, _, server):
        edit_params(project, **{"mlflow.tracking_uri": url})
        proc = started(["dvc", "repro", "train"], project, env=env)
        seen = read_until(proc, epoch_ended(2))
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()
    seen += read_until(proc, r"waiting up to 300 s for the MLflow store")  # all 5 epochs trained meanwhile
    assert "warning: MLflow refused" in seen
    port = int(url.rsplit(":", 1)[1])
    with serve_mlflow(store, artifacts, port=port):
        rest = proc.stdout.read()
        assert proc.wait(timeout=300) == 0, seen + rest
        assert "MLflow accepts logs again: everything kept was logged" in rest
        client = mlflow.MlflowClient(tracking_uri=url)
        [mlrun] = client.search_runs([client.get_experiment_by_name("vae-pipeline").experiment_id])
        assert mlrun.info.status == "FINISHED"
        for key in ("train_total", "val_total"):
            assert sorted(m.step for m in client.get_metric_history(mlrun.info.run_id, key)) == [1, 2, 3, 4, 5]
        [model] = client.search_logged_models([mlrun.info.experiment_id])
        assert model.source_run_id == mlrun.info.run_id and mlrun.data.tags["model_id"] == model.model_id
        assert re.search(
            r"- \*\*Model\*\*: `models/model.pt` sha256 `[0-9a-f]{64}`", mlrun.data.tags["mlflow.note.content"]
        )
