"""Stage split: a seeded train/validation split of the training images, the test set kept apart,
written as the data parts every later stage reads (pipeline.data_parts)."""

from __future__ import annotations

from pipeline.data_parts import split
from pipeline.params import load_params
from pipeline.paths import RAW_DIR, SPLIT_DIR
from pipeline.stage import run_stage


def main() -> None:
    params = load_params()
    cfg = params.data
    sizes = split(RAW_DIR, SPLIT_DIR, cfg.val_fraction, cfg.split_seed, cfg.train_images, cfg.test_images)
    print(", ".join(f"{part}: {n} images" for part, n in sizes.items()))


if __name__ == "__main__":
    run_stage(main)
