"""Rows to messages: one function per message, and the small rules they share."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import cast

from bksops.tasknode.v1 import task_node_pb2 as pb
from google.protobuf.timestamp_pb2 import Timestamp

from server import values
from server.db.store import AttemptRow
from server.db.store import ChildRow

Mask = Callable[[str], str]

MICROS = 1_000_000
#: The state an attempt with no stored state ended in: it was retried, so it failed.
DEFAULT_ATTEMPT_STATE = "FAILED"


def state(name: str) -> pb.NodeState:
    """The NodeState for an engine state name (FINISHED -> NODE_STATE_FINISHED)."""
    return cast(pb.NodeState, pb.NodeState.Value("NODE_STATE_" + name))


def timestamp(micros: int | None) -> Timestamp | None:
    """The Timestamp for microseconds since the epoch; None stays None."""
    if micros is None:
        return None
    seconds, rest = divmod(micros, MICROS)
    return Timestamp(seconds=seconds, nanos=rest * 1000)


def elapsed_seconds(started: int | None, finished: int | None, now: int) -> int:
    """Whole seconds (rounded) from start to finish, to now while running, 0 if not started."""
    if started is None:
        return 0
    end = now if finished is None else finished
    return max(0, round((end - started) / MICROS))


def attempt(row: AttemptRow, node_id: str, mask: Mask, now: int) -> pb.NodeAttempt:
    """The NodeAttempt for one stored attempt."""
    return pb.NodeAttempt(
        history_id=row.id,
        node_id=node_id,
        loop=row.loop,
        retry=row.retry,
        skip=row.skip,
        version=row.version,
        state=state(row.state or DEFAULT_ATTEMPT_STATE),
        start_time=timestamp(row.started_at),
        finish_time=timestamp(row.finished_at),
        elapsed_seconds=elapsed_seconds(row.started_at, row.finished_at, now),
        inputs=values.object_spec(values.loads(row.inputs)),
        outputs=values.object_spec(values.loads(row.outputs)),
        ex_data=ex_data(row.ex_data, mask),
    )


def child(row: ChildRow, now: int) -> pb.ChildNode:
    """The ChildNode for one child of a sub-process."""
    return pb.ChildNode(
        id=row.node_id,
        name=row.name,
        state=state(row.state),
        start_time=timestamp(row.started_at),
        finish_time=timestamp(row.finished_at),
        elapsed_seconds=elapsed_seconds(row.started_at, row.finished_at, now),
        skip=row.skip,
        retry=row.retry,
        loop=row.loop,
        error_ignored=row.error_ignored,
        version=row.version,
    )


def ex_data(text: str | None, mask: Mask) -> str | None:
    """Stored failure detail, masked; None when there is none."""
    return None if text is None else mask(text)


def outputs(
    raw: dict[str, values.JSON], schema: Sequence[tuple[str, str]] | None
) -> list[pb.NodeOutput]:
    """A node's output table.

    With a schema (component_code given): the declared outputs in declared order,
    ``preset`` and named, "" for those missing; then every other raw output named
    by its key. Without: every raw output, unnamed, in stored order.
    """
    if schema is None:
        return [pb.NodeOutput(key=k, value=values.spec(v)) for k, v in raw.items()]
    table = [
        pb.NodeOutput(key=key, name=name, value=values.spec(raw.get(key, "")), preset=True)
        for key, name in schema
    ]
    declared = {key for key, _ in schema}
    table.extend(
        pb.NodeOutput(key=k, name=k, value=values.spec(v))
        for k, v in raw.items()
        if k not in declared
    )
    return table
