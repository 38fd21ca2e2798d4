"""Reading the engine's pickled execution data without running code from the database.

bamboo-engine stores inputs and outputs that json.dumps refuses (datetimes, Decimal,
UUID) as base64 of a pickle of a FancyDict (pipeline.utils.collections' in execution
data, bamboo_engine.utils.collections' in history rows). A pickle
names any callable it likes and calls it while loading, so a plain pickle.loads
would run whatever the row's writer chose. Loading here resolves only the names on
an allow-list; any other name fails the load before anything is called.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import decimal
import io
import pickle
import uuid
from typing import Any

from server.values import JSON


class Refused(ValueError):
    """The pickle names something off the allow-list, or is not a pickle; says what."""


class _FancyDict(dict[str, Any]):
    """bamboo's FancyDict (a dict with attribute access), read as the plain dict it is."""


#: (module, name) -> what the name means here: the only globals a pickle may load.
ALLOWED: dict[tuple[str, str], Any] = {
    ("pipeline.utils.collections", "FancyDict"): _FancyDict,
    # History rows are written by bamboo_engine's own copy of the class.
    ("bamboo_engine.utils.collections", "FancyDict"): _FancyDict,
    ("datetime", "datetime"): datetime.datetime,
    ("datetime", "date"): datetime.date,
    ("datetime", "time"): datetime.time,
    ("datetime", "timedelta"): datetime.timedelta,
    ("datetime", "timezone"): datetime.timezone,
    ("decimal", "Decimal"): decimal.Decimal,
    ("uuid", "UUID"): uuid.UUID,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = ALLOWED.get((module, name))
        if found is None:
            raise Refused(f"a pickle may not load {module}.{name}")
        return found


def loads_base64(text: str) -> Any:
    """The value in text (base64 of a pickle), loading only allowed names; Refused if not."""
    try:
        data = base64.b64decode(text.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise Refused(f"not base64 of a pickle ({exc})") from None
    try:
        return _AllowListUnpickler(io.BytesIO(data)).load()
    except Refused:
        raise
    except Exception as exc:  # a truncated or corrupt pickle: what failed, never its bytes
        raise Refused(f"not a readable pickle ({type(exc).__name__})") from None


def plain(value: Any) -> JSON:
    """value as JSON, written as Django's JSON encoder (bk-sops's responses) writes the
    types the engine pickles: datetimes and times in ISO 8601 (milliseconds, "Z" for
    UTC), dates in ISO, Decimal and UUID as strings; tuples and sets as lists."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(item) for item in value]
    if isinstance(value, datetime.datetime):
        text = value.isoformat()
        if value.microsecond:
            text = text[:23] + text[26:]
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, datetime.time):
        text = value.isoformat()
        return text[:12] if value.microsecond else text
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise Refused(f"a pickle holds a {type(value).__name__}, which has no JSON form")
