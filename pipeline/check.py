"""Stage check: validate params.yaml whenever its mlflow section changes.

No stage that makes a result depends on mlflow.* (where results are logged changes none of them),
so an edit there alone reruns nothing, and `dvc exp run -S mlflow.tracking_uri=...` would commit
whatever the URI holds into the experiment, a password included. This stage depends on that section
and nothing else: it runs on such an edit, and refuses a bad one before DVC records anything.
"""

from __future__ import annotations

from pipeline.params import load_params
from pipeline.stage import run_stage


def main() -> None:
    tracking = load_params().mlflow
    print(
        f"mlflow: experiment '{tracking.experiment_name}' at {tracking.tracking_uri}"
        if tracking.enabled
        else "mlflow: off"
    )


if __name__ == "__main__":
    run_stage(main)
