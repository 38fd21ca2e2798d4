"""Queries built by peewee once and run many times with new values.

peewee builds a query's SQL anew on every execution, walking the whole expression
tree: about 150 µs a query on our machines, while SQLite runs it in 15. A query
shape the store runs on every call is therefore built once, with a distinct
sentinel value standing in each place a call's value goes; the SQL and the
positions of the sentinels among the parameters are kept, and each run only
swaps the call's values in. The SQL is still peewee's, for whichever database
the store was opened on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peewee import Database


class Slot:
    """Stand-ins for the values a prepared query will be run with."""

    @staticmethod
    def text(name: str) -> str:
        return f"\x00slot:{name}\x00"

    @staticmethod
    def number(index: int) -> int:
        # Far outside every id the store holds, and distinct per slot.
        return -(7_346_000_000_000 + index)


class Prepared:
    """The SQL of one query shape, with the positions of its named values."""

    def __init__(self, db: Database, build: Callable[..., Any], **slots: str | int) -> None:
        """db: a database of the dialect the SQL is built for."""
        sql, params = build(**slots).sql()
        self.sql: str = sql
        self.params: list[Any] = list(params)
        self.positions: list[tuple[str, int]] = []
        for name, sentinel in slots.items():
            found = [i for i, value in enumerate(self.params) if value == sentinel]
            if len(found) != 1:
                raise ValueError(f"slot {name} appears {len(found)} times in {self.sql}")
            self.positions.append((name, found[0]))

    def rows(self, db: Database, **values: object) -> list[tuple[Any, ...]]:
        """Run on db (of the dialect it was built for) with these values in the slots;
        every row, as tuples."""
        params = self.params.copy()
        for name, position in self.positions:
            params[position] = values[name]
        return list(db.execute_sql(self.sql, params).fetchall())
