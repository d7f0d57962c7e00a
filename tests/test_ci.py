"""CI as a user's pull request meets it: the reproducibility check and the report on a real
two-commit change, and the GitHub Actions workflow that runs them, checked against GitHub's schema."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.projects import GIT_IDENTITY, ROOT, edit_params, make_project, project_env, run

WORKFLOWS = ROOT / ".github" / "workflows"
QUICK, FULL = WORKFLOWS / "pull-request.yml", WORKFLOWS / "full-suite.yml"
LINT = ("ruff check .", "ruff format --check .")  # in .ci/run, both workflows and the pre-commit hooks


def commit(project: Path, message: str) -> None:
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", message], project, env=project_env() | GIT_IDENTITY)


@pytest.mark.slow
def test_the_report_of_a_learning_rate_change_shows_its_params_metrics_images_and_verdict(tmp_path, mirror):
    project = make_project(tmp_path / "project", mirror, **{"mlflow.enabled": False, "train.epochs": 2})
    shutil.copytree(ROOT / ".ci", project / ".ci")
    run(["dvc", "repro"], project)
    commit(project, "results")
    edit_params(project, **{"train.learning_rate": 0.001})
    run(["dvc", "repro"], project)
    commit(project, "a higher learning rate")

    check = run([".ci/reproducibility-check", str(mirror), "mnist"], project, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    (tmp_path / "reproducibility.log").write_text(check.stdout + check.stderr)
    run(
        [
            sys.executable,
            str(ROOT / "scripts/ci-report"),
            "--base",
            "HEAD~1",
            "--reproducibility",
            str(tmp_path / "reproducibility.log"),
            "--out",
            str(tmp_path / "report"),
        ],
        project,
    )

    report = (tmp_path / "report" / "report.md").read_text()
    params, metrics = report.split("## Params")[1].split("## Metrics")
    assert re.search(r"^\| params\.yaml +\| train\.learning_rate +\| 0\.0005 +\| 0\.001 +\|$", params, re.M), params
    assert len(re.findall(r"^\| params\.yaml", params, re.M)) == 1, "only the learning rate changed"
    for name in ("val_total", "test_total", "test_knn_accuracy"):
        assert re.search(
            rf"^\| metrics/(train|test)\.json +\| {name} +\| [\d.-]+ +\| [\d.-]+ +\| [\d.-]+ +\|$", metrics, re.M
        ), f"{name} not compared:\n{metrics}"
    for image in ("loss_curves.png", "reconstructions.png"):
        assert f"](./{image})" in report
        assert (tmp_path / "report" / image).stat().st_size > 5_000, image
    assert (tmp_path / "report" / "reconstructions.png").read_bytes() == (
        project / "figures/reconstructions.png"
    ).read_bytes()
    assert "- compared on: cpu (" in report
    assert "- reproducible: every output hash in dvc.lock is identical across the two runs" in report


def test_the_report_refuses_a_base_that_is_not_here(tmp_path, mirror):
    project = make_project(tmp_path / "project", mirror)
    result = run([sys.executable, str(ROOT / "scripts/ci-report"), "--base", "origin/main"], project, check=False)
    assert result.returncode == 1
    assert result.stderr == (
        "error: --base origin/main is not a commit here; fetch it first (git fetch origin origin/main)\n"
    )
    assert not (project / "report").exists()


@pytest.mark.parametrize("workflow", [QUICK, FULL], ids=lambda path: path.name)
def test_each_workflow_is_valid_against_githubs_schema(workflow):
    """check-jsonschema ships a copy of GitHub's workflow schema: no network needed."""
    checker = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    result = run([checker, "--builtin-schema", "vendor.github-workflows", str(workflow)], ROOT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def readme_commands() -> tuple[str, dict[str, str]]:
    """The README's set-up command (without its `dvc repro`: the pipeline's 200 epochs are the
    user's, not CI's), and its test command for each tier."""
    section = (ROOT / "README.md").read_text().split("\n## The two commands\n", 1)[1].split("\n## ", 1)[0]
    blocks = [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL)]
    set_up = blocks[0].splitlines()[0].removesuffix(" && dvc repro")
    tests = [
        line.split(" #")[0].strip().removeprefix(". .venv/bin/activate && ")
        for line in next(block for block in blocks if "pytest" in block).splitlines()
    ]
    return set_up, {
        "quick": next(line for line in tests if "not slow" in line),
        "full": next(line for line in tests if "not slow" not in line),
    }


def test_pull_requests_get_the_quick_tier_and_the_full_suite_runs_nightly_and_on_demand():
    quick, full = yaml.safe_load(QUICK.read_text()), yaml.safe_load(FULL.read_text())
    # YAML 1.1 reads the key `on` as True
    assert set(quick[True]) == {"pull_request"}
    assert set(full[True]) == {"schedule", "workflow_dispatch"}
    assert [entry["cron"] for entry in full[True]["schedule"]], "a nightly schedule"

    set_up, tests = readme_commands()
    for step in (set_up, tests["quick"], ".ci/reproducibility-check", "scripts/ci-report", "cml comment"):
        assert step in QUICK.read_text(), step
    for step in (set_up, tests["full"], ".ci/system-packages", ".ci/reproducibility-check"):
        assert step in FULL.read_text(), step
    runs = {
        path.name: [line for line in path.read_text().splitlines() if "pytest" in line and "run:" in line]
        for path in (QUICK, FULL)
    }
    for path in (QUICK, FULL, ROOT / ".ci" / "run"):
        assert all(command in path.read_text() for command in LINT), f"{path.name} does not run ruff"
    assert runs["pull-request.yml"] and all(tests["quick"] in line for line in runs["pull-request.yml"]), runs
    assert runs["full-suite.yml"] and not any("-m " in line.split("pytest", 1)[1] for line in runs["full-suite.yml"]), (
        runs
    )


def path_without(folder: Path, *hidden: str) -> str:
    """A PATH of links to every program on this one but `hidden`: a machine where they are absent.
    `folder` must be one every user can enter: apt runs gpgv as its own user (_apt), from PATH."""
    for directory in os.environ["PATH"].split(os.pathsep):
        for program in Path(directory).glob("*") if Path(directory).is_dir() else []:
            link = folder / program.name
            if program.name not in hidden and not link.exists() and os.access(program, os.X_OK):
                link.symlink_to(program)
    return str(folder)


def debian_package(program: str) -> str | None:
    """The Debian package that holds `program` on PATH (None where none does)."""
    path = shutil.which(program)
    owner = path and subprocess.run(["dpkg", "-S", os.path.realpath(path)], capture_output=True, text=True)
    return owner.stdout.split(":")[0] if owner and owner.returncode == 0 else None


@pytest.mark.skipif(shutil.which("apt-get") is None or os.geteuid() != 0, reason="needs apt-get, as root")
@pytest.mark.skipif(
    debian_package("node") is None or debian_package("node") != debian_package("npm"),
    reason="needs Node.js whose Debian package holds its own npm, as this image's does",
)
def test_the_system_package_step_asks_apt_only_for_what_is_missing_and_never_debians_npm():
    """A fresh machine of this image: Node.js with its own npm, no Chromium. Debian's npm package
    conflicts with that Node.js, and asking for it made apt refuse the whole line."""
    with tempfile.TemporaryDirectory(prefix="path-without-chromium.") as folder:
        os.chmod(folder, 0o755)  # not in pytest's tmp_path, which only its owner may enter
        env = dict(os.environ, PATH=path_without(Path(folder), "chromium", "chromedriver"))
        result = subprocess.run(
            [str(ROOT / ".ci/system-packages"), "--simulate"], env=env, capture_output=True, text=True, timeout=600
        )
    assert result.returncode == 0, result.stdout + result.stderr
    asked = re.search(r"^system packages: installing (.*)$", result.stdout, re.M).group(1).split()
    assert {"chromium", "chromium-driver"} <= set(asked), asked
    assert "npm" not in asked, asked
    # apt would install each package asked for (or has it already, where the test ran before),
    # and neither touches Node.js nor brings Debian's npm
    for package in asked:
        assert re.search(rf"^(Inst {package} |{package} is already the newest version)", result.stdout, re.M), (
            result.stdout
        )
    assert not re.search(r"^(Inst|Remv) (npm|nodejs) ", result.stdout, re.M), result.stdout


def test_the_pre_commit_hooks_pass_the_tree_and_refuse_what_ci_would(tmp_path):
    """`pre-commit install` gives a user CI's ruff checks before each commit: the hooks pass on the
    committed tree, and a file that `ruff format --check` or `ruff check` would refuse is refused
    (and fixed) when it is committed."""
    clone = tmp_path / "clone"  # the tree as it is here, committed or not, in a repository of its own
    listed = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], ROOT).stdout
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    env = project_env() | GIT_IDENTITY | {"PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home")}
    run(["git", "init", "-q"], clone)
    run(["git", "add", "-A"], clone)
    pre_commit = str(Path(sys.executable).parent / "pre-commit")
    passed = run([pre_commit, "run", "--all-files"], clone, check=False, env=env)
    assert passed.returncode == 0, passed.stdout + passed.stderr

    (clone / "pipeline" / "careless.py").write_text("import os\nx = {'a':1}\n")
    run(["git", "add", "pipeline/careless.py"], clone)
    refused = run([pre_commit, "run", "--files", "pipeline/careless.py"], clone, check=False, env=env)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert re.search(r"ruff check\.+Failed", refused.stdout) and re.search(r"ruff format\.+Failed", refused.stdout)
    assert (clone / "pipeline" / "careless.py").read_text() == 'x = {"a": 1}\n', "fixed as ruff fixes it"
