"""Durable writes, observed in the system calls a real process makes (strace): the data reaches the
disk before the rename that publishes it, and the rename before the write returns; a folder swap
SIGKILLed between its two renames leaves the previous folder where the next write puts it back."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import atomic
from tests.projects import ROOT

STRACE = shutil.which("strace")
pytestmark = pytest.mark.skipif(STRACE is None, reason="needs strace (Debian: apt install strace)")


def traced(code: str, *strace_options: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `code` in a fresh Python under strace; its result and the fsync and rename calls it made,
    file descriptors shown as the paths they are open on."""
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"strace-{os.getpid()}-{abs(hash(code))}.log"
    env = os.environ | {"PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}  # no .pyc renames in the trace
    try:
        result = subprocess.run(
            [
                STRACE,
                "-f",
                "-y",
                "-o",
                str(log),
                "-e",
                "trace=fsync,rename,renameat,renameat2",
                *strace_options,
                sys.executable,
                "-c",
                code,
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        calls = [line for line in log.read_text().splitlines() if re.search(r"\b(fsync|rename\w*)\(", line)]
    finally:
        log.unlink(missing_ok=True)
    return result, calls


def write_folder(target: Path, content: str) -> str:
    """Code that writes a folder of two files, one in a subfolder, to `target` with atomic_dir."""
    return (
        f"from pathlib import Path\nfrom pipeline import atomic\n"
        f"with atomic.atomic_dir(Path({str(target)!r})) as staging:\n"
        f"    (staging / 'sub').mkdir()\n"
        f"    (staging / 'a.npy').write_text({content!r})\n"
        f"    (staging / 'sub' / 'b.npy').write_text({content!r})\n"
    )


def position(calls: list[str], pattern: str) -> int:
    found = [i for i, call in enumerate(calls) if re.search(pattern, call)]
    assert len(found) == 1, f"{pattern!r} {len(found)} times in:\n" + "\n".join(calls)
    return found[0]


def test_a_file_is_fsynced_before_its_rename_and_its_folder_after(tmp_path):
    target = tmp_path / "metrics" / "train.json"
    result, calls = traced(
        f"from pathlib import Path; from pipeline import atomic; atomic.write_text(Path({str(target)!r}), '{{}}')"
    )
    assert result.returncode == 0, result.stderr
    data = position(calls, rf"fsync\(\d+<{re.escape(str(target.parent))}/\.train\.json\.\w+\.tmp>\)")
    rename = position(calls, rf"rename\w*\(.*\.train\.json\.\w+\.tmp\", .*{re.escape(str(target))}\"")
    folder = position(calls, rf"fsync\(\d+<{re.escape(str(target.parent))}>\)")
    assert data < rename < folder
    assert target.read_text() == "{}"


def test_a_folder_is_fsynced_file_by_file_before_it_replaces_the_previous_one(tmp_path):
    target = tmp_path / "data" / "split"
    exec(write_folder(target, "old"))
    result, calls = traced(write_folder(target, "new"))
    assert result.returncode == 0, result.stderr
    staging = rf"{re.escape(str(target.parent))}/\.split\.\w+\.tmp"
    files = [position(calls, rf"fsync\(\d+<{staging}/{name}>\)") for name in ("a.npy", "sub/b.npy")]
    staged = position(calls, rf"fsync\(\d+<{staging}>\)")
    retire, swap = (
        position(calls, rf"rename\w*\({pattern}")
        for pattern in (
            rf".*{re.escape(str(target))}\", .*\.split\.previous\"",
            rf".*\.split\.\w+\.tmp\", .*{re.escape(str(target))}\"",
        )
    )
    published = position(calls, rf"fsync\(\d+<{re.escape(str(target.parent))}>\)")
    assert max(files) < staged < retire < swap < published
    assert (target / "sub" / "b.npy").read_text() == "new"


def test_a_swap_killed_between_its_renames_leaves_the_previous_folder_and_the_next_write_restores_it(tmp_path):
    target = tmp_path / "data" / "raw"
    exec(write_folder(target, "old"))
    # SIGKILL on entering the swap's second rename (the first moved the old folder aside).
    result, _ = traced(write_folder(target, "new"), "-e", "inject=rename,renameat,renameat2:signal=SIGKILL:when=2")
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not target.exists(), "killed before the new folder took the old one's place"
    assert (target.parent / ".raw.previous" / "sub" / "b.npy").read_text() == "old"

    with pytest.raises(RuntimeError), atomic.atomic_dir(target):  # the next run's write, which fails
        raise RuntimeError("the next run fails too")
    assert (target / "sub" / "b.npy").read_text() == "old", "the previous folder is back, not deleted"
    assert sorted(p.name for p in target.parent.iterdir()) == ["raw"], "nothing else left beside it"

    exec(write_folder(target, "new"))
    assert (target / "a.npy").read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["raw"]
