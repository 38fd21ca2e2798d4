"""Listing a task's nodes a page at a time (ListTaskNodes), over the store.

The page token is base64url of JSON [version, fingerprint, key, node id]: the
fingerprint is a hash of what the listing is (business, scope, task, sub-process,
filter, view, read_mask; not the page size, which may change between pages), so a token is
refused for another query; key and node id are the last node returned, where the
next page starts (Store.list_nodes). Nothing in a token is trusted beyond that: the
caller is authorized anew on every page, and a token only moves where a listing of
nodes the caller may read starts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json

from bksops.tasknode.v1 import task_node_pb2 as pb

from server import convert
from server import errors
from server.auth import Principal
from server.cache import DetailCache
from server.convert import Mask
from server.db.nodestore import NodeStore
from server.db.store import After
from server.db.store import ListedRow
from server.errors import FieldViolation
from server.nodes import authorize
from server.nodes import check_stack
from server.nodes import read_node_detail
from server.query import NODE_ID
from server.query import ListQuery
from server.query import NodeQuery

TOKEN_VERSION = 1
#: Longer tokens are none this service issued (its own are under 150 characters).
MAX_TOKEN_CHARS = 512


def list_task_nodes(
    store: NodeStore,
    query: ListQuery,
    mask: Mask,
    principal: Principal,
    cache: DetailCache | None = None,
) -> pb.ListTaskNodesResponse:
    """One page of the listing query asks for, or the domain error that says why not."""
    authorize(store, query.biz_id, query.by_project_id, principal)
    fingerprint = _fingerprint(query)
    after = _read_token(query.page_token, fingerprint) if query.page_token else None
    parent = _parent(store, query)
    rows = store.list_nodes(query.task_id, parent, query.terms, after, query.page_size + 1)
    reply = pb.ListTaskNodesResponse(
        total_size=store.count_nodes(query.task_id, parent, query.terms)
    )
    page = rows[: query.page_size]
    if len(rows) > query.page_size:
        last = page[-1]
        key = last.position if parent is not None else last.row_id
        reply.next_page_token = _token(fingerprint, key, last.node_id)
    if not query.full:
        reply.nodes.extend(summary(row) for row in page)
        return reply
    for row in page:
        node = NodeQuery(
            biz_id=query.biz_id,
            by_project_id=query.by_project_id,
            task_id=query.task_id,
            node_id=row.node_id,
            component_code="",
            subprocess_stack=row.path,
            loop=None,
            max_histories=None,
            fields=query.fields,
        )
        reply.nodes.append(read_node_detail(store, node, mask, principal, cache))
    return reply


def _parent(store: NodeStore, query: ListQuery) -> str | None:
    """The sub-process whose children are listed (None: the whole task), after checking
    that the business, the task and (if any) the sub-process at that stack exist."""
    stack = query.subprocess_stack
    if not stack:
        store.find_task(query.biz_id, query.by_project_id, query.task_id)
        return None
    node = store.find_node(query.biz_id, query.by_project_id, query.task_id, stack[-1], heavy=False)
    check_stack(node, stack[:-1])
    if node.kind != "SubProcess":
        problem = f"node {node.node_id} is no sub-process: it has no children to list"
        raise errors.InvalidArgument(
            problem,
            {"fields": "subprocess_stack", "nodeId": node.node_id},
            [FieldViolation(f"subprocess_stack[{len(stack) - 1}]", problem)],
        )
    return node.node_id


def summary(row: ListedRow) -> pb.NodeDetail:
    """The NODE_VIEW_BASIC NodeDetail of a listed node."""
    detail = pb.NodeDetail(
        id=row.node_id,
        name=row.name,
        state=convert.state(row.state or "READY"),
        executed=row.state is not None,
        loop=row.loop,
        retry=row.retry,
        component_code=row.component_code,
        subprocess_stack=row.path,
    )
    start, finish = convert.timestamp(row.started_at), convert.timestamp(row.finished_at)
    if start is not None:
        detail.start_time.CopyFrom(start)
    if finish is not None:
        detail.finish_time.CopyFrom(finish)
    return detail


def _fingerprint(query: ListQuery) -> str:
    """A hash of everything that makes the listing what it is, the page size aside."""
    what = [
        query.biz_id,
        query.by_project_id,
        query.task_id,
        list(query.subprocess_stack),
        [[t.column, t.op, t.value] for t in query.terms],
        query.full,
        sorted(query.fields) if query.fields is not None else None,
    ]
    text = json.dumps(what, separators=(",", ":")).encode()
    return hashlib.blake2b(text, digest_size=8).hexdigest()


def _token(fingerprint: str, key: int, node_id: str) -> str:
    raw = json.dumps([TOKEN_VERSION, fingerprint, key, node_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).rstrip(b"=").decode("ascii")


def _read_token(token: str, fingerprint: str) -> After:
    """Where the page starts; InvalidArgument for a token not issued here, or issued
    for another query."""
    try:
        if len(token) > MAX_TOKEN_CHARS:
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        version, issued_for, key, node_id = json.loads(raw)
        valid = (
            version == TOKEN_VERSION
            and isinstance(issued_for, str)
            and type(key) is int
            and isinstance(node_id, str)
            and NODE_ID.fullmatch(node_id) is not None
        )
    except (ValueError, TypeError, binascii.Error, RecursionError):
        valid = False
    if not valid:
        raise _bad_token("page_token is not a next_page_token this service issued")
    if issued_for != fingerprint:
        raise _bad_token(
            "page_token was issued for another query: keep every field but page_size "
            "as on the first page, or start again without a page_token"
        )
    return key, node_id


def _bad_token(problem: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(
        problem, {"fields": "page_token"}, [FieldViolation("page_token", problem)]
    )
