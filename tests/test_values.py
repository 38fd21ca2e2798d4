"""Exact JSON values: storage text and JsonValue messages round-trip every kind."""

from __future__ import annotations

import math

import pytest
from bksops.tasknode.v1 import json_value_pb2 as pb
from google.protobuf import json_format

from server import values

KINDS = {
    "int": 407584,
    "negative int": -12,
    "int beyond 2^53": 2**53 + 1,
    "int64 max": 2**63 - 1,
    "int64 min": -(2**63),
    "float": 0.375,
    "float that looks whole": 407584.0,
    "tiny float": 5e-324,
    "true": True,
    "false": False,
    "string": "echo 0\nexit 0",
    "unicode": "执行结果 ✓ \u0000 \U0001f600",
    "empty string": "",
    "null": None,
    "list": [1, 2.5, "x", None, [True], {}],
    "empty list": [],
    "object keeps key order": {"z": 1, "a": {"y": [1, {"b": 2, "a": 1}], "x": None}, "m": 0.5},
    "empty object": {},
    # What bk-sops's engine stores and Python's json writes: kept, not refused.
    "int beyond 64 bits": 2**70,
    "negative int beyond 64 bits": -(2**64) - 7,
    "infinity": math.inf,
    "negative infinity": -math.inf,
    "nan": math.nan,
}


def same(a: object, b: object) -> bool:
    """Equal, and of the same types all the way down (so 1 != 1.0 != True), keys in order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        assert isinstance(b, dict)
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        assert isinstance(b, list)
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)  # type: ignore[arg-type]
    return a == b


@pytest.mark.parametrize("value", KINDS.values(), ids=KINDS.keys())
def test_storage_text_round_trips(value: object) -> None:
    values.check(value)
    assert same(values.loads(values.dumps(value)), value)


@pytest.mark.parametrize("value", KINDS.values(), ids=KINDS.keys())
def test_message_round_trips(value: object) -> None:
    message = values.to_message(value)
    assert same(values.from_message(message), value)
    wire = pb.JsonValue.FromString(message.SerializeToString())
    assert same(values.from_message(wire), value)
    parsed = json_format.Parse(json_format.MessageToJson(message), pb.JsonValue())
    assert same(values.from_message(parsed), value)


def test_integers_and_floats_are_different_kinds() -> None:
    assert values.to_message(1).WhichOneof("kind") == "int_value"
    assert values.to_message(1.0).WhichOneof("kind") == "double_value"
    assert values.to_message(True).WhichOneof("kind") == "bool_value"
    assert values.dumps(1.0) == "1.0"
    assert values.dumps(2**53 + 1) == "9007199254740993"


def test_a_megabyte_value_round_trips() -> None:
    big = {"log": "x" * 1_000_000, "lines": list(range(1000))}
    assert same(values.loads(values.dumps(big)), big)
    assert same(values.from_message(values.to_message(big)), big)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({1: "x"}, "is not a string"),
        ("a \ud800 b", "is not valid Unicode text"),
        ({"\udfff": 1}, "is not valid Unicode text"),
        ({"a": (1, 2)}, "tuple is not a JSON value"),
    ],
)
def test_values_that_cannot_be_exact_are_refused(value: object, problem: str) -> None:
    with pytest.raises(values.ValueProblem, match=problem):
        values.check(value)


def test_problems_name_where_they_are() -> None:
    with pytest.raises(values.ValueProblem, match=r"outputs\.detail\.rows\[2\]"):
        values.check({"detail": {"rows": [1, 2, "\ud83d"]}}, "outputs")


def test_nesting_is_bounded() -> None:
    deep: object = 1
    for _ in range(values.MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(values.ValueProblem, match="nested deeper"):
        values.check(deep)


def test_request_text_refuses_what_storage_text_keeps() -> None:
    """Storage text keeps NaN, infinities and big integers as Python's json writes them
    (bk-sops sends them so); a request body is plain JSON."""
    assert values.dumps([math.inf, 2**70]) == "[Infinity,1180591620717411303424]"
    assert math.isnan(values.loads('{"a": NaN}')["a"])
    with pytest.raises(values.ValueProblem):
        values.strict_loads('{"a": NaN}')


def test_big_integers_travel_as_their_digits() -> None:
    message = values.to_message(-(2**64) - 7)
    assert message.WhichOneof("kind") == "big_int_value"
    assert message.big_int_value == str(-(2**64) - 7)
    assert values.to_message(2**63 - 1).WhichOneof("kind") == "int_value"
