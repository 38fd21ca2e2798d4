"""TaskNodeService: parse the request, read the node, return the message."""

from __future__ import annotations

import grpc
from bksops.tasknode.v1 import task_node_pb2 as pb
from bksops.tasknode.v1 import task_node_pb2_grpc as pb_grpc

from server import errors
from server.auth import Principal
from server.auth import current_principal
from server.cache import DetailCache
from server.db.nodestore import NodeStore
from server.interceptors import rich_status
from server.interceptors import to_status
from server.listing import list_task_nodes
from server.nodes import Masker
from server.nodes import authorize
from server.nodes import read_node_detail
from server.query import ListQuery
from server.query import NodeQuery
from server.query import check_batch
from server.query import parse_list_request
from server.query import parse_request

#: Errors about the call rather than one of its items: they fail a whole batch, as they
#: fail a single call, since the caller's answer is to retry the call (or give it time).
CALL_ERRORS = (errors.StoreUnavailable, errors.DeadlineExceeded, errors.Internal)


class TaskNodeServicer(pb_grpc.TaskNodeServiceServicer):
    """The servicer; errors are raised as domain errors and mapped by the interceptor."""

    def __init__(
        self, store: NodeStore, mask: Masker, cache: DetailCache | None, watch_addr: str = ""
    ) -> None:
        self.store = store
        self.mask = mask
        self.cache = cache
        self.watch_addr = watch_addr

    def WatchTaskNode(
        self, request: pb.WatchTaskNodeRequest, context: grpc.ServicerContext
    ) -> None:
        """Streams are not served here (a thread each): the call says where they are."""
        self._elsewhere(context)

    def WatchTask(self, request: pb.WatchTaskRequest, context: grpc.ServicerContext) -> None:
        """As WatchTaskNode: the call says where streams are served."""
        self._elsewhere(context)

    def _elsewhere(self, context: grpc.ServicerContext) -> None:
        where = self.watch_addr or "nowhere: the watch server is off (TASKNODE_WATCH_ADDR)"
        context.abort_with_status(
            to_status(
                errors.WatchElsewhere(
                    f"watch streams are served on the watch address, {where}",
                    {"watchAddr": self.watch_addr},
                )
            )
        )

    def GetTaskNodeDetail(
        self, request: pb.GetTaskNodeDetailRequest, context: grpc.ServicerContext
    ) -> pb.NodeDetail:
        return self._read(parse_request(request), _principal())

    def BatchGetTaskNodeDetails(
        self, request: pb.BatchGetTaskNodeDetailsRequest, context: grpc.ServicerContext
    ) -> pb.BatchGetTaskNodeDetailsResponse:
        """Each request served as GetTaskNodeDetail serves it, its domain error (but for
        CALL_ERRORS) kept as its result's status."""
        principal = _principal()
        check_batch(request)
        queries = [_parsed_or_error(item) for item in request.requests]
        if self.cache is not None:  # the stamps the items' reads would take one by one
            self.store.stamp_ahead(
                [(q.task_id, q.node_id) for q in queries if isinstance(q, NodeQuery)]
            )
        reply = pb.BatchGetTaskNodeDetailsResponse()
        for query in queries:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise errors.DeadlineExceeded(
                    "the call's deadline passed before every request of the batch was read"
                )
            try:
                if isinstance(query, errors.ServiceError):
                    raise query
                reply.results.add(detail=self._read(query, principal))
            except CALL_ERRORS:
                raise
            except errors.ServiceError as exc:
                reply.results.add(error=rich_status(exc))
            finally:
                self.store.end_snapshot()
        return reply

    def ListTaskNodes(
        self, request: pb.ListTaskNodesRequest, context: grpc.ServicerContext
    ) -> pb.ListTaskNodesResponse:
        return list_task_nodes(
            self.store, parse_list_request(request), self.mask, _principal(), self.cache
        )

    def open_watch_task_node(
        self, request: pb.WatchTaskNodeRequest, context: grpc.ServicerContext
    ) -> tuple[NodeQuery, pb.NodeDetail]:
        """What opening a WatchTaskNode stream reads, as GetTaskNodeDetail reads it (the
        stream itself is served by server.watch.service, off these threads)."""
        query = parse_request(request.node)
        return query, read_node_detail(self.store, query, self.mask, _principal(), self.cache)

    def open_watch_task(
        self, request: pb.WatchTaskRequest, context: grpc.ServicerContext
    ) -> ListQuery:
        """Which task a WatchTask stream watches, once the caller may read the business
        and the task is there (NotFound otherwise)."""
        query = parse_list_request(
            pb.ListTaskNodesRequest(
                bk_biz_id=request.bk_biz_id, task_id=request.task_id, scope=request.scope
            )
        )
        authorize(self.store, query.biz_id, query.by_project_id, _principal())
        self.store.find_task(query.biz_id, query.by_project_id, query.task_id)
        return query

    def _read(self, query: NodeQuery, principal: Principal) -> pb.NodeDetail:
        return read_node_detail(self.store, query, self.mask, principal, self.cache)


def _parsed_or_error(request: pb.GetTaskNodeDetailRequest) -> NodeQuery | errors.ServiceError:
    """The batch item's query, or the error that is its result (raised at its turn)."""
    try:
        return parse_request(request)
    except errors.ServiceError as exc:
        return exc


def _principal() -> Principal:
    principal = current_principal.get()
    if principal is None:  # the auth interceptor always runs first; this is a bug
        raise errors.Internal("no authenticated caller")
    return principal
