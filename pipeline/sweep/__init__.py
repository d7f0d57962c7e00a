"""Sweeps beyond one machine: a grid of DVC experiments run as Ray tasks, each trial a nested MLflow
run under the sweep's run. `python -m pipeline.sweep` is the driver (__main__.py): plan.py checks
it, grid.py expands the grid, cluster.py runs the trials on Ray, trial.py is what a Ray worker runs,
board.py is where the trials report progress, report.py is what the sweep leaves.
Not a stage: it runs the pipeline, and no stage imports it."""
