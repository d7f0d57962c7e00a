"""Stage split: a seeded train/validation split of the training images; the test set kept apart,
written as the data parts every later stage reads (`pipeline.data_parts`)."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.atomic import atomic_dir
from pipeline.data_parts import save_part
from pipeline.errors import PipelineError, run_stage
from pipeline.idx import read_split
from pipeline.params import load_params
from pipeline.paths import RAW_DIR, SPLIT_DIR


def split(raw_dir: Path, target: Path, val_fraction: float, seed: int) -> dict[str, int]:
    images, labels = read_split(raw_dir, "train")
    n_val = round(len(images) * val_fraction)
    if not 0 < n_val < len(images):
        raise PipelineError(
            f"data.val_fraction {val_fraction} of {len(images)} training images leaves {n_val} for validation and "
            f"{len(images) - n_val} for training; both need at least one image"
        )
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).numpy()
    parts = {
        "train": order[n_val:],
        "val": order[:n_val],
    }
    test_images, test_labels = read_split(raw_dir, "test")
    with atomic_dir(target) as staging:
        for part, index in parts.items():
            save_part(part, images[index], labels[index], staging)
        save_part("test", test_images, test_labels, staging)
    return {part: len(index) for part, index in parts.items()} | {"test": len(test_images)}


def main() -> None:
    params = load_params()
    sizes = split(RAW_DIR, SPLIT_DIR, params.data.val_fraction, params.data.split_seed)
    print(", ".join(f"{part}: {n} images" for part, n in sizes.items()))


if __name__ == "__main__":
    run_stage(main)
