"""The bk-sops store: node records read straight from a bk-sops deployment's database.

bk-sops (engine v2, bamboo-engine) keeps a task's tree in a zlib-compressed snapshot
row and each node's runtime in the engine's tables (eri_state, eri_executiondata,
eri_executionhistory); docs/bksops-engine.md says what they hold. This store maps
those rows onto the rows of server.db.store, so server.nodes applies the
reference's rules to both stores alike. It never writes there: a read-only database
user suffices, and a SQLite file is opened read-only.

Apps, grants, tokens and plugin output schemas stay in the service's own database
(the native store), whose session each call opens beside this one.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Hashable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from peewee import Database
from peewee import MySQLDatabase
from peewee import PostgresqlDatabase
from peewee import SqliteDatabase

from server import errors
from server import values
from server.config import Config
from server.db import pickles
from server.db.coalescing import Coalescer
from server.db.store import WATCH_BATCH
from server.db.store import After
from server.db.store import AttemptRow
from server.db.store import ChildRow
from server.db.store import ListedRow
from server.db.store import NodeRow
from server.db.store import Store
from server.db.store import TaskState
from server.filters import Term
from server.lru import SizedLRU

log = logging.getLogger(__name__)

#: Seconds a catalog stamp read by CatalogEpoch serves cached replies, by default
#: (Config.bksops_catalog_refresh_seconds).
CATALOG_REFRESH_SECONDS = 1.0
#: Bytes of indexed task trees kept per process, by default (BksopsStore tree_cache_bytes):
#: ~5 KiB a tree of the bench's ~12 nodes, so ~50,000 trees.
TREE_CACHE_BYTES = 256 * 1024 * 1024
#: Keys a statement of stamp_ahead reads at most (a batch holds up to 100 requests).
STAMPS_AHEAD = 100
#: Node kinds kept for the stamp (a few MiB).
KINDS_KEPT = 65_536
#: The stamp's children column (count/digest sum) for a node with none, on every database.
NO_CHILDREN = "0/0"
SUBPROCESS = "SubProcess"
#: bamboo's plain context values (eri_contextvalue.type); splice and computed ones
#: would need the engine's renderer.
PLAIN_CONTEXT = 1
#: The digest functions a SQLite connection of this store is given for the stamp.
_SQLITE_DIGEST = "tasknode_md5"
_SQLITE_ROW_DIGEST = "tasknode_row_digest"
#: The digest of a node's execution data the watch poll reads, on SQLite.
_SQLITE_DATA_DIGEST = "tasknode_data_digest"
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_REFERENCE = re.compile(r"\$\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}")
#: One encoder for _compact: json.dumps with options builds a new one each call.
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
#: A row as the driver gives it.
Row = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class _TreeNode:
    """One node of a task's tree: what a call needs of it, compactly (kinds, codes and
    versions are interned, shared by every tree)."""

    #: None when the tree has none (null, as for events): bk-sops then answers null.
    name: str | None
    kind: str
    component_code: str
    component_version: str
    error_ignorable: bool
    #: Ancestor sub-process node ids, root first.
    path: tuple[str, ...]
    #: The configured inputs ({key: value}) of a service, or a sub-process's constants, as
    #: compact JSON ("" for none): only a READY preview reads them, and a dict of them
    #: costs several times their text, which would bound the trees kept to a few.
    inputs: str


@dataclass(slots=True)
class _Tree:
    """A task's tree, indexed by node id, with each pipeline's constants (compact JSON, as
    a node's inputs) by its id."""

    nodes: dict[str, _TreeNode] = field(default_factory=dict)
    constants: dict[str, str] = field(default_factory=dict)
    #: node id -> (output key, constant key without ${}) of each root-level constant
    #: of source_type component_outputs that the node feeds.
    renamed: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    #: What the tree holds in memory, about (_Tree.measure), for the cache's bound.
    size: int = 0

    def measure(self) -> int:
        """Bytes of the objects this tree holds of its own (interned strings, shared by
        every tree, not counted): the dicts, each node, its id, name, inputs and path."""
        size = sys.getsizeof(self) + sys.getsizeof(self.nodes) + sys.getsizeof(self.constants)
        size += sys.getsizeof(self.renamed)
        paths: set[int] = set()
        for node_id, node in self.nodes.items():
            size += sys.getsizeof(node_id) + sys.getsizeof(node) + sys.getsizeof(node.inputs)
            size += 0 if node.name is None else sys.getsizeof(node.name)
            if node.path and id(node.path) not in paths:  # one tuple per sub-process
                paths.add(id(node.path))
                size += sys.getsizeof(node.path)
        size += sum(sys.getsizeof(text) for text in self.constants.values())
        for shown in self.renamed.values():
            size += sys.getsizeof(shown)
            size += sum(sys.getsizeof(pair) + sum(map(sys.getsizeof, pair)) for pair in shown)
        return size


@dataclass(frozen=True)
class _StampSql:
    """The stamp's statements in one database's dialect (BksopsStore._make_stamp_sql)."""

    #: One key's, with the children's subquery, and without it (not a sub-process).
    full: str
    cheap: str
    #: Several keys' in one statement: their rows (key_row, one per key: tag, task id,
    #: node id, 1 if its children are read) as a derived table the stamp's tables join.
    many_head: str
    key_row: str
    many_tail: str

    def many(self, count: int) -> str:
        return f"{self.many_head}{' UNION ALL '.join([self.key_row] * count)}{self.many_tail}"


class _Current(threading.local):
    """The tree of the task this thread's call found its node in."""

    tree: _Tree | None = None


class CatalogEpoch:
    """The service's catalog stamp (server.db.models.CatalogStamp, bumped by every `server
    load`: output schemas, here), kept by a thread of this process that reads it every
    refresh / 2 seconds, so that a cached reply costs no statement on the service's own
    database. A value serves while its read began at most refresh seconds ago; an older
    one (the thread held up, the database down) is read again by the call itself. So a
    schema loaded shows in replies at most refresh seconds after its load committed: a
    read that began after the commit sees it. refresh <= 0: every call reads it."""

    def __init__(self, native: Store, refresh: float) -> None:
        self.native = native
        self.refresh = refresh
        #: (stamp, time.monotonic() its read began); replaced whole, never mutated.
        self._value: tuple[int, float] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        #: Reads the thread made (for tests).
        self.reads = 0

    def get(self) -> int:
        """The catalog stamp, read at most refresh seconds ago (on the call's session of
        the native store when the kept one is older)."""
        if self.refresh <= 0:
            return self.native.catalog_stamp()
        if self._pid != os.getpid():
            self._start()
        value = self._value
        if value is not None and time.monotonic() - value[1] <= self.refresh:
            return value[0]
        began = time.monotonic()
        stamp = self.native.catalog_stamp()
        self._keep(stamp, began)
        return stamp

    def close(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout=self.native.timeout + 1)

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid() or self._stop.is_set():
                return
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="catalog-epoch", daemon=True)
            self._thread.start()

    def _keep(self, stamp: int, began: float) -> None:
        with self._lock:
            if self._value is None or began > self._value[1]:
                self._value = (stamp, began)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                with self.native.session():
                    stamp = self.native.catalog_stamp()
            except Exception as exc:  # calls read it themselves until it answers again
                log.warning("reading the catalog stamp failed (%s); retrying", exc)
            else:
                self._keep(stamp, began)
                self.reads += 1
            self._stop.wait(self.refresh / 2)


class BksopsStore(Store):
    """Reads tasks and nodes from a bk-sops database, schemas and credentials from native."""

    def __init__(
        self,
        db: Database,
        native: Store,
        timeout: float = Config.store_timeout_seconds,
        replicas: Sequence[Database] = (),
        tree_cache_bytes: int = TREE_CACHE_BYTES,
        catalog_refresh: float = CATALOG_REFRESH_SECONDS,
    ) -> None:
        self.native = native
        self.catalog = CatalogEpoch(native, catalog_refresh)
        #: The stamp's statements by id of the database node they were made for (see
        #: _stamp_sql: the digests depend on the server's kind and version).
        self._stamp_sqls: dict[int, _StampSql] = {}
        #: Indexed trees by snapshot id (a snapshot row never changes), within the bound.
        self.trees: SizedLRU[int, _Tree] = SizedLRU(tree_cache_bytes)
        #: Trees decompressed and indexed by this store (each is then kept, within bounds).
        self.trees_parsed = 0
        self._trees_lock = threading.Lock()
        #: node id -> True for a node known not to be a sub-process (see stamp).
        self._plain: OrderedDict[str, bool] = OrderedDict()
        self._current = _Current()
        #: Concurrent calls' stamps, read together (server.db.coalescing).
        self._stamps = Coalescer(self._read_stamps, "stamp")
        super().__init__(db, timeout, replicas)

    @contextmanager
    def session(
        self, deadline: float | None = None, primary: bool = False, lazy: bool = False
    ) -> Iterator[None]:
        """The call's connections to both databases (see Store.session), each taken at
        the call's first read there: a cached reply reads only the engine's, and a call
        that takes its stamp from another call's statement (server.db.coalescing) reads
        neither."""
        with (
            self.native.session(deadline, primary, lazy=True),
            super().session(deadline, primary, lazy=True),
        ):
            yield

    def end_snapshot(self) -> None:
        self.native.end_snapshot()
        super().end_snapshot()

    def close(self) -> None:
        self.catalog.close()
        super().close()
        self.native.close()

    def stamp(self, task_id: int, node_id: str) -> tuple[Any, ...] | None:
        """Everything a reply about the node is built from, in one statement on the engine's
        database, with the catalog epoch of the service's own (for output schemas; read by
        CatalogEpoch, not by the call).

        No engine row stamps a change: bamboo-engine updates eri_state and
        eri_executiondata rows in place (a node's version is refreshed only when it
        re-enters; data changes while it stays RUNNING), and inserts eri_executionhistory
        rows. So the stamp is what the reply shows of them: the task's and project's rows
        and the snapshot id (a snapshot never changes), the node's state columns, digests
        of its data, the count and last id of its histories (only ever inserted), and the
        count and a sum of digests of its children's state rows (a sub-process's). None
        for a node that has not run (its preview follows the context values) or no task.

        Calls asking at once share a statement (server.db.coalescing): each takes its
        stamp from one begun after it asked.
        """
        ahead = self._this.call.ahead
        if ahead and (task_id, node_id) in ahead:  # read by stamp_ahead, taken once
            found = ahead.pop((task_id, node_id))
        else:
            try:
                found = self._stamps.read((task_id, node_id), self.time_left())
            except TimeoutError:
                raise self._late(self._this.call) from None
        return None if found is None else (*found, self.catalog.get())

    def stamp_ahead(self, keys: Sequence[tuple[int, str]]) -> None:
        """Read the stamps of keys (task id, node id) now, STAMPS_AHEAD keys a statement,
        for this call's stamp() to take, each once: a batch of a hundred nodes then costs
        one stamp statement, not a hundred. Read before any of its replies is built, none
        is newer than its reply (server.cache)."""
        ahead = self._this.call.ahead
        if ahead is None:  # outside a session: nothing would take them
            return
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), STAMPS_AHEAD):
            chunk = unique[start : start + STAMPS_AHEAD]
            found = self._read_stamps(chunk)
            for key in chunk:
                ahead[key] = found.get(key)

    def _read_stamps(self, keys: Sequence[tuple[int, str]]) -> dict[tuple[int, str], Row]:
        """The stamps of keys (task id, node id), in one statement on this call's session,
        each row tagged with its key's place. A node known not to be a sub-process skips
        the children's subquery (on MariaDB it costs ~0.4 ms even when it finds none).
        Several keys are rows of a derived table that the stamp's tables join: on MariaDB
        ~30 µs of the server's time a key at eight keys, against ~90 for a statement each
        (or a SELECT each joined by UNION ALL); one key, a statement of its own (~10 %
        cheaper than a derived table of one)."""
        sql = self._stamp_sql()
        if len(keys) == 1:
            ((task_id, node_id),) = keys
            if self._plain.get(node_id, False):  # one dict read: no lock needed
                rows = self._rows("stamp", sql.cheap, False, node_id, node_id, node_id, task_id)
            else:
                params = (node_id, node_id, node_id, node_id, task_id)
                rows = self._rows("stamp", sql.full, False, *params)
        else:
            rows = self._rows(
                "stamp",
                sql.many(len(keys)),
                False,
                *(
                    value
                    for tag, (task_id, node_id) in enumerate(keys)
                    for value in (tag, task_id, node_id, 0 if self._plain.get(node_id) else 1)
                ),
            )
        return {keys[row[0]]: row[1:] for row in rows if row[1] is not None}

    def find_task(self, biz_id: int, by_project_id: bool, task_id: int) -> None:
        """NotFound naming the business or task missing (or deleted), UnsupportedEngine
        for a task of the legacy engine, else nothing."""
        self._task_row(biz_id, by_project_id, task_id)

    def task_changes(self, known: Mapping[int, Hashable | None]) -> dict[int, TaskState]:
        """See Store.task_changes. The engine, not this service, writes here, and no
        engine row stamps a task, so each poll reads the tasks' roots and then the
        eri_state rows of every watched task, each with a digest of its node's
        eri_executiondata (one statement per WATCH_BATCH tasks, by the indexed root_id and
        node_id); the stamp is a hash of the summaries those make, with the tree's nodes
        that have not run (no eri_state row yet) as READY, and of the data digests. So
        outputs the engine rewrites while a node stays RUNNING move the stamp (and the
        node's streams are sent them) but no summary; so does the catalog epoch (output
        schemas loaded into the service's own database). A task whose tree cannot be read
        counts as not there: its streams then read why."""
        ids = list(known)
        roots: dict[int, tuple[str, int]] = {}
        for start in range(0, len(ids), WATCH_BATCH):
            batch = ids[start : start + WATCH_BATCH]
            for task_id, root_id, snapshot_id in self._rows(
                "watch_tasks", self._sql_watch_tasks(len(batch)), True, *batch, False
            ):
                roots[int(task_id)] = (root_id, snapshot_id)
        states: dict[str, tuple[Any, ...]] = {}
        data: dict[str, Any] = {}
        root_ids = [root for root, _ in roots.values()]
        for start in range(0, len(root_ids), WATCH_BATCH):
            batch_roots = root_ids[start : start + WATCH_BATCH]
            for node_id, *state, digest in self._rows(
                "watch_states", self._sql_watch_states(len(batch_roots)), True, *batch_roots
            ):
                states[node_id] = tuple(state)
                data[node_id] = digest
        # Output schemas are the service's own (a `server load` bumps the catalog epoch):
        # a node's rendering names its outputs by them, so they move every stamp too.
        catalog = self.catalog.get()
        changed: dict[int, TaskState] = {}
        for task_id in ids:
            found = TaskState(None, ())
            if task_id in roots:
                try:
                    tree = self._tree(roots[task_id][1], task_id)
                except errors.ServiceError:
                    tree = None
                if tree is not None:
                    nodes = tuple(
                        _summary(index, node_id, info, states.get(node_id))
                        for index, (node_id, info) in enumerate(tree.nodes.items())
                    )
                    # The data's digests move the stamp, not the summaries (they hold no
                    # data): the node's streams re-read it, the task's are sent nothing.
                    digests = tuple(data.get(node_id) for node_id in tree.nodes)
                    found = TaskState(hash((nodes, digests, catalog)), nodes)
            if found.stamp != known[task_id]:
                changed[task_id] = found
        self.end_snapshot()
        return changed

    def list_nodes(
        self,
        task_id: int,
        parent: str | None,
        terms: tuple[Term, ...],
        after: After | None,
        limit: int,
    ) -> list[ListedRow]:
        raise _unlisted()

    def count_nodes(self, task_id: int, parent: str | None, terms: tuple[Term, ...]) -> int:
        raise _unlisted()

    def business_of_project(self, project_id: int) -> int | None:
        rows = self._rows("business_of_project", self._sql_project_business, False, project_id)
        if not rows or not rows[0][1] or rows[0][0] is None or int(rows[0][0]) < 0:
            return None
        return int(rows[0][0])

    def output_schema(self, code: str, version: str) -> list[tuple[str, str]]:
        return self.native.output_schema(code, version)

    def find_node(
        self, biz_id: int, by_project_id: bool, task_id: int, node_id: str, heavy: bool = True
    ) -> NodeRow:
        """The node's row; NotFound naming the first of business, task or node missing,
        UnsupportedEngine for a task of the legacy engine. Always whole (heavy or not):
        the engine keeps a node's data in rows of their own, read when it is built."""
        snapshot_id, root_id = self._task_row(biz_id, by_project_id, task_id)
        tree = self._tree(snapshot_id, task_id)
        self._current.tree = tree
        info = tree.nodes.get(node_id)
        if info is None:
            raise errors.NodeNotFound(
                f"node {node_id} not found in task {task_id}",
                {"taskId": str(task_id), "nodeId": node_id},
            )
        self._remember_kind(node_id, info.kind != SUBPROCESS)
        row = NodeRow(
            task_id=task_id,
            node_id=node_id,
            path=info.path,
            name=info.name or "",
            kind=info.kind,
            component_code=info.component_code,
            component_version=info.component_version,
            error_ignorable=info.error_ignorable,
            state=None,
            loop=1,
            retry=0,
            skip=False,
            error_ignored=False,
            version="",
            started_at=None,
            finished_at=None,
            inputs="{}",
            outputs="{}",
            ex_data=None,
            renamed=tree.renamed.get(node_id, ()),
            name_null=info.name is None,
            root_id=root_id,
        )
        states = self._rows("state", self._sql_state, True, node_id)
        if not states:  # not run: the READY preview (its context read only then)
            return row._replace(inputs=values.dumps(self._preview(tree, info, root_id)))
        state, version, loop, retry, skip, ignored, started, archived = states[0]
        row = row._replace(
            state=state,
            loop=loop,
            retry=retry,
            skip=bool(skip),
            error_ignored=bool(ignored),
            version=version,
            started_at=_micros(started),
            finished_at=_micros(archived),
        )
        data = self._rows("data", self._sql_data, True, node_id)
        if not data:
            # The engine keeps no data for events and gateways: bk-sops answers empty,
            # with no output table (outputs null; server.nodes).
            return row._replace(inputs="{}", outputs="null", ex_data="")
        inputs = _data(data[0][0], data[0][2], node_id, "inputs")
        outputs = _data(data[0][1], data[0][3], node_id, "outputs")
        if info.kind == SUBPROCESS:
            inputs = {_unwrap(key): value for key, value in inputs.items()}
        failure = outputs.get("ex_data")
        return row._replace(
            inputs=_dumps(inputs, node_id, "inputs"),
            outputs=_dumps(outputs, node_id, "outputs"),
            ex_data=None if failure is None else _text(failure),
        )

    def _task_row(self, biz_id: int, by_project_id: bool, task_id: int) -> tuple[int | None, str]:
        """The task's (snapshot id, root pipeline id); NotFound naming the first of
        business or task missing, UnsupportedEngine for the legacy engine's tasks."""
        if by_project_id:
            found = self._rows("task", self._sql_project_task, True, task_id, biz_id)
        else:
            found = self._rows("task", self._sql_business_task, True, task_id, biz_id, True)
        if not found:
            scope = "project" if by_project_id else "cmdb_biz"
            raise errors.BusinessNotFound(
                f"project({biz_id}) with scope({scope}) does not exist.",
                {"bkBizId": str(biz_id), "scope": scope},
            )
        where = {"bkBizId": str(biz_id), "taskId": str(task_id)}
        task, deleted, engine_ver, snapshot_id, root_id = found[0]
        if task is None or root_id is None:  # no task there, or no pipeline instance
            raise errors.TaskNotFound(f"task {task_id} of business {biz_id} does not exist", where)
        if deleted:
            raise errors.TaskNotFound(f"task {task_id} of business {biz_id} is deleted", where)
        if engine_ver != 2:
            raise errors.UnsupportedEngine(
                f"task {task_id} runs on bk-sops engine version {engine_ver}; "
                "only engine version 2 (bamboo-engine) is served",
                {**where, "engineVer": str(engine_ver)},
            )
        return snapshot_id, root_id

    def _remember_kind(self, node_id: str, plain: bool) -> None:
        """Note whether a node (its id is unique in the engine's database, its tree never
        changes) is not a sub-process, for the stamp's cheaper statement."""
        with self._trees_lock:
            self._plain[node_id] = plain
            self._plain.move_to_end(node_id)
            while len(self._plain) > KINDS_KEPT:
                self._plain.popitem(last=False)

    def attempts(self, task_id: int, node_id: str, loop: int) -> list[AttemptRow]:
        rows = self._rows("attempts", self._sql_histories, True, node_id, loop)
        found = []
        for id_, loop_, retry, skip, version, started, archived, isz, osz, ins, outs in rows:
            where = f"history {id_}"
            outputs = _data(osz, outs, node_id, f"{where} outputs")
            failure = outputs.get("ex_data")
            found.append(
                AttemptRow(
                    id=int(id_),
                    loop=loop_,
                    retry=retry,
                    skip=bool(skip),
                    version=version,
                    state=None,
                    started_at=_micros(started),
                    finished_at=_micros(archived),
                    inputs=_dumps(_data(isz, ins, node_id, f"{where} inputs"), node_id, where),
                    outputs=_dumps(outputs, node_id, where),
                    # As the native store's: the rules (server.nodes) decide what none shows.
                    ex_data=None if failure is None else _text(failure),
                )
            )
        return found

    def children(self, task_id: int, node_id: str) -> list[ChildRow]:
        tree = self._current.tree
        named = tree.nodes if tree is not None else {}
        return [
            ChildRow(
                child,
                (named[child].name if child in named else None) or "",
                state,
                loop,
                retry,
                bool(skip),
                bool(ignored),
                version,
                _micros(started),
                _micros(archived),
            )
            for child, state, loop, retry, skip, ignored, version, started, archived in self._rows(
                "children", self._sql_children, True, node_id
            )
        ]

    def _rows(self, name: str, sql: str, snapshot: bool, *params: object) -> list[tuple[Any, ...]]:
        """The rows of sql, read as the query name (its metrics and span)."""
        return self.read(lambda: list(self.db.execute_sql(sql, params).fetchall()), snapshot, name)

    def _tree(self, snapshot_id: int | None, task_id: int) -> _Tree:
        """The task's tree, parsed once per snapshot and kept."""
        if snapshot_id is None:
            raise errors.TaskNotFound(
                f"task {task_id} has no pipeline tree", {"taskId": str(task_id)}
            )
        tree = self.trees.get(snapshot_id)
        if tree is not None:
            return tree
        rows = self._rows("tree", self._sql_snapshot, True, snapshot_id)
        if not rows:
            raise errors.TaskNotFound(
                f"task {task_id} has no pipeline tree", {"taskId": str(task_id)}
            )
        try:
            web = json.loads(zlib.decompress(bytes(rows[0][0])))
            tree = _Tree()
            _index(web, (), tree)
            tree.size = tree.measure()
        except (zlib.error, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise errors.UnreadableData(
                f"the pipeline tree of task {task_id} cannot be read ({type(exc).__name__})",
                {"taskId": str(task_id)},
            ) from None
        with self._trees_lock:
            self.trees_parsed += 1
        self.trees.put(snapshot_id, tree, tree.size)
        return tree

    def _preview(self, tree: _Tree, info: _TreeNode, root_id: str) -> dict[str, Any]:
        """The inputs of a node that has not run, as bk-sops previews them: its configured
        inputs with ${name} references rendered from the pipeline's constants (the root's
        plain context values first); events and gateways have none."""
        if info.kind not in ("ServiceActivity", SUBPROCESS):
            return {}
        context = _decoded(tree.constants.get("", ""))
        for key, kind, serializer, value in self._rows("context", self._sql_context, True, root_id):
            if kind == PLAIN_CONTEXT and serializer == "json":
                try:
                    context[_unwrap(key)] = json.loads(value)
                except ValueError:
                    continue  # not previewable: the tree's value stands
        for sub in info.path:
            context = {
                _unwrap(key): _render(value, context)
                for key, value in _decoded(tree.nodes[sub].inputs).items()
            }
        rendered = {key: _render(value, context) for key, value in _decoded(info.inputs).items()}
        if info.kind == SUBPROCESS:
            return {_unwrap(key): value for key, value in rendered.items()}
        return rendered

    def _prepare(self) -> None:
        """The SQL of every query, in the database's dialect (`loop` is reserved in MySQL)."""
        p = self.db.param
        loop = "`loop`" if isinstance(self.db, MySQLDatabase) else '"loop"'
        # The task in the business's first project (by id), or a row of nulls when the
        # business has a project and it no such task: one statement, not two.
        task = (
            "SELECT t.id, t.is_deleted, t.engine_ver, i.execution_snapshot_id, i.instance_id"
            " FROM core_project pr"
            f" LEFT JOIN taskflow3_taskflowinstance t ON t.id = {p} AND t.project_id = pr.id"
            " LEFT JOIN pipeline_pipelineinstance i ON i.id = t.pipeline_instance_id"
        )
        self._sql_project_task = f"{task} WHERE pr.id = {p}"
        self._sql_business_task = (
            f"{task} WHERE pr.id = (SELECT MIN(id) FROM core_project"
            f" WHERE bk_biz_id = {p} AND from_cmdb = {p})"
        )
        self._sql_project_business = f"SELECT bk_biz_id, from_cmdb FROM core_project WHERE id = {p}"
        self._sql_snapshot = f"SELECT data FROM pipeline_snapshot WHERE id = {p}"
        self._sql_state = (
            f"SELECT name, version, {loop}, retry, skip, error_ignored, started_time,"
            f" archived_time FROM eri_state WHERE node_id = {p}"
        )
        self._sql_data = (
            "SELECT inputs_serializer, outputs_serializer, inputs, outputs"
            f" FROM eri_executiondata WHERE node_id = {p}"
        )
        self._sql_histories = (
            f"SELECT id, {loop}, retry, skip, version, started_time, archived_time,"
            " inputs_serializer, outputs_serializer, inputs, outputs"
            f" FROM eri_executionhistory WHERE node_id = {p} AND {loop} = {p} ORDER BY id"
        )
        self._sql_children = (
            f"SELECT node_id, name, {loop}, retry, skip, error_ignored, version, started_time,"
            f" archived_time FROM eri_state WHERE parent_id = {p} ORDER BY id"
        )
        self._prepare_stamp()
        if isinstance(self.db, SqliteDatabase):
            self.db.register_function(_data_digest, _SQLITE_DATA_DIGEST, 2)
        self._sql_context = (
            f"SELECT {self._quoted('key')}, type, serializer, value FROM eri_contextvalue"
            f" WHERE pipeline_id = {p}"
        )

    def _sql_watch_tasks(self, count: int) -> str:
        p = self.db.param
        return (
            "SELECT t.id, i.instance_id, i.execution_snapshot_id"
            " FROM taskflow3_taskflowinstance t"
            " JOIN pipeline_pipelineinstance i ON i.id = t.pipeline_instance_id"
            f" WHERE t.id IN ({', '.join([p] * count)}) AND t.is_deleted = {p}"
            " AND t.engine_ver = 2"
        )

    def _sql_watch_states(self, count: int) -> str:
        """The state rows of count root pipelines' nodes, each with a digest of its
        execution data (see _watch_data_digest): the engine rewrites a node's data in place,
        its state row untouched, at each schedule of a RUNNING node, and after the state
        when a node finishes or fails (bamboo_engine.handlers.service_activity)."""
        p = self.db.param
        loop = "`loop`" if isinstance(self.db, MySQLDatabase) else '"loop"'
        return (
            f"SELECT s.node_id, s.name, s.{loop}, s.retry, s.started_time, s.archived_time,"
            f" {self._watch_data_digest()} FROM eri_state s"
            " LEFT JOIN eri_executiondata d ON d.node_id = s.node_id"
            f" WHERE s.root_id IN ({', '.join([p] * count)})"
        )

    def _watch_data_digest(self) -> str:
        """What changes whenever a node's eri_executiondata row does, cheaply, for the
        watch poll (which reads it for every node of every watched task, every interval).
        PostgreSQL: the row's xmin, the transaction that wrote its version: no data read
        (a rewrite of equal data moves it too: a re-read that sends nothing). MySQL and
        MariaDB: the length and CRC32 of inputs and outputs (CRC32 costs a fraction of
        MD5's time on kilobytes; a change of same length and CRC32, chance 2^-32, would
        wait for the node's next change). SQLite: the same, by a function of this store."""
        if isinstance(self.db, PostgresqlDatabase):
            return "d.xmin::text"
        if isinstance(self.db, MySQLDatabase):
            return (
                "CONCAT_WS(':', LENGTH(d.inputs), CRC32(d.inputs),"
                " LENGTH(d.outputs), CRC32(d.outputs))"
            )
        return f"{_SQLITE_DATA_DIGEST}(d.inputs, d.outputs)"

    def _prepare_stamp(self) -> None:
        if isinstance(self.db, SqliteDatabase):
            self.db.register_function(_md5, _SQLITE_DIGEST, 1)
            self.db.register_function(_row_digest, _SQLITE_ROW_DIGEST, -1)

    def _stamp_sql(self) -> _StampSql:
        """The stamp's statements (see stamp and _read_stamps) for the database node of
        this call."""
        db = self.db
        found = self._stamp_sqls.get(id(db))
        if found is None:
            found = self._stamp_sqls[id(db)] = self._make_stamp_sql(db)
        return found

    def _make_stamp_sql(self, db: Database) -> _StampSql:
        """The stamp's statements in db's dialect. The node's data is digested: on MariaDB
        (10.8 and later) by CRC32 and CRC32C side by side, 64 bits, ~8 times cheaper than
        MD5 (0.25 against 1.6 µs for 300 bytes, 2.3 against 18 µs for 10 kB); on MySQL and
        PostgreSQL by MD5; on SQLite, which has none, by a function this store gives
        each connection (the children's rows by 60 bits of MD5, as before). Each count
        and its aggregate share one subquery: on MariaDB a subquery costs more than its
        index probe. (Sending every value in one CONCAT_WS text column instead, fewer
        columns for the driver to read, measured no cheaper: MariaDB then formats each.)"""
        p, loop = db.param, self._quoted("loop")
        kids = [
            f"c.{name}"
            for name in (
                *("id", "node_id", "name", "version", loop, "retry", "skip", "error_ignored"),
                *("started_time", "archived_time"),
            )
        ]
        shown = [
            *("t.is_deleted", "t.engine_ver", "t.project_id", "pr.bk_biz_id", "pr.from_cmdb"),
            *("i.execution_snapshot_id", "i.instance_id", "s.version", f"s.{loop}", "s.retry"),
            *("s.skip", "s.error_ignored", "s.started_time", "s.archived_time"),
            *("d.inputs_serializer", "d.outputs_serializer"),
        ]
        if isinstance(db, MySQLDatabase):
            if _has_crc32c(db):
                digest = "CONCAT(CRC32({0}), ':', CRC32C({0}))".format
            else:
                digest = "MD5({})".format
            pair = "CONCAT({}, '/', COALESCE({}, 0))".format
            row = "CAST(CONV(LEFT(MD5(CONCAT_WS('|', {})), 15), 16, 10) AS UNSIGNED)".format
            marked = "COALESCE({}, '-')".format
            # Times as the text the server sends anyway: the driver then builds no
            # datetime (MySQLdb parses them in Python, ~10 µs each).
            shown = [f"CAST({c} AS CHAR)" if c.endswith("_time") else c for c in shown]
        elif isinstance(db, PostgresqlDatabase):
            digest = "md5({})".format
            pair = "({} || '/' || COALESCE({}, 0))".format
            row = "('x' || left(md5(concat_ws('|', {})), 15))::bit(60)::bigint".format
            marked = "coalesce({}::text, '-')".format
        else:
            digest = f"{_SQLITE_DIGEST}({{}})".format
            pair = "({} || '/' || COALESCE({}, 0))".format
            row = f"{_SQLITE_ROW_DIGEST}({{}})".format
            marked = "{}".format  # _row_digest marks nulls itself
        kids = [marked(c) for c in kids]
        summed = "SUM({})".format(row(", ".join(kids)))

        def select(node: str, children: str) -> str:
            """The stamp's columns, for the node named by node (a parameter or a column)."""
            histories = (
                f"(SELECT {pair('COUNT(*)', 'MAX(h.id)')}"
                f" FROM eri_executionhistory h WHERE h.node_id = {node})"
            )
            columns = [*shown, digest("d.inputs"), digest("d.outputs"), histories, children]
            return f"s.name, {', '.join(columns)}"

        def children_of(node: str) -> str:
            return (
                f"(SELECT {pair('COUNT(*)', summed)} FROM eri_state c WHERE c.parent_id = {node})"
            )

        def joined(node: str) -> str:
            """The task's instance and project, and the node's state and data rows."""
            return (
                " JOIN pipeline_pipelineinstance i ON i.id = t.pipeline_instance_id"
                " LEFT JOIN core_project pr ON pr.id = t.project_id"
                f" LEFT JOIN eri_state s ON s.node_id = {node}"
                f" LEFT JOIN eri_executiondata d ON d.node_id = {node}"
            )

        none = f"'{NO_CHILDREN}'"
        one = f" FROM taskflow3_taskflowinstance t{joined(p)} WHERE t.id = {p}"
        kept = f"CASE WHEN k.kids = 1 THEN {children_of('k.node')} ELSE {none} END"
        return _StampSql(
            full=f"SELECT 0, {select(p, children_of(p))}{one}",
            cheap=f"SELECT 0, {select(p, none)}{one}",
            many_head=f"SELECT k.tag, {select('k.node', kept)} FROM (",
            key_row=f"SELECT {p} AS tag, {p} AS task, {p} AS node, {p} AS kids",
            many_tail=(f") k JOIN taskflow3_taskflowinstance t ON t.id = k.task{joined('k.node')}"),
        )

    def _quoted(self, name: str) -> str:
        return f"`{name}`" if isinstance(self.db, MySQLDatabase) else f'"{name}"'


def _has_crc32c(db: Database) -> bool:
    """Whether db (MySQL or MariaDB, connected) has CRC32C: MariaDB 10.8 and later."""
    info = str(db.connection().get_server_info())
    if "MariaDB" not in info:
        return False
    found = re.match(r"(?:5\.5\.5-)?(\d+)\.(\d+)", info)
    return found is not None and (int(found.group(1)), int(found.group(2))) >= (10, 8)


def _md5(text: str | None) -> str | None:
    return None if text is None else hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def _row_digest(*values: object) -> int:
    """60 bits of a digest of a row's values, as the MySQL and PostgreSQL stamps take them."""
    text = "|".join("-" if v is None else str(v) for v in values)
    return int(hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()[:15], 16)


def _data_digest(inputs: str | None, outputs: str | None) -> str | None:
    """The length and CRC32 of each of a node's execution data columns, as the MySQL
    statement has them (BksopsStore._watch_data_digest); None for no row."""
    if inputs is None and outputs is None:
        return None
    found = []
    for text in (inputs, outputs):
        data = (text or "").encode()
        found.append(f"{len(data)}:{zlib.crc32(data)}")
    return ":".join(found)


def _index(pipeline: dict[str, Any], path: tuple[str, ...], tree: _Tree) -> None:
    """Adds a (sub-)pipeline of the web tree, and those inside it, to tree."""
    scope = path[-1] if path else ""
    tree.constants[scope] = _compact(
        {key[2:-1]: constant.get("value") for key, constant in pipeline["constants"].items()}
    )
    if not path:
        for key, constant in pipeline["constants"].items():
            if constant.get("source_type") != "component_outputs":
                continue
            for source, keys in (constant.get("source_info") or {}).items():
                if keys:
                    shown = (sys.intern(str(keys[0])), _unwrap(key))
                    tree.renamed[source] = (*tree.renamed.get(source, ()), shown)
    for event in (pipeline["start_event"], pipeline["end_event"]):
        tree.nodes[event["id"]] = _node(event, path, {})
    for gateway in pipeline.get("gateways", {}).values():
        tree.nodes[gateway["id"]] = _node(gateway, path, {})
    for activity in pipeline["activities"].values():
        if activity["type"] == SUBPROCESS:
            constants = activity.get("constants") or {}
            inputs = {key: c.get("value") for key, c in constants.items()}
            tree.nodes[activity["id"]] = _node(activity, path, inputs)
            _index(activity["pipeline"], (*path, activity["id"]), tree)
            continue
        component = activity.get("component") or {}
        inputs = {key: entry.get("value") for key, entry in (component.get("data") or {}).items()}
        tree.nodes[activity["id"]] = _node(activity, path, inputs, component)


def _node(
    raw: dict[str, Any],
    path: tuple[str, ...],
    inputs: dict[str, Any],
    component: dict[str, Any] | None = None,
) -> _TreeNode:
    return _TreeNode(
        name=raw.get("name"),
        kind=sys.intern(str(raw.get("type", ""))),
        component_code=sys.intern(str((component or {}).get("code") or "")),
        component_version=sys.intern(str((component or {}).get("version") or "")),
        error_ignorable=bool(raw.get("error_ignorable", False)),
        path=path,
        inputs=_compact(inputs),
    )


def _compact(found: dict[str, Any]) -> str:
    """A tree's dict of values as the compact JSON a _TreeNode keeps ("" for none): the
    engine's JSON values only (NaN and big integers included), so it reads back equal."""
    return _COMPACT(found) if found else ""


def _decoded(text: str) -> dict[str, Any]:
    """What _compact kept, as a new dict."""
    return json.loads(text) if text else {}


def _render(value: Any, context: dict[str, Any]) -> Any:
    """value with ${name} references to known names replaced: a value that is one
    reference alone becomes the referenced value itself, as the engine renders it."""
    if not isinstance(value, str):
        return value
    whole = _REFERENCE.fullmatch(value)
    if whole is not None and whole.group(1) in context:
        return context[whole.group(1)]

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        return str(context[name]) if name in context else match.group(0)

    return _REFERENCE.sub(one, value)


def _unwrap(key: str) -> str:
    """A sub-process constant's key without ${}, as bk-sops shows it."""
    return key[2:-1] if key.startswith("${") and key.endswith("}") else key


def _data(serializer: str, text: str | None, node_id: str, what: str) -> dict[str, Any]:
    """One execution data column as a dict: JSON, or a pickle read with the allow-list."""
    try:
        if serializer == "pickle":
            value = pickles.plain(pickles.loads_base64(text or ""))
        elif serializer == "json":
            value = json.loads(text or "{}")
        else:
            raise pickles.Refused(f"unknown serializer {serializer!r}")
    except (pickles.Refused, ValueError) as exc:
        raise _unreadable(node_id, what, str(exc)) from None
    if not isinstance(value, dict):
        raise _unreadable(node_id, what, f"a {type(value).__name__}, not an object")
    return value


def _dumps(value: dict[str, Any], node_id: str, what: str) -> str:
    """value as the rows' JSON text; UnreadableData naming the node if it will not go."""
    try:
        values.check(value, what)
    except values.ValueProblem as exc:
        raise _unreadable(node_id, what, str(exc)) from None
    return values.dumps(value)


def _unreadable(node_id: str, what: str, why: str) -> errors.UnreadableData:
    return errors.UnreadableData(
        f"the execution data of node {node_id} cannot be served: {what}: {why}",
        {"nodeId": node_id},
    )


def _text(value: Any) -> str:
    return value if isinstance(value, str) else values.dumps(value)


def _micros(value: Any) -> int | None:
    """A stored engine time (an aware or naive-UTC datetime, or SQLite's text) as
    microseconds since the epoch."""
    if value is None:
        return None
    moment = (
        value if isinstance(value, datetime.datetime) else datetime.datetime.fromisoformat(value)
    )
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return (moment - _EPOCH) // datetime.timedelta(microseconds=1)


def _summary(index: int, node_id: str, info: _TreeNode, state: tuple[Any, ...] | None) -> ListedRow:
    """A node of the tree as a listing shows it, with its eri_state row if it ran."""
    name, loop, retry, started, archived = state or (None, 1, 0, None, None)
    return ListedRow(
        index,
        index,
        node_id,
        info.path,
        info.name or "",  # an event's null name: the summary has no null (name_null)
        info.component_code,
        name,
        loop,
        retry,
        _micros(started),
        _micros(archived),
    )


def _unlisted() -> errors.UnsupportedByStore:
    """ListTaskNodes on this store: the listing queries read our own node table (Store)."""
    return errors.UnsupportedByStore(
        "ListTaskNodes is not served from a bk-sops database yet; "
        "GetTaskNodeDetail and BatchGetTaskNodeDetails are"
    )
