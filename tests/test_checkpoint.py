"""What a checkpoint may be resumed by: the device kind it was trained on is part of its fingerprint,
and a checkpoint of another kind is refused, kept, with what to do; torchrun's process count is
checked against the devices before any process starts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from pipeline import history
from pipeline.errors import PipelineError
from pipeline.losses import DatasetLoss
from pipeline.model import VAE
from pipeline.model_files import load_checkpoint, save_checkpoint
from pipeline.params import Params
from pipeline.paths import CHECKPOINT_FILE
from pipeline.run_state import random_states, seeded
from tests.projects import ROOT


def cpu_run_states() -> list[dict[str, torch.Tensor]]:
    """The random states a checkpoint of a one-process CPU run keeps."""
    return [random_states(seeded(Params(), torch.device("cpu")))]


# The losses (train's and val's reconstruction, KL, total, optimised), the active units, the KL by dimension.
HISTORY = [[1, 30.0, 4.0, 34.0, 34.0, 29.0, 4.5, 33.5, 33.5, 2, 2.0, 2.5]]
FINGERPRINT = {"seed": 42, "model": {}, "train": {"precision": "fp32"}, "device": "cuda", "data": "abc"}


def test_a_checkpoint_trained_on_cuda_is_refused_on_the_cpu_and_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = VAE()
    save_checkpoint(
        FINGERPRINT,
        model,
        torch.optim.Adam(model.parameters()),
        cpu_run_states(),
        HISTORY,
        None,
        model.state_dict(),
    )
    saved = CHECKPOINT_FILE.read_bytes()
    with pytest.raises(PipelineError) as refused:
        load_checkpoint(FINGERPRINT | {"device": "cpu"}, epochs=3)
    assert str(refused.value) == (
        "models/checkpoint.pt holds a run trained on cuda and this run is on cpu: resume it where cuda is used "
        "(train.device: cuda), or delete models/checkpoint.pt to train from scratch here"
    )
    assert CHECKPOINT_FILE.read_bytes() == saved

    assert load_checkpoint(FINGERPRINT, epochs=3)["history"] == HISTORY, "on its own device kind it resumes"
    assert load_checkpoint(FINGERPRINT | {"device": "cpu", "seed": 1}, epochs=3) is None, "other params: discarded"
    assert not CHECKPOINT_FILE.exists()


def test_a_checkpoint_written_after_a_resume_is_the_bytes_of_one_written_without(tmp_path, monkeypatch):
    """The rows loaded from a checkpoint and those trained after it are written alike."""
    monkeypatch.chdir(tmp_path)
    model = VAE()
    optimizer, rng = torch.optim.Adam(model.parameters()), cpu_run_states()
    epochs = [history.EpochLosses.of(epoch, torch.rand(4), validation(torch.rand(4))) for epoch in (1, 2)]

    save_checkpoint(FINGERPRINT, model, optimizer, rng, history.to_saved(epochs), None, model.state_dict())
    uninterrupted = CHECKPOINT_FILE.read_bytes()
    save_checkpoint(FINGERPRINT, model, optimizer, rng, history.to_saved(epochs[:1]), None, model.state_dict())
    resumed = history.from_saved(load_checkpoint(FINGERPRINT, epochs=2)["history"]) + epochs[1:]
    assert resumed == epochs
    save_checkpoint(FINGERPRINT, model, optimizer, rng, history.to_saved(resumed), None, model.state_dict())
    assert CHECKPOINT_FILE.read_bytes() == uninterrupted


def test_one_gpu_for_several_processes_is_refused_before_any_starts(tmp_path):
    params = {"train": {"device": "cuda:1", "num_processes": 2}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.train"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert result.stderr == (
        "error: train.device is 'cuda:1', one GPU, but train.num_processes is 2: each process "
        "needs a GPU of its own; set train.device to cuda (process i on GPU i)\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_the_objective_is_the_negative_elbo_whatever_beta_weighs_the_kl_by():
    row = history.EpochLosses.of(
        3, torch.tensor([30.0, 4.0, 38.0, 38.0]), validation(torch.tensor([29.0, 4.5, 38.0, 38.0]))
    )
    assert row.metrics[history.OBJECTIVE] == 29.0 + 4.5, "reconstruction + KL, not val_total (beta 2)"
    assert history.train_metrics([row])[history.OBJECTIVE] == 33.5
    header, line = history.to_csv([row]).splitlines()
    assert header.split(",")[-2:] == [history.OBJECTIVE, history.ACTIVE_UNITS] and line.split(",")[-2:] == ["33.5", "1"]
    assert history.from_saved(history.to_saved([row])) == [row], "a checkpoint holds every number of the row"


def test_each_epoch_keeps_the_kl_of_each_latent_dimension_and_the_active_units():
    rows = [history.EpochLosses.of(e, torch.rand(4), validation(torch.rand(4), [0.25, 0.5], 2)) for e in (1, 2)]
    assert history.latent_to_csv(rows).splitlines() == [
        "epoch,dimension,kl",
        "1,0,0.25",
        "1,1,0.5",
        "2,0,0.25",
        "2,1,0.5",
    ], "the long form: a line per dimension in one chart"
    assert rows[1].run_metrics.items() >= {"val_kl_dim0": 0.25, "val_kl_dim1": 0.5, history.ACTIVE_UNITS: 2}.items()
    assert "val_kl_dim0" not in history.train_metrics(rows), "train.json's table stays narrow for any latent_dim"
    assert history.train_metrics(rows)[history.ACTIVE_UNITS] == 2


def validation(parts: torch.Tensor, kl_per_dim=(0.5,), active_units: int = 1) -> DatasetLoss:
    """What `dataset_loss` returns for a validation set of these numbers."""
    return DatasetLoss(parts, torch.tensor(kl_per_dim), torch.tensor(active_units))


def rows_of(val_totals: list[float]) -> list[history.EpochLosses]:
    return [
        history.EpochLosses(epoch, dict.fromkeys(history.COLUMNS, 1.0) | {history.BEST_BY: total}, (1.0,), 1)
        for epoch, total in enumerate(val_totals, 1)
    ]


def test_the_best_epoch_is_the_last_to_improve_by_more_than_min_delta_and_patience_counts_from_it():
    rows = rows_of([10.0, 9.0, 8.95, 9.5, 8.5, 8.6, 8.7])
    assert history.best_row(rows).epoch == 5, "the lowest val_total"
    assert history.best_row(rows[:2]).epoch == 2
    assert history.best_row(rows, min_delta=0.1).epoch == 5, "8.5 < 9.0 - 0.1; 8.95 was not enough"
    assert history.best_row(rows[:4], min_delta=0.1).epoch == 2
    assert history.best_row(rows_of([5.0, 5.0])).epoch == 1, "a tie does not improve"

    assert not history.stops_early(rows, patience=0), "0: never"
    assert [n for n in range(1, 8) if history.stops_early(rows[:n], patience=2)] == [7], "epochs 6 and 7 after 5"
    assert [n for n in range(1, 8) if history.stops_early(rows[:n], patience=2, min_delta=0.1)] == [4, 7]
    assert history.stopped_before_last(rows, patience=2, min_delta=0.1) == 4, "a run of this rule ends at 4"
    assert history.stopped_before_last(rows, patience=2) is None, "it ends at 7, its last epoch"
    assert history.stopped_before_last(rows, patience=0) is None


def test_train_json_gives_the_best_epoch_beside_the_last():
    metrics = history.train_metrics(rows_of([10.0, 8.0, 9.0]))
    assert (metrics["epochs"], metrics[history.BEST_BY]) == (3, 9.0), "the last epoch's"
    assert (metrics[history.BEST_EPOCH], metrics[f"best_{history.BEST_BY}"]) == (2, 8.0)
    assert metrics[f"best_{history.OBJECTIVE}"] == 2.0, "the best epoch's val_reconstruction + val_kl"
