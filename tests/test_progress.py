"""Progress as a user sees it under `dvc repro`: a live bar on a terminal, plain lines in a log."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import termios
from pathlib import Path

import pytest

from pipeline.history import OBJECTIVE
from pipeline.progress import PROGRESS_FILE_VARIABLE, progress
from tests.projects import edit_params, make_project, project_env, run, stages_run


def test_a_log_gets_a_plain_line_with_rate_and_time_left(monkeypatch, capsys):
    monkeypatch.setenv("PIPELINE_PROGRESS_SECONDS", "0")
    with progress(10, "evaluate: work", "decodes") as advance:
        for _ in range(5):
            advance(2)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4, "a line for each update but the last: the stage says itself when it is done"
    assert re.fullmatch(r"evaluate: work: 2/10 decodes \(20%\), [\d,]+ decodes/s, about \d+ s left", lines[0]), lines
    assert lines[-1].startswith("evaluate: work: 8/10 decodes (80%)")


def test_nothing_is_shown_where_it_is_not_wanted(capsys):
    with progress(10, "a rank other than 0", "images", shown=False) as advance:
        assert advance is None
    assert capsys.readouterr().err == ""


def read_terminal(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run `args` with a pseudo-terminal as its stdout and stderr, as in a user's shell (120 columns:
    a new pseudo-terminal has none, and nothing can be drawn in that)."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, start_new_session=True
    )
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: every holder of the terminal has exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_dvc_repro_shows_a_live_bar_on_a_terminal_and_plain_lines_in_a_log(tmp_path, mirror):
    project = make_project(
        tmp_path / "p", mirror, **{"train.epochs": 2, "evaluate.iw_samples": 300, "mlflow.enabled": False}
    )
    events = tmp_path / "progress.jsonl"
    status, screen = read_terminal(
        ["dvc", "repro", "evaluate"], project, project_env() | {PROGRESS_FILE_VARIABLE: str(events)}
    )
    assert status == 0, screen
    recorded = [json.loads(line) for line in events.read_text().splitlines()]
    assert (
        [e["stage"] for e in recorded if e["event"] == "start"]
        == stages_run(screen)
        == [
            "download",
            "split",
            "train",
            "evaluate",
        ]
    )
    epochs = [e for e in recorded if e["event"] == "epoch"]
    assert [(e["epoch"], e["epochs"]) for e in epochs] == [(1, 2), (2, 2)], "the file a program follows"
    assert set(epochs[-1]["metrics"]) >= {"val_total", OBJECTIVE} and epochs[-1]["stage"] == "train"
    loops = [(e["stage"], e["doing"]) for e in recorded if e["event"] == "done" and e["seconds"] > 0]
    assert ("evaluate", "evaluate: importance-weighted log-likelihood") in loops, "a loop's end, with its seconds"
    assert re.search(r"epoch 1/2: +\d+%\|", screen), "a bar for each epoch"
    assert re.search(r"evaluate: importance-weighted log-likelihood: +\d+%\|.*decodes/s", screen), screen[-2000:]
    assert "\r" in screen, "the bar is redrawn in place"

    logged = run(
        ["dvc", "repro", "--force", "--single-item", "evaluate"],
        project,
        env=project_env() | {"PIPELINE_PROGRESS_SECONDS": "0.2"},
    )
    assert stages_run(logged.stdout) == ["evaluate"]
    lines = re.findall(
        r"^evaluate: importance-weighted log-likelihood: [\d,]+/18,000 decodes \(\d+%\), "
        r"[\d,]+ decodes/s, about \d+ s left$",
        logged.stderr,
        re.M,
    )
    assert lines, logged.stderr
    assert "\r" not in logged.stdout + logged.stderr, "a log gets whole lines, no carriage returns"

    edit_params(project, **{"data.train_images": 10**6})  # a mistake the split stage refuses
    failing = tmp_path / "failing.jsonl"
    refused = run(
        ["dvc", "repro", "split"], project, check=False, env=project_env() | {PROGRESS_FILE_VARIABLE: str(failing)}
    )
    assert refused.returncode != 0
    [failed] = [e for e in map(json.loads, failing.read_text().splitlines()) if e["event"] == "failed"]
    assert failed["stage"] == "split" and failed["reason"].startswith("data.train_images is 1000000 but"), failed
    assert f"error: {failed['reason']}" in refused.stderr, "the reason a program reads is the line a user reads"
