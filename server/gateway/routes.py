"""Routes: path templates in google.api.http syntax, the legacy routes, and the HttpRule routes.

The canonical routes are read from the ``google.api.http`` options of the services at
start-up, so a new annotated RPC gets its route with no change here. The legacy routes
are the few fixed paths old BlueKing callers use for get_task_node_detail.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote_to_bytes

from bksops.tasknode.v1 import task_node_pb2
from google.api import annotations_pb2
from google.api import http_pb2
from google.protobuf.descriptor import Descriptor
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.descriptor import ServiceDescriptor

from server import errors

#: How a route reads its request and writes its answer: the old ESB's way, the API
#: gateway's (the same, but for the gateway's own errors), or grpc-gateway's.
Kind = Literal["esb", "apigw", "canonical"]
ESB: Kind = "esb"
APIGW: Kind = "apigw"
CANONICAL: Kind = "canonical"

#: The services whose HttpRules become canonical routes.
SERVICES: tuple[ServiceDescriptor, ...] = tuple(task_node_pb2.DESCRIPTOR.services_by_name.values())
GET_TASK_NODE_DETAIL = task_node_pb2.DESCRIPTOR.services_by_name["TaskNodeService"].methods_by_name[
    "GetTaskNodeDetail"
]

#: The old ESB paths (a BlueKing SDK's CollectionsSOPS), with and without the API version.
ESB_PATHS = (
    "/api/c/compapi/v2/sops/get_task_node_detail/",
    "/api/c/compapi/sops/get_task_node_detail/",
)
#: The API gateway's resource path: the task comes first.
APIGW_PATH = "/get_task_node_detail/{task_id}/{bk_biz_id}/"

_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)(?:=([^{}]*))?\}")
_PIECE = re.compile(r"\{[^{}]*\}|[^/{}]+")


@dataclass(frozen=True)
class Template:
    """A path template ("/v1/things/{thing_id}", "{name=shelves/*}", "*", "**", ":verb").

    Compiled to one regular expression over the raw (still percent-encoded) path, so
    an encoded "/" inside a variable does not split it. Trailing slashes are ignored.
    """

    text: str
    pattern: re.Pattern[str]
    variables: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Template:
        """The template of text; ValueError saying what is wrong with it."""
        if not text.startswith("/"):
            raise ValueError(f"path template {text!r} does not start with /")
        path, verb = text.rstrip("/"), ""
        head, colon, tail = path.rpartition(":")
        if colon and "/" not in tail and "}" not in tail:
            path, verb = head, tail
        regex: list[str] = []
        variables: list[str] = []
        at = 1
        while at < len(path):
            piece = _PIECE.match(path, at)
            if piece is None:
                raise ValueError(f"path template {text!r}: unexpected text at {at}")
            regex.append(_piece_regex(piece.group(), variables, text))
            at = piece.end()
            if at < len(path):
                if path[at] != "/":
                    raise ValueError(f"path template {text!r}: expected / at {at}")
                at += 1
        suffix = ":" + re.escape(verb) if verb else ""
        compiled = re.compile("/" + "/".join(regex) + suffix)
        return cls(text, compiled, tuple(variables))

    def match(self, path: str) -> dict[str, str] | None:
        """The template's variables in path (raw, still encoded), or None if it does not match."""
        found = self.pattern.fullmatch(path.rstrip("/") or "/")
        if found is None:
            return None
        return {name: found.group(f"v{i}") for i, name in enumerate(self.variables)}

    @property
    def first_segment(self) -> str:
        return self.text.lstrip("/").split("/", 1)[0]


def _piece_regex(piece: str, variables: list[str], text: str) -> str:
    """The regex of one segment, or of a variable (whose field path joins variables)."""
    if not piece.startswith("{"):
        return _segments_regex(piece, text)
    variable = _VARIABLE.fullmatch(piece)
    if variable is None:
        raise ValueError(f"path template {text!r}: bad variable {piece!r}")
    name, segments = variable.groups()
    variables.append(name)
    return f"(?P<v{len(variables) - 1}>{_segments_regex(segments or '*', text)})"


def _segments_regex(segments: str, text: str) -> str:
    parts = []
    for segment in segments.split("/"):
        if segment == "*":
            parts.append("[^/]+")
        elif segment == "**":
            parts.append(".*")
        elif segment and not set(segment) & set("{}*"):
            parts.append(re.escape(segment))
        else:
            raise ValueError(f"path template {text!r}: bad segment {segment!r}")
    return "/".join(parts)


@dataclass(frozen=True)
class Route:
    """One HTTP method on one path template, answered by one RPC in one style."""

    method: str
    template: Template
    kind: Kind
    rpc: MethodDescriptor
    #: The HttpRule's body: "" (no body), "*" (the whole request) or a field name.
    body: str = ""


class Router:
    """Finds the route of a request, or says why there is none."""

    def __init__(self, routes: Sequence[Route]) -> None:
        # Templates ending in a verb first: "/nodes/{node_id}" would also match
        # "/nodes/x:watch" (a variable takes any segment), as grpc-gateway does not.
        self.routes = tuple(sorted(routes, key=lambda route: not _has_verb(route)))
        self._kinds = {route.template.first_segment: route.kind for route in self.routes}

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route for method and raw path, and its decoded path variables.

        RouteNotFound when no template matches, MethodNotAllowed (its metadata names
        the methods that are) when one matches with another method.
        """
        allowed: list[str] = []
        for route in self.routes:
            found = route.template.match(path)
            if found is None:
                continue
            if route.method == method:
                return route, {name: _decode(name, value) for name, value in found.items()}
            allowed.append(route.method)
        if allowed:
            raise errors.MethodNotAllowed(
                f"{method} is not allowed on {_shown(path)}; use {' or '.join(allowed)}",
                {"allow": ", ".join(allowed)},
            )
        raise errors.RouteNotFound(f"no route for {method} {_shown(path)}", {"method": method})

    def kind_for(self, path: str) -> Kind:
        """The style to answer in for any path: that of the routes under its first segment."""
        return self._kinds.get(path.lstrip("/").split("/", 1)[0], ESB)


def _has_verb(route: Route) -> bool:
    return ":" in route.template.text.rsplit("/", 1)[-1]


def _decode(name: str, raw: str) -> str:
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise errors.InvalidArgument(
            f"the path segment for {name} is not valid UTF-8", {"fields": name}
        ) from None


def _shown(path: str) -> str:
    return path if len(path) <= 100 else path[:100] + "..."


def legacy_routes(prefix: str = "") -> list[Route]:
    """The old ESB routes (GET and POST) and the API gateway route under prefix (GET)."""
    routes = [
        Route(method, Template.parse(path), ESB, GET_TASK_NODE_DETAIL)
        for path in ESB_PATHS
        for method in ("GET", "POST")
    ]
    gateway = "/".join(part for part in (prefix.strip("/"), APIGW_PATH.strip("/")) if part)
    routes.append(Route("GET", Template.parse(f"/{gateway}/"), APIGW, GET_TASK_NODE_DETAIL))
    return routes


def canonical_routes(services: Iterable[ServiceDescriptor] = SERVICES) -> list[Route]:
    """A route for every HttpRule (and additional binding) of every method of services."""
    routes = []
    for service in services:
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            rule = options.Extensions[annotations_pb2.http]
            for binding in (rule, *rule.additional_bindings):
                routes.append(_rule_route(method, binding))
    return routes


def _rule_route(method: MethodDescriptor, rule: http_pb2.HttpRule) -> Route:
    pattern = rule.WhichOneof("pattern")
    where = f"{method.full_name}: google.api.http"
    if pattern is None:
        raise ValueError(f"{where} has no pattern")
    if rule.response_body:
        raise ValueError(f"{where}: response_body is not supported by this shim")
    if pattern == "custom":
        verb, path = rule.custom.kind.upper(), rule.custom.path
    else:
        verb, path = pattern.upper(), getattr(rule, pattern)
    template = Template.parse(path)
    for variable in template.variables:
        field_path(method.input_type, variable, where)
    if rule.body not in ("", "*"):
        field_path(method.input_type, rule.body, where)
    return Route(verb, template, CANONICAL, method, rule.body)


def field_path(message: Descriptor, dotted: str, where: str) -> tuple[str, ...]:
    """The proto names along a dotted field path of message; ValueError naming where if bad."""
    names = []
    current: Descriptor | None = message
    for part in dotted.split("."):
        field = current.fields_by_name.get(part) if current is not None else None
        if field is None:
            raise ValueError(f"{where}: {dotted!r} is not a field path of the request")
        names.append(field.name)
        current = field.message_type
    return tuple(names)
