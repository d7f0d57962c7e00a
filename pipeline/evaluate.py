"""Stage evaluate: test-set losses of the trained model, into metrics/ and the model's MLflow run."""

from __future__ import annotations

import json

import torch

from pipeline import atomic, tracking
from pipeline.errors import run_stage
from pipeline.model import dataset_loss
from pipeline.params import load_params
from pipeline.paths import MODEL_FILE, TEST_METRICS
from pipeline.split import load_part
from pipeline.train import LOSS_NAMES, file_sha256, load_model, resolve_device


def main() -> None:
    params = load_params()
    device = resolve_device(params.train.device)
    tracked = tracking.run_for_model(tracking.connect(params.mlflow), file_sha256(MODEL_FILE))

    model = load_model(MODEL_FILE, device)
    test_images = torch.from_numpy(load_part("test")[0]).to(device)
    torch.manual_seed(params.seed)  # the reparameterisation noise
    parts = dataset_loss(model, test_images).tolist()
    metrics = {f"test_{name}": round(value, 6) for name, value in zip(LOSS_NAMES, parts)}

    atomic.write_text(TEST_METRICS, json.dumps(metrics, indent=2) + "\n")
    tracked.log_metrics(metrics)
    tracked.finish()
    print("  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))


if __name__ == "__main__":
    run_stage(main)
