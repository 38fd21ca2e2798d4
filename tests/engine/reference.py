"""bk-sops's legacy `data` for a node, computed from the engine's raw rows by its rules.

An independent model of bk-sops's engine v2 path (../shared/reference/bk-sops.md §2.3-2.7:
TaskFlowInstance.get_node_detail -> NodeCommandDispatcher.get_node_data_v2 and
get_node_detail_v2, bamboo_engine.api.get_children_states and get_node_histories,
format_pipeline_status, _format_outputs, Django's JSON encoder) over the rows a test reads
with SQL of its own: what the service must answer, field for field and type for type.
Nodes not run are modelled for events and gateways (no preview); the preview of services is
checked elsewhere.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import io
import json
import pickle
import uuid
import zlib
from collections.abc import Callable
from typing import Any
from zoneinfo import ZoneInfo

Rows = Callable[..., list[tuple[Any, ...]]]

SHANGHAI = ZoneInfo("Asia/Shanghai")
_STATE = (
    "SELECT node_id, name, root_id, parent_id, version, {loop}, retry, skip, error_ignored,"
    " started_time, archived_time FROM eri_state WHERE {where} ORDER BY id"
)
_HISTORY = (
    "SELECT id, node_id, started_time, archived_time, {loop}, retry, skip, version,"
    " inputs_serializer, outputs_serializer, inputs, outputs FROM eri_executionhistory"
    " WHERE node_id = ? AND {loop} = ? ORDER BY id"
)


def bk_sops_data(
    rows: Rows,
    tree: dict[str, Any],
    node_id: str,
    stack: tuple[str, ...],
    schemas: dict[tuple[str, str], list[dict[str, str]]],
    loop: int | None = None,
    component_code: str = "",
    now: datetime.datetime | None = None,
) -> dict[str, Any]:
    """The `data` bk-sops sends for the node; rows(sql, *params) reads the engine's tables
    ('?' placeholders, "loop" quoted as in PostgreSQL)."""
    info = _node_info(tree, stack, node_id)
    states = rows(_STATE.format(loop='"loop"', where="node_id = ?"), node_id)
    if not states:
        data: dict[str, Any] = {
            "name": info["name"],
            "error_ignorable": info.get("error_ignorable", False),
            "state": "READY",
        }
        assert info["type"] not in ("ServiceActivity", "SubProcess"), "previews: not modelled"
        data.update(inputs={}, outputs=[], ex_data="")
        return data
    detail = _state(states[0], now)
    detail["parent_id"] = detail["root_id:"]  # bamboo fills the node's parent_id so
    detail["children"] = {
        child[0]: {**_state(child, now), "children": {}}
        for child in rows(_STATE.format(loop='"loop"', where="parent_id = ?"), node_id)
    }
    if loop is None or loop >= detail["loop"]:
        histories = [
            _history(h) for h in rows(_HISTORY.format(loop='"loop"'), node_id, detail["loop"])
        ]
        for history in histories:
            history["ex_data"] = history["outputs"].get("ex_data", "")
        detail["histories"] = histories
        detail["history_id"] = -1
    else:
        histories = [_history(h) for h in rows(_HISTORY.format(loop='"loop"'), node_id, loop)]
        final = histories[-1]
        final["state"] = "FINISHED"
        _format(final, now)
        for key in ("start_time", "finish_time", "elapsed_time", "loop", "skip", "state"):
            detail[key] = final[key]
        detail["histories"] = histories[:-1]
        detail["history_id"] = final["id"]
        detail["version"] = final["version"]
    for history in detail["histories"]:
        history.setdefault("state", "FAILED")
        history["history_id"] = history["id"]
        _format(history, now)
    # get_node_data_v2 reads the state again: the current loop, not the one shown.
    data = _node_data(rows, tree, info, node_id, states[0][5], loop, component_code, schemas)
    detail.update(data)
    return detail


def _node_data(
    rows: Rows,
    tree: dict[str, Any],
    info: dict[str, Any],
    node_id: str,
    current: int,
    loop: int | None,
    component_code: str,
    schemas: dict[tuple[str, str], list[dict[str, str]]],
) -> dict[str, Any]:
    """get_node_data_v2 for a node that ran, then _format_outputs."""
    if loop is None or loop >= current:
        found = rows(
            "SELECT inputs_serializer, outputs_serializer, inputs, outputs"
            " FROM eri_executiondata WHERE node_id = ?",
            node_id,
        )
        if not found:
            return {"inputs": {}, "outputs": [], "ex_data": ""}
        inputs, raw = _column(found[0][0], found[0][2]), _column(found[0][1], found[0][3])
    else:
        last = rows(_HISTORY.format(loop='"loop"'), node_id, loop)[-1]
        inputs, raw = _column(last[8], last[10]), _column(last[9], last[11])
    if info["type"] == "SubProcess":
        inputs = {key[2:-1]: value for key, value in inputs.items()}
    if component_code:
        version = str((info.get("component") or {}).get("version"))
        declared = schemas[component_code, version]
        table = [
            {"name": o["name"], "key": o["key"], "value": raw.get(o["key"], ""), "preset": True}
            for o in declared
        ]
        keys = [o["key"] for o in declared]
        table += [
            {"name": k, "key": k, "value": v, "preset": False}
            for k, v in raw.items()
            if k not in keys
        ]
    else:
        table = [{"key": k, "value": v, "preset": False} for k, v in raw.items()]
    for key, constant in tree["constants"].items():
        if constant.get("source_type") == "component_outputs":
            source = (constant.get("source_info") or {}).get(node_id) or []
            for row in table if source else []:
                if row["key"] == source[0]:
                    row["key"] = key[2:-1]
    return {"inputs": inputs, "outputs": table, "ex_data": raw.get("ex_data")}


def _node_info(tree: dict[str, Any], stack: tuple[str, ...], node_id: str) -> dict[str, Any]:
    pipeline = tree
    for sub in stack:
        pipeline = pipeline["activities"][sub]["pipeline"]
    nodes = {
        pipeline["start_event"]["id"]: pipeline["start_event"],
        pipeline["end_event"]["id"]: pipeline["end_event"],
        **pipeline["activities"],
        **pipeline.get("gateways", {}),
    }
    found: dict[str, Any] = nodes[node_id]
    return found


def _state(row: tuple[Any, ...], now: datetime.datetime | None) -> dict[str, Any]:
    node_id, name, root_id, parent_id, version, loop, retry, skip, ignored, started, archived = row
    state = {
        "id": node_id,
        "state": name,
        "root_id:": root_id,
        "parent_id": parent_id,
        "version": version,
        "loop": loop,
        "retry": retry,
        "skip": bool(skip),
        "error_ignorable": bool(ignored),
        "error_ignored": bool(ignored),
        "started_time": _moment(started),
        "archived_time": _moment(archived),
    }
    _format(state, now)
    return state


def _history(row: tuple[Any, ...]) -> dict[str, Any]:
    id_, node_id, started, archived, loop, retry, skip, version, isz, osz, ins, outs = row
    return {
        "id": int(id_),
        "node_id": node_id,
        "started_time": _moment(started),
        "archived_time": _moment(archived),
        "loop": loop,
        "retry": retry,
        "skip": bool(skip),
        "version": version,
        "inputs": _column(isz, ins),
        "outputs": _column(osz, outs),
    }


def _format(item: dict[str, Any], now: datetime.datetime | None) -> None:
    """format_pipeline_status: times in +0800 or None, elapsed_time, children {}."""
    started, archived = item.pop("started_time"), item.pop("archived_time")
    item["start_time"] = (
        started.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M:%S %z") if started else None
    )
    item["finish_time"] = (
        archived.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M:%S %z") if archived else None
    )
    if not started:
        item["elapsed_time"] = 0
    else:
        end = archived or now or datetime.datetime.now(datetime.UTC)
        item["elapsed_time"] = round((end - started).total_seconds())
    item.setdefault("children", {})


def _moment(value: Any) -> datetime.datetime | None:
    if value is None:
        return None
    moment = (
        value if isinstance(value, datetime.datetime) else datetime.datetime.fromisoformat(value)
    )
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def _column(serializer: str, text: str | None) -> dict[str, Any]:
    """bamboo's SerializerMixin, then what Django's JSON encoder makes of the values."""
    if serializer == "json":
        value: dict[str, Any] = json.loads(text or "{}")
        return value
    return _django(_Unpickler(io.BytesIO(base64.b64decode(text or ""))).load())


class _FancyDict(dict[str, Any]):
    def __setstate__(self, state: Any) -> None:
        self.update(state)


class _Unpickler(pickle.Unpickler):
    """The engine's own (trusted, test-made) pickles; bamboo's FancyDict read as a dict."""

    def find_class(self, module: str, name: str) -> Any:
        if name == "FancyDict":
            return _FancyDict
        return super().find_class(module, name)


def _django(value: Any) -> Any:
    """DjangoJSONEncoder.default's strings for what json cannot write."""
    if isinstance(value, dict):
        return {k: _django(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_django(v) for v in value]
    if isinstance(value, datetime.datetime):
        text = value.isoformat()
        if value.microsecond:
            text = text[:23] + text[26:]
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    return value


def web_tree(snapshot: bytes) -> dict[str, Any]:
    tree: dict[str, Any] = json.loads(zlib.decompress(snapshot))
    return tree
