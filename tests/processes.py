"""Running `python -m server ...` as a real process in tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable


def start_server(
    args: list[str],
    env: dict[str, str],
    ready: re.Pattern[str],
    preexec_fn: Callable[[], None] | None = None,
) -> tuple[subprocess.Popen[str], re.Match[str]]:
    """Start python -m server <args> with env added to ours (and preexec_fn run in the
    child before it starts), and read its output until a line matches ready: (the
    process, that match). The caller stops it and closes stdout."""
    process = subprocess.Popen(
        [sys.executable, "-m", "server", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=preexec_fn,
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        found = ready.search(line)
        if found:
            return process, found
    process.wait(10)
    process.stdout.close()
    raise AssertionError("".join(lines))
