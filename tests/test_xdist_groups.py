"""The suite's shared builds are built once: under `pytest -n`, every test that reads one runs on
the worker that built it. xdist groups tests by an `@group` suffix it writes into their ids while
collecting, which takes effect only if conftest's markers come first and pytest lets the id be
rewritten (pytest 9.2 does not: pytest-dev/pytest-xdist#1386, hence pyproject's `pytest<9.2`)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import SHARED_BUILDS
from tests.projects import ROOT, project_env

FIXTURE, GROUP = next(iter(SHARED_BUILDS.items()))


def test_the_tests_of_a_shared_build_carry_its_group_on_every_worker(tmp_path):
    (tmp_path / "test_shared.py").write_text(f"""
import pytest

@pytest.fixture
def {FIXTURE}():
    return "built"

@pytest.mark.parametrize("reader", range(4))
def test_reads_the_build({FIXTURE}, reader, request):
    assert request.node.nodeid.endswith("@{GROUP}"), request.node.nodeid
""")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-n",
            "2",
            "-p",
            "tests.conftest",
            "-p",
            "no:randomly",
            "-p",
            "no:cacheprovider",
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            str(tmp_path),
            "-v",
            str(tmp_path / "test_shared.py"),
        ],
        cwd=ROOT,
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    workers = {line.split()[0] for line in result.stdout.splitlines() if "PASSED" in line}
    assert len(workers) == 1, f"the readers of one build ran on {sorted(workers)}"
