"""A copy of this project in a fresh git repo, run as a user runs it (real `dvc`, real git), and
what its outputs are afterwards."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.params import Params

ROOT = Path(__file__).resolve().parent.parent
# The project as a user clones it, but for params.yaml: tests write theirs from the code's defaults,
# so a user's edits (another dataset, a team tracking server) never reach a test.
PROJECT_FILES = [
    "pipeline",
    "dvc.yaml",
    ".dvc/config",
    ".dvc/.gitignore",
    ".dvc/plots",
    ".dvcignore",
    ".gitignore",
    "mlruns/.gitignore",
]


def project_env() -> dict[str, str]:
    """The environment DVC stages run in: this interpreter's `python` and `dvc` first on PATH, and
    DVC's usage analytics off (their reporting process would outlive a test)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "1"
    env.pop("DVC_ROOT", None)
    env.pop("PIPELINE_PROJECT_ROOT", None)
    return env


# Who test commits are by, whatever the machine's git config (DVC's experiment commits too).
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@localhost",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@localhost",
}


def run(args: list[str], cwd: Path, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(
        args, cwd=cwd, env=kwargs.pop("env", project_env()), capture_output=True, text=True, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def edit_params(project: Path, **changes) -> None:
    """Set dotted keys in the project's params.yaml, e.g. edit_params(p, **{"train.epochs": 1})."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(dest: Path, mirror: Path, **changes) -> Path:
    """A copy of this project in a fresh git repo, with the default params set for a fast run on `mirror`."""
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        src, dst = ROOT / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    (dest / "params.yaml").write_text(yaml.safe_dump(dataclasses.asdict(Params()), sort_keys=False))
    # On the CPU, whatever the machine: the suite compares exact bytes, which CUDA gives only in
    # deterministic mode; tests/test_cuda.py runs the pipeline on the GPU.
    # Fewer importance samples: on 60 test images, K=100 is most of evaluate's seconds on a CPU.
    edit_params(
        dest,
        **{
            "data.mirror": str(mirror),
            "train.device": "cpu",
            "train.epochs": 1,
            "train.batch_size": 32,
            "evaluate.iw_samples": 10,
            "visualize.num_samples": 16,
            "visualize.manifold_size": 5,
            **changes,
        },
    )
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "project"], dest, env=project_env() | GIT_IDENTITY)
    return dest


OUTPUTS = ("data/raw", "data/split", "models/model.pt", "models/state.pt", "metrics", "figures")  # every DVC output


def outputs_of(project: Path) -> dict[str, bytes]:
    """The bytes of every file of every DVC output, by path."""
    files = {}
    for name in OUTPUTS:
        path = project / name
        for file in [path] if path.is_file() else sorted(path.rglob("*")):
            if file.is_file():
                files[str(file.relative_to(project))] = file.read_bytes()
    return files


def assert_kept(project: Path, before: dict[str, bytes]) -> None:
    """Every output as it was, nothing half-written beside it, and DVC agrees nothing is missing."""
    after = outputs_of(project)
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    assert not changed, f"outputs lost or changed: {changed}"
    status = run(["dvc", "status"], project).stdout
    assert "changed outs" not in status, status


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


# The session's shared projects (conftest's fixtures build them; tests read them).
EPOCHS = 2  # of the end-to-end run
LEARNING_RATES = ("0.001", "0.002")  # of the two experiments
RERUNS = {"eval-only": "evaluate.iw_samples=5", "vis-only": "visualize.num_images=6"}  # one stage each
