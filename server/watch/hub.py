"""Shared change detection for watch streams: one poll of the store per interval per process.

However many streams a process serves, one thread (the Hub's) asks the store, once per
interval, which of the watched tasks changed (NodeStore.task_changes: one or two
statements for all of them). For a task that changed, it re-reads each distinct node
rendering some stream watches (a NodeQuery: node, loop, component_code, read_mask...)
once, whatever the number of streams watching it, and hands each stream what is new to
it. So the store's load grows with the tasks and renderings watched, not the streams.

Semantics are level-triggered: a stream is sent the latest state after one or more
changes. Two writes between two polls arrive as one message; a state that lasted less
than an interval may never be sent (its attempt stays in the node's histories and
retry/loop counters). What a stream was last sent is remembered as content (an etag, or
hashes of node summaries), so nothing unchanged is sent twice and no change is missed.

A Mailbox holds what a stream has not written yet: at most one detail, or one summary
per node of its task, each replaced by a newer one. A reader that never reads therefore
costs one pending message and no more, however often the node changes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from collections.abc import Hashable
from dataclasses import dataclass
from dataclasses import field

from bksops.tasknode.v1 import task_node_pb2 as pb

from server import errors
from server.auth import Principal
from server.cache import DetailCache
from server.db.nodestore import NodeStore
from server.db.store import ListedRow
from server.nodes import Masker
from server.nodes import read_node_detail
from server.query import NodeQuery
from server.watch import tokens

log = logging.getLogger(__name__)

#: Re-reads of a watched rendering are on behalf of streams authorized when they opened.
HUB = Principal(app_code="tasknode-watch", username="-", businesses=None)
_UNSEEN = object()


def visible(row: ListedRow) -> tuple[object, ...]:
    """What a stream is shown of a node's summary: the row without its storage ids
    (a re-imported task's rows get new ones)."""
    return tuple(row[2:])


class Mailbox:
    """What one stream has still to write; touched only on its event loop's thread."""

    def __init__(self, scope: str) -> None:
        self.scope = scope
        self.event = asyncio.Event()
        self.detail: pb.NodeDetail | None = None
        self.wire: bytes | None = None
        self.nodes: dict[str, ListedRow] = {}
        self.token = ""
        self.error: errors.ServiceError | None = None
        #: Messages replaced by newer ones before the stream wrote them.
        self.coalesced = 0
        #: When the stream last wrote (time.monotonic()), and whether a heartbeat is due.
        self.written = time.monotonic()
        self.beat = False

    def put_detail(self, detail: pb.NodeDetail, token: str, wire: bytes | None = None) -> None:
        """Pending: detail, resumable at token; wire, if given, is the whole message
        serialized once for every stream it goes to."""
        self.coalesced += self.detail is not None
        self.detail, self.token, self.wire = detail, token, wire
        self.event.set()

    def put_nodes(self, rows: list[ListedRow], token: str) -> None:
        self.coalesced += bool(self.nodes)
        for row in rows:
            self.nodes[row.node_id] = row
        self.token = token
        self.event.set()

    def put_error(self, error: errors.ServiceError) -> None:
        self.error = error
        self.event.set()

    def pending(self) -> int:
        """Messages waiting: 0 or 1."""
        return int(self.detail is not None or bool(self.nodes))


@dataclass
class _View:
    """One watched rendering of a node: the etag each watching stream was last sent."""

    sent: dict[Mailbox, str] = field(default_factory=dict)
    dirty: bool = True


@dataclass
class _Task:
    stamp: Hashable | None = _UNSEEN
    rows: tuple[ListedRow, ...] = ()
    hashes: frozenset[bytes] = frozenset()
    #: Task streams and the summary hashes each was last sent (shared sets).
    streams: dict[Mailbox, frozenset[bytes]] = field(default_factory=dict)
    fresh: set[Mailbox] = field(default_factory=set)
    views: dict[NodeQuery, _View] = field(default_factory=dict)


Delivery = tuple[Mailbox, Callable[[], None]]


class Hub:
    """The process's change detector; start() it, subscribe streams, stop() it."""

    def __init__(
        self,
        store: NodeStore,
        mask: Masker,
        cache: DetailCache | None,
        interval: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.store = store
        self.mask = mask
        self.cache = cache
        self.interval = interval
        self.loop = loop
        self.polls = 0
        self._tasks: dict[int, _Task] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watch-hub", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        self._thread.join(5)

    def watch_node(self, query: NodeQuery, mailbox: Mailbox, etag: str) -> None:
        """Send mailbox the node's detail whenever its etag is no longer etag."""
        with self._lock:
            task = self._tasks.setdefault(query.task_id, _Task())
            view = task.views.setdefault(query, _View())
            view.sent[mailbox] = etag
            view.dirty = True
        self._wake.set()

    def watch_task(self, task_id: int, mailbox: Mailbox, seen: frozenset[bytes]) -> None:
        """Send mailbox the task's node summaries whose hashes are not in seen, now and
        whenever they change."""
        with self._lock:
            task = self._tasks.setdefault(task_id, _Task())
            task.streams[mailbox] = seen
            task.fresh.add(mailbox)
        self._wake.set()

    def forget(self, task_id: int, mailbox: Mailbox) -> None:
        """The stream of mailbox ended."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                return
            task.streams.pop(mailbox, None)
            task.fresh.discard(mailbox)
            for query, view in list(task.views.items()):
                view.sent.pop(mailbox, None)
                if not view.sent:
                    del task.views[query]
            if not task.streams and not task.views:
                del self._tasks[task_id]

    def _run(self) -> None:
        next_poll = time.monotonic()
        while not self._stopped.is_set():
            with self._lock:
                idle = not self._tasks
            if idle:
                self._wake.wait()
                self._wake.clear()
                continue
            delay = next_poll - time.monotonic()
            if delay > 0:
                self._stopped.wait(delay)
                continue
            next_poll = time.monotonic() + self.interval
            try:
                self.poll()
            except Exception:  # the thread must outlive any one failed poll
                log.exception("a watch poll failed; trying again in %.2fs", self.interval)

    def poll(self) -> None:
        """One round: ask the store which watched tasks changed, then hand each stream
        what is new to it."""
        with self._lock:
            known: dict[int, Hashable | None] = {
                task_id: task.stamp for task_id, task in self._tasks.items()
            }
        self.polls += 1
        deliveries: list[Delivery] = []
        with self.store.session(primary=True):
            try:
                # _UNSEEN equals no stamp: a task seen for the first time always comes back.
                changes = self.store.task_changes(known)
            except errors.ServiceError as exc:
                log.warning("watch poll: %s", exc.message)
                return
            with self._lock:
                reread: list[tuple[int, NodeQuery]] = []
                for task_id, task in self._tasks.items():
                    state = changes.get(task_id)
                    if state is None and task.stamp is _UNSEEN:
                        continue  # watched since this poll began: read by the next one
                    changed = state is not None
                    if state is not None:
                        task.stamp, task.rows = state.stamp, state.nodes
                        task.hashes = frozenset(
                            tokens.summary_hash(visible(row)) for row in task.rows
                        )
                    streams = task.streams if changed else dict.fromkeys(task.fresh)
                    for mailbox in streams:
                        deliveries.extend(self._task_delivery(task, mailbox))
                    task.fresh.clear()
                    for query, view in task.views.items():
                        if changed or view.dirty:
                            view.dirty = False
                            reread.append((task_id, query))
            if deliveries:  # the task streams' summaries, before any rendering is re-read
                self.loop.call_soon_threadsafe(_deliver, deliveries)
            for task_id, query in reread:
                read = self._reread(task_id, query)
                self.store.end_snapshot()
                if read:  # a rendering's streams as soon as it is read, not after every one
                    self.loop.call_soon_threadsafe(_deliver, read)

    def _task_delivery(self, task: _Task, mailbox: Mailbox) -> list[Delivery]:
        seen = task.streams.get(mailbox, frozenset())
        if task.stamp is None:
            gone = errors.TaskNotFound("the watched task is no longer there", {})
            return [(mailbox, lambda: mailbox.put_error(gone))]
        new = [row for row in task.rows if tokens.summary_hash(visible(row)) not in seen]
        task.streams[mailbox] = task.hashes
        if not new and seen:
            return []
        token = tokens.task_token(mailbox.scope, task.hashes)
        return [(mailbox, lambda: mailbox.put_nodes(new, token))]

    def _reread(self, task_id: int, query: NodeQuery) -> list[Delivery]:
        """Read one watched rendering once and hand it to each stream it is new to."""
        try:
            detail = read_node_detail(self.store, query, self.mask, HUB, self.cache)
        except errors.ServiceError as exc:
            if isinstance(exc, errors.StoreUnavailable | errors.DeadlineExceeded):
                with self._lock:  # try again next poll
                    view = self._tasks.get(task_id, _Task()).views.get(query)
                    if view is not None:
                        view.dirty = True
                return []
            failure: errors.ServiceError = exc
            with self._lock:
                view = self._tasks.get(task_id, _Task()).views.get(query)
                targets = list(view.sent) if view is not None else []
            return [(m, lambda m=m: m.put_error(failure)) for m in targets]  # type: ignore[misc]
        out: list[Delivery] = []
        with self._lock:
            view = self._tasks.get(task_id, _Task()).views.get(query)
            if view is None:
                return out
            wires: dict[str, tuple[str, bytes]] = {}  # by scope: one per view in practice
            for mailbox, etag in view.sent.items():
                if etag != detail.etag:
                    view.sent[mailbox] = detail.etag
                    if mailbox.scope not in wires:
                        token = tokens.node_token(mailbox.scope, detail.etag)
                        message = pb.WatchTaskNodeResponse(detail=detail, resume_token=token)
                        wires[mailbox.scope] = token, message.SerializeToString()
                    token, wire = wires[mailbox.scope]
                    out.append(
                        (mailbox, lambda m=mailbox, t=token, w=wire: m.put_detail(detail, t, w))  # type: ignore[misc]
                    )
        return out


def _deliver(deliveries: list[Delivery]) -> None:
    for _, put in deliveries:
        put()
