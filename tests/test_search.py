"""`python -m pipeline.sweep --trials N`: a search that Optuna samples and prunes. Its refusals,
its seeded proposals and its parent run's figures without training; then, in a small real project,
a pruned trial that is the exact experiment of the epochs it reached, and a Ctrl-C that a search
run again goes on from."""

from __future__ import annotations

import dataclasses
import doctest
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline.errors import PipelineError
from pipeline.history import OBJECTIVE
from pipeline.params import Params
from pipeline.provenance import CONTINUED_RUN_TAG
from pipeline.sweep import front, grid, report, search, search_options, search_report, space
from pipeline.sweep.__main__ import main as sweep_main
from pipeline.sweep.shared import Outcome, Sweep, TrialResult
from pipeline.sweep.training import UNLANDED
from pipeline.sweep.trial import experiment_results
from tests.processes import owner_marker, processes_started_with
from tests.projects import GIT_IDENTITY, make_project, project_env, run
from tests.servers import logged_json
from tests.synthetic import write_mirror

SEARCH = [sys.executable, "-m", "pipeline.sweep"]
PRUNED_LR, KEPT_LR = "0.000001", "0.002"  # at one epoch the first is far worse: it is pruned at the first rung
# A slow starter: behind KEPT_LR at one epoch, so pruned there, and ahead of the two worse ones after it.
PROMOTED_LR, SLOWER_LR = "0.001", "0.0001"
# The grid sampler with seed 198 proposes them in this order (each proposal seeded by its number):
# srch-1 goes on; srch-2, srch-3 and srch-4 are pruned at epoch 1; once four have reached it, the
# best ⌊4/2⌋ there are srch-1 and srch-2, and srch-2 is promoted before the fifth trial is asked;
# no point is left for a fifth.
PROMOTING = [
    "--pruner",
    "asha",
    "--sampler",
    "grid",
    "--sampler-seed",
    "198",
    "--trials",
    "5",
    "--min-epochs",
    "1",
    "--reduction-factor",
    "2",
]
# The grid sampler with seed 2 proposes the better one first (each proposal seeded by its number), so the worse one
# is pruned at its first rung: a trial promoted at a rung is one among the best 1/2 there.
PRUNING = [
    *("--pruner", "asha", "--sampler", "grid", "--sampler-seed", "2", "--trials", "2"),
    *("--min-epochs", "1", "--reduction-factor", "2"),
]


def default_params_text() -> str:
    return yaml.safe_dump(dataclasses.asdict(Params()), sort_keys=False)


def search_env() -> dict[str, str]:
    env = project_env() | GIT_IDENTITY | {"PIPELINE_PROGRESS_SECONDS": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["-S", "train.learning_rate=interval(0.01, 0.001)", "--trials", "2"], "an empty range"),
        (
            ["-S", "train.learning_rate=tag(log, interval(0, 0.01))", "--trials", "2"],
            "a log range needs bounds above 0",
        ),
        (["-S", "train.device=interval(1, 2)", "--trials", "2"], "train.device is not a number"),
        (
            ["-S", "train.beta=1,4", "-S", "train.reconstruction=mse,bce", "--trials", "2"],
            "cannot vary train.reconstruction",
        ),
        (
            ["-S", "train.beta=1,4", "--trials", "2", "--min-epochs", "5"],
            "--min-epochs 5, the first rung, must be from 1",
        ),
        (["-S", "train.beta=1,4", "--trials", "0"], "--trials must be 1 or more"),
        (["-S", "train.beta=1,4", "-S", "train.num_processes=2", "--trials", "2"], "train.num_processes above 1"),
        (
            ["-S", "train.learning_rate=interval(0, 0.01)", "--trials", "2"],
            "train.learning_rate: must be greater than 0",
        ),
        (["-S", "train.beta=1,4", "--trials", "3", "--pruner", "median"], "--pruner must be one of asha, hyperband"),
        (["-S", "train.beta=1,4", "--trials", "3", "--sampler", "cmaes"], "--sampler must be one of tpe, random"),
        (
            ["-S", "train.beta=1,4", "-S", "train.early_stopping=2", "--trials", "2"],
            "train.early_stopping ends a trial by itself",
        ),
        (["-S", "train.beta=1,4", "--trials", "2", "--objectives", "val_total"], "--objectives takes val_neg_elbo"),
        (["-S", "train.beta=1,4", "--trials", "2", "--timeout", "ten minutes"], "--timeout takes a duration above 0"),
        (["-S", "train.beta=1,4", "--timeout", "10m"], "--timeout is a search's budget: give --trials too"),
        (
            ["-S", "train.beta=1,4", "--trials", "2", "--objectives", "rate,distortion", "--pruner", "asha"],
            "--pruner asha ranks a rung's trials by one number",
        ),
        (
            ["-S", "train.beta=1,4", "-S", "train.keep_epoch=best", "--trials", "2", "--objectives", "rate,distortion"],
            "train.keep_epoch: best keeps the epoch of the best val_total",
        ),
    ],
)
def test_a_bad_search_is_refused_in_one_line_before_any_work(refusing_project, args, said, monkeypatch, capsys):
    """The command's own entry point, in the project, as `python -m pipeline.sweep` runs it (in this
    process: a new interpreter per case would only add its start)."""
    monkeypatch.chdir(refusing_project)
    for name, value in search_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    environ, tracking_uri = dict(os.environ), mlflow.get_tracking_uri()
    try:
        assert sweep_main([*args, "--name", "bad"]) == 2
    finally:  # what the sweep sets for the process it thinks it is: not for the tests after this one
        for name in os.environ.keys() - environ.keys():
            del os.environ[name]
        mlflow.set_tracking_uri(tracking_uri)
    printed = capsys.readouterr()
    assert said in printed.err and len(printed.err.strip().splitlines()) == 1, printed.err
    assert "ray:" not in printed.out, "refused before Ray started"
    assert not (refusing_project / search.SEARCH_STORE).exists(), "no study was started"


@pytest.fixture(scope="module")
def refusing_project(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("refusals")
    project = make_project(tmp / "project", tmp / "no-mirror", **{"train.epochs": 2})
    mlflow.MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}").search_experiments()  # a store, as after a run
    return project


def test_a_space_takes_lists_ranges_and_log_intervals_of_any_checked_param():
    parsed = space.parse(
        [
            "train.learning_rate=tag(log, interval(0.0001, 0.01))",
            "train.beta=0.5,1,2",
            "model.latent_dim=range(2,9,2)",
            "train.epochs=3",
        ],
        default_params_text(),
    )
    dims = parsed.dimensions
    assert dims["train.learning_rate"] == optuna.distributions.FloatDistribution(0.0001, 0.01, log=True)
    assert dims["train.beta"] == optuna.distributions.CategoricalDistribution([0.5, 1, 2])
    assert dims["model.latent_dim"] == optuna.distributions.IntDistribution(2, 8, step=2)
    assert parsed.fixed == ("train.epochs=3",)
    values = {"train.learning_rate": 0.00123, "train.beta": 2, "model.latent_dim": 4}
    assert parsed.overrides(values) == (
        "train.epochs=3",
        "train.learning_rate=0.00123",
        "train.beta=2",
        "model.latent_dim=4",
    )
    with pytest.raises(PipelineError, match="takes whole numbers"):
        space.parse(["model.latent_dim=interval(1.5, 4)"], default_params_text())


def proposals(store: Path, seed: int, count: int = 14) -> list[dict]:
    """`count` trials asked of a TPE search (past its start), each told an objective that depends
    on its point alone."""
    sets = ["train.learning_rate=tag(log, interval(0.0001, 0.01))", "train.beta=0.5,1,2"]
    study = search_study(sets, count, seed, f"sqlite:///{store}")
    asked = []
    for _ in range(count):
        proposed = study.ask()
        asked.append(proposed[1].values)
        told_by_point(study, proposed)
    return asked


def test_the_same_seed_proposes_the_same_trials_and_another_seed_others(tmp_path):
    first = proposals(tmp_path / "a.db", seed=7)
    assert proposals(tmp_path / "b.db", seed=7) == first
    assert proposals(tmp_path / "c.db", seed=8) != first


HELD_OUT = ["train.learning_rate=0.0005,0.002,0.008", "train.beta=1,4", "model.latent_dim=2,8"]  # 12 points


def default_options(trials: int, seed: int = 0) -> search_options.SearchOptions:
    """The default search's options (TPE, its start, successive halving)."""
    return search_options.SearchOptions(trials, "tpe", seed, "asha", 1, 3)


def search_study(sets: list[str], trials: int, seed: int = 0, storage: str = "sqlite://") -> search.SearchStudy:
    """The default search's study, in memory unless `storage`."""
    return search.SearchStudy("s", space.parse(sets, default_params_text()), default_options(trials, seed), storage, 9)


def log_search_on_a_parent(
    tmp_path: Path, study: search.SearchStudy, options: search_options.SearchOptions
) -> tuple[mlflow.MlflowClient, str, list | None]:
    """search_report.log_search of `study` onto a parent run of a fresh store: the client, the run
    and what it returned (a two-objective search's front)."""
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.create_run(client.create_experiment("e")).info.run_id
    sweep = Sweep("", "", None, client.tracking_uri, "0", parent)
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(client.tracking_uri)  # where mlflow.log_table writes, as the sweep's driver sets it
    try:
        logged = search_report.log_search(client, sweep, study.study, Outcome(), options, "mse")
    finally:
        mlflow.set_tracking_uri(before)
    return client, parent, logged


def told_by_point(study: search.SearchStudy, asked) -> float:
    """An objective of the point alone, told to the study as a trial's end."""
    number, trial, _ = asked
    values = dict(o.split("=") for o in trial.overrides)
    objective = float(values["train.learning_rate"]) * 1000 + float(values["train.beta"])
    study.tell(number, {OBJECTIVE: objective}, False, {"epochs": 9, "metrics": {OBJECTIVE: objective}})
    return objective


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_list_space_trains_each_point_once_and_the_search_ends_when_all_are_tried(seed):
    study = search_study(HELD_OUT, trials=12, seed=seed)
    trained, repeats = [], 0
    while (asked := study.ask()) is not None:
        trained.append(asked[1].overrides)
        repeats += len(asked[2])
        told_by_point(study, asked)
    assert len(trained) == len(set(trained)) == 12, "every point once, then the end"
    assert study.counted() == 12, "a repeated proposal does not count against --trials"
    copies = [t for t in study.study.trials if search.SAME_AS_ATTR in t.user_attrs]
    assert len(copies) == repeats
    for copy in copies:
        same = next(t for t in study.study.trials if t.user_attrs.get("experiment") == copy.user_attrs["same_as"])
        assert (copy.state, copy.value, copy.params) == (same.state, same.value, same.params), "its result, known"


def test_the_start_covers_every_value_of_every_list():
    study = search_study(HELD_OUT, trials=12)  # a start of 4: a third of the budget
    start = [dict(o.split("=") for o in study.ask()[1].overrides) for _ in range(4)]
    assert sorted(p["train.beta"] for p in start) == ["1", "1", "4", "4"]
    assert sorted(p["model.latent_dim"] for p in start) == ["2", "2", "8", "8"]
    assert len({p["train.learning_rate"] for p in start}) == 3, "4 strata over 3 values: each at least once"


def test_a_proposal_of_a_point_that_trains_now_takes_its_result_when_it_ends():
    study = search_study(["train.beta=1,4"], trials=4)
    first = study.ask()
    study.study.enqueue_trial(study.study.trials[first[0]].params)  # the next proposal: the first's point
    second = study.ask()
    assert second is not None and set(second[2]) == {first[1].name}, "the repeats wait for the first trial"
    assert study.ask() is None, "both points held: nothing is left to train"
    copies = [t for t in study.study.trials if search.SAME_AS_ATTR in t.user_attrs]
    assert copies and all(t.state == optuna.trial.TrialState.RUNNING for t in copies), "no result known yet"
    study.report(first[0], 1, 30.0)
    study.tell(first[0], {OBJECTIVE: 30.0}, True, {"epochs": 1, "metrics": {OBJECTIVE: 30.0}})
    for copy in copies:
        told = study.study.trials[copy.number]
        assert told.state == optuna.trial.TrialState.PRUNED and told.intermediate_values == {1: 30.0}
    assert study.counted() == 1


def test_a_paused_slow_starter_is_promoted_once_later_trials_rank_it_among_the_best_of_its_rung():
    """ASHA's rule over Optuna's pruned trials: s-2 is pruned at epoch 1 behind s-1 alone; after
    four worse trials reach that rung, it is among the best third of six, and goes on."""
    study = search_study(["train.learning_rate=0.0005,0.001,0.002,0.004,0.008,0.016"], trials=6)
    for objective in (32.0, 33.0, 40.0, 41.0, 42.0, 43.0):
        number, trial, _ = study.ask()
        pruned = study.report(number, 1, objective)
        if objective < 43.0:
            assert study.promote() is None, "no paused trial is among the best ⌊n/3⌋ yet"
        study.tell(number, {OBJECTIVE: objective}, pruned, {"epochs": 1, "metrics": {OBJECTIVE: objective}})
        assert pruned == (objective != 32.0)
    number, trial, epochs, timed_out = study.promote()
    assert (trial.name, epochs, timed_out) == ("s-2", 1, False)
    continued = study.study.trials[number]
    assert continued.intermediate_values == {1: 33.0} and continued.user_attrs["experiment"] == "s-2"
    assert study.promote() is None, "promoted once: it is training now, not paused"
    assert study.report(number, 3, 30.0) is False, "the pruner goes on from the rungs it had"
    assert study.counted() == 6, "a promotion trains a point the budget has counted"


@pytest.mark.parametrize(
    ("trials", "start", "said"),
    [
        (1, 1, "random sampling: --trials 1 is within TPE's start of 1"),
        (12, 4, "TPE, after a start that covers the space (a Latin hypercube of 4 trials)"),
        (40, 10, "TPE, after a start that covers the space (a Latin hypercube of 10 trials)"),
    ],
)
def test_the_start_fits_the_budget_and_says_what_the_search_is(trials, start, said):
    options = search_options.SearchOptions(trials, "tpe", 0, "asha", 1, 3)
    assert options.start_trials() == start
    assert search_options.describe_sampling(options, start).startswith(said)


def test_the_covering_start_example_runs():
    from pipeline.sweep import covering_start

    assert doctest.testmod(covering_start).failed == 0


def test_importances_are_skipped_in_one_line_when_every_trial_has_the_same_objective(tmp_path, capsys):
    study = search_study(["visualize.num_images=4,5,6"], trials=3)
    for _ in range(3):
        number, _, _ = study.ask()
        study.tell(number, {OBJECTIVE: 25.0}, False, {"epochs": 9, "mlflow_run_id": None, "metrics": {OBJECTIVE: 25.0}})
    client, parent, _ = log_search_on_a_parent(tmp_path, study, default_options(3))
    said = capsys.readouterr().out
    assert (
        said == f"no parameter importances: the 3 trials that trained every epoch all have {OBJECTIVE} 25.0000, "
        "so no param explains a difference\n"
    )
    assert {a.path for a in client.list_artifacts(parent, "search")} == {
        "search/history.json",
        "search/optimization_history.png",
    }


@pytest.mark.parametrize("keep_epoch, ranked_by", [("last", 30.0), ("best", 25.0)])
def test_a_trial_is_ranked_by_the_epoch_it_kept(tmp_path, keep_epoch, ranked_by):
    params = yaml.safe_load(default_params_text())
    params["train"]["keep_epoch"] = keep_epoch
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "metrics").mkdir()
    train = {"epochs": 3, OBJECTIVE: 30.0, "best_epoch": 1, f"best_{OBJECTIVE}": 25.0}
    (tmp_path / "metrics/train.json").write_text(json.dumps(train))
    (tmp_path / "metrics/test.json").write_text(json.dumps({"test_total": 26.0}))
    metrics, run_id, kept = experiment_results(tmp_path)
    assert metrics == {OBJECTIVE: ranked_by, "best_epoch": 1, f"best_{OBJECTIVE}": 25.0, "test_total": 26.0}
    assert run_id is None, "no MLflow run file: tracking off"
    assert kept == (1 if keep_epoch == "best" else 3)


def test_the_trials_table_names_the_epoch_a_trial_kept_and_the_params_every_trial_sets_once(capsys):
    trials = [grid.Trial("kb-1", ("seed=1", "train.epochs=2")), grid.Trial("kb-2", ("seed=2", "train.epochs=2"))]
    results = {
        "kb-1": TrialResult("kb-1", {OBJECTIVE: 217.5}, None, 25.0, 23.0, epochs=2, kept_epoch=1),
        "kb-2": TrialResult("kb-2", {OBJECTIVE: 171.0}, None, 25.0, 23.0, epochs=2),
    }
    outcome = Outcome(finished=results)
    report.print_table(trials, outcome, report.summarize(outcome, 36.0))
    said = capsys.readouterr().out
    assert re.search(r"^kb-2 +FINISHED +2 +171\.0000  seed=2  <- best$", said, re.MULTILINE), said
    assert said.count("train.epochs=2") == 1 and "\nevery trial: train.epochs=2\n" in said, said
    assert f"{OBJECTIVE} of the epoch each trial kept (train.keep_epoch: best), not its last: kb-1 epoch 1\n" in said


def test_a_search_run_again_is_refused_with_another_space(tmp_path):
    store = f"sqlite:///{tmp_path / 'optuna.db'}"
    options = search_options.SearchOptions(2, "tpe", 0, "asha", 1, 3)
    search.open_study("s", space.parse(["train.beta=1,4"], default_params_text()), options, store, 3)
    with pytest.raises(PipelineError, match="started with another space"):
        search.open_study("s", space.parse(["train.beta=1,2"], default_params_text()), options, store, 3)


def test_the_parent_run_holds_the_history_and_the_importances(tmp_path):
    parsed = space.parse(["train.learning_rate=interval(0.0001, 0.01)", "train.beta=0.5,1,2"], default_params_text())
    options = search_options.SearchOptions(6, "random", 0, "asha", 1, 3)
    study = search.SearchStudy("s", parsed, options, "sqlite://", 3)
    for _ in range(6):
        number, trial, _ = study.ask()
        values = dict(o.split("=") for o in trial.overrides)
        objective = float(values["train.learning_rate"]) * 1000
        attrs = {"epochs": 3, "mlflow_run_id": None, "metrics": {OBJECTIVE: objective}}
        study.tell(number, attrs["metrics"], False, attrs)
    client, parent, _ = log_search_on_a_parent(tmp_path, study, options)
    artifacts = {a.path for a in client.list_artifacts(parent, "search")}
    assert artifacts == {
        "search/history.json",
        "search/importances.json",
        "search/optimization_history.png",
        "search/param_importances.png",
    }
    table = logged_json(client, parent, "search/importances.json")
    importances = dict(table["data"])
    assert importances["train.learning_rate"] > importances["train.beta"], "the objective depends on it alone"
    history = logged_json(client, parent, "search/history.json")
    rows = [dict(zip(history["columns"], row)) for row in history["data"]]
    assert [row["best_so_far"] for row in rows] == [min(r[OBJECTIVE] for r in rows[: i + 1]) for i in range(len(rows))]


def test_a_two_objective_search_logs_its_rate_distortion_front(tmp_path):
    """With --objectives rate,distortion the study has two directions and each landed trial is told
    its validation KL and reconstruction; the parent run gets the front (the trials no other beats
    on both, lowest rate first) as a table, a figure and a tag."""
    parsed = space.parse(["train.beta=0.25,0.5,1,2,4,8"], default_params_text())
    options = search_options.SearchOptions(6, "random", 0, "none", 1, 3, ("rate", "distortion"))
    study = search.SearchStudy("s", parsed, options, "sqlite://", 3)
    assert study.study.directions == [optuna.study.StudyDirection.MINIMIZE] * 2
    for _ in range(6):
        number, trial, _ = study.ask()
        beta = float(dict(o.split("=") for o in trial.overrides)["train.beta"])
        # A larger beta: less rate, more distortion; but beta 2 is made worse than beta 4 on both.
        rate, distortion = 10 / beta, (20 + 5 * beta if beta != 2 else 40)
        metrics = {"val_kl": rate, "val_reconstruction": distortion, OBJECTIVE: rate + distortion}
        study.tell(number, metrics, False, {"epochs": 3, "mlflow_run_id": None, "metrics": metrics})
    assert [t.values for t in search.trained(study.study) if t.params["train.beta"] == 4] == [[2.5, 40.0]]
    client, parent, logged = log_search_on_a_parent(tmp_path, study, options)
    assert [point.params["train.beta"] for point in logged] == [8, 4, 1, 0.5, 0.25], "beta 2 is dominated"
    assert {a.path for a in client.list_artifacts(parent, "search")} == {
        "search/front.json",
        "search/rate_distortion.png",
    }
    table = logged_json(client, parent, "search/front.json")
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [(row["train.beta"], row["rate"], row["distortion"]) for row in rows] == [
        (8, 1.25, 60.0),
        (4, 2.5, 40.0),
        (1, 10.0, 25.0),
        (0.5, 20.0, 22.5),
        (0.25, 40.0, 21.25),
    ]
    assert client.get_run(parent).data.tags[front.FRONT_TAG] == " ".join(row["trial"] for row in rows)


def test_a_pruned_trial_is_drawn_but_never_on_the_front():
    """It trained fewer epochs: a point of another model than its params', so it cannot beat one."""
    full = [front.Point("a", 1.0, 10.0, {}, False), front.Point("b", 2.0, 5.0, {}, False)]
    pruned = front.Point("c", 0.5, 4.0, {}, True)  # would dominate both
    assert front.pareto_front([*full, pruned]) == full
    assert front.pareto_front([*full, front.Point("d", 3.0, 6.0, {}, False)]) == full, "d is worse than b on both"


@dataclasses.dataclass(frozen=True)
class Searched:
    project: Path
    output: subprocess.CompletedProcess
    together: subprocess.CompletedProcess  # the same search, its trials trained together
    same: subprocess.CompletedProcess  # the default search of two points that train the same model
    rate_distortion: subprocess.CompletedProcess  # a two-objective search of two betas
    env: dict[str, str]


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> Searched:
    """A 2-epoch search of 4 points with a budget of 5, a rung at 1 epoch, one trial at a time (Ray
    gives each one thread), in which a pruned trial is promoted later; a search of 2 of those
    points with its trials trained together on one thread; a search of 3 trials (TPE, Hyperband)
    over 2 points that differ only in a figure's param; a two-objective search of 2 betas; then
    the last pruned trial's params trained alone on one thread for 1 and for 2 epochs, the promoted
    one's for 2, and the last pruned trial applied and continued to 2 as a user types it (these
    four the train stage alone: its outputs are what the tests compare)."""
    tmp = tmp_path_factory.mktemp("search")
    project = make_project(tmp / "project", write_mirror(tmp / "mirror"), **{"train.epochs": 2})
    env = search_env()
    rates = f"train.learning_rate={KEPT_LR},{PROMOTED_LR},{SLOWER_LR},{PRUNED_LR}"
    output = run(
        [*SEARCH, "-S", rates, *PROMOTING, "--max-concurrent", "1", "-n", "srch"], project, check=False, env=env
    )
    one_thread = env | {"OMP_NUM_THREADS": "1"}  # a driver on one thread: its groups train on one
    together = run(  # a group has the driver's threads: those of a run alone
        [
            *SEARCH,
            "-S",
            f"train.learning_rate={KEPT_LR},{PRUNED_LR}",
            "-S",
            "mlflow.registered_model=vae",
            *PRUNING,
            "--together",
            "2",
            "-n",
            "grp",
        ],
        project,
        check=False,
        env=one_thread,
    )
    same = run(
        [*SEARCH, "-S", "visualize.num_images=4,5", *PART_OF_THE_DATA, "--trials", "3", "-n", "same"],
        project,
        check=False,
        env=env,
    )
    rate_distortion = run(
        [*SEARCH, "-S", "train.beta=0.25,4", *PART_OF_THE_DATA, "--trials", "2", "--objectives", "rate,distortion"]
        + ["-n", "rd"],
        project,
        check=False,
        env=env,
    )
    # As a user's shell types them: no OMP_NUM_THREADS, so torch would take every core but for the
    # threads the command (or the applied experiment) sets.
    typed = {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}
    alone_runs = (("alone-1", PRUNED_LR, 1), ("alone-2", PRUNED_LR, 2), ("promoted-alone", PROMOTED_LR, 2))
    for name, rate, epochs in alone_runs:
        for trained in ("models/model.pt", "models/state.pt"):
            (project / trained).unlink(missing_ok=True)  # from scratch, not on from the last
        alone = [f"train.learning_rate={rate}", f"train.epochs={epochs}", "train.num_threads=1"]
        run(["dvc", "exp", "run", "-n", name, *(a for o in alone for a in ("-S", o)), "train"], project, env=typed)
    run(["git", "checkout", "--", "."], project)
    run(["dvc", "exp", "apply", "srch-4"], project, env=env)
    run(["dvc", "exp", "run", "-n", "srch-4-more", "-S", "train.epochs=2", "train"], project, env=typed)
    run(["git", "checkout", "--", "."], project)
    return Searched(project, output, together, same, rate_distortion, env)


PART_OF_THE_DATA = ("-S", "data.train_images=200", "-S", "data.test_images=30")  # of the mirror's 240 and 60


def train_outputs(project: Path, experiment: str) -> dict[str, str]:
    """The experiment's params and its train stage's output md5s, from its dvc.lock."""
    lock = yaml.safe_load(run(["git", "show", f"{experiment_ref(project, experiment)}:dvc.lock"], project).stdout)
    train = lock["stages"]["train"]
    return {out["path"]: out["md5"] for out in train["outs"]} | {
        "epochs": train["params"]["params.yaml"]["train"]["epochs"]
    }


def experiment_ref(project: Path, name: str) -> str:
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], project).stdout.split()
    return next(ref for ref in refs if ref.endswith(f"/{name}"))


@pytest.mark.slow
def test_a_pruned_trial_is_the_experiment_of_its_epochs_and_continues_bit_for_bit(searched):
    output = searched.output.stdout
    assert searched.output.returncode == 0, output + searched.output.stderr
    assert "pruned by successive halving at epochs 1 (reduction factor 2)" in output
    for pruned in ("srch-2", "srch-3", "srch-4"):
        assert re.search(rf"^{pruned} pruned at epoch 1, landed", output, re.MULTILINE), output
    assert re.search(r"^srch-1 +FINISHED +2 .*<- best", output, re.MULTILINE), output
    assert re.search(r"^srch-4 +PRUNED +1 ", output, re.MULTILINE), output
    assert re.search(
        r"outside `dvc exp run` \(clone, data, its training process, which climbs its rungs, push\)$",
        output,
        re.MULTILINE,
    ), output

    pruned, alone = train_outputs(searched.project, "srch-4"), train_outputs(searched.project, "alone-1")
    assert pruned["epochs"] == 1, "the experiment's train.epochs is the epochs it reached"
    assert pruned["models/model.pt"] == alone["models/model.pt"]
    assert pruned["metrics/history.csv"] == alone["metrics/history.csv"]
    more, alone = train_outputs(searched.project, "srch-4-more"), train_outputs(searched.project, "alone-2")
    assert more["models/model.pt"] == alone["models/model.pt"], (
        "applied and continued as typed, with the threads its experiment records (train.num_threads), it is "
        "the bytes of a run of 2 alone with that many threads"
    )
    assert train_outputs(searched.project, "srch-1")["epochs"] == 2


@pytest.mark.slow
def test_a_paused_trial_is_promoted_once_it_ranks_among_the_best_and_ends_as_its_run_alone(searched):
    """srch-2 starts slower than srch-1, so it is pruned at epoch 1; once two worse trials reach
    that epoch it is among the best half there, and it is promoted before a fifth trial would be
    asked: continued from its experiment, it ends with the bytes of its params trained alone for 2."""
    output = searched.output.stdout
    assert re.search(r"^srch-2 promoted: it paused at epoch 1", output, re.MULTILINE), output
    assert output.index("srch-4 pruned at epoch 1") < output.index("srch-2 promoted"), "after the fourth trial"
    assert re.search(r"^srch-2 +FINISHED +2 ", output, re.MULTILINE), output
    assert "every point of the space has been tried (4): the search ends with 4 of --trials 5" in output
    promoted, alone = train_outputs(searched.project, "srch-2"), train_outputs(searched.project, "promoted-alone")
    assert promoted["epochs"] == 2, "its experiment is the promoted one, in place of the paused one"
    assert promoted["models/model.pt"] == alone["models/model.pt"], "no epoch lost, none trained twice"
    assert promoted["metrics/history.csv"] == alone["metrics/history.csv"]


@pytest.mark.slow
def test_the_search_run_names_the_best_and_tags_each_trial_as_optuna_does(searched):
    client = mlflow.MlflowClient(f"sqlite:///{searched.project / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vae-pipeline").experiment_id
    parent = client.search_runs([experiment], filter_string="attributes.run_name = 'srch'")[0]
    assert parent.data.params["sweep.rungs"] == "1 2" and parent.data.params["sweep.objective"] == OBJECTIVE
    assert parent.data.tags["best_trial"] == "srch-1"
    assert parent.data.metrics["trial_epochs"] == 2 + 2 + 1 + 1, "the promoted trial's epochs counted once"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "search")} >= {
        "search/history.json",
        "search/optimization_history.png",
    }
    table = logged_json(client, parent.info.run_id, "trials.json")
    rows = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert len(table["data"]) == 4, "a trial once, promoted or not"
    assert (rows["srch-1"]["epochs"], rows["srch-1"]["pruned"]) == (2, False)
    assert (rows["srch-2"]["epochs"], rows["srch-2"]["pruned"]) == (2, False)
    assert (rows["srch-4"]["epochs"], rows["srch-4"]["pruned"]) == (1, True)

    children = client.search_runs([experiment], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'")
    assert all(child.info.status == "FINISHED" for child in children), "each rung's run is part of its trial"
    landed = {row["trial"]: client.get_run(row["run_id"]) for row in rows.values()}
    assert landed["srch-4"].data.tags["state"] == "PRUNED" and landed["srch-4"].data.tags["pruned_at_epoch"] == "1"
    assert landed["srch-1"].data.tags["state"] == "COMPLETE" and landed["srch-2"].data.tags["state"] == "COMPLETE"
    for trial in ("srch-1", "srch-2"):
        steps = [m.step for m in client.get_metric_history(landed[trial].info.run_id, OBJECTIVE)]
        assert sorted(steps) == [1, 2], "a promoted trial's last run holds every one of its epochs"
    names = sorted(child.info.run_name for child in children)
    assert names.count("srch-1") == 1, "one run: every rung in one process, then its landing"
    assert names.count("srch-2") == 2, "its pause, and its promotion"
    pause = next(c for c in children if c.info.run_name == "srch-2" and c.info.run_id != rows["srch-2"]["run_id"])
    assert (pause.data.tags["state"], pause.data.tags["pruned_at_epoch"]) == ("PRUNED", "1"), "the pause's record"
    assert landed["srch-2"].data.tags[CONTINUED_RUN_TAG] == pause.info.run_id, "the promotion names the pause"


@pytest.mark.slow
def test_a_search_together_prunes_inside_its_group_and_lands_the_same_bytes(searched):
    """Both trials train in one process; at the rung the worse leaves the group, and lands as the
    experiment of its one epoch; the better trains on. Each is the bytes of the search one by one.
    With a registered model, the alias `best` ends on the best trial's version."""
    output = searched.together.stdout
    assert searched.together.returncode == 0, output + searched.together.stderr
    assert re.search(r"^group 1: grp-1, grp-2$", output, re.MULTILINE), output
    assert re.search(r"^grp-2 pruned at epoch 1, landed", output, re.MULTILINE), output
    assert re.search(r"^grp-1 +FINISHED +2 .*<- best", output, re.MULTILINE), output
    assert train_outputs(searched.project, "grp-2") == train_outputs(searched.project, "alone-1")
    assert train_outputs(searched.project, "grp-1") == train_outputs(searched.project, "srch-1")

    client = mlflow.MlflowClient(f"sqlite:///{searched.project / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vae-pipeline").experiment_id
    parent = client.search_runs([experiment], filter_string="attributes.run_name = 'grp'")[0]
    children = client.search_runs([experiment], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'")
    runs = {child.info.run_name: child for child in children}
    assert len(children) == 2, "one run a trial: a promoted trial's epochs all in it"
    assert runs["grp-2"].data.params["train.epochs"] == "1", "its params are those of the experiment it landed as"
    assert runs["grp-1"].data.params["train.epochs"] == "2"
    assert runs["grp-2"].data.tags["pruned_at_epoch"] == "1"
    steps = [m.step for m in client.get_metric_history(runs["grp-1"].info.run_id, OBJECTIVE)]
    assert sorted(steps) == [1, 2]
    registered = {v.tags["dvc.exp_name"] for v in client.search_model_versions("name = 'vae'")}
    assert registered == {"grp-1", "grp-2"}, "each trial evaluated and registered, the pruned one too"
    best = client.get_model_version_by_alias("vae", "best")
    assert best.tags["dvc.exp_name"] == "grp-1", "the alias best is the best trial's version"
    assert parent.data.tags["best_model_version"] == f"vae/{best.version}"


@pytest.mark.slow
def test_a_stopped_search_run_again_lands_the_trials_and_bytes_of_one_run(tmp_path, started):
    """One trial at a time, the default search: Ctrl-C once its first trial has finished an epoch,
    then the same command, in which that trial's Ray worker is killed while it trains again. The
    trial goes on from its kept epoch each time, and the search lands what the same search without
    a stop lands in another project: the same points, the same bytes; nothing is left running, and
    no checkpoint is left once every trial has landed."""
    marker = owner_marker()
    env = search_env() | marker
    mirror = write_mirror(tmp_path / "mirror")
    command = [*SEARCH, "-S", "train.learning_rate=tag(log, interval(0.0005, 0.005))", *PART_OF_THE_DATA]
    command += ["--trials", "2", "--max-concurrent", "1", "-n", "res"]
    stopped, whole = (make_project(tmp_path / name, mirror, **{"train.epochs": 2}) for name in ("stopped", "whole"))
    kept = stopped / UNLANDED / "res-1.pt"

    first = started(command, stopped, env=env)
    wait_for(kept.exists, first)  # res-1 has finished an epoch, and trains on
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C, to the driver's whole process group
    said = first.stdout.read()
    assert first.wait(timeout=300) == 130, said

    again = started(command, stopped, env=env)
    training = wait_for(
        lambda: [p for p in processes_started_with(marker) if "pipeline.sweep.training" in p.cmdline()], again
    )
    training[0].parent().kill()  # its Ray worker: the driver runs the task again
    said = again.stdout.read()
    assert again.wait(timeout=600) == 0, said
    assert "res-1 resumes: it was stopped before it landed" in said, said
    assert run([*command], whole, check=False, env=env).returncode == 0

    def landed(project: Path) -> dict[str, tuple]:
        study = optuna.load_study(study_name="res", storage=f"sqlite:///{project / search.SEARCH_STORE}")
        trials = {t.user_attrs["experiment"]: t for t in search.trained(study)}
        return {name: (t.state, t.params, train_outputs(project, name)) for name, t in trials.items()}

    assert landed(stopped) == landed(whole) and sorted(landed(whole)) == ["res-1", "res-2"]
    assert not list((stopped / UNLANDED).glob("*.pt")), "each checkpoint goes once its trial lands"
    client = mlflow.MlflowClient(f"sqlite:///{stopped / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vae-pipeline").experiment_id
    runs = {r.info.run_id: r for r in client.search_runs([experiment], "attributes.run_name = 'res-1'")}
    last = next(r for r in runs.values() if r.info.status == "FINISHED")
    chain = [last]
    while CONTINUED_RUN_TAG in chain[-1].data.tags:
        chain.append(runs[chain[-1].data.tags[CONTINUED_RUN_TAG]])
    # The killed worker's run, where its training had begun, or else the Ctrl-C'd one: never from scratch.
    assert len(chain) >= 2, "the landed run goes on from the run of a stopped training"
    assert [m.step for m in client.get_metric_history(last.info.run_id, OBJECTIVE)] == [1, 2]
    left = [
        p.cmdline()
        for p in processes_started_with(marker)
        if re.search(r"dvc exp run|raylet|sweep.training", " ".join(p.cmdline()))
    ]
    assert not left, left


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300):
    """`condition()`'s first true value, polled while `proc` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        assert proc.poll() is None, f"it ended first:\n{proc.stdout.read()}"
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s")


@pytest.mark.slow
def test_a_search_of_points_that_train_alike_trains_each_once_and_ends_without_importances(searched):
    """The default search (TPE, Hyperband's pruner), more trials than points, on two points
    that differ in a figure's param alone, on part of the data: each point trains once (their
    rung's objectives tie, so both go on), on the images its params name, in its one MLflow run; the
    search says it has tried them all, there are no importances to weigh (one line says why), and
    its run ends FINISHED."""
    output = searched.same.stdout
    assert searched.same.returncode == 0, output + searched.same.stderr
    first = "search same: TPE, after a start that covers the space (a Latin hypercube of 1 trial) (seed 0), pruned by "
    assert first + "Hyperband at epochs 1 (reduction factor 3)" in output, output
    assert "every point of the space has been tried (2): the search ends with 2 of --trials 3" in output, output
    assert re.search(rf"^no parameter importances: the 2 trials .* all have {OBJECTIVE} ", output, re.MULTILINE)
    assert sorted(
        n for n in run(["dvc", "exp", "list", "--names-only"], searched.project).stdout.split() if n.startswith("same-")
    ) == ["same-1", "same-2"]
    client = mlflow.MlflowClient(f"sqlite:///{searched.project / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vae-pipeline").experiment_id
    parent = client.search_runs([experiment], filter_string="attributes.run_name = 'same'")[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["trials_finished"] == 2
    children = client.search_runs([experiment], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'")
    assert sorted(child.info.run_name for child in children) == ["same-1", "same-2"], "trained where it landed"
    for child in children:
        assert child.data.params["data.train_images"] == "200"
        contexts = {
            {t.key: t.value for t in i.tags}["mlflow.data.context"]: i.dataset for i in child.inputs.dataset_inputs
        }
        rows = {context: json.loads(dataset.profile)["features_shape"][0] for context, dataset in contexts.items()}
        assert rows == {"train": 160, "validation": 40, "test": 30}, "80/20 of 200, and the first 30 test images"


@pytest.mark.slow
def test_a_rate_distortion_search_lands_its_trials_and_logs_and_prints_their_front(searched):
    """`--objectives rate,distortion` as a user types it: no pruning, each trial trains every epoch
    and lands; the table shows each trial's rate and distortion; the front printed last is the one
    on the parent run, and it is the trials' Pareto front by their own metrics; no trial is named best."""
    done = searched.rate_distortion
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(seed 0), no pruning, 2 trials to go" in done.stdout, done.stdout
    client = mlflow.MlflowClient(f"sqlite:///{searched.project / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vae-pipeline").experiment_id
    parent = client.search_runs([experiment], filter_string="attributes.run_name = 'rd'")[0]
    assert parent.info.status == "FINISHED" and "best_trial" not in parent.data.tags
    assert (parent.data.params["sweep.objective"], parent.data.params["sweep.pruner"]) == ("rate,distortion", "none")
    table = logged_json(client, parent.info.run_id, "trials.json")
    trials = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert sorted(t["trial"] for t in trials) == ["rd-1", "rd-2"] and {t["epochs"] for t in trials} == {2}
    points = [front.Point(t["trial"], t["val_kl"], t["val_reconstruction"], {}, False) for t in trials]
    expected = [point.trial for point in front.pareto_front(points)]
    logged = logged_json(client, parent.info.run_id, "search/front.json")
    assert [row[0] for row in logged["data"]] == expected
    assert parent.data.tags[front.FRONT_TAG] == " ".join(expected)
    assert "search/rate_distortion.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    printed = done.stdout[done.stdout.index("the rate-distortion front, lowest rate first") :].splitlines()[2:]
    assert [line.split()[0] for line in printed if line.strip()] == expected, done.stdout
    study = optuna.load_study(study_name="rd", storage=f"sqlite:///{searched.project / search.SEARCH_STORE}")
    by_name = {t["trial"]: t for t in trials}
    for trial in search.trained(study):
        landed = by_name[trial.user_attrs["experiment"]]
        assert trial.values == [landed["val_kl"], landed["val_reconstruction"]], "each trial told its rate, distortion"


@dataclasses.dataclass(frozen=True)
class Budgeted:
    project: Path
    spent: subprocess.CompletedProcess  # --timeout 1s
    more: subprocess.CompletedProcess  # the same command, --timeout 1h
    whole: subprocess.CompletedProcess  # the same search, another name, no budget, --no-warm-start
    warm: subprocess.CompletedProcess  # the same space, another name: every point taken from the project
    later: subprocess.CompletedProcess  # the same, at a later commit: none taken


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory) -> Budgeted:
    """A 2-point search with a rung at epoch 1 of 2, one trial at a time: out of time in its first
    trial, then the same command with a larger budget, then the same search whole under another
    name; then a search of the same space that takes the project's experiments, and one at a later
    commit, which cannot."""
    tmp = tmp_path_factory.mktemp("budget")
    project = make_project(tmp / "project", write_mirror(tmp / "mirror"), **{"train.epochs": 2})
    env = search_env()
    command = [*SEARCH, "-S", f"train.learning_rate={KEPT_LR},{PRUNED_LR}", *PRUNING, *PART_OF_THE_DATA]
    command += ["--max-concurrent", "1"]
    spent = run([*command, "--timeout", "1s", "-n", "bud"], project, check=False, env=env)
    more = run([*command, "--timeout", "1h", "-n", "bud"], project, check=False, env=env)
    whole = run([*command, "--no-warm-start", "-n", "all"], project, check=False, env=env)
    warm = run([*command, "-n", "warm"], project, check=False, env=env)
    (project / "NOTES.md").write_text("a later commit\n")
    run(["git", "add", "NOTES.md"], project)
    run(["git", "commit", "-qm", "a later commit"], project, env=env)
    later = run([*command, "--trials", "1", "-n", "later"], project, check=False, env=env)
    return Budgeted(project, spent, more, whole, warm, later)


@pytest.mark.slow
def test_a_search_out_of_time_lands_what_ran_and_the_same_command_goes_on_to_the_trials_of_one_run(budgeted):
    """--timeout 1s, counted from the first trial's start (which reaches no rung within a second on
    any machine: a clone, the data, a process that imports torch): that trial stops at its first
    rung and lands, paused, and no other starts. The same command with a larger budget continues it,
    then asks the rest: the trials and bytes of the same search run without a budget."""
    project, spent = budgeted.project, budgeted.spent
    assert spent.returncode == 0, spent.stdout + spent.stderr
    assert "--timeout 1 s is spent: no trial starts" in spent.stdout, spent.stdout
    assert "bud-2" not in spent.stdout, "no trial started after the budget"
    assert re.search(r"^bud-1 stopped by --timeout at epoch 1, landed paused in ", spent.stdout, re.M), spent.stdout
    study = optuna.load_study(study_name="bud", storage=f"sqlite:///{project / search.SEARCH_STORE}")
    first = study.trials[0]
    assert (first.state, first.user_attrs[search.TIMED_OUT_ATTR], first.user_attrs["epochs"]) == (
        optuna.trial.TrialState.PRUNED,
        True,
        1,
    ), "landed at the rung it reached"
    more = budgeted.more
    assert more.returncode == 0, more.stdout + more.stderr
    assert "bud-1 continues: it paused at epoch 1, --timeout stopped it there" in more.stdout, more.stdout
    assert len(re.findall(r"^bud-1 +(FINISHED|PRUNED) ", more.stdout, re.MULTILINE)) == 1, "one row, as it landed now"
    assert budgeted.whole.returncode == 0, budgeted.whole.stdout + budgeted.whole.stderr
    assert "warm start" not in budgeted.whole.stdout, "--no-warm-start"
    for budget, whole in (("bud-1", "all-1"), ("bud-2", "all-2")):
        assert train_outputs(project, budget) == train_outputs(project, whole), budget
    assert [train_outputs(project, name)["epochs"] for name in ("bud-1", "bud-2")] == [2, 1], "bud-2 pruned at 1"


@pytest.mark.slow
def test_a_search_takes_the_experiments_of_its_commit_in_its_space_as_finished_trials(budgeted):
    """The four experiments of the space are taken, each told as it trained (COMPLETE with its
    objective at train.epochs, or PRUNED with its rung's), none counted against --trials, and no
    point is trained again; at a later commit, none is taken, and one line says why."""
    warm = budgeted.warm
    assert warm.returncode == 0, warm.stdout + warm.stderr
    assert "warm start: took 4 of the project's experiments as finished trials (all-1, all-2, bud-1, bud-2)" in (
        warm.stdout
    ), warm.stdout
    assert "every point of the space has been tried (2): the search ends with 0 of --trials 2" in warm.stdout
    study = optuna.load_study(study_name="warm", storage=f"sqlite:///{budgeted.project / search.SEARCH_STORE}")
    taken = {t.user_attrs["experiment"]: t for t in search.trained(study)}
    assert sorted(taken) == ["all-1", "all-2", "bud-1", "bud-2"], "nothing trained"
    for name, trial in taken.items():
        metrics = json.loads(
            run(
                ["git", "show", f"{experiment_ref(budgeted.project, name)}:metrics/train.json"], budgeted.project
            ).stdout
        )
        told = trial.value if metrics["epochs"] == 2 else trial.intermediate_values[1]  # metrics/train.json rounds
        assert told == pytest.approx(metrics[OBJECTIVE], abs=1e-6), name
        state = optuna.trial.TrialState.COMPLETE if metrics["epochs"] == 2 else optuna.trial.TrialState.PRUNED
        assert trial.state == state and sorted(trial.intermediate_values) == [1], name
    later = budgeted.later
    assert later.returncode == 0, later.stdout + later.stderr
    assert "warm start: 4 experiment(s) of other commits not taken" in later.stdout, later.stdout
    assert "later-1 finished" in later.stdout or "later-1 pruned" in later.stdout, later.stdout
