"""Which MLflow run a stage logs into. One pipeline execution (a `dvc repro`, a `dvc exp run`,
queued or not) is one run: the first stage it reruns opens the run, the later ones log into it.
A run whose execution did not train links to the run that trained its model and to the model.

A stage knows its execution by the DVC process that started it (its pid and start time): the
nearest ancestor process without DVC_STAGE in its environment (DVC sets it for each stage's
command). The execution's run is recorded in models/mlflow_run.json, beside the model and not a
DVC output (a run id differs on every run)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import mlflow
import psutil
import torch
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline import atomic, provenance
from pipeline.dvc_process import DVC_STAGE_VARIABLE, lineage_up_to_dvc
from pipeline.history import split_train_metrics
from pipeline.model_files import file_sha256
from pipeline.params import PARAMS_FILE, Params
from pipeline.paths import MODEL_FILE, RUN_FILE, TEST_METRICS, TRAIN_METRICS
from pipeline.provenance import (
    CONTINUED_RUN_TAG,
    MODEL_ID_TAG,
    MODEL_SHA256_TAG,
    PARENT_RUN_VARIABLE,
    PRECISION_TAG,
    TRAINING_RUN_TAG,
)
from pipeline.tracking.run import TrackedRun

EPOCHS_PARAM = "train.epochs"  # as MLflow's params name it


@dataclasses.dataclass(frozen=True)
class Record:
    """What models/mlflow_run.json holds: the execution's run and the model it works on."""

    run_id: str
    execution: str | None
    model_sha256: str | None = None
    model_id: str | None = None
    training_run_id: str | None = None


def execution() -> str | None:
    """This stage's pipeline execution as `pid-start time` of the DVC process that runs it; None
    when the stage was started by hand (it is then an execution of its own)."""
    lineage = lineage_up_to_dvc() if DVC_STAGE_VARIABLE in os.environ else []
    if not lineage:
        return None
    dvc = lineage[-1]
    with contextlib.suppress(psutil.Error, OSError):
        return f"{dvc.pid}-{_start_time(dvc)}"
    return None


def _start_time(process: psutil.Process) -> str:
    """When the process started, the same from every process that asks: on Linux its start in clock
    ticks since boot; psutil's create_time adds a boot time that the kernel recomputes from the wall
    clock on each read, so it moves when the clock is adjusted (giampaolo/psutil#2541)."""
    stat = Path(f"/proc/{process.pid}/stat")
    if stat.exists():
        return stat.read_text().rsplit(")", 1)[1].split()[19]  # field 22, starttime (fields from 3 on)
    return str(process.create_time())


def read_record() -> Record | None:
    try:
        return Record(**json.loads(RUN_FILE.read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


def write_record(record: Record) -> None:
    atomic.write_text(RUN_FILE, json.dumps(dataclasses.asdict(record)) + "\n")


@dataclasses.dataclass(frozen=True)
class Identity:
    """What a new training run is named and records as its params.yaml: the DVC experiment it is
    (None: none, so the commit and the params that differ name it) and that experiment's
    params.yaml (None: not known yet, where `train.epochs` is settled when training stops, as a
    search's trial's is; `log_epochs_reached` logs both then)."""

    experiment: str | None
    params_text: str | None

    @classmethod
    def of_this_execution(cls) -> Identity:
        """This process's: the experiment `dvc exp run` names (DVC_EXP_NAME), and params.yaml."""
        return cls(os.environ.get("DVC_EXP_NAME"), PARAMS_FILE.read_text())


def training_run(
    experiment_id: str | None,
    resumed_run_id: str | None,
    params: Params,
    device: torch.device,
    precision: str,
    datasets: dict[str, torch.Tensor],
    identity: Identity,
    continues_run_id: str | None = None,
) -> TrackedRun:
    """The run to train into: the interrupted run again when training resumes, otherwise a new run
    of this `identity`, with its data (`datasets`: context -> uint8 images) as inputs, the
    precision it trains in (`train.precision` resolved) and the finished run it continues, if
    any, as tags."""
    if experiment_id is None:
        return TrackedRun(None)
    tracked = None
    if resumed_run_id is not None:
        try:
            mlflow.MlflowClient().update_run(resumed_run_id, status="RUNNING")
            tracked = TrackedRun(resumed_run_id)
        except mlflow.exceptions.MlflowException:
            print(
                f"warning: the checkpoint's MLflow run {resumed_run_id} is not in this store; logging into a new run",
                file=sys.stderr,
            )
    if tracked is None:
        tracked = _new_run(experiment_id, params, "train", device, identity)
        tracked.set_tags(
            {PRECISION_TAG: precision} | ({CONTINUED_RUN_TAG: continues_run_id} if continues_run_id else {})
        )
        log_data(tracked, params, datasets)
    return tracked


def log_data(tracked: TrackedRun, params: Params, datasets: dict[str, torch.Tensor]) -> dict[str, mlflow.data.Dataset]:
    """uint8 images as the run's inputs (`datasets`: context -> images), named for the dataset and
    context and sourced from the mirror or torchvision's download; returns them by context."""
    source = params.data.mirror or f"torchvision://{params.data.dataset}"
    return {
        context: tracked.log_dataset(images.cpu().numpy(), f"{params.data.dataset}-{context}", source, context)
        for context, images in datasets.items()
    }


def model_tags(model_file: Path) -> dict[str, str]:
    """What ties a run or a LoggedModel to the model file: its sha256, and the md5 dvc.lock records."""
    content = model_file.read_bytes()
    return {MODEL_SHA256_TAG: hashlib.sha256(content).hexdigest(), "dvc.model_md5": hashlib.md5(content).hexdigest()}


def record_trained_model(tracked: TrackedRun, model_sha256: str) -> None:
    """After training: this execution's run trained this model (the later stages find it here)."""
    if tracked.run_id is not None:
        write_record(Record(tracked.run_id, execution(), model_sha256, tracked.model_id, tracked.run_id))


def run_for_stage(
    experiment_id: str | None, params: Params, stage: str, device: torch.device, model_sha256: str
) -> TrackedRun:
    """The run for evaluate or visualize: this execution's run if an earlier stage opened it for
    this model; otherwise a new run, which links to the training run and the model, and which
    carries the metrics of the upstream stages it did not run (as `dvc exp show` shows them)."""
    if experiment_id is None:
        return TrackedRun(None)
    here, record = execution(), read_record()
    if here is not None and record is not None and record.execution == here and record.model_sha256 == model_sha256:
        tracked = TrackedRun(record.run_id, record.model_id)
        tracked.reopen()
        return tracked

    trained = record if record is not None and record.model_sha256 == model_sha256 else None
    model_id, training_run_id = (
        (trained.model_id, trained.training_run_id) if trained else _find_trained_model(experiment_id, model_sha256)
    )
    tracked = _new_run(experiment_id, params, stage, device, Identity.of_this_execution())
    tracked.model_id = model_id
    link = (
        {MODEL_SHA256_TAG: model_sha256}
        | ({MODEL_ID_TAG: model_id} if model_id else {})
        | ({TRAINING_RUN_TAG: training_run_id} if training_run_id else {})
    )
    tracked.set_tags(link)
    if training_run_id is None:
        print("warning: no MLflow run found that trained this model; this run links to none", file=sys.stderr)
    upstream = [TRAIN_METRICS] + ([TEST_METRICS] if stage == "visualize" else [])
    for path in upstream:
        if path.exists():
            epochs, values = split_train_metrics(json.loads(path.read_text()))
            tracked.log_metrics(values, step=epochs)
    write_record(Record(tracked.run_id, here, model_sha256, model_id, training_run_id))
    return tracked


def run_that_trained(experiment_id: str | None) -> str | None:
    """The MLflow run that trained models/model.pt, which a run with more epochs continues: this
    workspace's record of it, or the store's newest LoggedModel of its bytes (None with tracking off
    or no model)."""
    if experiment_id is None or not MODEL_FILE.exists():
        return None
    model_sha256 = file_sha256(MODEL_FILE)
    record = read_record()
    if record is not None and record.model_sha256 == model_sha256 and record.training_run_id:
        return record.training_run_id
    return _find_trained_model(experiment_id, model_sha256)[1]


def _find_trained_model(experiment_id: str, model_sha256: str) -> tuple[str | None, str | None]:
    """The newest LoggedModel of these exact bytes, and the run that trained it (after `dvc pull`
    or a checkout the record may be gone; CPU training is bit-identical, so the newest is taken)."""
    found = mlflow.MlflowClient().search_logged_models(
        [experiment_id],
        filter_string=f"tags.`{MODEL_SHA256_TAG}` = '{model_sha256}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
        max_results=1,
    )
    return (found[0].model_id, found[0].source_run_id) if found else (None, None)


def _new_run(experiment_id: str, params: Params, stage: str, device: torch.device, identity: Identity) -> TrackedRun:
    """A new run, named and labelled as `identity` says: its params, params.yaml and the packages
    it ran with, where it comes from (MLflow's source and git tags), where it runs."""
    source = provenance.source()
    name = identity.experiment or provenance.run_name(params, source)
    run = mlflow.MlflowClient().create_run(experiment_id, run_name=name)
    tracked = TrackedRun(run.info.run_id)
    flat = provenance.flat_yaml(params)
    if identity.params_text is None:
        del flat[EPOCHS_PARAM]
    else:
        tracked.log_text(identity.params_text, PARAMS_FILE.name)
    tracked.log_params(flat)
    tracked.set_tags(runtime_tags(device) | provenance.source_tags(source, stage) | dvc_tags(identity.experiment))
    tracked.log_text(provenance.environment(), "environment/requirements.txt")
    return tracked


def log_epochs_reached(tracked: TrackedRun, params: Params, params_text: str) -> None:
    """What a run of an `Identity` without params.yaml held back: `train.epochs` and params.yaml,
    those of the experiment the trial lands as."""
    tracked.log_params({EPOCHS_PARAM: provenance.flat_yaml(params)[EPOCHS_PARAM]})
    tracked.log_text(params_text, PARAMS_FILE.name)


def runtime_tags(device: torch.device) -> dict[str, str]:
    """What the run ran on: the GPU and its CUDA stack, or the CPU."""
    tags = {"torch.version": torch.__version__, "device.type": device.type, "python.version": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        tags |= {
            "cuda.device_name": props.name,
            "cuda.version": str(torch.version.cuda),
            "cudnn.version": str(torch.backends.cudnn.version()),
            "cuda.capability": f"{props.major}.{props.minor}",
            "cuda.memory_gib": f"{props.total_memory / 2**30:.1f}",
        }
    else:
        tags |= {"cpu.name": platform.processor() or platform.machine(), "cpu.threads": str(torch.get_num_threads())}
    return tags


def dvc_tags(experiment: str | None = None) -> dict[str, str]:
    """What ties the run to DVC: the `experiment`'s name (default: the one `dvc exp run` gives this
    process), and the dvc.lock the stage started from (DVC writes the new one after the stage);
    and, for a trial of a sweep, the sweep's run as MLflow's parent, so the UI nests it there."""
    tags = {}
    if os.environ.get(PARENT_RUN_VARIABLE):
        tags[MLFLOW_PARENT_RUN_ID] = os.environ[PARENT_RUN_VARIABLE]
    experiment = experiment or os.environ.get("DVC_EXP_NAME")
    if experiment:
        tags["dvc.exp_name"] = experiment
    lock = Path("dvc.lock")
    if lock.exists():
        tags["dvc.lock.parent_sha256"] = hashlib.sha256(lock.read_bytes()).hexdigest()
    return tags
