"""One experiment, one name: after two `dvc exp run -S ...` experiments, MLflow names each run as
`dvc exp show` names the experiment, fills its own Source, commit, user and description fields, and
the description's commands reproduce the run's model, byte for byte, in a fresh clone."""

from __future__ import annotations

import getpass
import hashlib
import importlib.metadata
import json
import re
import shutil
import subprocess

import mlflow
import pytest
import yaml

from pipeline.history import ACTIVE_UNITS, OBJECTIVE
from tests.projects import GIT_IDENTITY, LEARNING_RATES, ROOT, make_project, project_env, run, stages_run

pytestmark = pytest.mark.slow


def runs_by_name(project) -> dict[str, mlflow.entities.Run]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("vae-pipeline")
    return {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


def test_mlflow_names_each_run_as_dvc_names_the_experiment(experiments):
    names = run(["dvc", "exp", "list", "--name-only"], experiments).stdout.split()
    runs = runs_by_name(experiments)
    assert len(names) == 2 and sorted(runs) == sorted(names), (names, list(runs))
    shown = run(["dvc", "exp", "show", "--no-pager", "--csv"], experiments).stdout
    assert all(name in shown for name in names), shown
    by_rate = {r.data.params["train.learning_rate"]: r for r in runs.values()}
    assert sorted(by_rate) == sorted(LEARNING_RATES)
    for mlrun in runs.values():
        assert mlrun.info.status == "FINISHED"
        assert mlrun.data.tags["dvc.exp_name"] == mlrun.info.run_name


def test_the_readmes_comparison_of_experiments_fits_a_terminal(experiments, tmp_path):
    """The README's first comparison, typed as written on a copy of a project that ran: commit the
    run, run an experiment, show the two. However wide the terminal, the table holds the objective,
    the test metrics that decide (those that differ) and the param that differs, in at most 110
    columns."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Change params and compare.*?```bash\n(.*?)```", readme, re.DOTALL)[1].splitlines()
    typed = block[: next(i for i, line in enumerate(block) if line.startswith("dvc exp show")) + 1]
    project = shutil.copytree(experiments, tmp_path / "project", symlinks=True)
    env = project_env() | GIT_IDENTITY | {"COLUMNS": "400"}
    for line in typed:
        shown = run(["bash", "-c", line + " --no-pager" * line.startswith("dvc exp show")], project, env=env)
    lines = shown.stdout.splitlines()
    header = next(line for line in lines if "Experiment" in line).split()
    assert header[:2] == ["Experiment", OBJECTIVE] and header[-1] == "train.learning_rate", header
    assert set(header[2:-1]) <= {"test_log_likelihood", "test_knn_accuracy", ACTIVE_UNITS, "active_units"}, header
    assert max(len(line.rstrip()) for line in lines) <= 110, shown.stdout


def test_each_run_says_where_it_comes_from_in_mlflows_own_fields(experiments, tmp_path):
    head = run(["git", "rev-parse", "HEAD"], experiments).stdout.strip()
    branch = run(["git", "rev-parse", "--abbrev-ref", "HEAD"], experiments).stdout.strip()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{experiments}/mlruns/mlflow.db")
    for mlrun in runs_by_name(experiments).values():
        tags, rate = mlrun.data.tags, mlrun.data.params["train.learning_rate"]
        assert tags["mlflow.source.name"] == str(experiments / "pipeline" / "train.py")
        assert tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.source.git.commit"] == head and tags["mlflow.source.git.branch"] == branch
        assert tags["mlflow.source.git.dirty"] == "true", "params.yaml differs from the commit"
        assert "git.uncommitted_code" not in tags, "only params differ: the commit has all the code"
        assert tags["mlflow.user"] == getpass.getuser()

        note = tags["mlflow.note.content"]
        assert f"as DVC experiment `{mlrun.info.run_name}` of commit `{head[:7]}` on branch `{branch}`" in note
        assert f"`train.learning_rate` {rate} (reference 0.0005)" in note
        assert re.search(r"- \*\*Test\*\*: test_total [\d.]+, test_reconstruction", note), "evaluate added its metrics"
        assert f"git checkout {head}\n" in note and f"dvc exp run -S train.learning_rate={rate}\n" in note

        into = tmp_path / mlrun.info.run_id
        into.mkdir()
        seen = yaml.safe_load(open(client.download_artifacts(mlrun.info.run_id, "params.yaml", str(into))))
        assert seen["train"]["learning_rate"] == float(rate), "params.yaml as the run saw it"
        packages = open(client.download_artifacts(mlrun.info.run_id, "environment/requirements.txt", str(into))).read()
        for package in ("torch", "mlflow", "dvc"):
            assert f"{package}=={importlib.metadata.version(package)}\n" in packages, "the exact versions it ran with"


def test_the_descriptions_commands_reproduce_the_model_in_a_fresh_clone(experiments, tmp_path):
    """Every command of the description runs as written, but the environment's set-up: the test runs
    in the environment it already has, made from the same lock file."""
    runs = runs_by_name(experiments)
    mlrun = runs[min(runs)]
    note = mlrun.data.tags["mlflow.note.content"]
    [block] = re.findall(r"```bash\n(.*?)```", note, re.S)
    commands = [line for line in block.splitlines() if not line.startswith("python3 -m venv")]
    assert len(commands) == 3, block
    result = subprocess.run(
        ["bash", "-ec", "\n".join(commands)], cwd=tmp_path, env=project_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    model = (tmp_path / "vae-pipeline" / "models" / "model.pt").read_bytes()
    assert hashlib.sha256(model).hexdigest() == mlrun.data.tags["model.sha256"]


def test_a_loss_part_added_by_its_name_is_trained_logged_and_evaluated(tmp_path, mirror):
    """docs/experiments.md's "Adding a loss term", done to a copy of the project: a fourth part (the
    L1 error, reported, not optimised) needs its name and its value, nothing else; `dvc repro`
    then trains, and every table of the parts has it."""
    project = make_project(tmp_path / "project", mirror)
    names = project / "pipeline" / "loss_names.py"
    assert '"total", "optimised")' in names.read_text(), "the docs' step 1 no longer fits loss_names.py"
    names.write_text(names.read_text().replace('"total", "optimised")', '"total", "optimised", "l1")'))
    losses = project / "pipeline" / "losses.py"
    returned = "    return LossParts(recon, kl, total, optimised)\n"
    assert returned in losses.read_text(), "the docs' step 2 no longer fits losses.py"
    l1 = "    l1 = (reconstruction - x).abs().sum() / batch\n    return LossParts(recon, kl, total, optimised, l1)\n"
    losses.write_text(losses.read_text().replace(returned, l1))

    assert stages_run(run(["dvc", "repro"], project).stdout)[-3:] == ["train", "evaluate", "visualize"]
    assert (project / "metrics/history.csv").read_text().splitlines()[0].split(",") == [
        "epoch",
        *(
            f"{split}_{part}"
            for split in ("train", "val")
            for part in ("reconstruction", "kl", "total", "optimised", "l1")
        ),
        OBJECTIVE,  # reconstruction + KL alone: a part added to the loss does not change what the ELBO is
        ACTIVE_UNITS,
    ]
    train_metrics = json.loads((project / "metrics/train.json").read_text())
    test_metrics = json.loads((project / "metrics/test.json").read_text())
    assert train_metrics["val_l1"] > 0 and test_metrics["test_l1"] > 0
    [logged] = runs_by_name(project).values()
    assert logged.data.metrics["val_l1"] == pytest.approx(train_metrics["val_l1"], rel=1e-5)
