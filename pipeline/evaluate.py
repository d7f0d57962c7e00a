"""Stage evaluate: the numbers researchers quote for a VAE (pipeline.evaluation), into
metrics/test.json and the model's MLflow run."""

from __future__ import annotations

import json

import torch

from pipeline import atomic, tracking
from pipeline.data_parts import part_on
from pipeline.device import resolve_device
from pipeline.evaluation import evaluate
from pipeline.model_files import file_sha256, load_model
from pipeline.params import load_params
from pipeline.paths import MODEL_FILE, TEST_METRICS
from pipeline.stage import run_stage


def main() -> None:
    params = load_params()
    device = resolve_device(params.train.device)
    tracked = tracking.run_for_stage(
        tracking.connect(params.mlflow), params, "evaluate", device, file_sha256(MODEL_FILE)
    )
    model = load_model(MODEL_FILE, device, params.train.channels_last)
    test_images, test_labels = part_on("test", device)
    train_images, train_labels = part_on("train", device)
    torch.manual_seed(params.seed)  # the reparameterisation and importance-sampling noise, drawn on the CPU
    metrics = evaluate(model, test_images, test_labels, train_images, train_labels, params)

    atomic.write_text(TEST_METRICS, json.dumps(metrics, indent=2) + "\n")
    tracked.log_evaluation(metrics, tracking.log_data(tracked, params, {"test": test_images})["test"])
    if params.mlflow.registered_model:  # registered once evaluated, tagged with its DVC experiment
        tracked.register_model(params.mlflow.registered_model, tracking.dvc_tags())
    tracked.describe()  # now with the test metrics
    tracked.finish()
    print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))


if __name__ == "__main__":
    run_stage(main)
