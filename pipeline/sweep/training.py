"""`python -m pipeline.sweep.training SPEC`: one group of a sweep's trials, trained together in this
process on one device, each exactly as it would train alone, into an MLflow run of its own.

Each trial draws from generators of its own, in the calls a run alone makes: its initial weights
from `seed`, its data order, its reparameterisation noise (a copy of the default generator as the
seed left it); it has its own loss, Adam and learning rate. So on the CPU a trial's weights are the
bytes its own `dvc exp run` gives. What the group writes per trial is the checkpoint that run would
have written after its last epoch; `dvc exp run` of the trial then finds it and only finishes.

Run by the sweep in its clone of the repository (the data split there), never by hand. SPEC is a
JSON file: {"trials": [{"name", "overrides"}], "out": folder, "rungs": [epochs], "continues": epochs}.
Writes, atomically, per trial, `<out>/<name>.pt` (trained) or `<out>/<name>.failed` (why not). A
trial that `train.early_stopping` stops leaves the group then, as its run alone stops. A search's
group stops at each rung for the sweep's answer (pipeline.progress's "rung" event, a line on
stdin): the trials it prunes leave the group there, as the checkpoints of the epochs they reached.
A promoted trial (`continues`, a group of one) goes on from the finished run of its paused
experiment, models/state.pt, as `dvc exp run` with more epochs continues it.

On one machine ("keep": UNLANDED in the project) each trial's checkpoint of its last epoch is kept
until it lands: stopped (Ctrl-C, a killed driver or Ray worker), it goes on from there when it
trains again, its rung at that epoch asked again, to the bytes it would have had without the stop."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml

from pipeline import atomic, model_files, tracking
from pipeline.data_parts import check_training_data, training_data
from pipeline.device import (
    compiles_forward,
    configure_determinism,
    resolve_device,
    resolve_precision,
    set_cpu_threads,
)
from pipeline.dvc_process import stop_when_orphaned
from pipeline.epoch_report import report_epoch
from pipeline.errors import PipelineError
from pipeline.history import kept_epoch, train_metrics
from pipeline.params import PARAMS_FILE, Params, parse_params
from pipeline.paths import STATE_FILE
from pipeline.progress import record
from pipeline.provenance import PARENT_RUN_VARIABLE
from pipeline.run_state import Training, end_epoch, random_states, restore, save_checkpoint, seeded, stops_early
from pipeline.stage import run_stage
from pipeline.step import TrainStep, divergence
from pipeline.sweep import grid
from pipeline.sweep.side_by_side import group_key, train_together
from pipeline.sweep.stall import StallGuard

STALL_STACKS = "stall-stacks.txt"  # a stalled group's every thread's stack, in each trial's MLflow run
UNLANDED = Path("mlruns") / "unlanded"  # in the project: each training trial's last finished epoch


@dataclasses.dataclass
class Member:
    """One trial of the group: its params, its run's state (run_state.Training) and its step."""

    trial: grid.Trial
    params: Params
    fingerprint: dict
    state: Training
    step: TrainStep
    tracked: tracking.TrackedRun
    kept: Path | None  # where its checkpoint is kept until it lands (None: nowhere)
    resumed: bool  # from the kept checkpoint of a stopped training


def train_group(
    trials: list[grid.Trial],
    out: Path,
    rungs: tuple[int, ...] = (),
    continues: bool = False,
    keep: Path | None = None,
) -> None:
    """Train the trials together; a search's (`rungs`: the epochs at which it may prune them) asks
    the sweep at each rung which of them stop there; a promoted one `continues` its paused run;
    one whose checkpoint is in `keep` goes on from it (and each epoch's is kept there)."""
    params_text = PARAMS_FILE.read_text()
    texts = [grid.applied(trial, params_text) for trial in trials]
    all_params = [parse_params(yaml.safe_load(text)) for text in texts]
    if len({group_key(params) for params in all_params}) > 1:
        raise ValueError("the trials of a group must differ only in seed, learning rate, beta and loss")
    cfg = all_params[0].train
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    configure_determinism(cfg.deterministic)
    set_cpu_threads(cfg.num_threads)
    data = training_data(device)
    for params in all_params:
        check_training_data(params, data)
    train_images, validation = data
    experiment_id = tracking.connect(all_params[0].mlflow)
    compiles = compiles_forward(cfg.compile, device, 1)
    searched = bool(rungs)  # a search's trials learn their train.epochs when they stop
    members = [
        _start(
            trial,
            params,
            text,
            device,
            precision,
            compiles,
            experiment_id,
            train_images,
            validation,
            searched,
            continues,
            keep / f"{trial.name}.pt" if keep else None,
        )
        for trial, params, text in zip(trials, all_params, texts)
    ]
    first_epoch = len(members[0].state.history) + 1
    if any(len(member.state.history) != first_epoch - 1 for member in members):
        raise PipelineError("the group's trials start from different epochs: they cannot train together")
    print(f"training {', '.join(trial.name for trial in trials)} together on {device}", flush=True)
    active = list(members)

    def stalled(reason: str, stacks: str) -> None:
        """Each trial still training fails with the reason; its MLflow run gets the stacks."""
        for member in active:
            atomic.write_text(out / f"{member.trial.name}.failed", reason)
            member.tracked.log_text(stacks, STALL_STACKS)

    def settle(epoch: int) -> None:
        """The members `train.early_stopping` or the sweep's answer at a rung stops after `epoch`,
        saved for their landing and out of the group."""
        ended = [m for m in active if stops_early(m.state.history, m.params.train)]
        if epoch in rungs:
            with guard.paused():
                ended += _pruned_at_rung(active, epoch)
        for member in ended:
            _save(member, out, params_text, searched)
            active.remove(member)

    try:
        with (
            tracking.TrackedRun(os.environ.get(PARENT_RUN_VARIABLE)).monitor_system(resumed=True),
            StallGuard(stalled) as guard,
        ):
            if first_epoch > 1 and all(m.resumed for m in members):  # stopped after this epoch's checkpoint
                settle(first_epoch - 1)
            for epoch in range(first_epoch, cfg.epochs + 1):
                if not active:  # every trial diverged, or stopped early
                    break
                started = time.perf_counter()
                ends = train_together([m.step for m in active], [m.state.order for m in active], guard.beat)
                for member, (train_parts, first_bad_step) in zip(list(active), ends):
                    if why := divergence(first_bad_step.item(), epoch, member.params.train.learning_rate):
                        print(f"{member.trial.name} failed: {why}", flush=True)
                        atomic.write_text(out / f"{member.trial.name}.failed", why)
                        member.tracked.finish("FAILED")
                        active.remove(member)
                        continue
                    end_epoch(member.state, epoch, train_parts, validation, member.params.train, member.step.loss)
                    guard.beat()
                seconds = time.perf_counter() - started  # the group's epoch: every trial's time, shared
                guard.epoch_ended(seconds)
                for member in active:
                    state = member.state
                    report_epoch(member.tracked, state.history[-1], seconds, state.model, validation, cfg.epochs)
                    if member.kept:
                        save_checkpoint(
                            state, member.fingerprint, [random_states(state)], member.tracked.run_id, member.kept
                        )
                settle(epoch)
    except BaseException:
        for member in active:  # KILLED: MLflow's status for a run its user stopped (Ctrl-C)
            member.tracked.finish("KILLED" if isinstance(sys.exc_info()[1], KeyboardInterrupt) else "FAILED")
        raise
    for member in active:
        _save(member, out, params_text, searched)


def _pruned_at_rung(active: list[Member], epoch: int) -> list[Member]:
    """The group's objectives at a rung to the sweep (the progress file), and the members its answer
    (a line of JSON on stdin) prunes there."""
    objectives = {
        m.trial.name: kept_epoch(train_metrics(m.state.history, m.params.train.min_delta), m.params.train.keep_epoch)[1]
        for m in active
    }
    record("rung", epoch=epoch, objectives=objectives)
    answer = sys.stdin.readline()
    if not answer:
        raise RuntimeError(f"the sweep gave no answer at the rung of epoch {epoch}")
    stop = set(json.loads(answer)["stop"])
    return [member for member in active if member.trial.name in stop]


def _save(member: Member, out: Path, params_text: str, epochs_later: bool) -> None:
    """The checkpoint the trial's run alone would have left after its last epoch, for the trial's
    `dvc exp run` to find; its MLflow run stays RUNNING, for that `dvc exp run` to resume and end.
    A search's trial (`epochs_later`) first gets the `train.epochs` it reached, with the params.yaml
    it lands with."""
    if epochs_later:
        reached = grid.Trial(member.trial.name, grid.at_epochs(member.trial.overrides, len(member.state.history)))
        text = grid.applied(reached, params_text)
        tracking.log_epochs_reached(member.tracked, parse_params(yaml.safe_load(text)), text)
    checkpoint = out / f"{member.trial.name}.pt"
    save_checkpoint(member.state, member.fingerprint, [random_states(member.state)], member.tracked.run_id, checkpoint)


def _start(
    trial: grid.Trial,
    params: Params,
    params_text: str,
    device: torch.device,
    precision: str,
    compiles: bool,
    experiment_id: str | None,
    train_images: torch.Tensor,
    validation: torch.Tensor,
    epochs_later: bool = False,
    continues: bool = False,
    kept: Path | None = None,
) -> Member:
    """The trial as its run alone starts: seeded, and its MLflow run named as DVC names the trial
    (for a search's, without the `train.epochs` it has yet to reach); one that `continues`, from
    the finished run of its experiment (its weights, Adam, random states and history), into a new
    run that names the one it continues, as a run alone with more epochs is. A checkpoint `kept`
    from a stopped training of it goes before either."""
    state = seeded(params, device)
    fingerprint = model_files.training_fingerprint(params, precision, device.type)
    stopped = model_files.load_torch(kept, "cpu") if kept is not None and kept.exists() else None
    if stopped is not None and (stopped["fingerprint"] != fingerprint or len(stopped["history"]) > params.train.epochs):
        stopped = None  # another training's of the same name (other params, code or data): not this one's
    if stopped is not None:
        restore(state, stopped)
    elif continues:
        restore(state, _finished_run(trial, fingerprint, params.train.epochs))
    step = TrainStep.from_params(
        params.train,
        state.model,
        state.optimizer,
        train_images,
        precision=precision,
        compile=compiles,
        noise_generator=state.noise,
    )
    step.resume_after(len(state.history))  # where beta's warm-up is
    continues_run_id = stopped["run_id"] if stopped else tracking.run_that_trained(experiment_id) if continues else None
    identity = tracking.Identity(trial.name, None if epochs_later else params_text)  # as its `dvc exp run` names it
    datasets = {"train": train_images, "validation": validation}
    tracked = tracking.training_run(
        experiment_id, None, params, device, precision, datasets, identity, continues_run_id
    )
    if state.history:
        tracked.log_history(state.history)  # the epochs it continues from, as a run alone logs them
    else:
        tracked.log_untrained(state.model, validation)  # step 0, as a run alone logs it
    return Member(trial, params, fingerprint, state, step, tracked, kept, stopped is not None)


def _finished_run(trial: grid.Trial, fingerprint: dict, epochs: int) -> dict:
    """The finished run a promoted trial continues (models/state.pt, from its experiment)."""
    finished, why_not = model_files.load_finished(fingerprint, epochs)
    if finished is None:
        raise PipelineError(f"{trial.name} cannot continue from its experiment: {why_not or f'no {STATE_FILE}'}")
    return finished


def main() -> None:
    stop_when_orphaned([os.getppid()])  # its Ray worker lost: stopped as Ctrl-C stops it, its checkpoints kept
    spec = json.loads(Path(sys.argv[1]).read_text())
    trials = [grid.Trial(t["name"], tuple(t["overrides"])) for t in spec["trials"]]
    keep = Path(spec["keep"]) if spec.get("keep") else None
    train_group(trials, Path(spec["out"]), tuple(spec.get("rungs", ())), bool(spec.get("continues")), keep)


if __name__ == "__main__":
    run_stage(main)
