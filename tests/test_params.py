import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.params import Params, ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parent.parent


def default_params() -> dict:
    """The params the code ships, as params.yaml spells them (not the user's working file)."""
    return dataclasses.asdict(Params())


def with_change(dotted: str, value) -> dict:
    raw = default_params()
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        node = node[key]
    node[leaf] = value
    return raw


def test_the_code_ships_the_reference_model_by_default():
    """The one place the reference's values are pinned: a missing key takes them, and every test
    builds its params.yaml from them."""
    p = Params()
    assert (p.data.dataset, p.data.mirror, p.data.val_fraction) == ("mnist", None, 0.2)  # 80/20 of MNIST's 60,000
    assert p.data.train_images is p.data.test_images is None  # all of them
    assert p.seed == p.data.split_seed == 42  # the split the reference results were measured on
    assert (p.model.input_dim, p.model.hidden_dim, p.model.latent_dim, p.model.leaky_relu) == (1, 64, 2, 0.01)
    assert (p.train.batch_size, p.train.learning_rate, p.train.epochs) == (64, 0.0005, 200)
    assert (p.train.beta, p.train.reconstruction, p.train.precision) == (1.0, "mse", "fp32")  # MSE + KL, in fp32
    assert p.train.device == "auto"  # CUDA when present
    assert p.mlflow.tracking_uri == "sqlite:///mlruns/mlflow.db"
    assert parse_params({}) == p


def test_the_projects_params_file_is_valid():
    """Whatever values the user has chosen: the file the pipeline will read parses."""
    load_params(ROOT / "params.yaml")


def test_flat_names_match_dvc_param_keys():
    flat = parse_params(default_params()).flat()
    assert flat["train.learning_rate"] == 0.0005
    assert flat["data.mirror"] is None
    assert "seed" in flat


@pytest.mark.parametrize(
    "dotted, value, message",
    [
        ("train.learning_rate", -0.001, "train.learning_rate: must be greater than 0, got -0.001"),
        ("train.learning_rate", "fast", "train.learning_rate: expected a number, got 'fast'"),
        ("train.epochs", 1.5, "train.epochs: expected an integer, got 1.5"),
        ("train.epochs", True, "train.epochs: expected an integer, got True"),
        ("train.batch_size", 0, "train.batch_size: must be greater than 0, got 0"),
        ("data.val_fraction", 1.0, "data.val_fraction: must be strictly between 0 and 1, got 1.0"),
        ("data.val_fraction", 0, "data.val_fraction: must be strictly between 0 and 1, got 0"),
        ("data.dataset", "cifar10", "data.dataset: expected one of 'mnist', 'fashion_mnist', got 'cifar10'"),
        ("data.mirror", 3, "data.mirror: expected str or null, got 3"),
        ("data.train_images", 0, "data.train_images: must be greater than 0, got 0"),
        ("data.test_images", "all", "data.test_images: expected int or null, got 'all'"),
        ("train.device", "gpu", "train.device: must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("train.channels_last", "yes", "train.channels_last: expected true or false, got 'yes'"),
        ("seed", -1, "seed: must be 0 or more, got -1"),
        (
            "seed",
            2**70,
            "seed: must be at most 9,223,372,036,854,775,807 (2^63 - 1, the largest integer PyTorch and "
            "NumPy take), got 1180591620717411303424",
        ),
        (
            "train.epochs",
            2**63,
            "train.epochs: must be at most 9,223,372,036,854,775,807 (2^63 - 1, the largest "
            "integer PyTorch and NumPy take), got 9223372036854775808",
        ),
        ("train.epochs", -(2**64), "train.epochs: must be greater than 0, got -18446744073709551616"),
        ("train.learning_rate", float("inf"), "train.learning_rate: must be a finite number, got inf"),
        ("train.beta", float("nan"), "train.beta: must be a finite number, got nan"),
        ("model", [1, 2], "model: expected a mapping of keys, got [1, 2]"),
        ("train.early_stopping", -1, "train.early_stopping: must be 0 or more, got -1"),
        ("train.min_delta", -0.1, "train.min_delta: must be 0 or more, got -0.1"),
        ("train.keep_epoch", "first", "train.keep_epoch: expected one of 'last', 'best', got 'first'"),
        ("train.kl_warmup_epochs", -2, "train.kl_warmup_epochs: must be 0 or more, got -2"),
        ("train.kl_warmup_epochs", 0.5, "train.kl_warmup_epochs: expected an integer, got 0.5"),
        ("train.free_bits", -0.5, "train.free_bits: must be 0 or more, got -0.5"),
    ],
)
def test_bad_values_are_refused_naming_the_key(dotted, value, message):
    with pytest.raises(ParamsError) as error:
        parse_params(with_change(dotted, value))
    assert str(error.value) == message


@pytest.mark.parametrize(
    "uri, shown",
    [
        ("https://alice:s3cret@mlflow.internal:5443", "https://***@mlflow.internal:5443"),
        ("http://alice@localhost:5000/", "http://***@localhost:5000/"),
        ("https://:token@host", "https://***@host"),
    ],
)
def test_a_tracking_uri_with_a_login_is_refused_without_echoing_it(uri, shown):
    with pytest.raises(ParamsError) as error:
        parse_params(with_change("mlflow.tracking_uri", uri))
    assert str(error.value).startswith("mlflow.tracking_uri: must not hold a user or password")
    assert "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)" in str(error.value)
    assert str(error.value).endswith(f"got '{shown}'") and "alice" not in str(error.value)
    assert "s3cret" not in str(error.value) and "token" not in str(error.value).split("got")[-1]


@pytest.mark.parametrize(
    "uri", ["sqlite:///mlruns/mlflow.db", "https://mlflow.internal:5443", "file:///srv/mlruns", "mlruns", "databricks"]
)
def test_a_tracking_uri_without_a_login_is_taken(uri):
    assert parse_params(with_change("mlflow.tracking_uri", uri)).mlflow.tracking_uri == uri


def test_misspelt_key_gets_a_suggestion():
    raw = default_params()
    raw["train"]["learning_rat"] = raw["train"].pop("learning_rate")
    with pytest.raises(ParamsError, match=r"unknown key 'train.learning_rat'; did you mean 'train.learning_rate'\?"):
        parse_params(raw)


def test_unknown_section_lists_the_known_keys():
    with pytest.raises(ParamsError, match=r"unknown key 'optimizer'; known keys: seed, data, model, train"):
        parse_params(default_params() | {"optimizer": {}})


def test_exponent_without_a_dot_is_a_number():
    # YAML 1.1 reads 5e-4 as a string; users write it anyway.
    assert parse_params(yaml.safe_load("train: {learning_rate: 5e-4}")).train.learning_rate == 0.0005


def test_missing_keys_take_the_reference_defaults():
    params = parse_params({"train": {"epochs": 3}})
    assert params.train.epochs == 3 and params.train.batch_size == 64 and params.model.latent_dim == 2


@pytest.mark.parametrize("stage", ["check", "download", "split", "train", "evaluate", "visualize"])
def test_every_stage_stops_on_bad_params_before_any_work(tmp_path, stage):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_change("train.learning_rate", -1)))
    result = subprocess.run(
        [sys.executable, "-m", f"pipeline.{stage}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: train.learning_rate: must be greater than 0, got -1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing created


def test_missing_params_file_says_where_to_run(tmp_path):
    with pytest.raises(ParamsError, match="run the stage from the project root"):
        load_params(tmp_path / "params.yaml")
