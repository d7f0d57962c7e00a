"""`python -m pipeline.sweep -S 'train.learning_rate=0.001,0.0005' -S 'train.beta=1,4'`: every point
of the grid as a DVC experiment, run as a Ray task on the cluster RAY_ADDRESS names (or on a Ray
started on this machine), pushed to the git and DVC remotes, and logged as an MLflow run nested
under the sweep's run. With `--together N`, the trials train in groups of N on this machine instead,
each still its own experiment. Everything that can be refused is refused before any trial starts.

In parts: the plan and its refusals (plan.py), the trials on Ray (cluster.py), one trial on its
worker (trial.py), trials trained together (groups.py, together.py), and what the sweep leaves in
MLflow and on screen (report.py)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlflow
import ray
from dvc.repo.experiments.utils import gen_random_name

from pipeline.errors import PipelineError
from pipeline.sweep import cluster, groups, report
from pipeline.sweep.plan import dvc, prepare, prepare_together
from pipeline.sweep.trial import Sweep


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("-S", "--set-param", dest="sets", action="append", default=[], metavar="KEY=V1,V2",
                        help="as `dvc exp run --queue -S` takes it: a list of values sweeps, one value sets")
    parser.add_argument("--grid", type=Path, help="a YAML file of `key: [values]`, added to the -S grid")
    parser.add_argument("-n", "--name", help="the sweep's name; its trials are NAME-1, NAME-2, ... (default: a "
                                             "name DVC makes up)")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="Ray CPUs a trial takes (default 1)")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0,
                        help="GPUs a trial takes, fractions sharing one (0.25: four trials a GPU); default 0")
    parser.add_argument("--max-concurrent", type=int, default=0,
                        help="trials running at once at most (default 0: as many as the cluster fits)")
    parser.add_argument("--retries", type=int, default=3, help="runs again of a trial whose node was lost (default 3)")
    parser.add_argument("--git-remote", default="origin", help="the git remote workers clone from and push to")
    parser.add_argument("--together", type=int, default=0, metavar="N",
                        help="train up to N trials that differ only in seed, learning rate, beta or loss together, "
                             "in one process on this machine's device; needs no Ray, remote or server (default 0: "
                             "each trial a Ray task)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.name = args.name or gen_random_name()
    started = time.monotonic()
    try:
        plan = prepare_together(args) if args.together else prepare(args)
        if not args.together:
            cluster.start_ray(args.cpus_per_trial, args.gpus_per_trial)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before any trial started", file=sys.stderr)
        return 130
    trials = plan.trials
    if args.together:  # a trial that is an experiment here already is kept: the same sweep again resumes it
        kept = groups.finished_before(plan.trials)
        trials = [trial for trial in plan.trials if trial.name not in kept]
        if kept:
            print(f"kept from before: {', '.join(kept)} (experiments here already)", flush=True)
    client = mlflow.MlflowClient()
    parent_run_id = report.open_parent_run(client, plan, args)
    sweep = Sweep(plan.git_url, plan.commit, mlflow.get_tracking_uri(), plan.experiment_id, parent_run_id)
    how = f"up to {args.together} together on this machine" if args.together else "on Ray"
    print(f"sweep {args.name}: {len(trials)} trials of commit {plan.commit[:7]}, {how}, MLflow run {parent_run_id} in "
          f"experiment '{plan.tracking.experiment_name}'", flush=True)
    try:
        outcome = (groups.run_groups(plan, trials, args, parent_run_id) if args.together
                   else cluster.run_sweep(sweep, trials, args))
    except BaseException:
        client.set_terminated(parent_run_id, "FAILED")
        raise
    finally:
        ray.shutdown()
    summary = report.finish(client, sweep, trials, outcome, time.monotonic() - started)
    if outcome.finished and not args.together:  # trials trained together were pushed here already
        pulled = dvc("exp", "pull", args.git_remote, *outcome.finished)
        best = f"; the best is {summary.best.name}" if summary.best else ""
        print(f"\n`dvc exp show` lists the {len(outcome.finished)} finished trials{best}" if pulled.returncode == 0
              else f"warning: `dvc exp pull` failed: {pulled.stderr.strip()}", flush=True)
    return 130 if outcome.cancelled else 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
