"""Long work draws a progress bar when stderr is a terminal, and nothing of it otherwise:
`server load` of an import file and seeding (`make seed-large`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.documents import document
from tests.documents import node
from tests.documents import task

TASKS = 40
NODES = 25
#: A drawn bar: a carriage return (alone: the terminal sends \r\n for a newline), a
#: label, the bar and the share done.
BAR = re.compile(r"\r(?!\n)[^\n]*\[#* *\] +\d+%")
COMMANDS = {
    "load": lambda path: ["-m", "server", "load", str(path)],
    "seed": lambda path: ["-m", "server.db.scale", "--tasks", "3"],
}


def import_file(tmp_path: Path) -> Path:
    """An import file of TASKS tasks of NODES nodes each."""
    tasks = [
        task(1000 + t, *(node(f"node{t:04d}{n:024d}") for n in range(NODES))) for t in range(TASKS)
    ]
    path = tmp_path / "large.json"
    path.write_text(json.dumps(document(*tasks)), encoding="utf-8")
    return path


def run(args: list[str], database_url: str, stderr: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TASKNODE_DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=120,
        check=True,
    )


def on_a_terminal(args: list[str], database_url: str) -> str:
    """What the command writes to stderr when stderr is a pseudo-terminal."""
    leader, follower = os.openpty()
    try:
        run(args, database_url, follower)
        os.close(follower)
        follower = -1
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end is closed and all is read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    return seen.decode("utf-8")


@pytest.mark.parametrize("command", COMMANDS)
def test_long_work_shows_progress_on_a_terminal_only(
    command: str, database_url: str, tmp_path: Path
) -> None:
    args = COMMANDS[command](import_file(tmp_path))
    shown = on_a_terminal(args, database_url)
    assert BAR.search(shown) and "100%" in shown, shown
    unit = f"{TASKS * (1 + NODES):,}/{TASKS * (1 + NODES):,} rows" if command == "load" else "tasks"
    assert unit in shown, shown

    # Again into an empty database, stderr a pipe: the same work, and no bar.
    done = run(args, f"sqlite:///{tmp_path / 'quiet.db'}", subprocess.PIPE)
    assert "written" in done.stdout or "rows/s" in done.stderr, done
    assert "\r" not in done.stderr and "%" not in done.stderr, done.stderr
