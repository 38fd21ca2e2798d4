"""ListTaskNodesRequest.filter: the documented subset of AIP-160, parsed into terms.

Comparisons of a node field with a literal, joined with AND (upper case, as AIP-160
writes it). Each term becomes one SQL comparison in the store, so the fields are
the node columns the store can compare: state, component_code, loop, retry and the
two times. Nothing else of AIP-160 (OR, NOT, parentheses, functions, has) is taken.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from datetime import timedelta

from bksops.tasknode.v1 import task_node_pb2 as pb

from server import errors
from server.errors import FieldViolation

#: Longest filter read, and most comparisons in one.
MAX_FILTER_CHARS = 1000
MAX_TERMS = 10
_TERM = re.compile(r"\s*([A-Za-z_]+)\s*(<=|>=|!=|=|<|>)\s*(\"[^\"]*\"|[^\s\"]+)\s*")
_AND = re.compile(r"\s+AND\s+")
_ORDERED = frozenset({"<", "<=", ">", ">="})
#: Engine state names (FAILED), from the contract's NodeState.
_STATES = frozenset(
    name.removeprefix("NODE_STATE_")
    for name in pb.NodeState.keys()  # noqa: SIM118 (an enum wrapper, not a dict)
    if name != "NODE_STATE_UNSPECIFIED"
)
#: Filter field names to the column each compares.
_FIELDS = {
    "state": "state",
    "component_code": "component_code",
    "loop": "loop",
    "retry": "retry",
    "start_time": "started_at",
    "started_at": "started_at",
    "finish_time": "finished_at",
    "finished_at": "finished_at",
}
_INTEGER = re.compile(r"[0-9]{1,9}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Term:
    """One comparison: a node column, an operator, and the value (text or integer;
    times as microseconds since the epoch)."""

    column: str
    op: str
    value: str | int


def parse_filter(text: str) -> tuple[Term, ...]:
    """The terms of a filter ("" has none); InvalidArgument naming what is wrong."""
    if not text.strip():
        return ()
    if len(text) > MAX_FILTER_CHARS:
        raise _bad(f"filter is longer than {MAX_FILTER_CHARS} characters")
    parts = _AND.split(text.strip())
    if len(parts) > MAX_TERMS:
        raise _bad(f"filter joins more than {MAX_TERMS} comparisons")
    return tuple(_term(part) for part in parts)


def _term(part: str) -> Term:
    match = _TERM.fullmatch(part)
    if match is None:
        raise _bad(
            f"cannot read {part[:60]!r}: a filter is comparisons such as state = FAILED "
            "or loop > 1, joined with AND"
        )
    name, op, raw = match.groups()
    column = _FIELDS.get(name)
    if column is None:
        raise _bad(
            f"{name[:40]!r} cannot be filtered on; the fields are state, component_code, "
            "loop, retry, start_time and finish_time"
        )
    quoted = raw.startswith('"')
    literal = raw[1:-1] if quoted else raw
    if column in ("state", "component_code") and op in _ORDERED:
        raise _bad(f"{name} takes = or != only, not {op}")
    if column == "state":
        state = literal.removeprefix("NODE_STATE_")
        if state not in _STATES:
            raise _bad(f"{literal[:40]!r} is not a NodeState name (such as FAILED)")
        return Term(column, op, state)
    if column == "component_code":
        if not quoted:
            raise _bad(f'component_code takes a quoted string, such as "{literal[:40]}"')
        return Term(column, op, literal)
    if column in ("loop", "retry"):
        if quoted or not _INTEGER.fullmatch(literal):
            raise _bad(f"{name} takes a whole number, not {raw[:40]}")
        return Term(column, op, int(literal))
    if not quoted:
        raise _bad(f'{name} takes a quoted RFC 3339 time, such as "2024-01-01T00:00:00Z"')
    return Term(column, op, _micros(name, literal))


def _micros(name: str, literal: str) -> int:
    try:
        moment = datetime.fromisoformat(literal.replace("z", "Z"))
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None or "T" not in literal.upper():
        raise _bad(f"{name} takes an RFC 3339 time with its offset, not {literal[:40]!r}")
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _bad(problem: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(
        problem, {"fields": "filter"}, [FieldViolation("filter", problem)]
    )
