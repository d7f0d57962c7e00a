"""Early stopping and the kept epoch (`train.early_stopping`, `train.min_delta`, `train.keep_epoch`),
with the KL's warm-up and free bits, as a user meets them, through `dvc repro` and `dvc exp run`:
where a run stops, which epoch's weights it keeps and evaluates, what more epochs do afterwards,
and a killed run's resume."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from tests.processes import epoch_ended, read_until
from tests.projects import GIT_IDENTITY, PROJECT_FILES, ROOT, make_project, project_env, run
from tests.servers import runs_of
from tests.synthetic import write_mirror

pytestmark = pytest.mark.slow
# No epoch improves val_total by this much, so the first epoch stays the best while the weights
# go on changing: the kept epoch is then not the last.
NOTHING_IMPROVES_BY = 1e6
# main before these params: with their defaults the model must be the bytes this commit trains.
BEFORE_THESE_PARAMS = "afc00f39c3586dfb49698125e9df7f91e28ea7f4"
NEW_TRAIN_PARAMS = ("early_stopping", "min_delta", "keep_epoch", "kl_warmup_epochs", "free_bits", "num_threads")
NEW_DATA_PARAMS = ("train_images", "test_images")
# A run that keeps its best epoch, with a KL warm-up that lasts past the kill and free bits.
KL_TERM = {"train.kl_warmup_epochs": 2, "train.free_bits": 0.25}
KEPT_BEST = {"train.epochs": 3, "train.keep_epoch": "best", "train.min_delta": NOTHING_IMPROVES_BY, **KL_TERM}


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    """Enough images that an epoch lasts about a second, so a kill can land inside a run."""
    return write_mirror(tmp_path_factory.mktemp("mirror"), n_train=1500, n_test=100)


@pytest.fixture(scope="module")
def kept_best(tmp_path_factory, mirror) -> Path:
    """A whole pipeline run of 3 epochs that keeps its best epoch, the first; tests copy it to change it."""
    project = make_project(tmp_path_factory.mktemp("kept") / "p", mirror, **KEPT_BEST)
    run(["dvc", "repro"], project)
    return project


def epochs_trained(stdout: str) -> list[int]:
    return [int(n) for n in re.findall(r"^epoch (\d+)/\d+  train_", stdout, re.M)]


def train_outputs(project: Path) -> dict[str, str]:
    """The md5 of each output of the train stage, as dvc.lock records it."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for out in lock["stages"]["train"]["outs"]}


def test_a_run_whose_validation_loss_stops_improving_stops_after_its_patience_and_says_so(tmp_path, mirror):
    """At a learning rate of 1e-9 the weights hardly move, so val_total only wanders by the
    sampling noise's few hundredths: past epoch 1 nothing improves by train.min_delta 0.5."""
    project = make_project(tmp_path / "p", mirror, **{"train.learning_rate": 1e-9, "train.min_delta": 0.5})
    result = run(["dvc", "exp", "run", "-S", "train.epochs=6", "-S", "train.early_stopping=2"], project)
    assert epochs_trained(result.stdout) == [1, 2, 3], "epoch 1, then the 2 epochs of patience"
    [said] = [line for line in result.stdout.splitlines() if line.startswith("stopped early")]
    assert re.fullmatch(
        r"stopped early after epoch 3 of 6: val_total has not improved on epoch 1's [\d.]+ by more than 0\.5 "
        r"in 2 epochs \(train\.early_stopping\)",
        said,
    )
    train = json.loads((project / "metrics/train.json").read_text())
    assert (train["epochs"], train["best_epoch"]) == (3, 1)
    assert len((project / "metrics/history.csv").read_text().splitlines()) == 1 + 3
    client, [mlrun] = runs_of(project)
    assert mlrun.data.tags["stopped_early"] == said, "the run says so too"
    assert mlrun.data.tags["kept_epoch"] == "3", "train.keep_epoch last: the last epoch trained"
    assert mlrun.data.metrics["best_epoch"] == 1 and "test_total" in mlrun.data.metrics, "and it was evaluated"
    model = (project / "models/model.pt").read_bytes()

    # More epochs: the run is finished all the same, as an uninterrupted run of 9 epochs would be.
    more = run(["dvc", "exp", "run", "-S", "train.epochs=9", "train"], project)
    assert "continuing from epoch 3 of 9 (models/state.pt)" in more.stdout, more.stdout
    assert epochs_trained(more.stdout) == [] and "stopped early after epoch 3 of 9" in more.stdout
    assert (project / "models/model.pt").read_bytes() == model

    # A lower patience would have stopped the run before its last epoch: it trains afresh.
    lower = run(["dvc", "exp", "run", "-S", "train.early_stopping=1", "train"], project)
    assert (
        "training from scratch: models/state.pt trained past epoch 2, where train.early_stopping 1 stops this run"
        in lower.stdout
    ), lower.stdout
    assert epochs_trained(lower.stdout) == [1, 2]


def test_the_best_epoch_is_the_model_evaluated_and_more_epochs_keep_it_until_one_betters_it(
    tmp_path, mirror, kept_best
):
    first = make_project(tmp_path / "first", mirror, **{"train.epochs": 1, **KL_TERM})
    said = run(["dvc", "repro"], first).stdout
    assert (
        "note: train.kl_warmup_epochs 2 is above train.epochs 1: beta reaches 50% of train.beta by the last "
        "epoch, never train.beta itself"
    ) in said, "a warm-up longer than the run trains as asked, and says so in one line"
    assert (kept_best / "models/model.pt").read_bytes() == (first / "models/model.pt").read_bytes(), (
        "the kept model is epoch 1's weights, byte for byte"
    )
    assert (kept_best / "metrics/test.json").read_text() == (first / "metrics/test.json").read_text(), (
        "and evaluate measured that model"
    )
    state = torch.load(kept_best / "models/state.pt", weights_only=True)
    assert any(not torch.equal(state["model"][k], state["best_model"][k]) for k in state["model"]), (
        "the last epoch's weights are other weights: they go on training from models/state.pt"
    )
    train = json.loads((kept_best / "metrics/train.json").read_text())
    assert (train["epochs"], train["best_epoch"]) == (3, 1)
    with open(kept_best / "metrics/history.csv") as fh:
        first_epoch = next(csv.DictReader(fh))
    assert train["best_val_total"] == round(float(first_epoch["val_total"]), 6), "epoch 1's val_total"
    _, [mlrun] = runs_of(kept_best)
    assert mlrun.data.tags["kept_epoch"] == "1" and "stopped_early" not in mlrun.data.tags
    assert (mlrun.data.params["train.kl_warmup_epochs"], mlrun.data.params["train.free_bits"]) == ("2", "0.25")
    assert mlrun.data.metrics["train_optimised"] != mlrun.data.metrics["train_total"], "free bits: another loss"

    project = Path(shutil.copytree(kept_best, tmp_path / "more", symlinks=True))
    more = run(["dvc", "exp", "run", "-S", "train.epochs=4", "train"], project)
    assert epochs_trained(more.stdout) == [4], "it continues from its last epoch, not its best"
    assert (project / "models/model.pt").read_bytes() == (first / "models/model.pt").read_bytes(), (
        "epoch 4 does not improve by train.min_delta either: epoch 1 stays the kept one"
    )


def test_a_killed_run_that_keeps_its_best_epoch_resumes_to_the_bytes_of_one_never_killed(
    tmp_path, mirror, kept_best, started
):
    project = make_project(tmp_path / "p", mirror, **KEPT_BEST)
    proc = started(["dvc", "repro", "train"], project)
    read_until(proc, epoch_ended(1))  # from here on, in epoch 2 of 3
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert (project / "models/checkpoint.pt").exists() and not (project / "models/model.pt").exists()

    result = run(["dvc", "repro", "train"], project)
    assert re.search(r"resuming from epoch [12] of 3", result.stdout), result.stdout
    assert train_outputs(project) == train_outputs(kept_best), "model.pt (epoch 1's), state.pt and the histories"


def test_the_default_params_train_the_bytes_the_code_before_these_params_trained(tmp_path, reproduced):
    """Every new param's default leaves the reference run as it was: the session's default project
    (`reproduced`) and the code of BEFORE_THESE_PARAMS, on the same params and data, train the same
    model on this machine."""
    if subprocess.run(["git", "cat-file", "-e", BEFORE_THESE_PARAMS], cwd=ROOT).returncode:
        pytest.skip(f"this checkout's history lacks {BEFORE_THESE_PARAMS[:7]} (a shallow clone)")
    before = tmp_path / "before"
    archive = subprocess.run(
        ["git", "archive", "--format=tar", BEFORE_THESE_PARAMS, *(f for f in PROJECT_FILES if f != ".dvc/plots")],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    before.mkdir()
    (before / "project.tar").write_bytes(archive.stdout)
    with tarfile.open(before / "project.tar") as tar:
        tar.extractall(before, filter="data")
    (before / "project.tar").unlink()
    params = yaml.safe_load((reproduced / "params.yaml").read_text())
    assert [params["train"][key] for key in NEW_TRAIN_PARAMS] == [0, 0.0, "last", 0, 0.0, 0], "the defaults"
    assert [params["data"][key] for key in NEW_DATA_PARAMS] == [None, None], "all of the images"
    for key in NEW_TRAIN_PARAMS:  # the code before them refuses keys it does not know
        del params["train"][key]
    for key in NEW_DATA_PARAMS:
        del params["data"][key]
    (before / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], before)
    run(["git", "add", "-A"], before)
    run(["git", "commit", "-qm", "before"], before, env=project_env() | GIT_IDENTITY)

    run(["dvc", "repro", "train"], before)
    assert (before / "models/model.pt").read_bytes() == (reproduced / "models/model.pt").read_bytes()
