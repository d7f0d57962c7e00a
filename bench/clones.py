"""What the benchmarks that run the pipeline as a user does share: a fresh clone of this
repository's HEAD with their params, its commands run as a user's shell runs them, and the
experiments it holds."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from pipeline.idx import FILES, read_idx, write_idx

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def run(args: list[str], cwd: Path, ok: tuple[int, ...] = (0,)) -> str:
    """The command's output; any exit status but `ok` ends the benchmark with what it said."""
    result = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True)
    if result.returncode not in ok:
        sys.exit(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def clone(dest: Path, settings: dict) -> Path:
    """This repository's HEAD with `settings` (dotted key -> value) in params.yaml and the data
    split, committed: every way a benchmark compares starts from the same place."""
    run(["git", "clone", "--quiet", str(ROOT), str(dest)], dest.parent)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for dotted, value in settings.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = value
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro", "--quiet", "split"], dest)
    run(["git", "commit", "--quiet", "-am", "bench settings, the data split"], dest)
    return dest


def experiment_refs(project: Path) -> dict[str, str]:
    """Experiment name -> its git ref (not DVC's own refs of a run in progress)."""
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], project).split()
    return {ref.rsplit("/", 1)[-1]: ref for ref in refs if not ref.startswith("refs/exps/exec/")}


def part_of(mirror: Path, dest: Path, train_images: int, test_images: int) -> Path:
    """The first `train_images` and `test_images` of each IDX file of `mirror`, as a mirror."""
    dest.mkdir()
    for key, name in FILES.items():
        count = train_images if key.startswith("train") else test_images
        packed = mirror / f"{name}.gz"
        with tempfile.NamedTemporaryFile() as plain:
            plain.write(gzip.decompress(packed.read_bytes()) if packed.exists() else (mirror / name).read_bytes())
            plain.flush()
            write_idx(dest / f"{name}.gz", read_idx(Path(plain.name), 3 if key.endswith("images") else 1)[:count])
    return dest
