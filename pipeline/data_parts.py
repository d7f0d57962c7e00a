"""The prepared data parts: what the split stage writes into data/split/ and every later stage reads.

Each part ("train", "val", "test") is two uint8 .npy arrays, images N x 28 x 28 and labels N:
compact, and byte-identical for the same seed, so DVC's hashes are reproducible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

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
