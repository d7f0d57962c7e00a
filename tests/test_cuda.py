"""The CUDA paths, as a user with a GPU meets them: `dvc repro` on the GPU, in deterministic mode.
Skipped without a CUDA device.

PIPELINE_TEST_DEVICE=cpu runs these same checks on the CPU, to try the tests themselves on a
machine without a GPU; the CPU-against-GPU comparison then compares the CPU with itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from pipeline.device import has_native_bf16
from tests.processes import epoch_ended, read_until
from tests.projects import edit_params, make_project, project_env, run
from tests.servers import SYSTEM_METRICS_OFTEN, runs_of
from tests.synthetic import write_mirror

DEVICE = os.environ.get("PIPELINE_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
EPOCHS = 6 if DEVICE == "cuda" else 3  # enough that a kill after the first epoch lands inside the run
SETTINGS = {"train.device": DEVICE, "train.deterministic": True, "train.epochs": EPOCHS, "train.batch_size": 64}
TRAIN_IMAGES = 20_000 if DEVICE == "cuda" else 1_500  # an epoch long enough that a kill lands inside a run


@pytest.fixture(scope="module")
def device_mirror(tmp_path_factory) -> Path:
    return write_mirror(tmp_path_factory.mktemp("mirror"), n_train=TRAIN_IMAGES, n_test=500)


@pytest.fixture(scope="module")
def on_device(tmp_path_factory, device_mirror) -> Path:
    """The whole pipeline reproduced on the device, tracked, with system metrics sampled often."""
    project = make_project(tmp_path_factory.mktemp("on-device") / "p", device_mirror, **SETTINGS)
    result = run(["dvc", "repro"], project, env=project_env() | SYSTEM_METRICS_OFTEN)
    assert "Running stage 'visualize'" in result.stdout
    # MLflow checks the logged model on the input example; seen failing on an H200 before the
    # check was pointed at the CPU, where the exported program lives.
    assert "Failed to validate serving input example" not in result.stdout + result.stderr
    return project


def test_the_run_names_the_gpu_and_holds_its_utilisation_and_memory(on_device):
    client, [mlrun] = runs_of(on_device)
    assert mlrun.info.status == "FINISHED"
    tags, metrics = mlrun.data.tags, set(mlrun.data.metrics)
    assert tags["device.type"] == DEVICE
    assert "system/cpu_utilization_percentage" in metrics
    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        assert tags["cuda.device_name"] == props.name
        assert tags["cuda.version"] == torch.version.cuda
        assert tags["cuda.capability"] == f"{props.major}.{props.minor}"
        assert {"system/gpu_0_utilization_percentage", "system/gpu_0_memory_usage_megabytes"} <= metrics, metrics


def test_deterministic_training_gives_the_same_model_twice(on_device, device_mirror, tmp_path):
    again = make_project(tmp_path / "again", device_mirror, **SETTINGS, **{"mlflow.enabled": False})
    run(["dvc", "repro", "train"], again)
    assert (again / "models/model.pt").read_bytes() == (on_device / "models/model.pt").read_bytes()
    assert (again / "metrics/history.csv").read_text() == (on_device / "metrics/history.csv").read_text()


def test_training_killed_mid_run_resumes_to_the_same_model(on_device, device_mirror, tmp_path, started):
    project = make_project(tmp_path / "p", device_mirror, **SETTINGS)
    proc = started(["dvc", "repro", "train"], project)
    read_until(proc, epoch_ended(1))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (project / "models/model.pt").exists(), "killed before the end: raise TRAIN_IMAGES"
    assert (project / "models/checkpoint.pt").exists()

    result = run(["dvc", "repro", "train"], project)
    assert re.search(rf"resuming from epoch \d of {EPOCHS}", result.stdout), result.stdout
    assert (project / "models/model.pt").read_bytes() == (on_device / "models/model.pt").read_bytes()
    assert (project / "metrics/history.csv").read_text() == (on_device / "metrics/history.csv").read_text()


def test_auto_precision_trains_in_bf16_where_the_device_has_it_and_twice_gives_the_same_model(device_mirror, tmp_path):
    settings = SETTINGS | {"train.precision": "auto", "train.epochs": 2}
    first = make_project(tmp_path / "first", device_mirror, **settings)
    run(["dvc", "repro", "train"], first)
    _, [mlrun] = runs_of(first)
    assert mlrun.data.tags["train.precision_used"] == ("bf16" if has_native_bf16(torch.device(DEVICE)) else "fp32")
    again = make_project(tmp_path / "again", device_mirror, **settings, **{"mlflow.enabled": False})
    run(["dvc", "repro", "train"], again)
    assert (again / "models/model.pt").read_bytes() == (first / "models/model.pt").read_bytes()


def test_evaluate_and_visualize_on_the_cpu_agree_with_the_device(on_device, tmp_path):
    """The same model and the same seeded noise (drawn on the CPU for every device): only float
    rounding, and TF32 convolutions on the GPU, may differ."""
    on_cpu = Path(shutil.copytree(on_device, tmp_path / "cpu", symlinks=True))
    edit_params(on_cpu, **{"train.device": "cpu", "mlflow.enabled": False})
    for stage in ("evaluate", "visualize"):
        run(["dvc", "repro", "--single-item", stage], on_cpu)

    device_metrics, cpu_metrics = (json.loads((p / "metrics/test.json").read_text()) for p in (on_device, on_cpu))
    assert device_metrics.keys() == cpu_metrics.keys()
    assert device_metrics["active_units"] == cpu_metrics["active_units"]
    knn = next(k for k in cpu_metrics if k.startswith("test_knn"))
    assert abs(device_metrics[knn] - cpu_metrics[knn]) <= 0.01, "a few near-ties may fall the other way"
    for name in cpu_metrics.keys() - {"active_units", knn}:
        assert device_metrics[name] == pytest.approx(cpu_metrics[name], rel=1e-3, abs=1e-3), name

    for figure in sorted((on_cpu / "figures").iterdir()):
        device_pixels = matplotlib.image.imread(on_device / "figures" / figure.name)
        cpu_pixels = matplotlib.image.imread(figure)
        assert device_pixels.shape == cpu_pixels.shape, figure.name
        assert np.abs(device_pixels - cpu_pixels).mean() < 0.01, figure.name


@pytest.mark.skipif(DEVICE != "cuda", reason="counts GPUs")
def test_more_processes_than_gpus_are_refused_before_any_starts(tmp_path):
    gpus = torch.cuda.device_count()
    (tmp_path / "params.yaml").write_text(f"train: {{device: cuda, num_processes: {gpus + 1}}}\n")
    result = run(
        [sys.executable, "-m", "pipeline.train"],
        tmp_path,
        check=False,
        env=project_env()
        | {
            "PYTHONPATH": os.pathsep.join(  # the packages' path kept: a GPU node's bundle
                [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]
            )
        },
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"error: train.num_processes is {gpus + 1} but PyTorch sees {gpus} GPU(s) "
        f"(CUDA_VISIBLE_DEVICES may hide some); set it to {gpus} or fewer\n"
    )
