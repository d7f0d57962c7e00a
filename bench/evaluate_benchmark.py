"""Seconds of the evaluate stage's work against one training epoch: same model, same device, one run.

Downloads and splits a local IDX mirror with the code the download and split stages run (48,000
training, 12,000 validation and 10,000 test images for the full datasets), trains one epoch as the train stage does
(training plus validation), then evaluates that model on the test images as the evaluate stage
does, K importance samples an image. Prints both times and their ratio and writes them as JSON.

    python bench/evaluate_benchmark.py /path/to/fashion-mnist --out bench/results/evaluate-cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from pipeline.data_parts import load_part, split
from pipeline.device import resolve_device
from pipeline.evaluation import evaluate
from pipeline.losses import dataset_loss
from pipeline.model import VAE
from pipeline.params import EvaluateParams, Params, TrainParams
from pipeline.raw_data import download
from pipeline.step import TrainStep, make_optimizer, train_epoch


def seconds(work, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mirror", type=Path, help="folder with the four IDX files (.gz or not)")
    parser.add_argument("--iw-samples", type=int, default=EvaluateParams.iw_samples, help="K (default: params.yaml's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench/results/evaluate.json"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    params = Params(train=TrainParams(device=args.device), evaluate=EvaluateParams(iw_samples=args.iw_samples))
    cfg = params.train

    with tempfile.TemporaryDirectory() as tmp:
        download("fashion_mnist", str(args.mirror.resolve()), Path(tmp) / "raw")
        split(Path(tmp) / "raw", Path(tmp) / "split", params.data.val_fraction, params.data.split_seed)
        parts = {part: load_part(part, Path(tmp) / "split") for part in ("train", "val", "test")}
    (train_images, train_labels), (val_images, _), (test_images, test_labels) = (
        (torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device).long())
        for images, labels in parts.values()
    )

    torch.manual_seed(params.seed)
    model = VAE().to(device).to(memory_format=torch.channels_last)
    generator = torch.Generator(device=device).manual_seed(params.seed)
    step = TrainStep.from_params(
        cfg, model, make_optimizer(model, cfg.learning_rate, device), train_images, precision="fp32", compile=False
    )

    def one_epoch() -> None:
        train_epoch(step, generator)
        dataset_loss(model, val_images, cfg.channels_last, step.loss).parts.tolist()

    epoch_s = seconds(one_epoch, device)
    print(
        f"one training epoch ({len(train_images):,} + {len(val_images):,} validation images): {epoch_s:.1f} s",
        flush=True,
    )
    model.eval()
    metrics = {}
    evaluate_s = seconds(
        lambda: metrics.update(evaluate(model, test_images, test_labels, train_images, train_labels, params)), device
    )
    ratio = evaluate_s / epoch_s
    print(
        f"evaluate ({len(test_images):,} test images, K = {args.iw_samples}): {evaluate_s:.1f} s  "
        f"= {ratio:.2f} training epochs  ({len(test_images) * args.iw_samples / evaluate_s:,.0f} decodes/s)"
    )

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "train_images": len(train_images),
        "val_images": len(val_images),
        "test_images": len(test_images),
        "iw_samples": args.iw_samples,
        "epoch_seconds": epoch_s,
        "evaluate_seconds": evaluate_s,
        "evaluate_in_epochs": ratio,
        "metrics": metrics,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
