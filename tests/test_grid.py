"""A sweep's grid: DVC's `-S` syntax expanded by DVC's own code, a YAML file read as the same
overrides, and every point checked as a stage checks params.yaml, before anything runs."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from pipeline.errors import PipelineError
from pipeline.params import Params
from pipeline.sweep import grid

DEFAULTS = yaml.safe_dump(dataclasses.asdict(Params()), sort_keys=False)


def test_the_grid_expands_in_dvcs_order_and_names_trials_as_dvc_names_a_queued_sweep():
    trials = grid.expand(["train.learning_rate=0.001,0.0005", "train.beta=1,4", "train.epochs=1"], "lr")
    assert [(t.name, t.overrides) for t in trials] == [
        ("lr-1", ("train.learning_rate=0.001", "train.beta=1", "train.epochs=1")),
        ("lr-2", ("train.learning_rate=0.001", "train.beta=4", "train.epochs=1")),
        ("lr-3", ("train.learning_rate=0.0005", "train.beta=1", "train.epochs=1")),
        ("lr-4", ("train.learning_rate=0.0005", "train.beta=4", "train.epochs=1")),
    ]
    checked = grid.check(trials, DEFAULTS)
    assert [(p.train.learning_rate, p.train.beta, p.train.epochs) for p in checked] == [
        (0.001, 1.0, 1),
        (0.001, 4.0, 1),
        (0.0005, 1.0, 1),
        (0.0005, 4.0, 1),
    ]
    assert checked[0].model == Params().model, "keys the grid does not set keep params.yaml's values"


def test_a_grid_file_is_the_same_grid(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "train.learning_rate: [0.001, 0.0005]\ntrain.reconstruction: [mse, bce]\ndata.mirror: /data/fashion mnist\n"
    )
    from_file = grid.check(grid.expand(grid.overrides_from_file(path), "f"), DEFAULTS)
    from_sets = grid.check(
        grid.expand(
            ["train.learning_rate=0.001,0.0005", "train.reconstruction=mse,bce", "data.mirror='/data/fashion mnist'"],
            "f",
        ),
        DEFAULTS,
    )
    assert from_file == from_sets
    assert {p.data.mirror for p in from_file} == {"/data/fashion mnist"}


@pytest.mark.parametrize(
    ("sets", "refusal"),
    [
        (
            ["train.learning_rate=0.001,-1"],
            "trial s-2 (train.learning_rate=-1): train.learning_rate: must be greater than 0",
        ),
        (
            ["train.lernrate=1,2"],
            "trial s-1 (train.lernrate=1): unknown key 'train.lernrate'; did you mean 'train.learning_rate'?",
        ),
        (["trian.epochs=1"], "unknown key 'trian'; did you mean 'train'?"),
        (["train.epochs=2,two"], "trial s-2 (train.epochs=two): train.epochs: expected an integer, got 'two'"),
        (["train.epochs=[1"], "the grid is not valid -S syntax"),
        (["other.yaml:train.epochs=1,2"], "the grid sets keys of other.yaml: a sweep sets params.yaml keys only"),
    ],
)
def test_a_bad_point_refuses_the_whole_grid_and_says_which(sets, refusal):
    with pytest.raises(PipelineError) as refused:
        grid.check(grid.expand(sets, "s"), DEFAULTS)
    assert refusal in str(refused.value)


def test_a_grid_file_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("- train.learning_rate\n")
    with pytest.raises(PipelineError, match="expected a mapping of dotted params keys to lists of values"):
        grid.overrides_from_file(path)
