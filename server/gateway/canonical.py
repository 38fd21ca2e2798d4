"""The canonical routes: an HttpRule's request and reply in grpc-gateway's proto JSON.

grpc-gateway's defaults, pinned here: field names in lowerCamelCase (proto names are
accepted on the way in), fields without presence printed even when zero, int64 as
strings, enums by name; unknown query parameters and body fields are discarded;
errors are the google.rpc.Status as proto JSON, ``{"code", "message", "details"}``.
"""

from __future__ import annotations

import re
from typing import Any

from bksops.tasknode.v1 import task_node_pb2
from google.protobuf import descriptor_pool
from google.protobuf import json_format
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.rpc import status_pb2

from server import errors
from server.errors import FieldViolation
from server.gateway.requests import Request
from server.gateway.routes import Route
from server.query import SUMMARY_FIELDS

_INTEGER = re.compile(r"[-+]?[0-9]{1,20}")
#: One entity tag of an If-None-Match list: optionally weak, then quoted.
_ENTITY_TAG = re.compile(r'(?:W/)?"[^"]*"')
#: A FieldMask query parameter takes comma-separated paths, as grpc-gateway reads it.
_FIELD_MASK = "google.protobuf.FieldMask"
_TRUE = frozenset({"true", "True", "TRUE", "t", "T", "1"})
_FALSE = frozenset({"false", "False", "FALSE", "f", "F", "0"})
_INTEGER_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED32,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def build_request(route: Route, request: Request) -> Message:
    """The RPC's request message from the path variables, the query and (per the rule) the body."""
    message = message_factory.GetMessageClass(route.rpc.input_type)()
    try:
        if route.body == "*":
            json_format.ParseDict(request.json_object(), message, ignore_unknown_fields=True)
        elif route.body and (body := request.json_body()) is not None:
            json_format.ParseDict({route.body: body}, message, ignore_unknown_fields=True)
        if route.body != "*":
            bound = set(request.path_vars) | {route.body}
            query = _query_fields(route.rpc.input_type, request.query_pairs(), bound)
            json_format.ParseDict(query, message)
        json_format.ParseDict(_nested(request.path_vars.items()), message)
    except json_format.ParseError as exc:
        raise errors.InvalidArgument(str(exc)) from None
    return message


def _query_fields(
    descriptor: Descriptor, pairs: list[tuple[str, str]], bound: set[str]
) -> dict[str, Any]:
    """The query as a proto JSON object, skipping names of no field or of bound ones."""
    found: dict[tuple[FieldDescriptor, ...], tuple[str, list[str]]] = {}
    for name, text in pairs:
        path = _field_path(descriptor, name)
        if path is None or ".".join(f.name for f in path) in bound:
            continue
        found.setdefault(path, (name, []))[1].append(text)
    fields: list[tuple[str, Any]] = []
    for path, (name, texts) in found.items():
        leaf = path[-1]
        if leaf.message_type is not None and leaf.message_type.full_name == _FIELD_MASK:
            value: Any = _field_mask(texts)
        elif leaf.is_repeated:
            value = [_scalar(leaf, name, text) for text in texts]
        elif len(texts) > 1:
            raise _bad(name, f"{name} is given {len(texts)} times; it takes one value")
        else:
            value = _scalar(leaf, name, texts[0])
        fields.append((".".join(f.name for f in path), value))
    return _nested(fields)


def _field_mask(texts: list[str]) -> str:
    """FieldMask query values (?read_mask=state,start_time, perhaps repeated) as the mask's
    proto JSON string: proto or JSON names, each path in lowerCamelCase. A name that is
    no field stays as it is, for the service to refuse by its path."""
    paths = [path.strip() for text in texts for path in text.split(",") if path.strip()]
    return ",".join(".".join(_camel(part) for part in path.split(".")) for path in paths)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


#: The JSON names of a summary node (ListTaskNodes' basic view).
_SUMMARY = {_camel(name) for name in SUMMARY_FIELDS}


def _field_path(descriptor: Descriptor, name: str) -> tuple[FieldDescriptor, ...] | None:
    """The fields along a dotted query name (proto or JSON names); None if it names no field."""
    path: list[FieldDescriptor] = []
    current: Descriptor | None = descriptor
    for part in name.split("."):
        if current is None or (path and path[-1].is_repeated):
            return None
        field = current.fields_by_name.get(part) or current.fields_by_camelcase_name.get(part)
        if field is None:
            return None
        path.append(field)
        current = field.message_type
    return tuple(path)


def _scalar(field: FieldDescriptor, name: str, text: str) -> Any:
    """One query value as proto JSON takes it; json_format checks ranges and enum names."""
    if field.type == FieldDescriptor.TYPE_BOOL:
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise _bad(name, f"{name} must be true or false, not {text[:40]!r}")
    if field.type in _INTEGER_TYPES and not _INTEGER.fullmatch(text):
        raise _bad(name, f"{name} must be an integer, not {text[:40]!r}")
    if field.type == FieldDescriptor.TYPE_ENUM and _INTEGER.fullmatch(text):
        return int(text)
    return text


def _nested(fields: Any) -> dict[str, Any]:
    """{"a.b": 1} as {"a": {"b": 1}}."""
    tree: dict[str, Any] = {}
    for dotted, value in fields:
        *parents, leaf = dotted.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


def _bad(name: str, message: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(message, {"fields": name}, [FieldViolation(name, message)])


def reply_json(reply: Message, request: Message | None = None) -> Any:
    """The reply as grpc-gateway prints it; a partial reply (the request's read_mask,
    or each batch item's) without the zero values of the fields it was not asked for."""
    data = json_format.MessageToDict(reply, always_print_fields_with_no_presence=True)
    if request is not None:
        _trim(data, request)
    return data


def _trim(data: dict[str, Any], request: Message) -> None:
    """Drop from data what request's read_mask leaves out (etag stays: it tags the rest)."""
    if isinstance(request, task_node_pb2.BatchGetTaskNodeDetailsRequest):
        for item, result in zip(request.requests, data.get("results", ()), strict=False):
            if isinstance(result, dict) and isinstance(result.get("detail"), dict):
                _trim(result["detail"], item)
        return
    if isinstance(request, task_node_pb2.ListTaskNodesRequest):
        full = request.view == task_node_pb2.NODE_VIEW_FULL
        kept = _masked(request.read_mask.paths) if full else _SUMMARY
        if kept is not None:
            for node in data.get("nodes", ()):
                _keep(node, kept)
        return
    if isinstance(request, task_node_pb2.GetTaskNodeDetailRequest):
        kept = _masked(request.read_mask.paths)
        if kept is not None:
            _keep(data, kept)


def _masked(paths: Any) -> set[str] | None:
    """The JSON names a read_mask's paths keep (etag too); None to keep everything."""
    if not paths or list(paths) == ["*"]:
        return None
    return {_camel(path) for path in paths} | {"etag"}


def _keep(data: dict[str, Any], kept: set[str]) -> None:
    for key in [key for key in data if key not in kept]:
        del data[key]


def etag_of(reply: Message) -> str:
    """The reply's etag field (AIP-154), "" for a reply without one."""
    field = reply.DESCRIPTOR.fields_by_name.get("etag")
    if field is None or field.type != FieldDescriptor.TYPE_STRING:
        return ""
    return str(getattr(reply, field.name))


def matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names etag: "*", or a listed tag equal to it by
    RFC 9110's weak comparison (W/ prefixes ignored), as that header compares."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    opaque = etag.removeprefix("W/")
    return any(tag.removeprefix("W/") == opaque for tag in _ENTITY_TAG.findall(if_none_match))


def status_json(status: status_pb2.Status) -> Any:
    """A failure as grpc-gateway prints it, leaving out details of types unknown here."""
    known = status_pb2.Status(code=status.code, message=status.message)
    known.details.extend(detail for detail in status.details if _known(detail.type_url))
    return json_format.MessageToDict(known, always_print_fields_with_no_presence=True)


def _known(type_url: str) -> bool:
    try:
        descriptor_pool.Default().FindMessageTypeByName(type_url.rpartition("/")[2])
    except KeyError:
        return False
    return True
