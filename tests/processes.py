"""Running `python -m server ...` as a real process in tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager


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


@contextmanager
def running_server(
    args: list[str],
    env: dict[str, str],
    ready: re.Pattern[str],
    on_line: Callable[[str], None] = lambda line: None,
) -> Iterator[tuple[subprocess.Popen[str], re.Match[str]]]:
    """start_server, then its output handed to on_line on a thread, so that it never
    blocks on a full pipe: (the process, the match of ready). Killed at the end if it
    still runs."""
    process, found = start_server(args, env, ready)
    assert process.stdout is not None
    output = process.stdout

    def read() -> None:
        for line in output:
            on_line(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield process, found
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        reader.join(10)
        output.close()
