"""The grid of a sweep: DVC's own `-S` syntax (`-S 'train.learning_rate=0.001,0.0005'`, Hydra's
sweep overrides, expanded by DVC's own code as `dvc exp run --queue` does) or a YAML file of key:
list of values. Every point is checked against params.yaml before any task starts."""

from __future__ import annotations

import dataclasses
import re
import tempfile
from pathlib import Path

import yaml
from dvc.exceptions import InvalidArgumentError
from dvc.utils.cli_parse import to_path_overrides
from dvc.utils.hydra import apply_overrides, get_hydra_sweeps

from pipeline.errors import PipelineError
from pipeline.params import PARAMS_FILE, Params, ParamsError, parse_params
from pipeline.provenance import yaml_value


@dataclasses.dataclass(frozen=True)
class Trial:
    """One point of the grid: its DVC experiment name (the sweep's name and its number, as DVC
    names the experiments of a queued sweep) and the `-S` overrides that make it."""

    name: str
    overrides: tuple[str, ...]

    @property
    def values(self) -> dict[str, str]:
        """The overrides as params.yaml key -> value as written (`+` to add, `~` to delete dropped)."""
        return {key.lstrip("+~"): value for key, _, value in (o.partition("=") for o in self.overrides)}


def at_epochs(overrides: tuple[str, ...], epochs: int) -> tuple[str, ...]:
    """The overrides, with `train.epochs` set to `epochs` (a search's trial at a rung)."""
    return (*(o for o in overrides if not o.startswith("train.epochs=")), f"train.epochs={epochs}")


def overrides_from_file(path: Path) -> list[str]:
    """`key: [v1, v2]` (or `key: v`) lines of a YAML file as `-S key=v1,v2` overrides."""
    try:
        grid = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"grid file {path} not found") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"grid file {path} is not valid YAML: {exc}") from None
    if not isinstance(grid, dict) or not grid:
        raise PipelineError(
            f"grid file {path}: expected a mapping of dotted params keys to lists of values, "
            "e.g. 'train.learning_rate: [0.001, 0.0005]'"
        )
    return [
        f"{key}=" + ",".join(_hydra_value(v) for v in (values if isinstance(values, list) else [values]))
        for key, values in grid.items()
    ]


def _hydra_value(value) -> str:
    """A YAML value spelt as a Hydra override value: strings quoted unless plainly a word."""
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z_][\w.:/-]*", value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return yaml_value(value)


def expand(sets: list[str], sweep_name: str) -> list[Trial]:
    """The grid's points, in DVC's order, named `<sweep_name>-1`, `-2`, ..."""
    path_overrides = to_path_overrides(sets)
    other_files = sorted(set(path_overrides) - {str(PARAMS_FILE)})
    if other_files:
        raise PipelineError(f"the grid sets keys of {', '.join(other_files)}: a sweep sets params.yaml keys only")
    try:
        points = get_hydra_sweeps(path_overrides) if path_overrides else [{}]
    except InvalidArgumentError as exc:
        raise PipelineError(f"the grid is not valid -S syntax: {exc}") from None
    except Exception as exc:  # Hydra's parser errors name the bad override
        raise PipelineError(f"the grid is not valid -S syntax: {str(exc).splitlines()[0]}") from None
    return [Trial(f"{sweep_name}-{i}", tuple(point.get(str(PARAMS_FILE), []))) for i, point in enumerate(points, 1)]


def check(trials: list[Trial], params_text: str) -> list[Params]:
    """Each trial's params.yaml (`params_text` with its overrides, applied by DVC's own code as
    `dvc exp run -S` applies them), checked as a stage checks it. A bad point refuses the sweep."""
    checked = []
    for trial in trials:
        try:
            checked.append(parse_params(yaml.safe_load(applied(trial, params_text))))
        except (ParamsError, InvalidArgumentError) as exc:
            reason = str(exc) if isinstance(exc, ParamsError) else _unknown_key(trial)
            raise PipelineError(f"trial {trial.name} ({' '.join(trial.overrides)}): {reason}") from None
    return checked


def applied(trial: Trial, params_text: str) -> str:
    """The trial's params.yaml: `params_text` as `dvc exp run -S` leaves it after the trial's overrides."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / PARAMS_FILE.name
        path.write_text(params_text)
        apply_overrides(path, list(trial.overrides))
        return path.read_text()


def _unknown_key(trial: Trial) -> str:
    """What Hydra refused, said as a stage says it: the unknown key, and the key meant."""
    for key in trial.values:
        tree: dict = {}
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = None
        try:
            parse_params(tree)
        except ParamsError as exc:
            if "unknown key" in str(exc):
                return str(exc)
    return "not a valid -S override of params.yaml"
