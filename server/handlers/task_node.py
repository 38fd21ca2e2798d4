"""TaskNodeService: parse the request, read the node, return the message."""

from __future__ import annotations

import grpc
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

from server import errors
from server.auth import current_principal
from server.cache import DetailCache
from server.db.store import Store
from server.nodes import Masker
from server.nodes import read_node_detail
from server.query import parse_request


class TaskNodeServicer(pb_grpc.TaskNodeServiceServicer):
    """The servicer; errors are raised as domain errors and mapped by the interceptor."""

    def __init__(self, store: Store, mask: Masker, cache: DetailCache | None) -> None:
        self.store = store
        self.mask = mask
        self.cache = cache

    def GetTaskNodeDetail(
        self, request: pb.GetTaskNodeDetailRequest, context: grpc.ServicerContext
    ) -> pb.NodeDetail:
        principal = current_principal.get()
        if principal is None:  # the auth interceptor always runs first; this is a bug
            raise errors.Internal("no authenticated caller")
        return read_node_detail(
            self.store, parse_request(request), self.mask, principal, self.cache
        )
