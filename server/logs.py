"""Logging for every process: one configure() call, text (the default) or JSON lines.

Text is what an engineer reads on a terminal; JSON (TASKNODE_LOG_FORMAT=json) is what a log
shipper reads: one object per line with stable keys, for every record, access lines
included. Access lines arrive in batches (server.access); the JSON formatter writes one
object per line of a batch, with the line's fields as keys of their own.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Iterable
from datetime import datetime
from typing import Any
from typing import Protocol
from typing import TypeGuard

from server import traces
from server.config import Config

FORMATS = ("text", "json")
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: A worker process's text lines name it: tasknode.workers[1].
WORKER_TEXT = "%(asctime)s %(levelname)s %(name)s[{index}]: %(message)s"


class Batch(Protocol):
    """What server.access hands logging: lines as text, or as one dict each."""

    def __str__(self) -> str: ...

    def entries(self) -> Iterable[tuple[float, str, dict[str, Any]]]:
        """Each line: its time (epoch seconds), its text, its fields."""
        ...


def configure(config: Config, worker: int | None = None) -> None:
    """Send every record of this process to stderr in config.log_format, at
    config.log_level. worker, in a worker process: its index, in each line.

    SystemExit, with a message naming the setting, for a format or level it does not know:
    a bad setting stops the start, before anything is served."""
    if config.log_format not in FORMATS:
        raise SystemExit(
            f"TASKNODE_LOG_FORMAT: {config.log_format!r} is not one of {', '.join(FORMATS)}"
        )
    level = config.log_level.upper()
    if not isinstance(logging.getLevelName(level), int):
        raise SystemExit(f"TASKNODE_LOG_LEVEL: {config.log_level!r} is not a logging level")
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
        # Warnings would otherwise reach stderr as text lines of their own.
        logging.captureWarnings(True)
    else:
        text = TEXT if worker is None else WORKER_TEXT.format(index=worker)
        handler.setFormatter(logging.Formatter(text))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def trace_id(given: str | None) -> str | None:
    """The id a line carries as trace_id: the one its record was given (an access line's,
    noted during its call), else the trace id of the span current where the record is
    written (a line logged while serving a call, when tracing), else none."""
    return given or traces.current_trace_id()


def rfc3339(seconds: float) -> str:
    """seconds since the epoch as RFC 3339 in the local zone, to the millisecond."""
    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, trace_id, and for access
    lines their fields; a traceback goes in "exception", still on the one line."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        base: dict[str, Any] = {"level": record.levelname, "logger": record.name}
        if self.worker is not None:
            base["worker"] = self.worker
        if _is_batch(record.msg):
            return "\n".join(
                self._line(base, moment, text, fields)
                for moment, text, fields in record.msg.entries()
            )
        fields: dict[str, Any] = {"trace_id": trace_id(getattr(record, "trace_id", None))}
        if record.exc_info:
            fields["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            fields["exception"] = record.exc_text
        if record.stack_info:
            fields["stack"] = record.stack_info
        return self._line(base, record.created, record.getMessage(), fields)

    @staticmethod
    def _line(base: dict[str, Any], moment: float, message: str, fields: dict[str, Any]) -> str:
        line = {"time": rfc3339(moment), **base, "message": message, **fields}
        # default=str: a field of a type json does not know still makes a line, not an error.
        return json.dumps(line, default=str)


def _is_batch(msg: object) -> TypeGuard[Batch]:
    return hasattr(msg, "entries") and callable(msg.entries)
