"""What the reference's rules (server.nodes) and the servicer need of a node store.

Two stores answer it: server.db.store.Store reads our own tables (loaded from the
import format); server.db.bksops.BksopsStore reads a bk-sops deployment's engine
tables. Both hand back the same rows, so the rules live in server.nodes once.
"""

from __future__ import annotations

from collections.abc import Hashable
from collections.abc import Mapping
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Protocol

from server.db.store import After
from server.db.store import AttemptRow
from server.db.store import ChildRow
from server.db.store import ListedRow
from server.db.store import NodeRow
from server.db.store import TaskState
from server.filters import Term


class NodeStore(Protocol):
    """Reads node records for one call at a time (see server.db.store.Store)."""

    def session(
        self, deadline: float | None = None, primary: bool = False
    ) -> AbstractContextManager[None]:
        """The connection(s) of one call, bounded by deadline and the store's timeout."""
        ...

    def end_snapshot(self) -> None:
        """End the call's read snapshot, so the next read begins a fresh one."""
        ...

    def close(self) -> None:
        """Close every connection (at shutdown)."""
        ...

    def find_node(
        self, biz_id: int, by_project_id: bool, task_id: int, node_id: str, heavy: bool = True
    ) -> NodeRow:
        """The node's row; NotFound naming the first of business, task or node missing.
        Unless heavy, a store may leave the JSON columns out ("{}", "{}", None)."""
        ...

    def find_task(self, biz_id: int, by_project_id: bool, task_id: int) -> None:
        """NotFound naming the business or task missing, else nothing."""
        ...

    def list_nodes(
        self,
        task_id: int,
        parent: str | None,
        terms: tuple[Term, ...],
        after: After | None,
        limit: int,
    ) -> list[ListedRow]:
        """A page of the task's nodes (of one sub-process, with parent) in stored order."""
        ...

    def count_nodes(self, task_id: int, parent: str | None, terms: tuple[Term, ...]) -> int:
        """How many nodes list_nodes would list from the start, with no limit."""
        ...

    def stamp(self, task_id: int, node_id: str) -> Hashable | None:
        """What a cached reply about the task's node is checked against; None: do not cache."""
        ...

    def stamp_ahead(self, keys: Sequence[tuple[int, str]]) -> None:
        """Read now, where that is cheaper than one by one, the stamps this call's stamp()
        will ask of keys (task id, node id): a batch reads them before its first reply."""
        ...

    def task_changes(self, known: Mapping[int, Hashable | None]) -> dict[int, TaskState]:
        """The tasks of known whose stamp differs from the one given, with their new
        stamp and every node's summary (None and no nodes: the task is not there)."""
        ...

    def business_of_project(self, project_id: int) -> int | None:
        """The business a project belongs to; None for no such project or none."""
        ...

    def attempts(self, task_id: int, node_id: str, loop: int) -> list[AttemptRow]:
        """The node's earlier attempts in one loop, oldest first."""
        ...

    def children(self, task_id: int, node_id: str) -> list[ChildRow]:
        """The direct children of a sub-process node that have run, in stored order."""
        ...

    def output_schema(self, code: str, version: str) -> list[tuple[str, str]]:
        """The declared outputs of a plugin at a version as (key, name), in order."""
        ...
