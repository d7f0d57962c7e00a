"""The whole pipeline, as a user runs it: real `dvc repro` in a real git repo, a real MLflow store.
The tests that only read the one reproduced project are the quick tier's end-to-end run; those
that reproduce projects of their own are slow."""

import csv
import json
import math
from pathlib import Path

import mlflow
import pytest
import yaml

from pipeline.history import ACTIVE_UNITS, OBJECTIVE
from pipeline.visualize import FIGURE_COUNT
from tests.projects import EPOCHS, edit_params, run, stages_run


def client_for(project) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")


def only_run(project):
    client = client_for(project)
    experiment = client.get_experiment_by_name("vae-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, f"expected one run, found {len(runs)}"
    return client, runs[0]


def test_every_output_is_written(reproduced):
    p = reproduced
    assert sorted(f.name for f in (p / "data/raw").iterdir()) == [
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
    ]
    assert sorted(f.name for f in (p / "data/split").iterdir()) == [
        f"{part}_{kind}.npy" for part in ("test", "train", "val") for kind in ("images", "labels")
    ]
    assert (p / "models/model.pt").stat().st_size > 100_000

    train = json.loads((p / "metrics/train.json").read_text())
    assert train["epochs"] == EPOCHS
    assert set(train) >= {f"{s}_{n}" for s in ("train", "val") for n in ("reconstruction", "kl", "total")}
    test = json.loads((p / "metrics/test.json").read_text())
    assert set(test) == {
        "test_reconstruction",
        "test_kl",
        "test_total",
        "test_optimised",
        "test_log_likelihood",
        "test_kl_dim0",
        "test_kl_dim1",
        "active_units",
        "test_knn_accuracy",
    } | {f"test_reconstruction_class{c}" for c in range(10)}
    assert test["test_total"] == pytest.approx(test["test_reconstruction"] + test["test_kl"], abs=1e-5)
    assert test["test_optimised"] == test["test_total"], "neither free bits nor a warm-up: the total is optimised"
    assert test["test_kl"] == pytest.approx(test["test_kl_dim0"] + test["test_kl_dim1"], abs=1e-4)
    assert test["active_units"] in (0, 1, 2) and 0 <= test["test_knn_accuracy"] <= 1
    # The log-likelihood bound lies above the ELBO, -(total + the Gaussian's normaliser (784/2) log(pi)).
    assert test["test_log_likelihood"] > -(test["test_total"] + 392 * math.log(math.pi))

    with open(p / "metrics/history.csv") as fh:
        history = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in history] == list(range(1, EPOCHS + 1))
    assert float(history[-1]["train_total"]) < float(history[0]["train_total"]), "training should lower the loss"
    assert history[-1][ACTIVE_UNITS] == str(train[ACTIVE_UNITS]) and 0 <= train[ACTIVE_UNITS] <= 2
    with open(p / "metrics/latent.csv") as fh:
        latent = list(csv.DictReader(fh))
    assert [(int(r["epoch"]), int(r["dimension"])) for r in latent] == [
        (epoch, dim) for epoch in range(1, EPOCHS + 1) for dim in (0, 1)
    ], "a row per epoch and latent dimension"
    for row in history:  # each epoch's dimensions add up to its validation KL
        kl = sum(float(r["kl"]) for r in latent if r["epoch"] == row["epoch"])
        assert kl == pytest.approx(float(row["val_kl"]), rel=1e-4)

    figures = sorted(f.name for f in (p / "figures").iterdir())
    assert len(figures) == FIGURE_COUNT, "the count its progress bar shows"
    assert figures == [
        "interpolation.png",
        "latent_space.png",
        "loss_curves.png",
        "manifold.png",
        "prior_samples.png",
        "reconstructions.png",
        "traversals.png",
    ]
    assert all((p / "figures" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in figures)


def test_mlflow_run_holds_params_metrics_tags_and_images(reproduced):
    client, mlrun = only_run(reproduced)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["train.learning_rate"] == "0.0005"
    assert mlrun.data.params["model.latent_dim"] == "2"
    for name in (
        *("train_reconstruction", "train_kl", "train_total", "val_reconstruction", "val_kl", "val_total"),
        *(ACTIVE_UNITS, "val_kl_dim0", "val_kl_dim1"),  # the latent space's use, while it trains
    ):
        assert [m.step for m in client.get_metric_history(mlrun.info.run_id, name)] == list(range(1, EPOCHS + 1))
    objective = client.get_metric_history(mlrun.info.run_id, OBJECTIVE)
    assert [m.step for m in objective] == list(range(1, EPOCHS + 1)), "the search's objective, every epoch"
    metrics = mlrun.data.metrics
    assert objective[-1].value == pytest.approx(metrics["val_reconstruction"] + metrics["val_kl"], rel=1e-6)
    assert set(mlrun.data.metrics) >= {"test_reconstruction", "test_kl", "test_total"}
    assert client.get_metric_history(mlrun.info.run_id, "system/cpu_utilization_percentage"), "sampled while training"

    tags = mlrun.data.tags
    head = run(["git", "rev-parse", "HEAD"], reproduced).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head
    assert mlrun.info.run_name == head[:7], "under dvc repro, a run of the committed params is named by its commit"
    assert tags["device.type"] == "cpu" and tags["torch.version"] and tags["cpu.threads"]
    assert (
        tags["model.sha256"] == __import__("hashlib").sha256((reproduced / "models/model.pt").read_bytes()).hexdigest()
    )

    lock = yaml.safe_load((reproduced / "dvc.lock").read_text())
    [model_out] = [out for out in lock["stages"]["train"]["outs"] if out["path"] == "models/model.pt"]
    assert tags["dvc.model_md5"] == model_out["md5"], "the run names the model dvc.lock records"

    inputs = {d.dataset.name: d for d in mlrun.inputs.dataset_inputs}
    assert set(inputs) == {"mnist-train", "mnist-validation", "mnist-test"}, "the test set: evaluate's dataset"
    assert all(len(d.dataset.digest) >= 8 for d in inputs.values())

    images = [a.path for a in client.list_artifacts(mlrun.info.run_id, "images")]
    for step in range(0, EPOCHS + 1):  # step 0: the untrained model, where MLflow's image card opens
        assert any(f"reconstructions+step+{step}+" in path and path.endswith(".png") for path in images), images

    artifacts = sorted(a.path for a in client.list_artifacts(mlrun.info.run_id, "figures"))
    assert artifacts == [
        f"figures/{n}.png"
        for n in (
            "interpolation",
            "latent_space",
            "loss_curves",
            "manifold",
            "prior_samples",
            "reconstructions",
            "traversals",
        )
    ]
    assert mlrun.info.artifact_uri.startswith(f"file://{reproduced}/mlruns/artifacts/")


def test_logged_model_loads_back_and_reconstructs_like_the_dvc_model(reproduced):
    import numpy as np
    import torch

    from pipeline.model import Reconstructor
    from pipeline.model_files import load_model

    client, mlrun = only_run(reproduced)
    [logged] = client.search_logged_models([mlrun.info.experiment_id])
    assert logged.source_run_id == mlrun.info.run_id
    mlflow.set_tracking_uri(f"sqlite:///{reproduced}/mlruns/mlflow.db")
    loaded = mlflow.pytorch.load_model(logged.model_uri)
    images = np.load(reproduced / "data/split/test_images.npy")[:8]
    x = torch.from_numpy(images).unsqueeze(1).float() / 255
    expected = Reconstructor(load_model(reproduced / "models/model.pt"))(x)
    assert torch.allclose(loaded(x), expected, atol=1e-5)
    [version] = client.search_model_versions("name = 'vae'")
    assert version.run_id == mlrun.info.run_id, "mlflow.registered_model registers the trained model"
    signature = mlflow.models.get_model_info(logged.model_uri).signature
    assert signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 1, 28, 28)


def test_second_repro_runs_nothing(reproduced):
    result = run(["dvc", "repro"], reproduced)
    assert stages_run(result.stdout) == []
    assert "Data and pipelines are up to date." in result.stdout


@pytest.fixture
def edited(project) -> Path:
    """A reproduced project of the test's own, for a test that edits it (`reproduced` is only read)."""
    run(["dvc", "repro"], project)
    return project


@pytest.mark.slow
def test_a_param_edit_reruns_exactly_the_stages_that_depend_on_it(edited):
    edit_params(edited, **{"visualize.num_images": 6})
    assert stages_run(run(["dvc", "repro"], edited).stdout) == ["visualize"]
    edit_params(edited, **{"train.learning_rate": 0.001})
    assert stages_run(run(["dvc", "repro"], edited).stdout) == ["train", "evaluate", "visualize"]
    client = client_for(edited)
    [newest] = client.search_runs(
        [client.get_experiment_by_name("vae-pipeline").experiment_id],
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    head = run(["git", "rev-parse", "--short=7", "HEAD"], edited).stdout.strip()
    assert newest.info.run_name == f"{head} train.learning_rate=0.001 visualize.num_images=6", (
        "named by the commit and the params that differ from its params.yaml"
    )
    edit_params(edited, **{"data.val_fraction": 0.25})
    assert stages_run(run(["dvc", "repro"], edited).stdout) == ["split", "train", "evaluate", "visualize"]
    split_before = {f.name: f.read_bytes() for f in (edited / "data/split").iterdir()}
    edit_params(edited, **{"seed": 7})  # a sweep over the training seed keeps the validation set
    assert stages_run(run(["dvc", "repro"], edited).stdout) == ["train", "evaluate", "visualize"]
    assert {f.name: f.read_bytes() for f in (edited / "data/split").iterdir()} == split_before
    edit_params(edited, **{"data.split_seed": 7})
    assert stages_run(run(["dvc", "repro"], edited).stdout) == ["split", "train", "evaluate", "visualize"]
    edit_params(edited, **{"mlflow.experiment_name": "elsewhere"})
    assert stages_run(run(["dvc", "repro"], edited).stdout) == ["check"], "where results are logged changes none"


@pytest.mark.slow
def test_a_code_edit_reruns_exactly_the_stages_whose_results_it_can_change(edited):
    def touch(module: str) -> list[str]:
        with open(edited / "pipeline" / module, "a") as fh:
            fh.write("# edited\n")
        return stages_run(run(["dvc", "repro"], edited).stdout)

    assert touch("tracking/run.py") == [], "reporting code changes no result"
    # Retraining gives the same model bytes on the CPU, so visualize, which does not use the loss, stays.
    assert touch("losses.py") == ["train", "evaluate"]


@pytest.mark.slow
def test_a_latent_space_above_two_dimensions_is_shown_in_its_principal_plane(project):
    edit_params(project, **{"model.latent_dim": 5, "mlflow.enabled": False})
    run(["dvc", "repro"], project)
    test = json.loads((project / "metrics/test.json").read_text())
    assert [k for k in test if k.startswith("test_kl_dim")] == [f"test_kl_dim{i}" for i in range(5)]
    assert (project / "figures/latent_space.png").exists() and (project / "figures/manifold.png").exists()
    with open(project / "metrics/latent.csv") as fh:
        assert {row["dimension"] for row in csv.DictReader(fh)} == {str(i) for i in range(5)}, "each epoch's KL of each"
    assert (project / "figures/traversals.png").exists()


def test_a_traversal_sweeps_one_dimension_a_row_from_minus_to_plus_three_around_the_images_code():
    import torch

    from pipeline.model import VAE, to_input
    from pipeline.visualize import image_grid, traversal_labels, traversals

    torch.manual_seed(0)
    model = VAE(latent_dim=3)
    image = to_input(torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8))
    with torch.no_grad():
        centre = model.encode(image)[0][0]
    decoded = []
    model.decode = lambda z: decoded.append(z) or torch.zeros(len(z), 1, 28, 28)
    assert traversals(model, image, steps=4).shape == (3 * 4, 1, 28, 28), "3 rows of 4"
    [z] = decoded
    sweep = torch.tensor([-3.0, -1.0, 1.0, 3.0])
    for i, row in enumerate(z.view(3, 4, 3)):
        torch.testing.assert_close(row[:, i], sweep)
        others = [d for d in range(3) if d != i]
        assert torch.equal(row[:, others], centre[others].expand(4, 2)), "the others at the image's mean"
    drawn = image_grid(torch.zeros(12, 1, 28, 28), 4, "traversals", traversal_labels(model))
    labels = [t.get_text() for t in drawn.axes[0].get_yticklabels()]
    assert labels == ["z[0]", "z[1]", "z[2]"]


def test_latent_plane_is_the_axes_in_2d_and_orthonormal_principal_axes_above():
    import torch

    from pipeline.visualize import latent_plane

    origin, axes = latent_plane(torch.randn(100, 2))
    assert torch.equal(origin, torch.zeros(2)) and torch.equal(axes, torch.eye(2))
    means = torch.randn(500, 6) * torch.tensor([5.0, 0.1, 0.1, 3.0, 0.1, 0.1])
    origin, axes = latent_plane(means)
    torch.testing.assert_close(axes @ axes.T, torch.eye(2), atol=1e-5, rtol=0)
    assert axes[0].abs().argmax() == 0 and axes[1].abs().argmax() == 3, "the two directions of largest spread"


@pytest.mark.parametrize("count, cols", [(10, 10), (16, 4), (7, 3), (3, 10)])
def test_the_figures_tile_images_as_torchvisions_make_grid_does(count, cols):
    import torch
    import torchvision

    from pipeline.tiling import tile

    images = torch.rand(count, 1, 28, 28)
    assert torch.equal(tile(images, cols), torchvision.utils.make_grid(images, nrow=cols, padding=2, pad_value=1.0)[0])
