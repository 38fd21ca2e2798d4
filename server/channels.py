"""Channels to several server replicas: their target, and the client service config.

A caller that knows several replicas spreads its calls over all of them with
gRPC's client-side round_robin and retries a read that a dying replica dropped on
another one (server/service_config.json, described in the README under "Several
replicas"). Every method of TaskNodeService is a read, so any attempt may be
repeated: a replica that was SIGKILLed mid-call, or that is draining after SIGTERM,
makes the call fail UNAVAILABLE ("Stream removed (recvmsg:Connection reset by
peer)", or the server's SHUTTING_DOWN), and the retry goes to a replica that is
READY. Only UNAVAILABLE is retried: INTERNAL from this server is a bug that the
next replica would repeat, RESOURCE_EXHAUSTED is an overload that retries would
feed, and DEADLINE_EXCEEDED means the caller's time is up.
"""

from __future__ import annotations

import ipaddress
import json
from functools import cache
from importlib import resources
from typing import Any

#: Bytes of a call's request kept for retries (grpc.per_rpc_retry_buffer_size): a call
#: whose request is larger is never retried. gRPC keeps 256 KiB; a batch of 1,000
#: requests can be larger, up to the server's limit (TASKNODE_MAX_RECEIVE_MESSAGE_BYTES,
#: 1 MiB by default), so twice that.
RETRY_BUFFER_BYTES = 2 * 1024 * 1024
#: gRPC's name-resolver schemes: a target starting with one is passed through as it is.
SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


class BadTarget(ValueError):
    """A target that names several replicas in a form gRPC cannot resolve."""


@cache
def service_config() -> str:
    """The client service config (JSON text), checked to be JSON once."""
    text = resources.files("server").joinpath("service_config.json").read_text(encoding="utf-8")
    json.loads(text)
    return text


def channel_options() -> list[tuple[str, Any]]:
    """grpc channel options that give a channel the service config: round_robin over
    every address the target resolves to, and retries of the reads. Retries are on by
    default in grpcio; the option says so anyway, since without it the retry policy
    would be silently ignored. A service config from DNS (TXT records) is not used:
    this one is the contract the README documents. Requests up to RETRY_BUFFER_BYTES
    are retried."""
    return [
        ("grpc.service_config", service_config()),
        ("grpc.enable_retries", 1),
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
    ]


def channel_target(spec: str) -> str:
    """The gRPC target of spec: a gRPC target (``host:port``, ``dns:///name:port``,
    ``ipv4:10.0.0.1:50051,10.0.0.2:50051``) as it is, or a comma list of IP
    ``address:port`` as gRPC's ``ipv4:``/``ipv6:`` form. A list naming a host by name
    is refused (BadTarget): gRPC has no target for several names; one DNS name with an
    address record per replica (``dns:///tasknode.internal:50051``) is the form for
    that, and follows the records as they change."""
    spec = spec.strip()
    if "," not in spec or spec.startswith(SCHEMES):
        return spec
    addresses = [part.strip() for part in spec.split(",") if part.strip()]
    families = {_family(address, spec) for address in addresses}
    if len(families) != 1:
        raise BadTarget(f"{spec!r} mixes IPv4 and IPv6 addresses; gRPC takes one family a list")
    return f"{families.pop()}:{','.join(addresses)}"


def tls_name(target: str) -> str:
    """The name a replica's certificate must carry for target (a channel_target), when
    gRPC's own choice will not do: a list of addresses has no host of its own (gRPC
    would check the whole list against the certificate), so its first address's host
    stands for every replica. Empty for any other target: gRPC checks its host."""
    if not target.startswith(("ipv4:", "ipv6:")) or "," not in target:
        return ""
    first = target.split(":", 1)[1].split(",", 1)[0]
    return first.rpartition(":")[0].strip("[]")


def _family(address: str, spec: str) -> str:
    """ipv4 or ipv6, for an address:port of a list ([host]:port for IPv6)."""
    host, _, port = address.rpartition(":")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        ip = None
    if ip is None or not port.isdigit():
        raise BadTarget(
            f"{spec!r}: {address!r} is not an IP address:port; a list takes addresses only,"
            " several hosts by name take one DNS name with a record per replica"
            " (dns:///name:port)"
        ) from None
    return f"ipv{ip.version}"
