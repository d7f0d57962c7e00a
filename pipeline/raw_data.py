"""data/raw: the four IDX files of a dataset, fetched into a staging folder and each checked before
the folder takes the place of the previous one.

With no mirror this is torchvision's own download (its mirrors in turn, the MD5 of every archive).
A mirror is a local folder or a URL holding the four standard files, gzipped or not.
"""

from __future__ import annotations

import gzip
import shutil
import urllib.error
import zlib
from pathlib import Path
from urllib.parse import urlparse

from pipeline.atomic import atomic_dir
from pipeline.errors import PipelineError
from pipeline.idx import FILES, IdxError, read_split
from pipeline.paths import RAW_DIR, from_root

# data.dataset -> torchvision's class, imported only for a download: torchvision takes seconds to import
DATASETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


class DownloadError(PipelineError):
    """The data could not be fetched: unreachable mirror, missing file, checksum mismatch."""


def fetch_official(dataset: str, dest: Path) -> dict[str, str]:
    """torchvision's download, which tries each of the dataset class's mirrors and checks each MD5.
    Returns what each file is to the user: which download it came from."""
    import torchvision

    dataset_cls = getattr(torchvision.datasets, DATASETS[dataset])
    work = dest / "torchvision"
    try:
        dataset = dataset_cls(root=work, train=True, download=True)
    except RuntimeError as exc:
        raise DownloadError(
            f"torchvision could not download {dataset_cls.__name__}: {exc}\n"
            "Offline? Point data.mirror in params.yaml at a folder or URL holding the four IDX files."
        ) from None
    for name in FILES.values():
        shutil.move(Path(dataset.raw_folder) / name, dest / name)
    shutil.rmtree(work)
    return {name: f"{name} of torchvision's {dataset_cls.__name__} download" for name in FILES.values()}


def fetch_mirror(mirror: str, dest: Path) -> dict[str, str]:
    """Copy (folder) or download (URL) each IDX file, preferring `<name>.gz` over `<name>`. Returns
    where each file came from, as the user knows it: the mirror's path or URL of it."""
    is_url = urlparse(mirror).scheme in ("http", "https", "ftp", "file")
    folder = None if is_url else from_root(mirror)
    if folder is not None and not folder.is_dir():
        raise DownloadError(f"data.mirror: {folder} is not a folder; point it at the folder holding the four IDX files")
    origins = {}
    for name in FILES.values():
        fetched = _download_one(mirror.rstrip("/"), name, dest) if is_url else _copy_one(folder, name, dest)
        origins[name] = f"{mirror.rstrip('/')}/{fetched.name}" if is_url else str(folder / fetched.name)
        if fetched.suffix == ".gz":
            _gunzip(fetched, dest / name, origins[name])
    return origins


def _copy_one(folder: Path, name: str, dest: Path) -> Path:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            print(f"copying {candidate} ({candidate.stat().st_size / 1e6:.1f} MB)", flush=True)
            return Path(shutil.copyfile(candidate, dest / candidate.name))
    raise DownloadError(f"data.mirror: {folder} has neither {name}.gz nor {name}; add the file or fix the path")


def _download_one(base_url: str, name: str, dest: Path) -> Path:
    from torchvision.datasets.utils import download_url

    for filename in (f"{name}.gz", name):
        url = f"{base_url}/{filename}"
        print(f"downloading {url}", flush=True)
        try:
            download_url(url, dest, filename)  # torchvision's, with its progress bar
            return dest / filename
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}; check data.mirror") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DownloadError(f"cannot reach {url}: {reason}; check data.mirror or the network") from None
    raise DownloadError(f"data.mirror: {base_url} has neither {name}.gz nor {name}; add the file or fix the URL")


def _gunzip(archive: Path, target: Path, origin: str) -> None:
    try:
        with gzip.open(archive, "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise IdxError(
            f"{origin}: not a complete gzip file ({exc}); the mirror's copy is truncated or corrupt, fetch it again"
        ) from None
    archive.unlink()


def download(dataset: str, mirror: str | None, target: Path = RAW_DIR) -> None:
    """Fetch into a staging folder, check every file, then swap it in: a failure leaves nothing partial,
    and names the file as the user knows it (the mirror's), not its staging copy."""
    with atomic_dir(target) as staging:
        origins = fetch_official(dataset, staging) if mirror is None else fetch_mirror(mirror, staging)
        for split in ("train", "test"):
            images, _ = read_split(staging, split, named=lambda path: origins[path.name])
            print(f"{split}: {len(images)} images checked", flush=True)
