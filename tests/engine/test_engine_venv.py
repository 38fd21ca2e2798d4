"""The engine's virtualenv: the pinned engine on Python 3.11, built once; the service's has none."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

from tests.engine.harness import REQUIREMENTS
from tests.engine.harness import engine_python
from tests.engine.harness import venv_dir


def test_the_engine_venv_holds_the_pinned_engine_on_python_3_11(engine_venv: Path) -> None:
    script = (
        "import sys, importlib.metadata as m;"
        " print('%d.%d' % sys.version_info[:2],"
        " *(m.version(p) for p in ('bamboo-pipeline', 'bamboo-engine', 'Django')))"
    )
    done = subprocess.run(
        [str(engine_venv), "-c", script], capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["3.11", "4.0.6", "3.0.7", "4.2.30"]
    assert "bamboo-pipeline==4.0.6" in REQUIREMENTS.read_text().splitlines()


def test_a_built_venv_is_reused_as_it_is(engine_venv: Path) -> None:
    marker = venv_dir() / ".installed"
    before = marker.stat().st_mtime_ns
    assert engine_python() == engine_venv
    assert marker.stat().st_mtime_ns == before


def test_the_service_venv_has_no_django() -> None:
    assert importlib.util.find_spec("django") is None
    assert importlib.util.find_spec("bamboo_engine") is None
