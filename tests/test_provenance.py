"""Where a run comes from, read from a real git repository: what makes it dirty, and the committed
params.yaml read as it is, whatever today's schema says."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import provenance
from tests.projects import run

COMMITTED_PARAMS = "seed: 42\ntrain:\n  learning_rate: 0.0005\n  old_name: 3\n"


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A committed project: params, code, and the files DVC writes."""
    for path, text in {
        "params.yaml": COMMITTED_PARAMS,
        "pipeline/train.py": "# code\n",
        "dvc.lock": "schema: '2.0'\n",
        "metrics/train.json": "{}\n",
        "metrics/test.json": "{}\n",
        "metrics/history.csv": "epoch\n",
        "metrics/latent.csv": "epoch,dimension,kl\n",
        "data/.gitignore": "/raw\n",
    }.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    run(["git", "init", "-q"], tmp_path)
    run(["git", "add", "-A"], tmp_path)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@l", "commit", "-qm", "c"], tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    return tmp_path


def test_what_dvc_writes_leaves_a_run_clean(repo):
    written = ("dvc.lock", "metrics/train.json", "metrics/test.json", "metrics/history.csv", "metrics/latent.csv")
    for path in (*written, "data/.gitignore"):
        (repo / path).write_text("rewritten by DVC\n")
    assert provenance.source().dirty is False


def test_params_or_code_that_differ_make_it_dirty_and_code_is_named(repo):
    (repo / "params.yaml").write_text(COMMITTED_PARAMS.replace("0.0005", "0.001"))
    changed_params = provenance.source()
    assert changed_params.dirty is True and changed_params.uncommitted_code == ()
    (repo / "pipeline/train.py").write_text("# edited\n")
    assert provenance.source().uncommitted_code == ("pipeline/train.py",)


def test_the_committed_params_are_read_as_plain_yaml_even_with_a_key_renamed_since(repo):
    """`train.old_name` is in no schema: renaming a key in code and params.yaml before committing
    must not break reading what the commit holds."""
    commit = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert provenance.committed_params(commit) == {"seed": "42", "train.learning_rate": "0.0005", "train.old_name": "3"}
    run_params = {"seed": "42", "train.learning_rate": "0.0005", "train.new_name": "3"}
    assert provenance.overrides(run_params, commit) == {"train.new_name": "3"}
