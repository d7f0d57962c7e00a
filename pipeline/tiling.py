"""Images tiled into one picture, with torchvision's make_grid's pixels but without importing
torchvision, whose import alone costs a stage seconds."""

from __future__ import annotations

import torch


def tile(images: torch.Tensor, cols: int, padding: int = 2) -> torch.Tensor:
    """(N, 1, H, W) images as one (H', W') image, `cols` to a row, white `padding` between and around."""
    n, _, height, width = images.shape
    cols = min(cols, n)
    rows = -(-n // cols)
    grid = images.new_ones(rows * (height + padding) + padding, cols * (width + padding) + padding)
    for i, image in enumerate(images[:, 0]):
        top, left = (i // cols) * (height + padding) + padding, (i % cols) * (width + padding) + padding
        grid[top : top + height, left : left + width] = image
    return grid
