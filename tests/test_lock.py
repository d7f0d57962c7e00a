"""requirements.lock installs on every platform people train on: each target's wheels exist for
every package it pins, and the lock holds every package the target needs."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import uv

from tests.projects import ROOT

# uv's name of each platform, and the environment it reads the target's OS version from.
TARGETS = {
    "linux-x86_64": ("x86_64-manylinux_2_28", {}),  # the CUDA build of PyTorch
    "linux-aarch64": ("aarch64-manylinux_2_28", {}),
    "macos-arm64": ("aarch64-apple-darwin", {"MACOSX_DEPLOYMENT_TARGET": "14.0"}),  # PyTorch's wheels need 14
    "windows-x86_64": ("x86_64-pc-windows-msvc", {}),
}
PYTHONS = ("3.11", "3.12", "3.13")
# Pure Python, published as a source archive only (DVC's hydra-core pins it); pip builds it anywhere.
SOURCE_ONLY = ("antlr4-python3-runtime",)


def pinned(text: str) -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+)==", text, re.M))


def resolve(target: str, python: str) -> subprocess.CompletedProcess:
    """uv's resolution of the lock for `target` and `python`, from wheels alone, markers evaluated
    for the target (pip's --platform does not evaluate them)."""
    platform, env = TARGETS[target]
    args = [
        uv.find_uv_bin(),
        "pip",
        "compile",
        str(ROOT / "requirements.lock"),
        "--python-platform",
        platform,
        "--python-version",
        python,
        "--only-binary",
        ":all:",
        "--no-header",
        "--no-annotate",
        "--color",
        "never",
    ]
    for package in SOURCE_ONLY:
        args += ["--no-binary", package]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=os.environ | env)


@pytest.mark.slow
@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("target", TARGETS)
def test_the_lock_resolves_from_wheels_for_every_platform(target, python):
    result = resolve(target, python)
    if result.returncode != 0:
        without = re.findall(r"Because (\S+?)==\S+ has no (?:usable )?wheels", result.stderr)
        pytest.fail(
            f"{target}, Python {python}: no wheel of {', '.join(sorted(set(without))) or 'a package'}:\n"
            f"{result.stderr[-2000:]}"
        )
    missing = pinned(result.stdout) - pinned((ROOT / "requirements.lock").read_text())
    assert not missing, f"{target}, Python {python} needs packages the lock does not pin: {sorted(missing)}"
