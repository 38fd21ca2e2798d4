"""The engine's pickled execution data is read with an allow-list and runs no code."""

from __future__ import annotations

import base64
import datetime
import decimal
import os
import pickle
import sys
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.db import pickles


class _Touch:
    """Unpickled with plain pickle.loads, creates the file at path."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


class _Shell:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


def _encoded(value: Any) -> str:
    return base64.b64encode(pickle.dumps(value, protocol=4)).decode()


@pytest.mark.parametrize("evil", [_Touch, _Shell])
def test_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path, evil: type) -> None:
    target = tmp_path / "pwned"
    text = _encoded({"outputs": evil(target)})
    with pytest.raises(pickles.Refused, match="may not load"):
        pickles.loads_base64(text)
    assert not target.exists()
    made = pickle.loads(base64.b64decode(text))["outputs"]  # loaded plainly, they do create it
    if hasattr(made, "close"):
        made.close()
    assert target.exists()


@pytest.fixture
def fancy_dict() -> Iterator[type]:
    """A class pickled under bamboo's FancyDict name, as the engine writes it."""
    saved = {name: sys.modules.get(name) for name in ("pipeline", "pipeline.utils")}
    module = types.ModuleType("pipeline.utils.collections")

    class FancyDict(dict[str, Any]):
        pass

    FancyDict.__module__ = module.__name__
    FancyDict.__qualname__ = "FancyDict"
    module.FancyDict = FancyDict  # type: ignore[attr-defined]
    sys.modules.setdefault("pipeline", types.ModuleType("pipeline"))
    sys.modules.setdefault("pipeline.utils", types.ModuleType("pipeline.utils"))
    sys.modules[module.__name__] = module
    yield FancyDict
    del sys.modules[module.__name__]
    for name, old in saved.items():
        if old is None:
            sys.modules.pop(name, None)


def test_allowed_values_read_as_django_writes_them(fancy_dict: type) -> None:
    data = fancy_dict(
        when=datetime.datetime(2024, 5, 17, 8, 30, 15, 123456, tzinfo=datetime.UTC),
        naive=datetime.datetime(2024, 5, 17, 8, 30, 15),
        day=datetime.date(2024, 5, 17),
        at=datetime.time(8, 30, 15),
        amount=decimal.Decimal("12.50"),
        ident=uuid.UUID("12345678-1234-5678-1234-567812345678"),
        many=(1, [2.5, None, True]),
    )
    loaded = pickles.loads_base64(_encoded(data))
    assert pickles.plain(loaded) == {
        "when": "2024-05-17T08:30:15.123Z",
        "naive": "2024-05-17T08:30:15",
        "day": "2024-05-17",
        "at": "08:30:15",
        "amount": "12.50",
        "ident": "12345678-1234-5678-1234-567812345678",
        "many": [1, [2.5, None, True]],
    }


@pytest.mark.parametrize("text", ["not base64 at all!", base64.b64encode(b"\x80\x04junk").decode()])
def test_what_is_not_a_pickle_is_refused_without_its_bytes(text: str) -> None:
    with pytest.raises(pickles.Refused) as refused:
        pickles.loads_base64(text)
    assert "junk" not in str(refused.value)


def test_a_value_with_no_json_form_is_refused() -> None:
    with pytest.raises(pickles.Refused, match="bytes"):
        pickles.plain(pickles.loads_base64(_encoded({"raw": b"\x00"})))
