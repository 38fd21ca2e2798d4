"""Reading one node's detail: the rules of the reference, over the store.

See ../shared/reference/legacy-contract.md. In short: a node that has not run is
READY with its configured name, inputs and outputs; a node that ran shows its
current attempt with the earlier attempts of the current loop as histories; an
older loop shows that loop's final attempt (as FINISHED) with the loop's earlier
attempts as histories.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable

from bksops.tasknode.v1 import task_node_pb2 as pb
from google.protobuf.timestamp_pb2 import Timestamp

from server import convert
from server import errors
from server import values
from server.auth import Principal
from server.cache import DetailCache
from server.convert import Mask
from server.db.nodestore import NodeStore
from server.db.store import AttemptRow
from server.db.store import NodeRow
from server.errors import FieldViolation
from server.query import NodeQuery

#: The plugin version a node without a recorded one runs (the engine's default).
DEFAULT_COMPONENT_VERSION = "legacy"
CURRENT_ATTEMPT = -1
#: The node kinds bk-sops previews before they run; others answer no inputs or outputs.
PREVIEWED_KINDS = frozenset({"ServiceActivity", "SubProcess"})
#: Bytes of hash in an etag: 128 bits, no collision between versions of one node.
ETAG_BYTES = 16
_DETAIL_FIELDS = pb.NodeDetail.DESCRIPTOR.fields_by_name
#: The fields read from the node's heavy columns (JSON text of any size).
_HEAVY_FIELDS = frozenset({"inputs", "outputs", "ex_data"})


class Masker:
    """Replaces configured secret keywords in failure details with ******."""

    def __init__(self, keywords: tuple[str, ...]) -> None:
        # Longest first, so a keyword that contains another is masked whole.
        self.keywords = tuple(sorted({k for k in keywords if k}, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for keyword in self.keywords:
            text = text.replace(keyword, "******")
        return text


def read_node_detail(
    store: NodeStore,
    query: NodeQuery,
    mask: Mask,
    principal: Principal,
    cache: DetailCache | None = None,
) -> pb.NodeDetail:
    """The NodeDetail the query asks for, or the domain error that says why not.

    With a cache, a reply built before is reused while the store's stamp of its
    task is unchanged (server.cache); the caller must not change what it returns.
    """
    authorize(store, query.biz_id, query.by_project_id, principal)
    stamp = store.stamp(query.task_id, query.node_id) if cache is not None else None
    if cache is not None and stamp is not None:
        cached = cache.get(query, stamp)
        if cached is not None:
            return cached
    detail = _build(store, query, mask)
    shown = query.fields
    running_children = tuple(
        (i, _micros(c.start_time))
        for i, c in enumerate(detail.children)
        if c.HasField("start_time") and not c.HasField("finish_time")
    )
    # What grows with the clock is what is sent of a node or child still running.
    running = (
        detail.HasField("start_time")
        and not detail.HasField("finish_time")
        and (shown is None or "elapsed_seconds" in shown)
    )
    if shown is not None:
        detail = _only(detail, shown)
        if "children" not in shown:
            running_children = ()
    detail.etag = _etag(detail, running, [i for i, _ in running_children], shown)
    if cache is not None and stamp is not None:
        cache.put(
            query,
            stamp,
            detail,
            _micros(detail.start_time) if running else None,
            running_children,
        )
    return detail


def _only(detail: pb.NodeDetail, fields: frozenset[str]) -> pb.NodeDetail:
    """A NodeDetail holding only these fields of detail, with their presence kept."""
    part = pb.NodeDetail()
    for name in fields:
        field = _DETAIL_FIELDS[name]
        if field.is_repeated:
            getattr(part, name).extend(getattr(detail, name))
        elif field.has_presence:
            if detail.HasField(name):
                if field.message_type is not None:
                    getattr(part, name).CopyFrom(getattr(detail, name))
                else:
                    setattr(part, name, getattr(detail, name))
        else:
            setattr(part, name, getattr(detail, name))
    return part


def _etag(
    detail: pb.NodeDetail,
    running: bool,
    running_children: list[int],
    fields: frozenset[str] | None = None,
) -> str:
    """The entity tag of detail (whose etag is not set yet): a hash of its deterministic
    serialization, so equal content has one tag in every process and across restarts.

    A partial reply (fields, from read_mask) hashes the names of its fields too: its
    tag then differs from the full reply's, and from another mask's, even where the
    bytes sent happen to be equal, so a 304 for one mask never vouches for another.

    The elapsed seconds of whatever still runs are a function of the clock, not of the
    content, and a cached reply refreshes them (server.cache) without a new tag: they
    are left out of the hash, and the tag is weak (RFC 9110: equivalent, not identical).
    """
    kept = detail.elapsed_seconds, [detail.children[i].elapsed_seconds for i in running_children]
    if running:
        detail.elapsed_seconds = 0
    for i in running_children:
        detail.children[i].elapsed_seconds = 0
    hashed = hashlib.blake2b(detail.SerializeToString(deterministic=True), digest_size=ETAG_BYTES)
    if fields is not None:
        hashed.update(b"\x00read_mask:" + ",".join(sorted(fields)).encode())
    digest = hashed.hexdigest()
    detail.elapsed_seconds = kept[0]
    for i, seconds in zip(running_children, kept[1], strict=True):
        detail.children[i].elapsed_seconds = seconds
    weak = running or bool(running_children)
    return f'W/"{digest}"' if weak else f'"{digest}"'


def _micros(moment: Timestamp) -> int:
    return moment.seconds * convert.MICROS + moment.nanos // 1000


def _build(store: NodeStore, query: NodeQuery, mask: Mask) -> pb.NodeDetail:
    """The detail, with what query.fields leaves out neither read nor built (the
    fields that cost nothing to fill may be set anyway: _only drops them)."""
    shown = query.fields

    def wants(name: str) -> bool:
        return shown is None or name in shown

    heavy = shown is None or not shown.isdisjoint(_HEAVY_FIELDS)
    node = store.find_node(
        query.biz_id, query.by_project_id, query.task_id, query.node_id, heavy=heavy
    )
    check_stack(node, query.subprocess_stack)
    schema = None
    if query.component_code:  # read even when outputs are not: the errors stay the same
        version = node.component_version or DEFAULT_COMPONENT_VERSION
        schema = store.output_schema(query.component_code, version)
    now = time.time_ns() // 1000
    if node.state is None:
        return _not_run(node, schema, wants)

    detail = pb.NodeDetail(
        id=node.node_id,
        name=node.name,
        name_null=node.name_null,
        root_pipeline_id=node.root_id,
        executed=True,
        retry=node.retry,
        error_ignorable=node.error_ignored,
        error_ignored=node.error_ignored,
        component_code=node.component_code,
        subprocess_stack=node.path,
    )
    if query.loop is None or query.loop >= node.loop:
        attempts = (
            store.attempts(node.task_id, node.node_id, node.loop) if wants("histories") else []
        )
        _show_current(detail, node, now)
        inputs, outputs, ex_data = node.inputs, node.outputs, node.ex_data
    else:
        attempts = store.attempts(node.task_id, node.node_id, query.loop)
        if not attempts:
            raise errors.LoopNotFound(
                f"node {node.node_id} has no record of loop {query.loop}; "
                f"its current loop is {node.loop}",
                {"nodeId": node.node_id, "loop": str(query.loop), "currentLoop": str(node.loop)},
            )
        final = attempts.pop()
        _show_final(detail, final, now)
        inputs, outputs, ex_data = final.inputs, final.outputs, final.ex_data

    if wants("histories"):
        if query.max_histories is not None:
            attempts = (
                attempts[len(attempts) - query.max_histories :] if query.max_histories else []
            )
        detail.histories.extend(convert.attempt(a, node.node_id, mask, now) for a in attempts)
    if node.kind == "SubProcess" and wants("children"):
        detail.children.extend(
            convert.child(c, now) for c in store.children(node.task_id, node.node_id)
        )
    if wants("inputs"):
        detail.inputs.CopyFrom(values.object_message(values.loads(inputs)))
    if wants("outputs"):
        raw = values.loads(outputs)
        # null: the engine keeps no execution data for the node (an event, a gateway, a
        # node paused before it ran), and bk-sops answers no table, component_code or not.
        if raw is not None:
            detail.outputs.extend(_renamed(convert.outputs(raw, schema), node))
    shown_ex_data = convert.ex_data(ex_data, mask) if wants("ex_data") else None
    if shown_ex_data is not None:
        detail.ex_data = shown_ex_data
    return detail


def authorize(store: NodeStore, biz_id: int, by_project_id: bool, principal: Principal) -> None:
    """PermissionDenied unless the caller may read the business, decided before any lookup
    of the task or node, so the answer does not depend on whether they exist."""
    if not by_project_id:
        principal.require(biz_id, biz_id)
    elif principal.businesses is not None:
        principal.require(store.business_of_project(biz_id), biz_id)


def _show_current(detail: pb.NodeDetail, node: NodeRow, now: int) -> None:
    detail.state = convert.state(node.state or "READY")
    detail.loop = node.loop
    detail.skip = node.skip
    detail.version = node.version
    detail.history_id = CURRENT_ATTEMPT
    _set_times(detail, node.started_at, node.finished_at, now)


def _show_final(detail: pb.NodeDetail, final: AttemptRow, now: int) -> None:
    # The reference forces FINISHED: a loop that was left behind had finished.
    detail.state = pb.NODE_STATE_FINISHED
    detail.loop = final.loop
    detail.skip = final.skip
    detail.version = final.version
    detail.history_id = final.id
    _set_times(detail, final.started_at, final.finished_at, now)


def _set_times(detail: pb.NodeDetail, started: int | None, finished: int | None, now: int) -> None:
    start, finish = convert.timestamp(started), convert.timestamp(finished)
    if start is not None:
        detail.start_time.CopyFrom(start)
    if finish is not None:
        detail.finish_time.CopyFrom(finish)
    detail.elapsed_seconds = convert.elapsed_seconds(started, finished, now)


def _not_run(
    node: NodeRow, schema: list[tuple[str, str]] | None, wants: Callable[[str], bool]
) -> pb.NodeDetail:
    detail = pb.NodeDetail(
        id=node.node_id,
        name=node.name,
        name_null=node.name_null,
        state=pb.NODE_STATE_READY,
        executed=False,
        error_ignorable=node.error_ignorable,
        component_code=node.component_code,
        subprocess_stack=node.path,
        ex_data="",
    )
    if wants("inputs"):
        detail.inputs.CopyFrom(values.object_message(values.loads(node.inputs)))
    # bk-sops answers events and gateways that have not run with no table at all.
    if wants("outputs") and node.kind in PREVIEWED_KINDS:
        raw = values.loads(node.outputs)
        if raw is not None:
            detail.outputs.extend(_renamed(convert.outputs(raw, schema), node))
    return detail


def _renamed(table: list[pb.NodeOutput], node: NodeRow) -> list[pb.NodeOutput]:
    """table with each output a root constant takes from the node under the constant's key;
    its name and place stay."""
    for key, shown in node.renamed:
        for row in table:
            if row.key == key:
                row.key = shown
    return table


def check_stack(node: NodeRow, given: tuple[str, ...]) -> None:
    """The request's subprocess_stack must be the node's path in the stored tree."""
    if given == node.path:
        return
    if node.path:
        expected = (
            f"node {node.node_id} is inside sub-process {node.path[-1]}: "
            f"subprocess_stack must be {json.dumps(list(node.path))}"
        )
    else:
        expected = f"node {node.node_id} is at the task's root: subprocess_stack must be empty"
    raise errors.SubprocessStackMismatch(
        expected,
        {
            "nodeId": node.node_id,
            "expectedParent": node.path[-1] if node.path else "",
            "expectedStack": ",".join(node.path),
        },
        [FieldViolation("subprocess_stack", expected)],
    )
