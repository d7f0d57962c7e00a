"""Reading, writing and checking IDX files, the format MNIST and Fashion-MNIST ship in.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, then the values. Both datasets use unsigned bytes: images are
N x 28 x 28 (magic 0x00000803) and labels are N (magic 0x00000801).
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

UBYTE = 0x08
IMAGE_SIZE = 28  # MNIST's and Fashion-MNIST's images are 28x28 (what the model is built for too)
NUM_CLASSES = 10
# Each dataset's class names, by label (data.dataset's values).
CLASS_NAMES = {
    "mnist": tuple("0123456789"),
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
}
# The four files of the standard layout, by role: (training?, images?) -> file name.
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class IdxError(PipelineError):
    """An IDX file that is truncated, mislabelled or inconsistent with its partner."""


def read_idx(path: Path, ndim: int, named: Callable[[Path], object] = str) -> np.ndarray:
    """Parse an IDX file of unsigned bytes with `ndim` dimensions, checking its header against its size.
    An error calls the file `named(path)`: where the user's copy is, where it is read from a staging copy."""
    path = Path(path)
    data = path.read_bytes()
    shown = named(path)
    if len(data) < 4:
        raise IdxError(
            f"{shown}: {len(data)} bytes is too short for an IDX header; the file is truncated, fetch it again"
        )
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    expected_magic = (UBYTE << 8) | ndim
    if zero != 0 or dtype != UBYTE or dims != ndim:
        raise IdxError(
            f"{shown}: magic number 0x{int.from_bytes(data[:4], 'big'):08x} is not 0x{expected_magic:08x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''}); "
            "is it the right file, or still gzip-compressed?"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"{shown}: header cut short at {len(data)} bytes; the file is truncated, fetch it again")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise IdxError(
            f"{shown}: header promises shape {shape} ({expected} bytes) but the file has {len(data)} bytes; "
            "the file is truncated or corrupt, fetch it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, UBYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(header + array.tobytes())


def read_pair(
    images_path: Path, labels_path: Path, named: Callable[[Path], object] = str
) -> tuple[np.ndarray, np.ndarray]:
    """Read an images/labels pair and check that they describe the same 28x28, 10-class dataset."""
    images = read_idx(images_path, 3, named)
    labels = read_idx(labels_path, 1, named)
    images_shown, labels_shown = named(Path(images_path)), named(Path(labels_path))
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise IdxError(
            f"{images_shown}: images are {images.shape[1]}x{images.shape[2]}, not the {IMAGE_SIZE}x{IMAGE_SIZE} "
            "of MNIST and Fashion-MNIST; this is not one of them"
        )
    if len(images) != len(labels):
        raise IdxError(
            f"{images_shown} holds {len(images)} images but {labels_shown} holds {len(labels)} labels; "
            "the two files come from different downloads, fetch both again"
        )
    if len(images) == 0:
        raise IdxError(f"{images_shown}: holds no images")
    if labels.max() >= NUM_CLASSES:
        raise IdxError(
            f"{labels_shown}: label {labels.max()} is outside 0-{NUM_CLASSES - 1}; is it a label file of MNIST layout?"
        )
    return images, labels


def read_split(raw_dir: Path, split: str, named: Callable[[Path], object] = str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of the "train" or "test" half of a raw IDX folder."""
    return read_pair(Path(raw_dir) / FILES[f"{split}_images"], Path(raw_dir) / FILES[f"{split}_labels"], named)
