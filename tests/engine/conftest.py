"""Fixtures: the real engine's virtualenv, and a database per store that it has run pipelines in."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import STORES
from tests.conftest import fresh_database
from tests.engine.harness import engine_python
from tests.engine.harness import run_pipelines


@dataclass(frozen=True)
class EngineDatabase:
    """A database the real engine wrote, and the manifest of what it ran there."""

    store: str
    url: str
    manifest: dict[str, Any]


@pytest.fixture(scope="session")
def engine_venv() -> Path:
    """The engine venv's python; the first session on a machine builds it (~25 s)."""
    return engine_python()


@pytest.fixture(scope="session", params=STORES)
def engine_database(
    request: pytest.FixtureRequest, engine_venv: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EngineDatabase]:
    """A database on each store after the engine ran tests/engine/run_pipelines.py in it.

    One per store for the whole session (a run takes seconds): tests only read it.
    """
    directory = tmp_path_factory.mktemp(f"engine-{request.param}")
    with fresh_database(request.param, directory) as url:
        yield EngineDatabase(request.param, url, run_pipelines(url, directory))
