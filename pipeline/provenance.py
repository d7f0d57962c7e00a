"""Where a run comes from and how to make it again: the commit, the params that differ from the
committed params.yaml, the packages installed, and the commands that reproduce the run in a fresh
clone. MLflow's standard tags and run description carry them, so its UI fills its own fields."""

from __future__ import annotations

import getpass
import importlib.metadata
import os
import platform
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml
from mlflow.entities import Run
from mlflow.utils.mlflow_tags import (
    MLFLOW_GIT_BRANCH,
    MLFLOW_GIT_COMMIT,
    MLFLOW_GIT_DIRTY,
    MLFLOW_GIT_REPO_URL,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
)

from pipeline.git import GitError, git
from pipeline.params import PARAMS_FILE, Params, flatten
from pipeline.paths import TEST_METRICS, TRAIN_HISTORY, TRAIN_LATENT, TRAIN_METRICS, project_root

UNCOMMITTED_CODE_TAG = "git.uncommitted_code"  # MLflow's dirty flag also counts the params
MODEL_SHA256_TAG = "model.sha256"  # the bytes of models/model.pt a run trained or evaluated
MODEL_ID_TAG = "model_id"  # the MLflow LoggedModel of those bytes
TRAINING_RUN_TAG = "training_run_id"  # on a run that did not train: the run that trained its model
CONTINUED_RUN_TAG = "continued_from_run_id"  # on a run that trained more epochs: the finished run it went on from
PRECISION_TAG = "train.precision_used"  # fp32 or bf16: what `train.precision` (auto, say) resolved to
# Set by a sweep for its trials' `dvc exp run`: the run of the trial is nested under the sweep's run.
PARENT_RUN_VARIABLE = "PIPELINE_PARENT_RUN_ID"
# Tracked files that DVC writes (dvc.lock, the metrics kept in git, the .gitignore files naming its
# outputs): they differ from the commit after nearly every run without the run differing.
DVC_WRITES = {"dvc.lock", str(TRAIN_METRICS), str(TRAIN_HISTORY), str(TRAIN_LATENT), str(TEST_METRICS)}
SETUP = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.lock && pip install --no-deps -e ."
)


def yaml_value(value) -> str:
    """A param value as params.yaml and `dvc exp run -S` spell it: null, true, 0.0005, mnist."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n").removesuffix("\n...")


def flat_yaml(params: Params) -> dict[str, str]:
    return {key: yaml_value(value) for key, value in params.flat().items()}


@dataclass(frozen=True)
class Source:
    """The code a run ran: its commit (under `dvc exp run`, the experiment's baseline), the branch
    and remote of the repository, whether code or params differ from the commit (`dirty`), and
    which code files do."""

    commit: str | None
    branch: str | None
    remote: str | None
    dirty: bool
    uncommitted_code: tuple[str, ...]


def _git_or_none(*args: str, cwd: Path | None = None) -> str | None:
    """What git says, or None where it cannot say (no repository, no commit yet): provenance is
    recorded as far as it is known, and never stops a stage."""
    try:
        return git(*args, cwd=cwd)
    except GitError:
        return None


def source() -> Source:
    """Read from git. The working folder is the run's own (DVC's temporary copy for a queued
    experiment); the branch and remote are the user's repository's."""
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or _git_or_none("rev-parse", "HEAD")
    changed = [
        path
        for path in (_git_or_none("diff", "--name-only", "HEAD") or "").splitlines()
        if path not in DVC_WRITES and Path(path).name != ".gitignore"
    ]
    return Source(
        commit=commit,
        branch=_branch_of(commit),
        remote=_git_or_none("config", "--get", "remote.origin.url", cwd=project_root()) or None,
        dirty=bool(changed),
        uncommitted_code=tuple(path for path in changed if path != str(PARAMS_FILE)),
    )


def _branch_of(commit: str | None) -> str | None:
    """The branch whose tip is `commit`, the checked-out one first (`dvc exp run` detaches HEAD
    while it runs, so HEAD alone does not say)."""
    tips = (
        _git_or_none(
            "for-each-ref",
            "--points-at",
            commit or "HEAD",
            "--format=%(HEAD) %(refname:short)",
            "refs/heads",
            cwd=project_root(),
        )
        or ""
    ).splitlines()
    tips.sort(key=lambda tip: not tip.startswith("*"))  # "* main" is the checked-out branch
    return tips[0].lstrip("* ") if tips else None


def source_tags(src: Source, stage: str) -> dict[str, str]:
    """MLflow's own tags for where a run comes from: the UI shows them as Source, Git commit, User."""
    tags = {
        MLFLOW_SOURCE_NAME: str(project_root() / "pipeline" / f"{stage}.py"),
        MLFLOW_SOURCE_TYPE: "LOCAL",
        MLFLOW_USER: getpass.getuser(),
        MLFLOW_GIT_DIRTY: str(src.dirty).lower(),
    }
    for tag, value in (
        (MLFLOW_GIT_COMMIT, src.commit),
        (MLFLOW_GIT_BRANCH, src.branch),
        (MLFLOW_GIT_REPO_URL, src.remote),
    ):
        if value:
            tags[tag] = value
    if src.uncommitted_code:
        tags[UNCOMMITTED_CODE_TAG] = ", ".join(src.uncommitted_code)
    return tags


def committed_params(commit: str | None) -> dict[str, str] | None:
    """params.yaml as the commit holds it, flat and spelt as YAML; None if there is none to read.
    Read as plain YAML, not checked against today's schema: a key renamed since is just a change."""
    text = _git_or_none("show", f"{commit}:{PARAMS_FILE}", cwd=project_root()) if commit else None
    if text is None:
        return None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return {key: yaml_value(value) for key, value in flatten(raw).items()} if isinstance(raw, dict) else None


def overrides(run_params: dict[str, str], commit: str | None) -> dict[str, str] | None:
    """The params the run had that its commit's params.yaml has not (`dvc exp run -S` takes them
    as they are). Not mlflow.*: where a run is logged does not change it."""
    committed = committed_params(commit)
    if committed is None:
        return None
    return {
        key: value for key, value in run_params.items() if not key.startswith("mlflow.") and committed.get(key) != value
    }


def run_name(params: Params, src: Source) -> str | None:
    """The name of a run that is no DVC experiment (under `dvc repro`): the commit and the params
    that differ from it. An experiment's run takes the experiment's name (tracking.Identity)."""
    if src.commit is None:
        return None  # MLflow makes one up
    changed = overrides(flat_yaml(params), src.commit) or {}
    name = " ".join(
        [src.commit[:7] + ("-dirty" if src.uncommitted_code else "")]
        + [f"{key}={value}" for key, value in changed.items()]
    )
    return name if len(name) <= 120 else name[:119] + "…"


def environment() -> str:
    """Every installed distribution and its exact version, as `pip freeze` writes them."""
    installed = sorted(
        {f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()}, key=str.lower
    )
    return (
        f"# Python {platform.python_version()} on {platform.system()} {platform.machine()}\n"
        + "\n".join(installed)
        + "\n"
    )


def reproduce_commands(run: Run) -> list[str] | None:
    """Shell commands that remake the run in a fresh clone of its repository."""
    tags, commit = run.data.tags, run.data.tags.get(MLFLOW_GIT_COMMIT)
    changed = overrides(run.data.params, commit)
    if changed is None:
        return None
    origin = tags.get(MLFLOW_GIT_REPO_URL) or str(project_root())
    settings = " ".join(f"-S {shlex.quote(f'{key}={value}')}" for key, value in changed.items())
    return [
        f"git clone {shlex.quote(origin)} vae-pipeline && cd vae-pipeline",
        f"git checkout {commit}",
        SETUP,
        f"dvc exp run {settings}".rstrip(),
    ]


HEADLINE_METRICS = ("test_total", "test_reconstruction", "test_kl", "active_units")


def describe(run: Run) -> str:
    """The run's description (MLflow's `mlflow.note.content`, Markdown): data, device, what differs
    from the reference model, the test metrics and how to reproduce the run."""
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    reference = flat_yaml(Params())
    differs = [
        f"`{key}` {value} (reference {reference[key]})"
        for key, value in params.items()
        if key in reference
        and reference[key] != value
        and not key.startswith("mlflow.")
        and key not in ("data.mirror", "train.device")
    ]
    mirror = params.get("data.mirror", "null")
    origin = "torchvision's download" if mirror == "null" else mirror
    digests = ", ".join(f"{d.dataset.name} `{d.dataset.digest}`" for d in run.inputs.dataset_inputs)
    device = tags.get("cuda.device_name") or tags.get("cpu.name", "")
    shown = [name for name in metrics if name.startswith(("test_log_likelihood", "test_knn"))]
    test = ", ".join(f"{name} {metrics[name]:.4g}" for name in (*HEADLINE_METRICS, *shown) if name in metrics)
    commit = tags.get(MLFLOW_GIT_COMMIT, "")
    lines = [
        f"**{tags.get('mlflow.runName', run.info.run_id)}**: the reference VAE "
        + (f"as DVC experiment `{tags['dvc.exp_name']}` " if "dvc.exp_name" in tags else "")
        + (f"of commit `{commit[:7]}`" if commit else "outside a git repository")
        + (f" on branch `{tags[MLFLOW_GIT_BRANCH]}`" if MLFLOW_GIT_BRANCH in tags else "")
        + ".",
        "",
        f"- **Data**: {params.get('data.dataset')} from {origin}" + (f"; digests {digests}" if digests else ""),
        f"- **Device**: {tags.get('device.type', '?')} {device} (torch {tags.get('torch.version', '?')})",
        *(
            [
                f"- **Precision**: trained in {tags[PRECISION_TAG]}"
                + (
                    " (forward pass under autocast; weights, optimizer and loss fp32)"
                    if tags[PRECISION_TAG] != "fp32"
                    else ""
                )
                + "; evaluated in fp32"
            ]
            if PRECISION_TAG in tags
            else []
        ),
        "- **Differs from the reference model**: " + ("; ".join(differs) or "nothing"),
        "- **Test**: " + (test or "not evaluated yet"),
        f"- **Model**: `models/model.pt` sha256 `{tags[MODEL_SHA256_TAG]}`"
        if MODEL_SHA256_TAG in tags
        else "- **Model**: not written yet",
    ]
    experiment = f"#/experiments/{run.info.experiment_id}"
    if MODEL_ID_TAG in tags:
        lines.append(f"- **Logged model**: [{tags[MODEL_ID_TAG]}]({experiment}/models/{tags[MODEL_ID_TAG]})")
    if CONTINUED_RUN_TAG in tags:
        lines.append(
            f"- **Continues**: [run {tags[CONTINUED_RUN_TAG]}]({experiment}/runs/{tags[CONTINUED_RUN_TAG]}), "
            "whose epochs it holds too; it trained the epochs after them"
        )
    if TRAINING_RUN_TAG in tags:
        lines.append(
            f"- **Trained by**: [run {tags[TRAINING_RUN_TAG]}]({experiment}/runs/{tags[TRAINING_RUN_TAG]}); "
            "this run reran only the later stages"
        )
    commands = reproduce_commands(run)
    if commands:
        lines += ["", "**Reproduce** in a fresh clone:", "", "```bash", *commands, "```"]
        if UNCOMMITTED_CODE_TAG in tags:
            lines += [
                "",
                f"The run also had uncommitted changes to {tags[UNCOMMITTED_CODE_TAG]}, which these "
                "commands do not bring back.",
            ]
    return "\n".join(lines) + "\n"
