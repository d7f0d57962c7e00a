"""One MLflow run as the stages log into it: params, metrics, images, artifacts, datasets, the
trained model (an MLflow 3 LoggedModel), evaluations of that model, and the run's end. Logging
never breaks a stage, and a store that refuses a call for a while loses nothing."""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import mlflow
import mlflow.data
import mlflow.pytorch
import numpy as np
import torch
from mlflow.entities import DatasetInput, InputTag, LoggedModelInput, Metric, Param, RunTag
from mlflow.models import ModelSignature
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from pipeline import provenance
from pipeline.history import EpochLosses
from pipeline.model import VAE, to_input
from pipeline.tiling import tile

T = TypeVar("T")

# How long a stage's end waits for a store that refuses calls, before it lists what it could not
# log. A restarting server or a locked SQLite file answers well within it.
RETRY_SECONDS = "PIPELINE_TRACKING_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 60
CANDIDATE_ALIAS = "candidate"  # the registered model's newest evaluated version
WATCHED_IMAGES = 8  # validation images whose reconstructions are logged every epoch
WATCHED_COLUMNS = 4  # in rows of 4 above their reconstructions: a square, as MLflow's image card is
WATCHED_SCALE = 3  # each pixel as 3x3, for the full-size view (the card shows a 256-pixel thumbnail)


class TrackedRun:
    """An MLflow run that logging can never break, nor lose data in a blip. A call the store refuses
    (a server restarting, SQLite locked by a parallel experiment) is kept, in order, and tried again
    before the next call, so at the next epoch; at the stage's end the run waits up to
    PIPELINE_TRACKING_RETRY_SECONDS (60) for the store, then lists what it could not log. The
    stage goes on and writes its DVC outputs whatever the store does. With tracking off (run_id
    None) it does nothing and makes no client."""

    def __init__(self, run_id: str | None, model_id: str | None = None):
        self.run_id = run_id
        self.model_id = model_id  # the LoggedModel this run trained or evaluates
        self.pending: list[tuple[str, Callable[[mlflow.MlflowClient], object]]] = []
        self.refused = False

    def _call(self, what: str, action: Callable[[mlflow.MlflowClient], T]) -> T | None:
        """`action(client)` after every call kept before it; None if the store refuses (then kept)."""
        if self.run_id is None:
            return None
        self.pending.append((what, action))
        return self._flush()

    def _flush(self):
        result = None
        while self.pending:
            what, action = self.pending[0]
            try:
                result = action(mlflow.MlflowClient())
            except Exception as exc:
                if not self.refused:
                    print(
                        f"warning: MLflow refused {what} ({type(exc).__name__}); kept, and tried again "
                        "at the next epoch and at the end of the stage",
                        file=sys.stderr,
                    )
                self.refused = True
                return None
            self.pending.pop(0)
        if self.refused:
            print("MLflow accepts logs again: everything kept was logged", file=sys.stderr)
            self.refused = False
        return result

    def reopen(self) -> None:
        """Running again: a later stage of the run's execution logs into it."""
        self._call("run status", lambda client: client.update_run(self.run_id, status="RUNNING"))

    def log_params(self, params: dict) -> None:
        self._call(
            "params", lambda client: client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        )

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call("tags", lambda client: client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()]))

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self._call(
            f"metrics at step {step}",
            lambda client: client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()]),
        )

    def logged_steps(self, key: str) -> set[int]:
        history = self._call(f"history of {key}", lambda client: client.get_metric_history(self.run_id, key))
        return {m.step for m in history or []}

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        self._call(
            f"artifacts {artifact_path}/", lambda client: client.log_artifacts(self.run_id, str(folder), artifact_path)
        )

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call(f"artifact {artifact_file}", lambda client: client.log_text(self.run_id, text, artifact_file))

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        self._call(
            f"image {key} at step {step}", lambda client: client.log_image(self.run_id, image, key=key, step=step)
        )

    def log_epoch(self, row: EpochLosses, seconds: float, model: VAE, validation: torch.Tensor) -> None:
        """The epoch's losses and time, and the reconstructions of the first WATCHED_IMAGES
        validation images, each at the epoch's step."""
        self.log_metrics(row.run_metrics | {"epoch_seconds": seconds}, step=row.epoch)
        if self.run_id is not None:
            self.log_reconstructions(model, validation[:WATCHED_IMAGES], row.epoch)

    def log_untrained(self, model: VAE, validation: torch.Tensor) -> None:
        """The untrained model's reconstructions at step 0, where MLflow's image card opens (no random
        number is drawn: a run's bytes stay as they were)."""
        if self.run_id is not None:
            self.log_reconstructions(model, validation[:WATCHED_IMAGES], 0)

    @torch.no_grad()
    def log_reconstructions(self, model: VAE, images: torch.Tensor, step: int) -> None:
        """uint8 images, each row of WATCHED_COLUMNS above their reconstructions through the
        posterior mean, as one image."""
        x = to_input(images)
        rows = zip(x.split(WATCHED_COLUMNS), model.reconstruct(x).split(WATCHED_COLUMNS))
        grid = tile(torch.cat([part for pair in rows for part in pair]), cols=WATCHED_COLUMNS)
        grid = grid.repeat_interleave(WATCHED_SCALE, 0).repeat_interleave(WATCHED_SCALE, 1)
        self.log_image((grid * 255).round().to(torch.uint8).cpu().numpy(), "reconstructions", step)

    def log_dataset(self, array: np.ndarray, name: str, source: str, context: str) -> mlflow.data.Dataset:
        """The data as the run's input, with MLflow's digest of its content."""
        dataset = _numpy_dataset(array, name, source)
        entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
        self._call(f"dataset {name}", lambda client: client.log_inputs(self.run_id, [entity]))
        return dataset

    def describe(self) -> None:
        """(Re)write the run's description from what the run holds now (`provenance.describe`)."""
        self._call(
            "description",
            lambda client: client.set_tag(
                self.run_id, MLFLOW_RUN_NOTE, provenance.describe(client.get_run(self.run_id))
            ),
        )

    def monitor_system(self, resumed: bool) -> contextlib.AbstractContextManager:
        """CPU, memory and (with nvidia-ml-py) GPU utilisation and memory, sampled while training."""
        if self.run_id is None:
            return contextlib.nullcontext()
        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=10, resume_logging=resumed)
        return _started(monitor)

    def log_history(self, history: list[EpochLosses]) -> None:
        """Log the epochs the run does not have yet (those trained before a resume, if any), so a
        resumed run never holds a step twice."""
        last_logged = max(self.logged_steps("train_total"), default=0)
        for row in history:
            if row.epoch > last_logged:
                self.log_metrics(row.run_metrics, step=row.epoch)

    def log_model(self, model: torch.nn.Module, input_example: np.ndarray, tags: dict[str, str]) -> None:
        """The trained model as a LoggedModel of this run: a torch.export program, which loads back
        without our code and without unpickling. It is exported on the CPU, and MLflow cannot move
        an exported program's weights, so MLflow's check that the input example predicts runs on
        the CPU too, even where CUDA is present."""
        spec = TensorSpec(np.dtype(np.float32), (-1, *input_example.shape[1:]))

        def log(client) -> None:
            with _environment(MLFLOW_DEFAULT_PREDICTION_DEVICE="cpu"), mlflow.start_run(run_id=self.run_id):
                info = mlflow.pytorch.log_model(
                    model,
                    name="model",
                    serialization_format="pt2",
                    input_example=input_example,
                    signature=ModelSignature(inputs=Schema([spec]), outputs=Schema([spec])),
                    tags=tags,
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
                )
            self.model_id = info.model_id
            client.set_tag(self.run_id, provenance.MODEL_ID_TAG, info.model_id)

        self._call("model", log)

    def log_evaluation(self, metrics: dict[str, float], dataset: mlflow.data.Dataset) -> None:
        """Test metrics measured on `dataset`, logged against the evaluated model as well as the run,
        so the model's page lists every evaluation of it; the model is an input of this run."""
        now = int(time.time() * 1000)
        entries = [
            Metric(k, v, now, 0, model_id=self.model_id, dataset_name=dataset.name, dataset_digest=dataset.digest)
            for k, v in metrics.items()
        ]
        self._call("test metrics", lambda client: client.log_batch(self.run_id, metrics=entries))
        if self.model_id is not None:
            self._call(
                "evaluated model",
                lambda client: client.log_inputs(self.run_id, models=[LoggedModelInput(self.model_id)]),
            )

    def register_model(self, name: str, tags: dict[str, str]) -> None:
        """A version of registered model `name` from the evaluated model, tagged (with its DVC
        experiment, say), and the alias `candidate` moved to it."""
        if self.model_id is None:
            return

        def register(client) -> None:
            version = mlflow.register_model(f"models:/{self.model_id}", name, tags=tags)
            client.set_registered_model_alias(name, CANDIDATE_ALIAS, version.version)

        self._call(f"registered model {name}", register)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with its true status, after everything kept has been logged or the wait for
        the store is over."""
        if self.run_id is None:
            return
        self._call("run status", lambda client: client.set_terminated(self.run_id, status))
        if self.pending:
            wait = float(os.environ.get(RETRY_SECONDS, DEFAULT_RETRY_SECONDS))
            print(
                f"waiting up to {wait:.0f} s for the MLflow store to take what it refused", file=sys.stderr, flush=True
            )
            deadline = time.monotonic() + wait
            while self.pending and time.monotonic() < deadline:
                time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
                self._flush()
        if self.pending:
            print(
                f"warning: not logged to MLflow run {self.run_id}: {', '.join(what for what, _ in self.pending)}; "
                "every DVC output was written",
                file=sys.stderr,
            )


def _numpy_dataset(array: np.ndarray, name: str, source: str) -> mlflow.data.Dataset:
    with warnings.catch_warnings():  # MLflow registers its local-path source twice and says so
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
        return mlflow.data.from_numpy(array, source=source, name=name)


@contextlib.contextmanager
def _environment(**values: str):
    """These environment variables set for the duration, then put back as they were."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _started(monitor):
    monitor.start()
    try:
        yield monitor
    finally:
        monitor.finish()
