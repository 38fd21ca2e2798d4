"""A gRPC call made of raw HTTP/2 frames, for metadata no gRPC client will send.

grpcio's client refuses header values that are not printable ASCII, so a value with a
byte that is not UTF-8 can only reach the server through a plain HTTP/2 client: here
the `h2` package, with its own header checks turned off.
"""

from __future__ import annotations

import base64
import socket
import struct
from dataclasses import dataclass
from urllib.parse import unquote

import grpc
from google.rpc import error_details_pb2
from google.rpc import status_pb2
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ConnectionTerminated
from h2.events import DataReceived
from h2.events import ResponseReceived
from h2.events import StreamEnded
from h2.events import StreamReset
from h2.events import TrailersReceived

_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(frozen=True)
class RawReply:
    """What came back: the status (code, message, details) and the reply's bytes."""

    code: grpc.StatusCode
    message: str
    status: status_pb2.Status
    reply: bytes
    #: The size of every header and trailer name and value received, in bytes.
    metadata_bytes: int

    @property
    def reason(self) -> str:
        """The ErrorInfo reason in the status's details; "" when there is none."""
        info = error_details_pb2.ErrorInfo()
        for detail in self.status.details:
            if detail.Unpack(info):
                return info.reason
        return ""


def raw_call(
    address: str,
    path: str,
    metadata: list[tuple[bytes, bytes]],
    request: bytes,
    timeout: float = 10,
) -> RawReply:
    """One unary call to path at address ("host:port", plaintext), sending metadata
    byte for byte and request as the one message."""
    host, port = address.rsplit(":", 1)
    h2 = H2Connection(
        H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
    )
    h2.initiate_connection()
    stream = h2.get_next_available_stream_id()
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", address.encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        *metadata,
    ]
    h2.send_headers(stream, headers)
    h2.send_data(stream, b"\0" + struct.pack(">I", len(request)) + request, end_stream=True)
    received: dict[bytes, bytes] = {}
    size = 0
    body = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(h2.data_to_send())
        ended = False
        while not ended:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection mid-call")
            for event in h2.receive_data(chunk):
                if isinstance(event, ResponseReceived | TrailersReceived):
                    for name, value in event.headers or ():
                        received[bytes(name)] = bytes(value)
                        size += len(name) + len(value)
                elif isinstance(event, DataReceived):
                    body += event.data or b""
                    h2.acknowledge_received_data(event.flow_controlled_length or 0, stream)
                elif isinstance(event, StreamEnded):
                    ended = True
                elif isinstance(event, StreamReset | ConnectionTerminated):
                    raise ConnectionError(f"the call was cut off: {event}")
            sock.sendall(h2.data_to_send())
    details = received.get(b"grpc-status-details-bin")
    status = status_pb2.Status.FromString(_unbase64(details)) if details else status_pb2.Status()
    return RawReply(
        code=_CODES[int(received.get(b"grpc-status", b"2"))],
        message=unquote(received.get(b"grpc-message", b"").decode("latin-1")),
        status=status,
        reply=body[5:],
        metadata_bytes=size,
    )


def _unbase64(value: bytes) -> bytes:
    """gRPC sends -bin values in base64 without padding."""
    return base64.b64decode(value + b"=" * (-len(value) % 4))
