"""A one-line progress bar for long work (loads, seeding, scale datasets), on stderr.

It draws only when stderr is a terminal: piped into a file, a log shipper or a CI log,
long work says nothing until it is done, rather than filling the log with redraws. Our
own few lines rather than a dependency (tqdm): all it has to do is redraw one line with
a carriage return, at most ten times a second.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """A bar for count of total units, redrawn at most ten times a second.

    enabled: None (the default) draws when stream is a terminal."""

    WIDTH = 30
    EVERY_SECONDS = 0.1

    def __init__(
        self,
        total: int,
        unit: str,
        label: str = "",
        stream: TextIO | None = None,
        enabled: bool | None = None,
    ) -> None:
        self.total = max(total, 1)
        self.unit = unit
        self.label = f"{label} " if label else ""
        self.stream = sys.stderr if stream is None else stream
        self.enabled = _is_terminal(self.stream) if enabled is None else enabled
        self.count = 0
        self.detail = ""
        self.started = time.perf_counter()
        self.drawn = 0.0

    def update(self, count: int, detail: str = "") -> None:
        """count units are done (detail: a few words more, e.g. rows per second)."""
        self.count, self.detail = count, detail
        now = time.perf_counter()
        if self.enabled and now - self.drawn >= self.EVERY_SECONDS:
            self.drawn = now
            self._draw()

    def advance(self, by: int = 1) -> None:
        """by more units are done."""
        self.update(self.count + by, self.detail)

    def done(self, detail: str | None = None) -> None:
        """Draw the bar as it ends, and end its line."""
        if detail is not None:
            self.detail = detail
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()

    def elapsed(self) -> float:
        """Seconds since the bar was made."""
        return time.perf_counter() - self.started

    def _draw(self) -> None:
        share = min(self.count / self.total, 1.0)
        bar = "#" * round(share * self.WIDTH)
        detail = f"  {self.detail}" if self.detail else ""
        self.stream.write(
            f"\r{self.label}[{bar:<{self.WIDTH}}] {share:4.0%}"
            f" {self.count:,}/{self.total:,} {self.unit}{detail} "
        )
        self.stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False
