"""Everything MLflow, in three parts: the store (store.py), the run a stage logs into and what it
logs (run.py), and which run that is, tied to the model it trained or evaluates (link.py). It
reports results and changes none: editing it reruns no stage."""

from pipeline.tracking.link import (
    Identity,
    dvc_tags,
    log_data,
    log_epochs_reached,
    model_tags,
    record_trained_model,
    run_for_stage,
    run_that_trained,
    training_run,
)
from pipeline.tracking.run import TrackedRun
from pipeline.tracking.store import connect

__all__ = [
    "Identity",
    "TrackedRun",
    "connect",
    "dvc_tags",
    "log_data",
    "log_epochs_reached",
    "model_tags",
    "record_trained_model",
    "run_for_stage",
    "run_that_trained",
    "training_run",
]
