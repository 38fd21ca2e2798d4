"""Exact JSON values: validation, storage text, and the JsonValue message.

Stored values are JSON text written by ``dumps`` and read by ``loads``. Python's
json module already keeps what matters: ints stay ints of any size, floats are
written with repr (so they read back bit for bit), and dicts keep key order.
NaN, the infinities and integers beyond 64 bits are kept too, written as Python's
json writes them, because bk-sops's engine stores them and bk-sops sends them so;
the JsonValue message carries them (doubles, and ``big_int_value`` digits).
What neither JSON nor protobuf can hold (non-string keys, lone surrogates, which
no UTF-8 text can encode) is refused by ``check``. Request bodies are read by
``strict_loads``, which refuses the non-standard NaN and Infinity words.
"""

from __future__ import annotations

import json
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
    """Raise ValueProblem unless value is a JSON value (as Python's json writes them)
    that round-trips exactly."""
    if depth > MAX_DEPTH:
        raise ValueProblem(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool | int | float):
        return
    if isinstance(value, str):
        check_text(value, where)
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            check(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueProblem(f"{where}: key {key!r} is not a string")
            check_text(key, f"{where}: key")
            check(item, f"{where}.{key}", depth + 1)
        return
    raise ValueProblem(f"{where}: {type(value).__name__} is not a JSON value")


def check_text(text: str, where: str) -> None:
    """Raise ValueProblem for a str holding half a surrogate pair (JSON's "\\ud800"):
    valid in Python, but no database, protobuf or UTF-8 text can hold it."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueProblem(f"{where}: is not valid Unicode text (a lone surrogate)") from None


def dumps(value: JSON) -> str:
    """The storage text of a checked value (NaN and Infinity as Python's json writes them)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def loads(text: str) -> JSON:
    """Read storage text back: any JSON text, and NaN, Infinity and -Infinity."""
    return json.loads(text)


def strict_loads(text: str) -> JSON:
    """Read standard JSON text (a request body), refusing NaN and infinities."""
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
        if INT64_MIN <= value <= INT64_MAX:
            return {"int_value": value}
        return {"big_int_value": str(value)}
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
    if kind == "big_int_value":
        return int(message.big_int_value)
    return getattr(message, kind)


def object_from_message(message: pb.JsonObject) -> dict[str, JSON]:
    """The dict of a JsonObject, keys in message order."""
    return {f.key: from_message(f.value) for f in message.fields}
