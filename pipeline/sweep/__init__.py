"""Sweeps beyond one machine: a grid of DVC experiments run as Ray tasks, each trial a nested MLflow
run under the sweep's run. `python -m pipeline.sweep` is the driver (__main__.py); grid.py reads and
checks the grid, trial.py is what a Ray worker runs, board.py is where the trials report progress.
Not a stage: it runs the pipeline, and no stage imports it."""
