"""The shim's gRPC client: a few grpc.aio channels, any unary method by its descriptor."""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator
from collections.abc import Sequence
from typing import Any
from typing import Protocol

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc_status import rpc_status

from server import channels
from server import errors
from server.app import method_path
from server.channels import channel_options
from server.channels import channel_target
from server.gateway.statuses import status_of

#: Seconds a call may take before the shim gives up on it (DEADLINE_EXCEEDED).
CALL_TIMEOUT_SECONDS = 10.0
#: Connections to the gRPC server: a few per core, so that the kernel's spreading
#: of connections over worker processes rarely leaves one of them without any.
DEFAULT_CONNECTIONS = 4 * (os.cpu_count() or 1)

Metadata = Sequence[tuple[str, str]]


class Caller(Protocol):
    """What the shim calls the service through: Backend over a channel, or
    server.gateway.local.LocalBackend in the server's own process."""

    async def call(
        self,
        method: MethodDescriptor,
        request: Message,
        metadata: Metadata,
        raw: bool = False,
        peer: str = "",
    ) -> Any:
        """The reply of ``method`` to ``request`` (its serialized bytes when ``raw``);
        CallFailed with the status otherwise. ``peer`` is the HTTP client, as gRPC names
        peers, for the server's logs where it can see it."""
        ...

    async def close(self) -> None: ...


class CallFailed(Exception):
    """A call ended with a status other than OK; ``status`` is what the caller gets to see."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


class Backend:
    """Calls the gRPC server at ``target``, over TLS when given credentials.

    ``target`` may name several replicas (a comma list of addresses, an ``ipv4:`` list,
    a DNS name with a record per replica: server.channels): each channel then spreads
    its calls over all of them (round_robin) and a call a replica dropped (killed,
    draining) is retried on another, as the service config says. Calls do not wait for
    a replica to become ready (the config's waitForReady is overridden): with none up,
    an HTTP caller gets its 503 once the retries are spent (about a second), not after
    the call's whole timeout.

    grpc.aio objects belong to the event loop that made them, so the channels are
    opened on first use, inside the HTTP server's loop, and closed on its shutdown.

    Calls take turns over ``connections`` channels, each with its own TCP connection:
    the server's worker processes share one port (SO_REUSEPORT), and the kernel hands
    each connection, not each call, to one of them, so a single connection would
    leave every process but one idle.
    """

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = CALL_TIMEOUT_SECONDS,
        connections: int = DEFAULT_CONNECTIONS,
        tls_name: str = "",
    ) -> None:
        self.target = target
        self._channel_target = channel_target(target)
        #: The name every replica's certificate must carry (server.channels.tls_name).
        self.tls_name = tls_name or channels.tls_name(self._channel_target)
        self.credentials = credentials
        self.timeout = timeout
        self.connections = max(1, connections)
        self._channels: list[grpc.aio.Channel] = []
        self._callables: dict[tuple[str, bool], list[Any]] = {}
        self._turn = 0

    async def call(
        self,
        method: MethodDescriptor,
        request: Message,
        metadata: Metadata,
        raw: bool = False,
        peer: str = "",
    ) -> Any:
        """See Caller.call; the server sees this process as the peer."""
        try:
            return await self._callable(method, raw)(
                request, timeout=self.timeout, metadata=tuple(metadata), wait_for_ready=False
            )
        except grpc.aio.AioRpcError as exc:
            raise CallFailed(self._status(exc)) from None

    async def stream(
        self,
        method: MethodDescriptor,
        request: Message,
        metadata: Metadata,
        timeout: float | None = None,
    ) -> AsyncGenerator[Any, None]:
        """The messages of a server-streaming method, until timeout if given (else until
        its reader stops); CallFailed with the status it ends with, if not OK."""
        call = self._callable(method, False, streaming=True)(
            request, metadata=tuple(metadata), timeout=timeout
        )
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            raise CallFailed(self._status(exc)) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        channels, self._channels = self._channels, []
        self._callables.clear()
        for channel in channels:
            await channel.close()

    def _callable(self, method: MethodDescriptor, raw: bool, streaming: bool = False) -> Any:
        path = method_path(method)
        found = self._callables.get((path, raw))
        if found is None:
            if not self._channels:
                self._channels = [self._open() for _ in range(self.connections)]
            reply_class = message_factory.GetMessageClass(method.output_type)
            found = [
                (channel.unary_stream if streaming else channel.unary_unary)(
                    path,
                    request_serializer=lambda message: message.SerializeToString(),
                    response_deserializer=None if raw else reply_class.FromString,
                )
                for channel in self._channels
            ]
            self._callables[(path, raw)] = found
        self._turn = (self._turn + 1) % len(found)
        return found[self._turn]

    def _open(self) -> grpc.aio.Channel:
        # Channels to one target share one connection unless each has its own pool.
        options = [("grpc.use_local_subchannel_pool", 1), *channel_options()]
        if self.credentials is None:
            return grpc.aio.insecure_channel(self._channel_target, options=options)
        if self.tls_name:
            options.append(("grpc.ssl_target_name_override", self.tls_name))
        return grpc.aio.secure_channel(self._channel_target, self.credentials, options=options)

    def _status(self, exc: grpc.aio.AioRpcError) -> status_pb2.Status:
        """The server's own status when it sent one; else a domain error naming the backend.

        A status without details did not come from our server's interceptor: the
        channel made it up (no connection, our own deadline) or something in between did.
        """
        try:
            sent = rpc_status.from_call(exc)
        except ValueError:  # details that contradict the call's code: trust the code
            sent = None
        if sent is not None:
            return sent
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            return status_of(
                errors.BackendUnavailable(
                    f"the gRPC backend at {self.target} is unavailable: {details}",
                    {"target": self.target},
                )
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return status_of(
                errors.DeadlineExceeded(
                    f"the gRPC backend at {self.target} did not answer "
                    f"within {self.timeout:g} seconds",
                    {"target": self.target},
                )
            )
        return status_pb2.Status(code=code.value[0], message=details)
