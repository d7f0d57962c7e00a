"""IDX parsing and the download and split stages, on real files, a real HTTP server and real gzip."""

import gzip
import hashlib
import socket
from pathlib import Path

import numpy as np
import pytest
import torchvision

from pipeline.data_parts import load_part, split
from pipeline.idx import FILES, IdxError, read_idx, read_pair, write_idx
from pipeline.raw_data import DownloadError, download
from tests.synthetic import write_mirror


def test_idx_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "images", images)
    np.testing.assert_array_equal(read_idx(tmp_path / "images", 3), images)
    assert (tmp_path / "images").read_bytes()[:4] == b"\x00\x00\x08\x03"


def test_synthetic_files_read_like_torchvision_reads_them(tmp_path):
    write_mirror(tmp_path, n_train=12, n_test=4, gz=False)
    ours, _ = read_pair(tmp_path / FILES["train_images"], tmp_path / FILES["train_labels"])
    theirs = torchvision.datasets.mnist.read_image_file(str(tmp_path / FILES["train_images"]))
    np.testing.assert_array_equal(ours, theirs.numpy())


def test_truncated_file_is_refused(tmp_path):
    write_idx(tmp_path / "images", np.zeros((5, 28, 28), np.uint8))
    data = (tmp_path / "images").read_bytes()
    (tmp_path / "images").write_bytes(data[:-100])
    with pytest.raises(IdxError, match=r"images: header promises shape \(5, 28, 28\) .* truncated"):
        read_idx(tmp_path / "images", 3)


def test_wrong_magic_number_is_refused(tmp_path):
    write_idx(tmp_path / "labels", np.zeros(5, np.uint8))
    with pytest.raises(IdxError, match=r"labels: magic number 0x00000801 is not 0x00000803"):
        read_idx(tmp_path / "labels", 3)
    (tmp_path / "gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(8)))
    with pytest.raises(IdxError, match="still gzip-compressed"):
        read_idx(tmp_path / "gz", 1)


def test_counts_that_disagree_are_refused(tmp_path):
    write_idx(tmp_path / "images", np.zeros((5, 28, 28), np.uint8))
    write_idx(tmp_path / "labels", np.zeros(4, np.uint8))
    with pytest.raises(IdxError, match="holds 5 images but .*labels holds 4 labels"):
        read_pair(tmp_path / "images", tmp_path / "labels")


def test_labels_outside_0_to_9_are_refused(tmp_path):
    write_idx(tmp_path / "images", np.zeros((2, 28, 28), np.uint8))
    write_idx(tmp_path / "labels", np.array([3, 10], np.uint8))
    with pytest.raises(IdxError, match="label 10 is outside 0-9"):
        read_pair(tmp_path / "images", tmp_path / "labels")


def test_images_of_another_size_are_refused(tmp_path):
    write_idx(tmp_path / "images", np.zeros((2, 32, 32), np.uint8))
    write_idx(tmp_path / "labels", np.zeros(2, np.uint8))
    with pytest.raises(IdxError, match="images are 32x32, not the 28x28 of MNIST and Fashion-MNIST"):
        read_pair(tmp_path / "images", tmp_path / "labels")


@pytest.mark.parametrize("gz", [True, False])
def test_download_from_a_local_folder(tmp_path, gz):
    mirror = write_mirror(tmp_path / "mirror", n_train=30, n_test=10, gz=gz)
    download("mnist", str(mirror), tmp_path / "raw")
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(FILES.values())
    images, labels = read_pair(tmp_path / "raw" / FILES["test_images"], tmp_path / "raw" / FILES["test_labels"])
    assert images.shape == (10, 28, 28) and labels.shape == (10,)


@pytest.mark.parametrize("gz", [True, False])
def test_download_from_a_url(tmp_path, http_server, gz):
    mirror = write_mirror(tmp_path / "mirror", n_train=30, n_test=10, gz=gz)
    download("fashion_mnist", http_server(mirror) + "/", tmp_path / "raw")
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(FILES.values())


class _LocalMNIST(torchvision.datasets.MNIST):
    """torchvision's MNIST class, unchanged but for where it downloads from and the checksums."""


def test_official_path_runs_torchvision_download_and_checks_md5(tmp_path, http_server, monkeypatch):
    mirror = write_mirror(tmp_path / "mirror", n_train=30, n_test=10)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in mirror.iterdir()}
    monkeypatch.setattr(torchvision.datasets, "MNIST", _LocalMNIST)
    monkeypatch.setattr(_LocalMNIST, "mirrors", [http_server(mirror) + "/"])
    monkeypatch.setattr(_LocalMNIST, "resources", [(f + ".gz", md5[f + ".gz"]) for f in FILES.values()])
    download("mnist", None, tmp_path / "raw")
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(FILES.values())

    bad = [(name, "0" * 32 if "t10k-images" in name else digest) for name, digest in _LocalMNIST.resources]
    monkeypatch.setattr(_LocalMNIST, "resources", bad)
    with pytest.raises(
        DownloadError, match="(?s)torchvision could not download _LocalMNIST.*t10k-images.*corrupted.*data.mirror"
    ):
        download("mnist", None, tmp_path / "raw2")
    assert not (tmp_path / "raw2").exists()


def nothing_partial_under(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


def test_truncated_gzip_names_the_file_and_leaves_nothing(tmp_path):
    mirror = write_mirror(tmp_path / "mirror", n_train=300, n_test=10)
    archive = mirror / (FILES["train_images"] + ".gz")
    archive.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(IdxError, match="train-images-idx3-ubyte.gz: not a complete gzip file.*fetch it again"):
        download("mnist", str(mirror), tmp_path / "data" / "raw")
    assert nothing_partial_under(tmp_path / "data")


def test_missing_file_in_the_mirror_is_named(tmp_path, http_server):
    mirror = write_mirror(tmp_path / "mirror", n_train=30, n_test=10)
    (mirror / (FILES["test_labels"] + ".gz")).unlink()
    with pytest.raises(DownloadError, match=r"has neither t10k-labels-idx1-ubyte.gz nor t10k-labels-idx1-ubyte"):
        download("mnist", str(mirror), tmp_path / "data" / "raw")
    with pytest.raises(DownloadError, match=r"http://127.0.0.1:\d+ has neither t10k-labels-idx1-ubyte.gz nor"):
        download("mnist", http_server(mirror), tmp_path / "data" / "raw")
    assert nothing_partial_under(tmp_path / "data")


def test_mismatched_counts_in_a_mirror_leave_nothing(tmp_path):
    mirror = write_mirror(tmp_path / "mirror", n_train=30, n_test=10)
    write_idx(mirror / (FILES["train_labels"] + ".gz"), np.zeros(29, np.uint8))
    with pytest.raises(IdxError, match="holds 30 images but .* holds 29 labels"):
        download("mnist", str(mirror), tmp_path / "data" / "raw")
    assert nothing_partial_under(tmp_path / "data")


def test_unreachable_url_fails_fast_and_names_it(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=rf"cannot reach http://127.0.0.1:{port}/train-images-idx3-ubyte.gz"):
        download("mnist", f"http://127.0.0.1:{port}", tmp_path / "data" / "raw")
    assert nothing_partial_under(tmp_path / "data")


def test_missing_mirror_folder_is_named(tmp_path):
    with pytest.raises(DownloadError, match=r"data.mirror: .*nowhere is not a folder"):
        download("mnist", str(tmp_path / "nowhere"), tmp_path / "raw")


def test_failed_download_keeps_the_previous_data(tmp_path):
    download("mnist", str(write_mirror(tmp_path / "good", n_train=30, n_test=10)), tmp_path / "raw")
    before = {p.name: p.read_bytes() for p in (tmp_path / "raw").iterdir()}
    with pytest.raises(DownloadError):
        download("mnist", str(tmp_path / "nowhere"), tmp_path / "raw")
    assert {p.name: p.read_bytes() for p in (tmp_path / "raw").iterdir()} == before


def test_split_is_seeded_disjoint_and_complete(tmp_path):
    download("mnist", str(write_mirror(tmp_path / "mirror", n_train=100, n_test=20)), tmp_path / "raw")
    sizes = split(tmp_path / "raw", tmp_path / "a", val_fraction=0.2, seed=7)
    assert sizes == {"train": 80, "val": 20, "test": 20}
    split(tmp_path / "raw", tmp_path / "b", val_fraction=0.2, seed=7)
    split(tmp_path / "raw", tmp_path / "c", val_fraction=0.2, seed=8)
    same = all((tmp_path / "a" / f.name).read_bytes() == f.read_bytes() for f in (tmp_path / "b").iterdir())
    assert same, "same seed must give byte-identical files"
    assert load_part("val", tmp_path / "a")[0].tobytes() != load_part("val", tmp_path / "c")[0].tobytes()

    train, val = load_part("train", tmp_path / "a")[0], load_part("val", tmp_path / "a")[0]
    original = read_idx(tmp_path / "raw" / FILES["train_images"], 3)
    assert sorted(x.tobytes() for x in np.concatenate([train, val])) == sorted(x.tobytes() for x in original)
    assert load_part("train", tmp_path / "a")[0].dtype == np.uint8


def test_split_refuses_a_fraction_that_leaves_a_part_empty(tmp_path):
    download("mnist", str(write_mirror(tmp_path / "mirror", n_train=3, n_test=2)), tmp_path / "raw")
    with pytest.raises(Exception, match="data.val_fraction 0.1 of 3 training images leaves 0 for validation"):
        split(tmp_path / "raw", tmp_path / "s", val_fraction=0.1, seed=0)


def test_split_of_all_the_training_images_is_the_split_of_none_named(tmp_path):
    """data.train_images: N draws the first N of the seeded order that splits them all, so N = all
    gives the default's bytes, and a smaller N a split of its own size, seeded as well."""
    download("mnist", str(write_mirror(tmp_path / "mirror", n_train=100, n_test=20)), tmp_path / "raw")
    split(tmp_path / "raw", tmp_path / "all", val_fraction=0.2, seed=7)
    split(tmp_path / "raw", tmp_path / "named", val_fraction=0.2, seed=7, train_images=100, test_images=20)
    assert {f.name: f.read_bytes() for f in (tmp_path / "all").iterdir()} == {
        f.name: f.read_bytes() for f in (tmp_path / "named").iterdir()
    }
    sizes = split(tmp_path / "raw", tmp_path / "part", val_fraction=0.2, seed=7, train_images=30, test_images=5)
    assert sizes == {"train": 24, "val": 6, "test": 5}
    everything = {x.tobytes() for x in load_part("train", tmp_path / "all")[0]}
    everything |= {x.tobytes() for x in load_part("val", tmp_path / "all")[0]}
    part = [x.tobytes() for p in ("train", "val") for x in load_part(p, tmp_path / "part")[0]]
    assert len(set(part)) == 30 and set(part) <= everything
    test_all, test_part = load_part("test", tmp_path / "all")[0], load_part("test", tmp_path / "part")[0]
    assert test_part.tobytes() == test_all[:5].tobytes()


@pytest.mark.parametrize(
    ("key", "value", "held"), [("train_images", 101, "100 training"), ("test_images", 21, "20 test")]
)
def test_split_refuses_more_images_than_the_raw_data_holds(tmp_path, key, value, held):
    download("mnist", str(write_mirror(tmp_path / "mirror", n_train=100, n_test=20)), tmp_path / "raw")
    with pytest.raises(Exception, match=f"data.{key} is {value} but .* holds {held} images; set it to at most"):
        split(tmp_path / "raw", tmp_path / "s", val_fraction=0.2, seed=0, **{key: value})
    assert not (tmp_path / "s").exists()
