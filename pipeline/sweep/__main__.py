"""`python -m pipeline.sweep -S 'train.learning_rate=0.001,0.0005' -S 'train.beta=1,4'`: every point
of the grid as a DVC experiment, run as a Ray task, and logged as an MLflow run nested under the
sweep's run. On this machine (no RAY_ADDRESS) the trials clone this repository, share its DVC
cache and MLflow store and land here; on the Ray cluster RAY_ADDRESS names, they clone from the git
remote and push to the git and DVC remotes. With `--together N`, a task trains a group of up to N
trials in one process, each still its own experiment. With `--trials N`, the -S give a space that
Optuna samples and prunes (search.py, space.py). Everything that can be refused is refused before
any trial starts.

Every file of the package, and its job: pipeline/sweep/__init__.py."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import mlflow
import optuna
import ray
from dvc.repo.experiments.utils import gen_random_name
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.errors import PipelineError
from pipeline.history import OBJECTIVE
from pipeline.sweep import cluster, front, report, search, search_options, search_report, warm_start
from pipeline.sweep.interrupts import ctrl_c_as_flag
from pipeline.sweep.plan import Plan, dvc, experiments_here, prepare
from pipeline.sweep.proposals import Proposals
from pipeline.sweep.shared import Resources, Sweep, Task


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-S",
        "--set-param",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="as `dvc exp run --queue -S` takes it: a list of values sweeps, one value sets",
    )
    parser.add_argument("--grid", type=Path, help="a YAML file of `key: [values]`, added to the -S grid")
    parser.add_argument(
        "-n", "--name", help="the sweep's name; its trials are NAME-1, NAME-2, ... (default: a name DVC makes up)"
    )
    parser.add_argument(
        "--cpus-per-trial",
        type=float,
        default=None,
        help="Ray CPUs a task takes: a trial, or with --together a group; default 1, and for a "
        "group on the CPU a whole node",
    )
    parser.add_argument(
        "--gpus-per-trial",
        type=float,
        default=None,
        help="GPUs a task takes, fractions sharing one (0.25: four trials a GPU); default 0, "
        "and with --together 1 where the cluster has a GPU",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=0,
        help="tasks running at once at most (default 0: as many as the cluster fits)",
    )
    parser.add_argument("--retries", type=int, default=3, help="runs again of a task whose node was lost (default 3)")
    parser.add_argument(
        "--git-remote",
        default="origin",
        help="on a cluster, the git remote workers clone from and push to (default origin)",
    )
    parser.add_argument(
        "--together",
        type=int,
        default=0,
        metavar="N",
        help="train up to N trials that differ only in seed, learning rate, beta or loss together, "
        "in one process on one device, each still its own experiment (default 0: each trial "
        "alone)",
    )
    search = parser.add_argument_group(
        "search",
        "with --trials, the -S give a space (a list or choice(), range(), interval(), tag(log, interval())), "
        "and Optuna proposes each trial from the results so far",
    )
    search.add_argument("--trials", type=int, metavar="N", help="search: trials to land, the pruned ones included")
    search.add_argument("--sampler", default="tpe", help="tpe (default), random or grid (lists only)")
    search.add_argument("--sampler-seed", type=int, default=0, help="the sampler's seed (default 0)")
    search.add_argument(
        "--objectives",
        default="val_neg_elbo",
        help="what the search minimises: val_neg_elbo (default), or rate,distortion (the validation KL and "
        "reconstruction, the rate-distortion front of Alemi et al. 2018, with Optuna's multi-objective TPE)",
    )
    search.add_argument(
        "--pruner",
        help="hyperband (the default with one objective: brackets of successive halving, from different first "
        "rungs), asha (successive halving, asynchronous), or none (every trial to train.epochs; the default with "
        "two objectives)",
    )
    search.add_argument(
        "--timeout",
        metavar="DURATION",
        help="the search's time budget from its first trial's start (90s, 30m, 2h, 1h30m): then no trial starts, "
        "and running trials stop at their next rung and land; the same command with a larger one goes on",
    )
    search.add_argument(
        "--no-warm-start",
        action="store_true",
        help="leave out the project's experiments of this commit that lie in the space (by default the study "
        "takes them as finished trials)",
    )
    search.add_argument("--min-epochs", type=int, default=1, help="the first rung: epochs before any pruning (1)")
    search.add_argument(
        "--reduction-factor",
        type=int,
        default=3,
        help="each rung is this many times the epochs of the last, and 1/this of a rung's trials go on (3)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.name = args.name or gen_random_name()
    started = time.monotonic()
    with ctrl_c_as_flag() as ctrl_c:  # read between steps: no trial is ever half-recorded
        try:
            plan = prepare(args)
            study = None
            if plan.space is not None:  # a search: refused here if its study was started otherwise
                epochs, options = plan.params[0].train.epochs, search_options.options_from(args)
                search_options.check_against_space(options, plan.space, epochs)
                study = search.open_study(args.name, plan.space, options, search.storage_url(), epochs)
                if not args.no_warm_start:
                    warm_start.take(study, plan.space, options, epochs, plan.commit, plan.params_text)
            resources = cluster.start_ray(args)
            if ctrl_c.is_set():
                print("interrupted before any trial started", file=sys.stderr)
                return 130
            return sweep_trials(plan, args, resources, ctrl_c, started, study)
        except PipelineError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        finally:
            ray.shutdown()


def sweep_trials(
    plan: Plan,
    args: argparse.Namespace,
    resources: Resources,
    ctrl_c: threading.Event,
    started: float,
    study: optuna.Study | None,
) -> int:
    """The plan's trials (or the `study`'s proposals) run, their parent run opened and finished;
    the sweep's exit status."""
    trials = plan.trials
    if plan.local_cache:  # a trial that is an experiment here already is kept: the same sweep again resumes it
        kept = experiments_here(plan.trials)
        trials = [trial for trial in plan.trials if trial.name not in kept]
        if kept:
            print(f"kept from before: {', '.join(kept)} (experiments here already)", flush=True)
    params_of = {trial.name: params for trial, params in zip(plan.trials, plan.params)}
    tasks = cluster.tasks(trials, [params_of[trial.name] for trial in trials], args.together)
    proposals, kept, rate_distortion = None, {}, None
    client = mlflow.MlflowClient()
    parent_run_id = report.open_parent_run(client, plan, args, resources)
    if plan.space is not None:  # a search: its trials are proposed as it goes, and it keeps those it had
        options = search_options.options_from(args)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        actor = search.Search.options(scheduling_strategy=here).remote(
            args.name, plan.space, options, search.storage_url(), plan.params[0].train.epochs
        )
        proposals = Proposals(
            actor,
            args.name,
            options,
            plan.params[0].train.epochs,
            args.together,
            plan.params_text,
            search_options.timeout_seconds(args.timeout),
        )
        kept = search.landed_before(study)
        taken = search.imported(study)
        landed_here = [name for name in kept if name not in taken]
        if landed_here:
            print(f"kept from before: {', '.join(landed_here)} (landed by this search before)", flush=True)
        pruner = {"asha": "successive halving", "hyperband": "Hyperband"}.get(options.pruner)
        print(
            f"search {args.name}: {search_options.describe_sampling(options, study.user_attrs['start_trials'])} "
            f"(seed {options.seed}), "
            + (
                f"pruned by {pruner} at epochs {', '.join(map(str, proposals.rungs[:-1]))} (reduction factor "
                f"{options.reduction_factor}), "
                if len(proposals.rungs) > 1
                else "no pruning, "
            )
            + f"{proposals.left} trials to go",
            flush=True,
        )
    sweep = Sweep(
        plan.git_url,
        plan.commit,
        plan.local_cache,
        mlflow.get_tracking_uri(),
        plan.experiment_id,
        parent_run_id,
        os.environ.get("OMP_NUM_THREADS"),
    )
    where = "on this machine" if plan.local_cache else "on the Ray cluster"
    how = f" in groups of up to {args.together} trained together" if args.together else ""
    print(
        f"sweep {args.name}: {len(trials) + (proposals.left if proposals else 0)} trials of commit "
        f"{plan.commit[:7]} {where}{how}, MLflow run "
        f"{parent_run_id} in experiment '{plan.tracking.experiment_name}'",
        flush=True,
    )
    for task in tasks if args.together else []:
        shared = [
            f"{key}={value}"
            for key, value in task.trials[0].values.items()
            if all(trial.values.get(key) == value for trial in task.trials)
        ]
        print(
            f"{task.label}: {', '.join(t.name for t in task.trials)}"
            + (f" (all {' '.join(shared)})" if shared else ""),
            flush=True,
        )
    try:
        outcome = cluster.run_sweep(sweep, tasks, resources, args.retries, ctrl_c, proposals)
        if proposals is not None:
            proposals.settle(outcome)
            asked = proposals.trials()  # a trial kept from before and continued now is listed once, as asked
            outcome.kept = {name: result for name, (_, result) in kept.items() if name not in outcome.finished}
            trials = [trial for name, (trial, _) in kept.items() if name not in {t.name for t in asked}] + asked
            try:
                rate_distortion = search_report.log_search(
                    client, sweep, study, outcome, options, plan.params[0].train.reconstruction
                )
            except Exception as exc:  # the history's figures: the trials and the summary are logged all the same
                print(f"warning: the search's history and importances were not logged: {exc}", flush=True)
        decoders = {params.train.reconstruction for params in plan.params}
        summary = report.finish(
            client,
            sweep,
            trials,
            outcome,
            time.monotonic() - started,
            len(decoders) == 1,
            plan.tracking.registered_model,
            how_trained(args, tasks, proposals),
            options.metrics if proposals is not None else (OBJECTIVE,),
        )
        if rate_distortion is not None:
            front.print_front(rate_distortion)
    except BaseException as exc:  # whatever ends the sweep here, its run does not stay RUNNING
        if client.get_run(parent_run_id).info.status == "RUNNING":
            client.set_terminated(parent_run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if outcome.finished and not plan.local_cache:  # on one machine the trials pushed here already
        pulled = dvc("exp", "pull", args.git_remote, *outcome.finished)
        best = f"; the best is {summary.best.name}" if summary.best else ""
        print(
            f"\n`dvc exp show` lists the {len(outcome.finished)} finished trials{best}"
            if pulled.returncode == 0
            else f"warning: `dvc exp pull` failed: {pulled.stderr.strip()}",
            flush=True,
        )
    return 130 if outcome.cancelled else 1 if outcome.failed else 0


def how_trained(args: argparse.Namespace, tasks: list[Task], proposals: Proposals | None) -> str:
    """Where a trial's seconds outside `dvc exp run` went (report.OUTSIDE_DVC_EXP_RUN's keys)."""
    if args.together:
        return "together"
    if proposals is not None:
        return "searched"
    return "torchrun" if tasks and all(task.torchrun for task in tasks) else "alone"


if __name__ == "__main__":
    sys.exit(main())
