"""The prepared data parts: drawn from the raw IDX files by a seeded split (the split stage's
work), written into data/split/, and read by every later stage.

Each part ("train", "val", "test") is two uint8 .npy arrays, images N x 28 x 28 and labels N:
compact, and byte-identical for the same seed, so DVC's hashes are reproducible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import atomic_dir
from pipeline.errors import PipelineError
from pipeline.idx import read_split
from pipeline.paths import SPLIT_DIR


def images_file(part: str, split_dir: Path = SPLIT_DIR) -> Path:
    return Path(split_dir) / f"{part}_images.npy"


def labels_file(part: str, split_dir: Path = SPLIT_DIR) -> Path:
    return Path(split_dir) / f"{part}_labels.npy"


def save_part(part: str, images: np.ndarray, labels: np.ndarray, split_dir: Path) -> None:
    np.save(images_file(part, split_dir), images)
    np.save(labels_file(part, split_dir), labels)


def load_part(part: str, split_dir: Path = SPLIT_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x 28 x 28 uint8) and labels of 'train', 'val' or 'test'."""
    return np.load(images_file(part, split_dir)), np.load(labels_file(part, split_dir))


def part_on(part: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A part as tensors on `device`: uint8 images, int64 labels (what indexing and one_hot take)."""
    images, labels = load_part(part)
    return torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device).long()


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
