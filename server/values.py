"""Exact JSON values: validation, storage text, and the JsonValue message.

Stored values are JSON text written by ``dumps`` and read by ``loads``. Python's
json module already keeps what matters: ints stay ints of any size, floats are
written with repr (so they read back bit for bit), and dicts keep key order.
What it allows and JSON or our contract does not (NaN, infinities, integers
outside int64, non-string keys) is refused by ``check``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from bksops.tasknode.v1 import json_value_pb2 as pb

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
#: Deepest nesting accepted, below protobuf's own recursion limit of 100.
MAX_DEPTH = 64

JSON = Any  # None | bool | int | float | str | list[JSON] | dict[str, JSON]


class ValueProblem(ValueError):
    """A value that cannot be stored exactly; the message says where and why."""


def check(value: JSON, where: str = "value", depth: int = 0) -> None:
    """Raise ValueProblem unless value is plain JSON that round-trips exactly."""
    if depth > MAX_DEPTH:
        raise ValueProblem(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise ValueProblem(f"{where}: integer {value} is outside the signed 64-bit range")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueProblem(f"{where}: {value} is not a finite number")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            check(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueProblem(f"{where}: key {key!r} is not a string")
            check(item, f"{where}.{key}", depth + 1)
        return
    raise ValueProblem(f"{where}: {type(value).__name__} is not a JSON value")


def dumps(value: JSON) -> str:
    """The storage text of a checked value."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def loads(text: str) -> JSON:
    """Read storage text (or any JSON text) back, refusing NaN and infinities."""
    return json.loads(text, parse_constant=_refuse_constant)


def _refuse_constant(name: str) -> float:
    raise ValueProblem(f"{name} is not a JSON number")


def spec(value: JSON) -> dict[str, Any]:
    """The JsonValue of a checked value, as the dict its constructor takes.

    Building nested dicts in Python and letting protobuf's C code make the messages
    in one constructor call is about twice as fast as making each message here.
    """
    kind = type(value)
    if kind is str:
        return {"string_value": value}
    if kind is int:
        return {"int_value": value}
    if kind is bool:
        return {"bool_value": value}
    if kind is float:
        return {"double_value": value}
    if value is None:
        return {"null_value": 0}
    if kind is list:
        return {"list_value": {"values": [spec(item) for item in value]}}
    return {"object_value": object_spec(value)}


def object_spec(value: dict[str, JSON]) -> dict[str, Any]:
    """The JsonObject of a checked dict, keys in its order, as constructor arguments."""
    return {"fields": [{"key": key, "value": spec(item)} for key, item in value.items()]}


def to_message(value: JSON) -> pb.JsonValue:
    """The JsonValue for a checked Python value."""
    return pb.JsonValue(**spec(value))


def object_message(value: dict[str, JSON]) -> pb.JsonObject:
    """The JsonObject for a checked dict, keys in the dict's order."""
    return pb.JsonObject(**object_spec(value))


def from_message(message: pb.JsonValue) -> JSON:
    """The Python value of a JsonValue; an unset kind reads as null."""
    kind = message.WhichOneof("kind")
    if kind == "list_value":
        return [from_message(v) for v in message.list_value.values]
    if kind == "object_value":
        return object_from_message(message.object_value)
    if kind is None or kind == "null_value":
        return None
    return getattr(message, kind)


def object_from_message(message: pb.JsonObject) -> dict[str, JSON]:
    """The dict of a JsonObject, keys in message order."""
    return {f.key: from_message(f.value) for f in message.fields}
