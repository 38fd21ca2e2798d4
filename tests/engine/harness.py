"""The real bk-sops engine for tests: its virtualenv, and a run of real pipelines into a database.

The virtualenv is built on first use under .build/, then reused.

bamboo-pipeline pulls Django, Celery and more, and declares Python 3.11 only, so it gets a
virtualenv of its own and the service's .venv never imports it. The directory is named after a
hash of tests/engine/requirements.txt, so editing the pins builds a fresh one and an unchanged
file costs one stat. A lock file keeps concurrent test processes from building it twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote
from urllib.parse import urlsplit

from peewee import Database
from peewee import SqliteDatabase

from server.db.connection import open_database

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements.txt"
RUNNER = HERE / "run_pipelines.py"
ROOT = HERE.parents[1]
VENVS = ROOT / ".build" / "engine-venv"

#: The interpreter the engine venv is made from; bamboo-pipeline 4.0.6 requires >=3.11,<3.12.
ENGINE_PYTHON = os.environ.get("TASKNODE_ENGINE_PYTHON", "python3.11")


class EngineError(RuntimeError):
    """The engine's virtualenv could not be built, or a run failed; the message says why."""


def venv_dir() -> Path:
    """Where the venv for the current requirements file lives."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:16]
    return VENVS / digest


def open_reader(database_url: str) -> Database:
    """A peewee database that reads database_url and never writes to it.

    The service's open_database() sets SQLite's journal_mode to WAL on connecting: a write to
    the file, which also needs its exclusive lock, so it fails ("database is locked") while the
    engine writes. SQLite is opened read-only here (mode=ro) with only a busy timeout; the
    servers are read through the service's own open_database().
    """
    parts = urlsplit(database_url)
    if parts.scheme != "sqlite":
        return open_database(database_url)
    path = unquote(parts.path[1:])
    return SqliteDatabase(
        f"file:{path}?mode=ro", uri=True, pragmas={"busy_timeout": 10_000}, autoconnect=False
    )


def engine_python() -> Path:
    """The engine venv's interpreter, building the venv first when it is missing or partial."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    if marker.exists():
        return python
    VENVS.mkdir(parents=True, exist_ok=True)
    with (VENVS / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return python
        _build(venv)
        marker.touch()
    for stale in VENVS.iterdir():
        if stale.is_dir() and stale != venv:
            shutil.rmtree(stale, ignore_errors=True)
    return python


def _build(venv: Path) -> None:
    base = shutil.which(ENGINE_PYTHON)
    if base is None:
        raise EngineError(
            f"{ENGINE_PYTHON} not found on PATH: the engine needs Python 3.11"
            " (set TASKNODE_ENGINE_PYTHON to its path)"
        )
    shutil.rmtree(venv, ignore_errors=True)
    _run([base, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "install", "-r", str(REQUIREMENTS)])


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise EngineError(
            f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )


def engine_schema(database_url: str, directory: Path) -> None:
    """Creates the engine's tables (its own migrations) and bk-sops's two in database_url, an
    empty database, running no pipeline: for server.db.bksops_scale to fill."""
    run_pipelines(database_url, directory, "--schema-only")


def run_pipelines(database_url: str, directory: Path, *options: str) -> dict[str, Any]:
    """Runs tests/engine/run_pipelines.py in the engine venv against database_url (an empty
    database of the kinds tests/conftest.py makes) and returns its manifest.

    The engine's own chatter goes to directory/engine.log, named in the error if the run fails.
    """
    python = engine_python()
    manifest = directory / "manifest.json"
    log = directory / "engine.log"
    with log.open("w") as out:
        done = subprocess.run(
            [str(python), str(RUNNER), database_url, str(manifest), *options],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=300,
            check=False,
        )
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise EngineError(f"run_pipelines.py exited {done.returncode} (log {log}):\n{tail}")
    result: dict[str, Any] = json.loads(manifest.read_text())
    return result


@contextmanager
def writing_pipelines(
    database_url: str,
    directory: Path,
    loop_passes: int,
    only_loop: bool = True,
    poll_passes: int = 0,
    poll_pause: float = 0.2,
) -> Iterator[tuple[dict[str, Any], subprocess.Popen[bytes]]]:
    """Runs a `long_loop` of loop_passes passes (at most 100: the engine fails a node re-entered
    more often), then, given poll_passes, a `long_poll` whose node stays RUNNING through that
    many schedules poll_pause seconds apart (each rewriting its outputs), after the other
    pipelines unless only_loop, yielding the manifest as soon as the first of them is announced
    and the engine's process while it still writes; on leaving, waits for it to end cleanly."""
    python = engine_python()
    manifest = directory / "manifest.json"
    log = directory / "engine.log"
    command = [str(python), str(RUNNER), database_url, str(manifest)]
    polling = ["--poll-passes", str(poll_passes), "--poll-pause", str(poll_pause)]
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                *command,
                "--loop-passes",
                str(loop_passes),
                *(polling if poll_passes else []),
                *(["--only-loop"] if only_loop else []),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        while not manifest.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if not manifest.exists():
            raise EngineError(f"run_pipelines.py announced no loop (log {log})")
        yield json.loads(manifest.read_text()), process
        if process.wait(timeout=300) != 0:
            tail = log.read_text(errors="replace")[-4000:]
            raise EngineError(f"run_pipelines.py exited {process.returncode}:\n{tail}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def main(argv: list[str]) -> int:
    """`python -m tests.engine.harness [DATABASE_URL]`: build the venv and print its python, or
    run the pipelines into DATABASE_URL (an empty database) and print the manifest."""
    if len(argv) == 1:
        print(engine_python())
        return 0
    directory = Path(tempfile.mkdtemp(prefix="engine-run-"))
    print(json.dumps(run_pipelines(argv[1], directory), indent=2, sort_keys=True))
    print(f"engine log: {directory / 'engine.log'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
