"""Faults as users meet them: through `dvc repro` or `dvc exp run`, with real processes, signals,
servers and files. Each ends in a clear message or a correct result, and each test looks at what is
left on disk afterwards: a failed stage's previous outputs are still there, byte for byte (dvc.yaml
marks every output persist), nothing half-written appears, and interrupted training resumes."""

from __future__ import annotations

import gzip
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from pipeline.device import has_native_bf16
from pipeline.idx import FILES, write_idx
from pipeline.visualize import FIGURE_COUNT
from tests.processes import epoch_ended, read_until, stage_process
from tests.projects import (
    assert_kept,
    edit_params,
    make_project,
    outputs_of,
    project_env,
    run,
    stages_run,
)
from tests.servers import free_port, runs_of
from tests.synthetic import write_mirror
from tests.tolerances import BF16_LOSS_TOLERANCE

pytestmark = pytest.mark.slow
EPOCHS = 4


@pytest.fixture(scope="module")
def bigger_mirror(tmp_path_factory) -> Path:
    """Enough images that an epoch lasts about a second, so a kill can land inside one."""
    return write_mirror(tmp_path_factory.mktemp("mirror"), n_train=1500, n_test=100)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, bigger_mirror) -> Path:
    project = make_project(tmp_path_factory.mktemp("uninterrupted") / "p", bigger_mirror, **{"train.epochs": EPOCHS})
    run(["dvc", "repro", "train"], project)
    return project


@pytest.fixture(scope="module")
def reproduced_once(tmp_path_factory) -> Path:
    """A project whose whole pipeline has run once (without tracking); tests fault copies of it."""
    tmp = tmp_path_factory.mktemp("reproduced-once")
    project = make_project(tmp / "project", write_mirror(tmp / "mirror"), **{"mlflow.enabled": False})
    run(["dvc", "repro"], project)
    return project


@pytest.fixture
def finished(reproduced_once, tmp_path) -> Path:
    """A copy of a project with every output in place, as a user has it after a good `dvc repro`."""
    return Path(shutil.copytree(reproduced_once, tmp_path / "project", symlinks=True))


def finish(proc: subprocess.Popen, seen: str, timeout: float = 300) -> tuple[int, str]:
    """Wait for `proc`; its exit status and everything it printed."""
    seen += proc.stdout.read()
    return proc.wait(timeout=timeout), seen


# --- the download stage: a bad mirror -------------------------------------------------------------


def mirror_file(mirror: Path, role: str) -> Path:
    return mirror / (FILES[role] + ".gz")


def truncated_gzip(mirror: Path) -> str:
    archive = mirror_file(mirror, "train_images")
    archive.write_bytes(archive.read_bytes()[:-200])
    return str(mirror)


def wrong_magic_number(mirror: Path) -> str:
    shutil.copyfile(mirror_file(mirror, "train_images"), mirror_file(mirror, "train_labels"))
    return str(mirror)


def counts_that_disagree(mirror: Path) -> str:
    write_idx(mirror_file(mirror, "train_labels"), np.zeros(239, np.uint8))
    return str(mirror)


def labels_outside_0_to_9(mirror: Path) -> str:
    write_idx(mirror_file(mirror, "test_labels"), np.full(60, 10, np.uint8))
    return str(mirror)


def a_missing_file(mirror: Path) -> str:
    mirror_file(mirror, "test_labels").unlink()
    return str(mirror)


def an_unreachable_url(mirror: Path) -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def a_truncated_idx_file(mirror: Path) -> str:
    """A whole gzip of a cut IDX file: the archive is fine, its contents are not."""
    archive = mirror_file(mirror, "train_images")
    with gzip.open(archive) as fh:
        data = fh.read()
    with gzip.open(archive, "wb") as fh:
        fh.write(data[:-500])
    return str(mirror)


# Each error names the file as the user knows it: its path in the mirror (MIRROR), or its URL.
BAD_MIRRORS = [
    (truncated_gzip, r"MIRROR/train-images-idx3-ubyte.gz: not a complete gzip file .* fetch it again"),
    (a_truncated_idx_file, r"MIRROR/train-images-idx3-ubyte.gz: header promises shape \(240, 28, 28\) .* truncated"),
    (wrong_magic_number, r"MIRROR/train-labels-idx1-ubyte.gz: magic number 0x00000803 is not 0x00000801"),
    (
        counts_that_disagree,
        r"MIRROR/train-images-idx3-ubyte.gz holds 240 images but MIRROR/train-labels-idx1-ubyte.gz "
        r"holds 239 labels",
    ),
    (labels_outside_0_to_9, r"MIRROR/t10k-labels-idx1-ubyte.gz: label 10 is outside 0-9"),
    (a_missing_file, r"has neither t10k-labels-idx1-ubyte.gz nor t10k-labels-idx1-ubyte; add the file"),
    (an_unreachable_url, r"cannot reach http://127.0.0.1:\d+/train-images-idx3-ubyte.gz: .*check data.mirror"),
]


@pytest.mark.parametrize("spoil, message", BAD_MIRRORS, ids=[spoil.__name__ for spoil, _ in BAD_MIRRORS])
def test_a_bad_mirror_stops_the_download_and_keeps_the_previous_data(finished, tmp_path, spoil, message):
    mirror = spoil(write_mirror(tmp_path / "bad-mirror"))
    edit_params(finished, **{"data.mirror": mirror})
    before = outputs_of(finished)
    result = run(["dvc", "repro"], finished, check=False)
    assert result.returncode != 0
    assert re.search(f"error: .*{message.replace('MIRROR', re.escape(mirror))}", result.stderr), result.stderr
    assert ".tmp" not in result.stderr, "a staging copy the user never made is not named"
    assert stages_run(result.stdout) == ["download"]
    assert_kept(finished, before)


def test_a_failed_checksum_in_torchvisions_download_keeps_the_previous_data(finished, tmp_path, http_server):
    """`data.mirror: null` is torchvision's own download, from its own mirror URLs. Here a local HTTP
    proxy answers for those hosts with files whose MD5 is not the one torchvision expects."""
    served = write_mirror(tmp_path / "served" / "exdb" / "mnist").parent.parent  # torchvision's http mirror path
    proxy = http_server(served)
    env = {k: v for k, v in project_env().items() if k.lower() != "no_proxy"}
    env |= {"http_proxy": proxy, "https_proxy": proxy, "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy}
    edit_params(finished, **{"data.mirror": None})
    before = outputs_of(finished)
    result = run(["dvc", "repro"], finished, check=False, env=env)
    assert result.returncode != 0
    assert re.search(
        r"(?s)error: torchvision could not download MNIST: .*train-images-idx3-ubyte.gz.*corrupted"
        r".*Point data.mirror",
        result.stderr,
    ), result.stderr
    assert_kept(finished, before)


# --- parameters -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, stage, message",
    [
        (
            {"train.learning_rat": 0.001},
            "train",
            "unknown key 'train.learning_rat'; did you mean 'train.learning_rate'?",
        ),
        ({"train.batch_size": "big"}, "train", "train.batch_size: expected an integer, got 'big'"),
        ({"data.val_fraction": 1.5}, "split", "data.val_fraction: must be strictly between 0 and 1, got 1.5"),
        ({"train.batch_size": 512}, "train", "train.batch_size 512 is larger than the 192 training images; lower it"),
        ({"data.train_images": 241}, "split", "data.train_images is 241 but data/raw holds 240 training images; set"),
        ({"seed": 2**70}, "train", "seed: must be at most 9,223,372,036,854,775,807 (2^63 - 1"),
    ],
    ids=[
        "misspelt key",
        "wrong type",
        "out of range",
        "batch larger than the data",
        "more images than the data",
        "integer beyond int64",
    ],
)
def test_a_params_mistake_stops_its_stage_before_any_work_and_keeps_everything(finished, changes, stage, message):
    edit_params(finished, **changes)
    before = outputs_of(finished)
    result = run(["dvc", "repro"], finished, check=False)
    assert result.returncode != 0
    assert f"error: {message}" in result.stderr, result.stderr
    assert stages_run(result.stdout) == [stage]
    assert_kept(finished, before)
    assert not (finished / "models/checkpoint.pt").exists()


# --- training -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_training_resumes_to_bit_identical_weights_in_the_same_run(
    tmp_path, bigger_mirror, uninterrupted, started, sig
):
    project = make_project(tmp_path / "p", bigger_mirror, **{"train.epochs": EPOCHS})
    proc = started(["dvc", "repro", "train"], project)
    read_until(proc, epoch_ended(2))  # from here on, in epoch 3
    os.killpg(proc.pid, sig)
    proc.wait(timeout=30)
    assert not (project / "models/model.pt").exists()
    assert (project / "models/checkpoint.pt").exists()

    result = run(["dvc", "repro", "train"], project)
    assert re.search(r"resuming from epoch [23] of 4", result.stdout), result.stdout
    assert (project / "models/model.pt").read_bytes() == (uninterrupted / "models/model.pt").read_bytes()
    assert (project / "metrics/history.csv").read_text() == (uninterrupted / "metrics/history.csv").read_text()
    assert train_outputs(project) == train_outputs(uninterrupted), "every train output, state.pt included"
    assert not (project / "models/checkpoint.pt").exists(), "a finished stage leaves no checkpoint"

    client, runs = runs_of(project)
    assert len(runs) == 1, "the resumed training logs into the run it started"
    assert runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_total")]
    assert sorted(steps) == [1, 2, 3, 4], "every epoch logged exactly once"


def train_outputs(project: Path) -> dict[str, str]:
    """The hash of each output of the train stage, as dvc.lock records it."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for out in lock["stages"]["train"]["outs"]}


@pytest.mark.parametrize("shell", ["bash", "dash"])
def test_training_whose_dvc_is_killed_stops_as_ctrl_c_stops_it_and_the_next_repro_resumes(
    tmp_path, bigger_mirror, uninterrupted, started, shell
):
    """`kill -9` of DVC alone, not its group: the stage left running would write outputs DVC never
    records, outside its lock, beside the next `dvc repro` in the workspace. DVC runs the command in
    $SHELL (/bin/sh where unset): bash execs it, dash stays between DVC and the stage."""
    if shutil.which(shell) is None:
        pytest.skip(f"needs {shell}")
    project = make_project(tmp_path / "p", bigger_mirror, **{"train.epochs": EPOCHS})
    proc = started(["dvc", "repro", "train"], project, env=project_env() | {"SHELL": shutil.which(shell)})
    training = stage_process(proc, "train")
    read_until(proc, epoch_ended(1))
    proc.kill()
    proc.wait(timeout=30)
    training.wait(timeout=60)
    assert not (project / "models/model.pt").exists(), "the orphaned stage trained on to the end"
    assert (project / "models/checkpoint.pt").exists()
    _, [interrupted] = runs_of(project)
    assert interrupted.info.status == "KILLED"

    result = run(["dvc", "repro", "train"], project)
    assert re.search(r"resuming from epoch [1-3] of 4", result.stdout), result.stdout
    assert (project / "models/model.pt").read_bytes() == (uninterrupted / "models/model.pt").read_bytes()
    _, [resumed] = runs_of(project)
    assert resumed.info.run_id == interrupted.info.run_id and resumed.info.status == "FINISHED"


def test_more_epochs_continue_a_finished_run_to_the_bytes_of_the_longer_run(tmp_path, bigger_mirror, uninterrupted):
    project = make_project(tmp_path / "p", bigger_mirror, **{"train.epochs": 2})
    run(["dvc", "exp", "run", "train"], project)
    _, [first] = runs_of(project)

    result = run(["dvc", "exp", "run", "-S", f"train.epochs={EPOCHS}", "train"], project)
    assert f"continuing from epoch 2 of {EPOCHS} (models/state.pt)" in result.stdout, result.stdout
    assert re.findall(r"^epoch (\d+)/\d+  train_", result.stdout, re.M) == ["3", "4"], "only the epochs after 2"
    assert (project / "models/model.pt").read_bytes() == (uninterrupted / "models/model.pt").read_bytes()
    assert (project / "metrics/history.csv").read_text() == (uninterrupted / "metrics/history.csv").read_text()
    client, runs = runs_of(project)
    [continued] = [r for r in runs if r.info.run_id != first.info.run_id]
    assert continued.data.tags["continued_from_run_id"] == first.info.run_id
    assert sorted(m.step for m in client.get_metric_history(continued.info.run_id, "val_total")) == [1, 2, 3, 4]
    assert sorted(m.step for m in client.get_metric_history(first.info.run_id, "val_total")) == [1, 2], (
        "the finished run is not rewritten"
    )

    result = run(["dvc", "exp", "run", "-S", "train.epochs=1", "train"], project)
    assert f"training from scratch: models/state.pt holds {EPOCHS} epochs, and train.epochs is 1" in result.stdout
    assert re.findall(r"^epoch (\d+)/\d+  train_", result.stdout, re.M) == ["1"]


def test_bf16_training_through_dvc_tracks_fp32_and_a_killed_run_resumes_to_the_same_bytes(
    tmp_path, bigger_mirror, uninterrupted, started
):
    """`dvc exp run -S train.precision=bf16` against the fp32 `uninterrupted` run of the same data;
    then a bf16 run killed in epoch 3 and resumed gives the exp's bytes (so do two bf16 runs)."""
    exp = make_project(tmp_path / "exp", bigger_mirror, **{"train.epochs": EPOCHS})
    result = run(["dvc", "exp", "run", "-S", "train.precision=bf16", "train"], exp)
    assert ("has no native bf16" in result.stderr) is not has_native_bf16(torch.device("cpu")), result.stderr
    bf16_history = np.genfromtxt(exp / "metrics/history.csv", delimiter=",", names=True)
    fp32_history = np.genfromtxt(uninterrupted / "metrics/history.csv", delimiter=",", names=True)
    for name in ("train_total", "val_total"):
        np.testing.assert_allclose(bf16_history[name], fp32_history[name], rtol=BF16_LOSS_TOLERANCE, err_msg=name)
    assert (exp / "models/model.pt").read_bytes() != (uninterrupted / "models/model.pt").read_bytes()
    _, [tracked] = runs_of(exp)
    assert tracked.data.params["train.precision"] == "bf16" and tracked.data.tags["train.precision_used"] == "bf16"
    assert "- **Precision**: trained in bf16" in tracked.data.tags["mlflow.note.content"]

    project = make_project(tmp_path / "killed", bigger_mirror, **{"train.epochs": EPOCHS, "train.precision": "bf16"})
    proc = started(["dvc", "repro", "train"], project)
    read_until(proc, epoch_ended(2))  # from here on, in epoch 3
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    result = run(["dvc", "repro", "train"], project)
    assert re.search(r"resuming from epoch [23] of 4", result.stdout), result.stdout
    assert (project / "models/model.pt").read_bytes() == (exp / "models/model.pt").read_bytes()
    assert (project / "metrics/history.csv").read_text() == (exp / "metrics/history.csv").read_text()


def test_ctrl_c_during_training_keeps_the_previous_outputs_and_the_next_repro_resumes(finished, started):
    edit_params(finished, **{"train.epochs": 8, "mlflow.enabled": True})
    before = outputs_of(finished)
    proc = started(["dvc", "repro"], finished)
    seen = read_until(proc, epoch_ended(2))
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: SIGINT to the terminal's foreground group
    status, seen = finish(proc, seen, timeout=60)
    assert status != 0
    assert "interrupted: the stage's previous outputs are left as they were" in seen
    assert "the next `dvc repro` resumes from the last finished epoch, in models/checkpoint.pt" in seen
    assert_kept(finished, before)
    assert (finished / "models/checkpoint.pt").exists()
    _, [interrupted] = runs_of(finished)
    assert interrupted.info.status == "KILLED"

    result = run(["dvc", "repro"], finished)
    assert re.search(r"resuming from epoch \d+ of 8", result.stdout), result.stdout
    assert stages_run(result.stdout) == ["train", "evaluate", "visualize"]
    _, [resumed] = runs_of(finished)
    assert resumed.info.run_id == interrupted.info.run_id and resumed.info.status == "FINISHED"


def test_checkpoint_of_other_params_is_not_resumed(tmp_path, bigger_mirror, started):
    project = make_project(tmp_path / "p", bigger_mirror, **{"train.epochs": EPOCHS})
    proc = started(["dvc", "repro", "train"], project)
    read_until(proc, epoch_ended(1))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    edit_params(project, **{"train.learning_rate": 0.001, "train.epochs": 1})
    result = run(["dvc", "repro", "train"], project)
    assert "discarding models/checkpoint.pt" in result.stdout
    assert "resuming" not in result.stdout


def test_divergence_names_epoch_step_and_learning_rate_and_keeps_the_previous_model(finished):
    edit_params(finished, **{"train.learning_rate": 1.0e6, "mlflow.enabled": True})
    before = outputs_of(finished)
    result = run(["dvc", "repro"], finished, check=False)
    assert result.returncode != 0
    assert re.search(
        r"error: loss became NaN or infinite at epoch 1, step \d+; train.learning_rate 1000000.0", result.stderr
    ), result.stderr
    assert stages_run(result.stdout) == ["check", "train"]  # check: mlflow.enabled changed
    assert_kept(finished, before)
    _, runs = runs_of(finished)
    assert [r.info.status for r in runs] == ["FAILED"]


def file_size_limit(limit: int):
    """Run a process as if its disk were full past `limit` bytes a file (RLIMIT_FSIZE: writes beyond
    it fail with EFBIG, as they fail with ENOSPC on a full disk)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_full_disk_names_the_file_keeps_the_checkpoint_and_the_next_repro_resumes(tmp_path, bigger_mirror, started):
    project = make_project(tmp_path / "p", bigger_mirror, **{"train.epochs": EPOCHS, "mlflow.enabled": False})
    proc = started(["dvc", "repro", "train"], project)
    read_until(proc, epoch_ended(2))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    checkpoint = project / "models/checkpoint.pt"
    saved = checkpoint.read_bytes()  # epoch 2: weights and two sets of Adam moments, about 3 MB

    # Epoch 3's checkpoint does not fit.
    result = run(["dvc", "repro", "train"], project, check=False, preexec_fn=file_size_limit(2 * 2**20))
    assert result.returncode != 0
    assert "resuming from epoch 2 of 4" in result.stdout
    assert (
        "error: cannot write models/checkpoint.pt: File too large; any previous models/checkpoint.pt is left as"
        in result.stderr
    ), result.stderr
    assert checkpoint.read_bytes() == saved
    assert list((project / "models").iterdir()) == [checkpoint], "no temp file left beside it"

    # Two epochs are enough: the model (about 1 MB) does not fit.
    edit_params(project, **{"train.epochs": 2})
    result = run(["dvc", "repro", "train"], project, check=False, preexec_fn=file_size_limit(512 * 2**10))
    assert result.returncode != 0
    assert "error: cannot write models/model.pt: File too large" in result.stderr, result.stderr
    assert checkpoint.read_bytes() == saved and not (project / "models/model.pt").exists()

    result = run(["dvc", "repro", "train"], project)
    assert "resuming from epoch 2 of 2" in result.stdout
    assert (project / "models/model.pt").exists() and not checkpoint.exists()


# --- evaluate and visualize -------------------------------------------------------------------------


def test_a_crashed_evaluate_leaves_the_previous_metrics(finished, started):
    edit_params(finished, **{"evaluate.iw_samples": 5000})
    before = outputs_of(finished)
    proc = started(["dvc", "repro"], finished, env=project_env() | {"PIPELINE_PROGRESS_SECONDS": "0.5"})
    read_until(proc, r"^evaluate: importance-weighted log-likelihood: [\d,]+/300,000 decodes")  # well into its work
    stage_process(proc, "evaluate").kill()  # SIGKILL, as the kernel's out-of-memory killer does
    status, seen = finish(proc, "")
    assert status != 0, seen
    assert_kept(finished, before)


def test_a_crashed_visualize_leaves_the_previous_figures_whole(finished, started):
    edit_params(finished, **{"visualize.manifold_size": 40})
    before = outputs_of(finished)
    proc = started(["dvc", "repro"], finished)
    visualize = stage_process(proc, "visualize")
    deadline = time.monotonic() + 120
    while not list(finished.glob(".figures.*.tmp/*.png")):  # the new figures are being written
        assert time.monotonic() < deadline and visualize.is_running(), "visualize wrote no figure"
        time.sleep(0.01)
    visualize.kill()  # SIGKILL, as the kernel's out-of-memory killer does
    status, seen = finish(proc, "")
    assert status != 0, seen
    assert_kept(finished, before)

    run(["dvc", "repro"], finished)
    assert not list(finished.glob(".figures.*")), "the next run clears what the killed one left"


def test_a_truncated_model_file_is_named_and_dvc_checkout_restores_it(finished):
    model = finished / "models/model.pt"
    recorded = model.read_bytes()
    model.write_bytes(recorded[: len(recorded) // 2])
    before = outputs_of(finished)
    result = run(["dvc", "repro", "--single-item", "evaluate"], finished, check=False)
    assert result.returncode != 0
    assert "error: models/model.pt is not a complete PyTorch file" in result.stderr, result.stderr
    assert "`dvc checkout --force models/model.pt` restores the version dvc.lock records" in result.stderr
    assert outputs_of(finished) == before, "the evaluation and figures of the recorded model are kept"

    run(["dvc", "checkout", "--force", "models/model.pt"], finished)  # the command the error gives
    assert model.read_bytes() == recorded
    assert "Data and pipelines are up to date." in run(["dvc", "status"], finished).stdout


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_crafted_pickle_in_place_of_the_model_is_refused(finished):
    (finished / "models/model.pt").write_bytes(pickle.dumps({"config": _RunsCode()}))
    before = outputs_of(finished)
    result = run(["dvc", "repro", "--single-item", "evaluate"], finished, check=False)
    assert result.returncode != 0
    assert "models/model.pt holds objects other than tensors and plain values; refusing to unpickle it" in result.stderr
    assert not (finished / "pwned").exists()
    assert outputs_of(finished) == before


# --- tracking ---------------------------------------------------------------------------------------


def test_unreachable_tracking_server_fails_fast_naming_it(finished):
    uri = f"http://127.0.0.1:{free_port()}"
    edit_params(finished, **{"mlflow.enabled": True, "mlflow.tracking_uri": uri, "train.learning_rate": 0.001})
    before = outputs_of(finished)
    started = time.monotonic()
    result = run(["dvc", "repro"], finished, check=False)
    seconds = time.monotonic() - started
    assert result.returncode != 0
    assert f"error: cannot reach the MLflow tracking server {uri} (" in result.stderr
    assert seconds < 60, f"took {seconds:.0f} s to give up"
    assert_kept(finished, before)
    assert not (finished / "models/checkpoint.pt").exists()


def test_a_damaged_local_store_is_named_with_how_to_recover_and_left_as_it_was(finished):
    store = finished / "mlruns/mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{store}").search_experiments()  # a store with MLflow's tables
    damaged = bytearray(store.read_bytes())
    damaged[4096:] = bytes(len(damaged) - 4096)  # every page but the first zeroed, as a bad disk or copy leaves it
    store.write_bytes(damaged)
    edit_params(finished, **{"mlflow.enabled": True, "train.learning_rate": 0.001})
    before = outputs_of(finished)
    result = run(["dvc", "repro"], finished, check=False)
    assert result.returncode != 0
    assert re.search(
        r"error: the MLflow store mlruns/mlflow.db is damaged \(database disk image is malformed\), .*"
        r"Move it aside \(`mv mlruns/mlflow.db mlruns/mlflow.db.damaged`\)",
        result.stderr,
    ), result.stderr
    assert "Start the server" not in result.stderr
    assert_kept(finished, before)
    assert store.read_bytes() == damaged, "the damaged store is left for the user to recover"


def test_tracking_disabled_runs_the_whole_pipeline_without_a_store(project):
    edit_params(project, **{"mlflow.enabled": False})
    run(["dvc", "repro"], project)
    assert (project / "metrics/test.json").exists() and (project / "figures/manifold.png").exists()
    assert not list(project.rglob("mlflow.db")), "no store anywhere, MLflow's default ./mlflow.db included"


def test_server_dying_mid_run_still_writes_every_output(tmp_path, bigger_mirror, mlflow_server, started):
    url, store, server = mlflow_server
    project = make_project(tmp_path / "p", bigger_mirror, **{"train.epochs": 5})
    edit_params(project, **{"mlflow.tracking_uri": url})
    # The stage's end waits this long for the store to come back; this one never does. A login in
    # the environment (this server takes any) is never logged.
    login = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "s3cret"}
    proc = started(
        ["dvc", "repro", "train"], project, env=project_env() | login | {"PIPELINE_TRACKING_RETRY_SECONDS": "1"}
    )
    seen = read_until(proc, epoch_ended(2))
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    status, seen = finish(proc, seen)
    assert status == 0, seen
    assert re.search(r"warning: MLflow refused .*; kept, and tried again at the next epoch", seen), seen
    assert re.search(r"warning: not logged to MLflow run \w+: metrics at step \d", seen), seen
    assert (project / "models/model.pt").exists() and (project / "metrics/history.csv").exists()
    assert not (project / "models/checkpoint.pt").exists()

    client = mlflow.MlflowClient(tracking_uri=store)
    [logged] = client.search_runs([client.get_experiment_by_name("vae-pipeline").experiment_id])
    steps = sorted(m.step for m in client.get_metric_history(logged.info.run_id, "train_total"))
    assert steps[:2] == [1, 2] and steps == list(range(1, len(steps) + 1)), "what was logged is intact"
    assert logged.data.params["mlflow.tracking_uri"] == url
    assert "s3cret" not in Path(store[len("sqlite:///") :]).read_bytes().decode("latin-1")


# --- DVC itself -------------------------------------------------------------------------------------


def test_a_second_repro_in_the_same_workspace_is_refused_and_the_first_finishes_intact(
    tmp_path, bigger_mirror, uninterrupted, started
):
    project = make_project(tmp_path / "p", bigger_mirror, **{"train.epochs": EPOCHS})
    first = started(["dvc", "repro", "train"], project)
    seen = read_until(first, epoch_ended(1))
    training = stage_process(first, "train")
    training.suspend()  # the first repro still holds its lock while the second starts, however fast the machine
    try:
        second = run(["dvc", "repro"], project, check=False)
    finally:
        training.resume()
    assert second.returncode != 0
    assert re.search(r"ERROR: .* is busy, it is being blocked by:\s+\(PID \d+\)", second.stderr), second.stderr
    status, seen = finish(first, seen)
    assert status == 0, seen
    assert (project / "models/model.pt").read_bytes() == (uninterrupted / "models/model.pt").read_bytes()
    assert "Data and pipelines are up to date." in run(["dvc", "status", "train"], project).stdout


def test_queued_experiments_run_in_parallel_into_the_projects_own_store(project):
    rates = ("0.001", "0.002")
    for rate in rates:
        run(["dvc", "exp", "run", "--queue", "-S", f"train.learning_rate={rate}"], project)
    run(["dvc", "queue", "start", "-j", "2"], project)
    deadline = time.monotonic() + 600
    while True:
        status = run(["dvc", "queue", "status"], project).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        assert time.monotonic() < deadline, f"queued experiments did not finish:\n{status}"
        time.sleep(3)
    assert len(re.findall(r"\bSuccess\b", status)) == 2, status

    client, runs = runs_of(project)
    assert sorted(r.data.params["train.learning_rate"] for r in runs) == sorted(rates)
    for mlrun in runs:
        assert mlrun.info.status == "FINISHED"
        assert mlrun.data.tags.get("dvc.exp_name"), "a queued run names its DVC experiment"
        assert mlrun.info.run_name == mlrun.data.tags["dvc.exp_name"], "and is named after it"
        assert {"test_total", "val_total"} <= set(mlrun.data.metrics), "every stage logged into the one run"
        assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "val_total")] == [1], "nothing lost"
        assert len(client.list_artifacts(mlrun.info.run_id, "figures")) == FIGURE_COUNT
        [model] = client.search_logged_models(
            [mlrun.info.experiment_id], filter_string=f"source_run_id = '{mlrun.info.run_id}'"
        )
        assert (
            mlrun.data.tags["model_id"] == model.model_id
            and "Test**: test_total" in mlrun.data.tags["mlflow.note.content"]
        )
    leftovers = list((project / ".dvc/tmp").rglob("mlflow.db")) if (project / ".dvc/tmp").exists() else []
    assert leftovers == [], "no second store inside DVC's temporary copies"
