"""The prepared data parts: drawn from the raw IDX files by a seeded split (the split stage's
work), written into data/split/, and read by every later stage.

Each part ("train", "val", "test") is two uint8 .npy arrays, images N x 28 x 28 and labels N:
compact, and byte-identical for the same seed, so DVC's hashes are reproducible.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from pipeline.atomic import atomic_dir
from pipeline.errors import PipelineError
from pipeline.idx import read_split
from pipeline.params import Params
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


class TrainingData(NamedTuple):
    """The train stage's uint8 images on the device, named as MLflow's dataset contexts name them."""

    train: torch.Tensor
    validation: torch.Tensor


def training_data(device: torch.device) -> TrainingData:
    return TrainingData(part_on("train", device)[0], part_on("val", device)[0])


def check_training_data(params: Params, data: TrainingData, world_size: int = 1) -> None:
    """The data checked against the params that batch them, before any training."""
    cfg = params.train
    n_train = len(data.train)
    if cfg.batch_size > n_train:
        raise PipelineError(f"train.batch_size {cfg.batch_size} is larger than the {n_train} training images; lower it")
    if params.model.input_dim != 1:
        raise PipelineError(f"model.input_dim is {params.model.input_dim} but the images have 1 channel; set it to 1")
    if cfg.batch_size % world_size or 0 < n_train % cfg.batch_size < world_size:
        raise PipelineError(
            f"train.batch_size {cfg.batch_size} (the global batch) must split evenly over "
            f"train.num_processes {world_size}, with every batch at least one image per process"
        )


def split(
    raw_dir: Path,
    target: Path,
    val_fraction: float,
    seed: int,
    train_images: int | None = None,
    test_images: int | None = None,
) -> dict[str, int]:
    """The seeded split of `train_images` of the training images (None: all of them; a seeded draw
    of N, so the first N of the seeded order that splits them all), and the first `test_images`."""
    images, labels = read_split(raw_dir, "train")
    test, test_labels = read_split(raw_dir, "test")
    for key, wanted, there, named in (
        ("train_images", train_images, images, "training"),
        ("test_images", test_images, test, "test"),
    ):
        if wanted is not None and wanted > len(there):
            raise PipelineError(
                f"data.{key} is {wanted} but {raw_dir} holds {len(there)} {named} images; "
                f"set it to at most {len(there)}, or null for all of them"
            )
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).numpy()
    order = order[: train_images or len(images)]
    n_val = round(len(order) * val_fraction)
    if not 0 < n_val < len(order):
        raise PipelineError(
            f"data.val_fraction {val_fraction} of {len(order)} training images leaves {n_val} for validation and "
            f"{len(order) - n_val} for training; both need at least one image"
        )
    parts = {
        "train": order[n_val:],
        "val": order[:n_val],
    }
    test, test_labels = test[: test_images or len(test)], test_labels[: test_images or len(test)]
    with atomic_dir(target) as staging:
        for part, index in parts.items():
            save_part(part, images[index], labels[index], staging)
        save_part("test", test, test_labels, staging)
    return {part: len(index) for part, index in parts.items()} | {"test": len(test)}
