"""scripts/offline-bundle and scripts/gpu-check as a user on a GPU node without internet meets
them: the bundle built here (it downloads from the package index), then the node check rehearsed
on the CPU, which installs it with no index beside this machine's PyTorch and runs the pipeline
from it."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.projects import ROOT, run
from tests.synthetic import write_mirror

SCRIPT = ROOT / "scripts" / "offline-bundle"


def script_module(path: Path):
    """A script as a module (it has no .py suffix: it is a command)."""
    loader = importlib.machinery.SourceFileLoader(path.name.replace("-", "_"), str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def distribution(folder: Path, name: str, version: str, *requires: str) -> None:
    info = folder / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {r}\n" for r in requires)
    )


def test_a_bundled_package_shadows_the_nodes_older_one(tmp_path, monkeypatch):
    """Seen on an H200 and an H100: the node's certifi is older than databricks-sdk needs, the
    bundle's is new enough; the bundle comes first on the path, so its certifi is the one imported."""
    site, node = tmp_path / "site", tmp_path / "node"
    distribution(site, "databricks_sdk", "0.70.0", "certifi>=2026.10.19", "nowhere-pkg>=1")
    distribution(site, "certifi", "2026.10.19.post1")
    distribution(node, "certifi", "2026.7.22")
    monkeypatch.setattr(sys, "path", [str(site), str(node)])
    unmet = script_module(ROOT / "scripts" / "gpu-check").unmet_requirements(site)
    assert unmet == ["databricks_sdk needs nowhere-pkg>=1 (found nothing)"]


def build(out: Path, *options: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, str(SCRIPT), "--out", str(out), *options], ROOT, check=check)


def test_what_is_left_out_follows_the_lock():
    script = script_module(SCRIPT)
    lock = script.read_lock(ROOT / "requirements.lock")
    reasons = script.left_out(lock, include=set())
    assert {"torch", "torchvision", "triton", "nvidia-cublas"} <= reasons.keys()
    assert reasons["sympy"] == "required by PyTorch, so on the node with it"
    assert (
        reasons["selenium"] == reasons["flask-wtf"] == "only this repository's browser, team-server and workflow tests"
    )
    assert reasons["wtforms"] == "needed only by flask-wtf"
    assert reasons["ray"] == "only sweeps on a Ray cluster (the `sweep` extra)"
    assert reasons["msgpack"] == "needed only by ray"
    assert reasons["ruff"] == reasons["pre-commit"] == "only development: the linter and its commit hooks"
    assert reasons["virtualenv"] == "needed only by pre-commit"
    assert reasons["vl-convert-python"].startswith("only `python -m pipeline.offline_plots`")
    assert reasons["trio"].startswith("needed only by")  # selenium's, transitively
    assert reasons["rpds-py"].startswith("needed only by")  # check-jsonschema's, through jsonschema
    for needed in ("mlflow", "mlflow-skinny", "dvc", "nvidia-ml-py", "antlr4-python3-runtime", "certifi"):
        assert needed not in reasons, needed
    assert "scipy" not in script.left_out(lock, include={"scipy"})


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A bundle for this machine's Python, with a small IDX mirror as its data."""
    tmp = tmp_path_factory.mktemp("bundle")
    result = build(tmp / "bundle", "--data", str(write_mirror(tmp / "mirror")))
    assert "trimmed from mlflow's wheel" in result.stdout, result.stdout
    return tmp / "bundle"


@pytest.mark.slow
def test_every_requirement_of_a_python_3_12_bundle_resolves_offline(tmp_path):
    build(tmp_path / "bundle", "--python", "3.12")
    manifest = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert manifest["wheels_bytes"] <= 40 * 2**20, f"{manifest['wheels_bytes'] / 2**20:.1f} MiB of wheels"
    assert list((tmp_path / "bundle" / "wheels").glob("antlr4_python3_runtime-*-py3-none-any.whl")), (
        "the sdist-only package was built into a wheel"
    )
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-index",
            "--no-deps",
            "--only-binary=:all:",
            "--target",
            str(tmp_path / "target"),
            "--find-links",
            str(tmp_path / "bundle" / "wheels"),
            "-r",
            str(tmp_path / "bundle" / "requirements.txt"),
            *script_module(SCRIPT).pip_target_options("3.12", "2.28"),
        ],
        tmp_path,
    )


@pytest.mark.slow
def test_a_target_without_a_wheel_is_refused_by_name(tmp_path):
    """psycopg-binary ships wheels for glibc 2.17 and newer only, and no sdist."""
    version = script_module(SCRIPT).read_lock(ROOT / "requirements.lock")["psycopg-binary"][0]
    lock = tmp_path / "lock.txt"
    lock.write_text(f"psycopg-binary=={version}\n    # via vae-pipeline (pyproject.toml)\n")
    result = build(
        tmp_path / "bundle",
        "--python",
        "3.12",
        "--glibc",
        "2.12",
        "--lock",
        str(lock),
        "--include",
        "psycopg-binary",
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: cannot build a bundle for Python 3.12:\n  psycopg-binary=={version}: no wheel" in result.stderr
    assert not (tmp_path / "bundle").exists()
    assert not list(tmp_path.glob(".bundle.*")), "the staging folder was left behind"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this is the real check, not the rehearsal")
def test_gpu_check_rehearses_every_check_on_the_cpu(bundle, tmp_path):
    """The procedure of docs/gpu-node.md, on the CPU: the bundle installed with no index beside this
    machine's packages, every requirement met, and the pipeline run from it (deterministic-repro)."""
    pinned = (bundle / "requirements.txt").read_text().split()
    assert len(pinned) == len(list((bundle / "wheels").glob("*.whl"))), "requirements.txt names exactly the wheels"
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(bundle / "gpu-check"), str(bundle), "--epochs", "1"],
        cwd=tmp_path,
        env=os.environ | {"GPU_CHECK_RESULTS": str(results)},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines[0].startswith("gpu-check on REHEARSAL ON THE CPU"), lines[0]
    assert lines[-1].startswith("REHEARSAL ON THE CPU, not a GPU result: 6 of 6 checks passed"), lines[-1]
    report = json.loads((results / "gpu-check.json").read_text())
    assert report["rehearsal"] is True and report["device"] == "cpu (rehearsal)"
    assert [(c["check"], c["verdict"]) for c in report["checks"]] == [
        (name, "PASS")
        for name in ("torch-version", "install", "cuda-tests", "deterministic-repro", "benchmark", "together")
    ]
    assert json.loads((results / "benchmark.json").read_text())["device"] != "cuda"
    assert set(json.loads((results / "together.json").read_text())["seconds_per_epoch"]) == {"2"}


@pytest.mark.slow
def test_gpu_check_on_a_bundle_without_data_skips_what_needs_it_in_one_line_each(bundle, tmp_path):
    no_data = shutil.copytree(bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns("data"))
    proc = subprocess.run(
        [sys.executable, str(no_data / "gpu-check"), str(no_data), "--only", "benchmark", "together"],
        cwd=tmp_path,
        env=os.environ | {"GPU_CHECK_RESULTS": str(tmp_path / "results")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    for check in ("benchmark", "together"):
        assert re.search(
            rf"^SKIPPED {check} +the bundle has no data/: make it with scripts/offline-bundle --data DIR",
            proc.stdout,
            re.M,
        ), proc.stdout
    assert re.search(r"^PASS +install ", proc.stdout, re.M), proc.stdout
