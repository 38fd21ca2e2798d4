"""The legacy routes: bk-sops parameters in, the bk-sops envelope out.

What the envelope and ``data`` look like is fixed by legacy-contract.md (in the shared
reference); this module only lays the NodeDetail the server sent out in that shape.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from datetime import tzinfo
from typing import Any

from bksops.tasknode.v1 import task_node_pb2 as pb
from google.rpc import status_pb2

from server import errors
from server import values
from server.errors import FieldViolation
from server.gateway import statuses
from server.gateway.requests import Request
from server.gateway.requests import show
from server.nodes import CURRENT_ATTEMPT

Params = dict[str, values.JSON]

TIME_FORMAT = "%Y-%m-%d %H:%M:%S %z"
#: The scope that reads bk_biz_id as a CMDB business id; any other value means a project id.
CMDB_BIZ = "cmdb_biz"
INT32_MAX = 2**31 - 1
#: Integer text as the legacy parameters carry it; longer ones are out of range anyway.
_INTEGER = re.compile(r"-?[0-9]{1,12}")
#: Half a surrogate pair: valid in a Python str (JSON "\ud800"), not in a protobuf string.
_SURROGATE = re.compile("[\ud800-\udfff]")
_STATES = {v.number: v.name.removeprefix("NODE_STATE_") for v in pb.NodeState.DESCRIPTOR.values}


def read_params(request: Request) -> Params:
    """A legacy request's parameters: the query, then a POST's JSON body, then the path."""
    params: Params = dict(request.query_pairs())
    if request.method == "POST":
        params.update(request.json_object())
    params.update(request.path_vars)
    return params


def build_request(params: Params) -> pb.GetTaskNodeDetailRequest:
    """The GetTaskNodeDetailRequest for legacy parameters.

    Only the legacy encodings are read here (ids as strings or numbers, the stack as
    JSON text, loop as text); whether the values make sense is the server's call.
    """
    request = pb.GetTaskNodeDetailRequest(
        bk_biz_id=_id(params, "bk_biz_id"),
        task_id=_id(params, "task_id"),
        node_id=_text(params, "node_id"),
        component_code=_text(params, "component_code"),
        subprocess_stack=_stack(params.get("subprocess_stack")),
        scope=_scope(params.get("scope")),
    )
    loop = _integer(params, "loop", errors.InvalidLoop, "a positive integer")
    if loop is not None:
        request.loop = loop
    limit = _integer(params, "max_histories", errors.InvalidArgument, "an integer, 0 or more")
    if limit is not None:
        request.max_histories = limit
    return request


def _id(params: Params, name: str) -> str:
    value = params.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is None or isinstance(value, str):
        return _text(params, name)
    raise _invalid(
        errors.InvalidArgument, name, f"must be a string or an integer, not {show(value)}"
    )


def _text(params: Params, name: str) -> str:
    value = params.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _invalid(errors.InvalidArgument, name, f"must be a string, not {show(value)}")
    if _SURROGATE.search(value):
        raise _invalid(errors.InvalidArgument, name, "is not valid Unicode text")
    return value


def _stack(value: values.JSON) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = values.strict_loads(value)
        except (ValueError, RecursionError):
            raise _bad_stack() from None
    if not isinstance(value, list) or not all(
        isinstance(item, str) and not _SURROGATE.search(item) for item in value
    ):
        raise _bad_stack()
    return value


def _bad_stack() -> errors.InvalidSubprocessStack:
    # The reference's words, which callers may match on.
    return errors.InvalidSubprocessStack(
        "subprocess_stack is not a valid array json",
        {"fields": "subprocess_stack"},
        [FieldViolation("subprocess_stack", "must be a JSON array of node ids")],
    )


def _scope(value: values.JSON) -> pb.Scope:
    if value is None:
        return pb.SCOPE_CMDB_BIZ
    if not isinstance(value, str):
        raise _invalid(errors.InvalidArgument, "scope", f"must be a string, not {show(value)}")
    return pb.SCOPE_CMDB_BIZ if value == CMDB_BIZ else pb.SCOPE_PROJECT


def _integer(
    params: Params, name: str, error: type[errors.InvalidArgument], wanted: str
) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not _INTEGER.fullmatch(text):
        raise _invalid(error, name, f"must be {wanted}, not {show(value)}")
    number = int(text)
    if not -INT32_MAX - 1 <= number <= INT32_MAX:
        raise _invalid(error, name, f"must be {wanted} up to {INT32_MAX}, not {text}")
    return number


def _invalid(error: type[errors.InvalidArgument], name: str, problem: str) -> Exception:
    message = f"{name} {problem}"
    return error(message, {"fields": name}, [FieldViolation(name, message)])


def render_detail(detail: pb.NodeDetail, named_outputs: bool, zone: tzinfo) -> dict[str, Any]:
    """The legacy ``data`` of a NodeDetail; outputs carry names when component_code was given.

    A node that ran gets the union of what bk-sops's two engines send: engine v2's
    ``root_id:`` (the colon is bk-sops's) and ``parent_id`` (the root's id, as bk-sops
    fills it), each history's ``id``, and the legacy engine's ``name``.
    """
    inputs = values.object_from_message(detail.inputs)
    outputs = [_output(output, named_outputs) for output in detail.outputs]
    ex_data = detail.ex_data if detail.HasField("ex_data") else None
    if not detail.executed:
        return {
            "name": None if detail.name_null else detail.name,
            "error_ignorable": detail.error_ignorable,
            "state": _state(detail.state),
            "inputs": inputs,
            "outputs": outputs,
            "ex_data": ex_data,
        }
    current = detail.history_id == CURRENT_ATTEMPT
    return {
        "id": detail.id,
        "name": None if detail.name_null else detail.name,
        "state": _state(detail.state),
        "root_id:": detail.root_pipeline_id,
        "parent_id": detail.root_pipeline_id,
        **_times(detail, zone),
        "skip": detail.skip,
        "retry": detail.retry,
        "loop": detail.loop,
        "error_ignorable": detail.error_ignorable,
        "error_ignored": detail.error_ignored,
        "version": detail.version,
        "inputs": inputs,
        "outputs": outputs,
        "ex_data": ex_data,
        "histories": [_attempt(attempt, current, zone) for attempt in detail.histories],
        "children": {
            child.id: _child(child, detail.root_pipeline_id, detail.id, zone)
            for child in detail.children
        },
        "history_id": detail.history_id,
    }


def _state(state: int) -> str:
    """The engine's bare name (FINISHED for NODE_STATE_FINISHED); a newer server's number as is."""
    return _STATES.get(state, str(state))


def _output(output: pb.NodeOutput, named: bool) -> dict[str, Any]:
    value = values.from_message(output.value)
    if named:
        return {"name": output.name, "key": output.key, "value": value, "preset": output.preset}
    return {"key": output.key, "value": value, "preset": output.preset}


def _attempt(attempt: pb.NodeAttempt, current: bool, zone: tzinfo) -> dict[str, Any]:
    """One history as bk-sops shows it: in the current loop its ex_data is the outputs'
    (``""`` when they hold none); an older loop's histories have no ex_data key at all
    (bk-sops's _assemble_histroy_detail never sets it)."""
    shown = {
        "id": attempt.history_id,
        "history_id": attempt.history_id,
        "node_id": attempt.node_id,
        "loop": attempt.loop,
        "retry": attempt.retry,
        "skip": attempt.skip,
        "version": attempt.version,
        "state": _state(attempt.state),
        **_times(attempt, zone),
        "inputs": values.object_from_message(attempt.inputs),
        "outputs": values.object_from_message(attempt.outputs),
        "children": {},
    }
    if current:
        shown["ex_data"] = attempt.ex_data if attempt.HasField("ex_data") else ""
    return shown


def _child(child: pb.ChildNode, root_id: str, parent_id: str, zone: tzinfo) -> dict[str, Any]:
    """A child's state; its parent_id is the sub-process's pipeline, whose id is the
    sub-process node's."""
    return {
        "id": child.id,
        "name": child.name,
        "state": _state(child.state),
        "root_id:": root_id,
        "parent_id": parent_id,
        **_times(child, zone),
        "skip": child.skip,
        "retry": child.retry,
        "loop": child.loop,
        # The engine's child states carry the runtime flag under both names, as at the top.
        "error_ignorable": child.error_ignored,
        "error_ignored": child.error_ignored,
        "version": child.version,
        "children": {},
    }


def _times(message: pb.NodeDetail | pb.NodeAttempt | pb.ChildNode, zone: tzinfo) -> dict[str, Any]:
    return {
        "start_time": _time(message, "start_time", zone),
        "finish_time": _time(message, "finish_time", zone),
        "elapsed_time": message.elapsed_seconds,
    }


def _time(message: Any, name: str, zone: tzinfo) -> str | None:
    if not message.HasField(name):
        return None
    return datetime.fromtimestamp(getattr(message, name).seconds, zone).strftime(TIME_FORMAT)


def success(data: Any, request: Request) -> dict[str, Any]:
    """The envelope of an answer."""
    return {
        "result": True,
        "code": 0,
        "message": "",
        "data": data,
        "request_id": request.request_id,
        "trace_id": request.trace_id,
    }


def success_body(data: bytes, request: Request) -> bytes:
    """The envelope of an answer as JSON text, around data already rendered as JSON text:
    byte for byte what encoding success(...) would give."""
    ids = json.dumps(request.request_id), json.dumps(request.trace_id)
    return b"".join(
        (
            b'{"result":true,"code":0,"message":"","data":',
            data,
            b',"request_id":',
            ids[0].encode("ascii"),
            b',"trace_id":',
            ids[1].encode("ascii"),
            b"}",
        )
    )


def failure(status: status_pb2.Status, request: Request) -> dict[str, Any]:
    """The envelope of a failure: the status's message and the legacy code of its reason."""
    return {
        "result": False,
        "code": statuses.legacy_code(status),
        "message": status.message,
        "data": None,
        "request_id": request.request_id,
        "trace_id": request.trace_id,
    }


def gateway_failure(status: status_pb2.Status, code: int, code_name: str) -> dict[str, Any]:
    """The API gateway's own error envelope (its credential and permission errors)."""
    return {
        "code_name": code_name,
        "code": code,
        "result": False,
        "data": None,
        "message": status.message,
    }
