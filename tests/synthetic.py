"""Small, real IDX files for tests: one stroke per image, its angle set by the label, so there is
something for the VAE to learn and for the latent space to separate."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.idx import FILES, IMAGE_SIZE, write_idx


def make_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) - (IMAGE_SIZE - 1) / 2
    angles = labels[:, None, None] * (np.pi / 10) + rng.normal(0, 0.05, (len(labels), 1, 1))
    shift = rng.normal(0, 1.5, (len(labels), 2, 1, 1))
    x, y = xx - shift[:, 0], yy - shift[:, 1]
    distance = np.abs(x * np.sin(angles) - y * np.cos(angles))
    along = np.abs(x * np.cos(angles) + y * np.sin(angles))
    strokes = np.clip(2.0 - distance, 0, 1) * (along < 10)
    return (strokes * 255).astype(np.uint8)


def write_mirror(folder: Path, n_train: int = 240, n_test: int = 60, gz: bool = True, seed: int = 0) -> Path:
    """Write the four standard IDX files (gzipped or not) into `folder`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(folder / (FILES[f"{split}_images"] + suffix), make_images(labels, rng))
        write_idx(folder / (FILES[f"{split}_labels"] + suffix), labels)
    return folder
