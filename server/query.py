"""Checking a GetTaskNodeDetailRequest and turning it into a NodeQuery."""

from __future__ import annotations

import re
from dataclasses import dataclass

from bksops.tasknode.v1 import task_node_pb2 as pb

from server import errors
from server.errors import FieldViolation
from server.filters import Term
from server.filters import parse_filter

#: Node ids are engine-made ("node" + 28 hex digits); accept any similar token.
NODE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
COMPONENT_CODE = re.compile(r"[A-Za-z0-9_.-]{1,255}")
MAX_STACK_DEPTH = 32
SCOPES = frozenset(pb.Scope.values())
VIEWS = frozenset(pb.NodeView.values())
#: Requests in one BatchGetTaskNodeDetails call (the proto documents the number).
MAX_BATCH = 1000
#: ListTaskNodes page sizes: the default, and the most per page in each view.
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_FULL_PAGE_SIZE = 100
#: The NodeDetail fields of ListTaskNodes' NODE_VIEW_BASIC.
SUMMARY_FIELDS = (
    "id",
    "name",
    "state",
    "executed",
    "start_time",
    "finish_time",
    "loop",
    "retry",
    "component_code",
    "subprocess_stack",
)
#: The names a read_mask may hold: NodeDetail's top-level fields.
DETAIL_FIELDS = frozenset(pb.NodeDetail.DESCRIPTOR.fields_by_name)


@dataclass(frozen=True)
class NodeQuery:
    """A valid request: which node, and how to render it."""

    biz_id: int
    by_project_id: bool
    task_id: int
    node_id: str
    component_code: str
    subprocess_stack: tuple[str, ...]
    loop: int | None
    max_histories: int | None
    #: The NodeDetail fields to return (read_mask); None for all of them.
    fields: frozenset[str] | None = None


@dataclass(frozen=True)
class ListQuery:
    """A valid ListTaskNodesRequest: which nodes, how many, how, and from where."""

    biz_id: int
    by_project_id: bool
    task_id: int
    #: The sub-process whose children to list, as its stack; () for the whole task.
    subprocess_stack: tuple[str, ...]
    terms: tuple[Term, ...]
    full: bool
    page_size: int
    page_token: str
    #: The NodeDetail fields of each full node (read_mask); None for all of them.
    fields: frozenset[str] | None = None


def parse_list_request(request: pb.ListTaskNodesRequest) -> ListQuery:
    """The ListQuery for request; InvalidArgument listing every bad field otherwise
    (the page token is read later, against the query: server.listing)."""
    bad: list[FieldViolation] = []
    biz_id = _decimal_id(request.bk_biz_id, "bk_biz_id", bad)
    task_id = _decimal_id(request.task_id, "task_id", bad)
    stack = _stack(tuple(request.subprocess_stack), bad)
    by_project_id = _by_project_id(request.scope, bad)
    view = request.view
    if view not in VIEWS:
        bad.append(FieldViolation("view", f"view {view} is not a known NodeView"))
    full = view == pb.NODE_VIEW_FULL
    most = MAX_FULL_PAGE_SIZE if full else MAX_PAGE_SIZE
    size = request.page_size
    if size < 0:
        bad.append(FieldViolation("page_size", f"page_size must be 0 or more, not {size}"))
    fields = read_mask(request, bad) if request.HasField("read_mask") else None
    if fields is not None and not full:
        bad.append(
            FieldViolation(
                "read_mask",
                "read_mask applies to view NODE_VIEW_FULL; the summary view's fields are fixed",
            )
        )
    terms: tuple[Term, ...] = ()
    try:
        terms = parse_filter(request.filter)
    except errors.InvalidArgument as exc:
        bad.extend(exc.violations)
    if bad:
        raise _invalid(bad)
    assert biz_id is not None and task_id is not None
    return ListQuery(
        biz_id=biz_id,
        by_project_id=by_project_id,
        task_id=task_id,
        subprocess_stack=stack,
        terms=terms,
        full=full,
        page_size=min(size, most) if size else DEFAULT_PAGE_SIZE,
        page_token=request.page_token,
        fields=fields,
    )


def _by_project_id(scope: int, bad: list[FieldViolation]) -> bool:
    """Whether scope names businesses by project id, after noting in bad an unknown one."""
    if scope not in SCOPES:
        bad.append(FieldViolation("scope", f"scope {scope} is not a known Scope"))
    return scope == pb.SCOPE_PROJECT


def _stack(stack: tuple[str, ...], bad: list[FieldViolation]) -> tuple[str, ...]:
    """stack, after noting in bad what is wrong with it."""
    if len(stack) > MAX_STACK_DEPTH:
        bad.append(
            FieldViolation(
                "subprocess_stack", f"subprocess_stack is deeper than {MAX_STACK_DEPTH} levels"
            )
        )
    for i, parent in enumerate(stack):
        if not NODE_ID.fullmatch(parent):
            bad.append(
                FieldViolation(f"subprocess_stack[{i}]", "each entry must be a sub-process node id")
            )
    return stack


def parse_request(request: pb.GetTaskNodeDetailRequest) -> NodeQuery:
    """The NodeQuery for request; InvalidArgument listing every bad field otherwise.

    Runs on every call: each field is read from the message once.
    """
    bad: list[FieldViolation] = []
    biz_id = _decimal_id(request.bk_biz_id, "bk_biz_id", bad)
    task_id = _decimal_id(request.task_id, "task_id", bad)
    node_id = request.node_id
    if not node_id:
        bad.append(FieldViolation("node_id", "node_id is required"))
    elif not NODE_ID.fullmatch(node_id):
        bad.append(FieldViolation("node_id", "node_id must be 1-64 letters, digits or _.:-"))
    component_code = request.component_code
    if component_code and not COMPONENT_CODE.fullmatch(component_code):
        bad.append(
            FieldViolation("component_code", "component_code must be letters, digits or _.-")
        )
    stack = _stack(tuple(request.subprocess_stack), bad)
    loop = request.loop if request.HasField("loop") else None
    if loop is not None and loop < 1:
        bad.append(FieldViolation("loop", f"loop must be a positive integer, not {loop}"))
    max_histories = request.max_histories if request.HasField("max_histories") else None
    if max_histories is not None and max_histories < 0:
        bad.append(FieldViolation("max_histories", "max_histories must be 0 or more"))
    by_project_id = _by_project_id(request.scope, bad)
    fields = read_mask(request, bad) if request.HasField("read_mask") else None
    if bad:
        raise _invalid(bad)
    assert biz_id is not None and task_id is not None
    return NodeQuery(
        biz_id=biz_id,
        by_project_id=by_project_id,
        task_id=task_id,
        node_id=node_id,
        component_code=component_code,
        subprocess_stack=stack,
        loop=loop,
        max_histories=max_histories,
        fields=fields,
    )


def read_mask(
    request: pb.GetTaskNodeDetailRequest | pb.ListTaskNodesRequest, bad: list[FieldViolation]
) -> frozenset[str] | None:
    """The fields request.read_mask names; None when it asks for all (empty, or "*").

    Only NodeDetail's top-level fields may be named: they are what the reply is built
    in parts of, and a nested path would trim inside a part already built.
    """
    paths = request.read_mask.paths
    if not paths or list(paths) == ["*"]:
        return None
    fields: set[str] = set()
    for i, path in enumerate(paths):
        if path in DETAIL_FIELDS:
            fields.add(path)
            continue
        if path == "*":
            problem = '"*" must be the only path of read_mask'
        elif "." in path and path.split(".")[0] in DETAIL_FIELDS:
            problem = f"read_mask path {path[:64]!r} is nested; name top-level fields only"
        else:
            problem = f"read_mask path {path[:64]!r} is no field of NodeDetail"
        bad.append(FieldViolation(f"read_mask.paths[{i}]", problem))
    return frozenset(fields)


def check_batch(request: pb.BatchGetTaskNodeDetailsRequest) -> None:
    """InvalidArgument unless the batch holds 1 to MAX_BATCH requests; the requests
    themselves are each checked on their own (parse_request), as single calls."""
    count = len(request.requests)
    if 1 <= count <= MAX_BATCH:
        return
    problem = (
        "requests must hold at least one request"
        if not count
        else f"requests holds {count} requests; at most {MAX_BATCH} are read in one call"
    )
    raise errors.InvalidArgument(
        problem,
        {"fields": "requests", "count": str(count), "limit": str(MAX_BATCH)},
        [FieldViolation("requests", problem)],
    )


def _decimal_id(text: str, field: str, bad: list[FieldViolation]) -> int | None:
    if not text:
        bad.append(FieldViolation(field, f"{field} is required"))
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        bad.append(FieldViolation(field, f"{field} must be a decimal integer, not {text[:40]!r}"))
        return None
    return int(text)


def _invalid(bad: list[FieldViolation]) -> errors.InvalidArgument:
    """The most specific error class that covers all the bad fields."""
    fields = {v.field.split("[")[0] for v in bad}
    message = "; ".join(v.description for v in bad)
    metadata = {"fields": ",".join(sorted(fields))}
    if fields == {"subprocess_stack"}:
        return errors.InvalidSubprocessStack(message, metadata, bad)
    if fields == {"loop"}:
        return errors.InvalidLoop(message, metadata, bad)
    return errors.InvalidArgument(message, metadata, bad)
