"""Sweeps and searches beyond one machine: DVC experiments run as Ray tasks, each trial a nested
MLflow run under the sweep's run. Not a stage: it runs the pipeline, and no stage imports it.

The files, in the order a sweep meets them:
    __main__.py        the driver, `python -m pipeline.sweep`: plan, run, report
    shared.py          the types every part hands another: a task, a result, the resources, the outcome
    plan.py            the plan and every refusal, before any work
    grid.py            the `-S` grid expanded and checked; a trial's params.yaml
    space.py           a search's space (`--trials`) as Optuna's distributions
    search_options.py  a search's options (`--sampler`, `--pruner`, ...), their refusals, the rungs
    search.py          the study: its proposals, copies of points already tried, its pruning
    warm_start.py      the project's experiments that lie in the space, taken as finished trials
    proposals.py       the search's next tasks, asked of the study as room frees
    covering_start.py  TPE's start: a Latin hypercube of the space
    promotion.py       ASHA's rule: which paused trial goes on
    cluster.py         the tasks on Ray: at most --max-concurrent, a lost node's again, Ctrl-C
    board.py           where the trials report what they do, for the driver's progress lines
    trial.py           a trial's clone, its data, its push; a torchrun trial's task (`dvc exp run`)
    watch.py           a trial's command followed by its progress file, and stopped on a cancel
    groups.py          a trial's task, or a `--together` group's: one process, then each lands
    training.py        that process: epoch after epoch (each kept until it lands), the study's answer at rungs
    side_by_side.py    several trials' epochs interleaved on one device; which trials can share one
    stall.py           a group that stops making progress, stopped with its stacks
    interrupts.py      what a cancel must not cut in half (a push)
    report.py          what the sweep leaves: the parent run, the trials' table and their runs' ends
    repeats.py         repeats over `seed`: each configuration's mean and spread
    search_report.py   what a search adds: its history, the params' importances, Optuna's tags
    front.py           a two-objective search's rate-distortion front: its table, figure and lines
"""
