"""Configuration: one frozen value, read from the environment only in main()."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from dataclasses import fields

DEFAULT_DATABASE_URL = "sqlite:///var/tasknode.db"

#: A list of database URLs, read from a variable as URLs separated by commas (a comma
#: inside a URL's host list, postgresql://h1:5432,h2:5432/db, separates nothing).
URLs = tuple[str, ...]
_NEXT_URL = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


@dataclass(frozen=True)
class Config:
    """Every setting of the service. Tests build it directly; main() uses from_env()."""

    #: Where the records live: sqlite:///relative/path, sqlite:////absolute/path,
    #: postgresql://user@host:port/db or mysql://user@host:port/db. A server URL may
    #: name several hosts (user@h1:p1,h2:p2/db): PostgreSQL connects to the one that
    #: takes writes (target_session_attrs=read-write), MySQL/Galera to the first that
    #: answers. Apps, tokens and migrations always use this database.
    database_url: str = DEFAULT_DATABASE_URL
    #: Read replicas of database_url (URLs of its engine): node reads go to them in
    #: turn, and to the primary only when none answers. Empty: reads go to the primary.
    database_replicas: URLs = ()
    #: A bk-sops deployment's database (same URL forms), read only: set, tasks, nodes and
    #: their runtime come from its engine tables, and database_url keeps only apps,
    #: grants, tokens and component schemas. Empty: every record is in database_url.
    bksops_database_url: str = ""
    #: Read replicas of bksops_database_url, as database_replicas are of database_url.
    bksops_database_replicas: URLs = ()
    #: Megabytes of bk-sops task trees kept indexed per process (by snapshot id, least
    #: recently used out first), so that a call does not decompress and parse its task's
    #: tree again: ~5 KiB a task of ~12 nodes.
    bksops_tree_cache_mb: int = 256
    #: Seconds a reply cached from a bk-sops database may go on showing output schemas
    #: that a `server load` has since changed: each process reads the catalog stamp of
    #: database_url every half of it on a thread of its own, not once per call. 0: every
    #: call reads it (a statement more per cached reply).
    bksops_catalog_refresh_seconds: float = 1.0
    #: host:port of the gRPC server; port 0 picks a free one.
    grpc_addr: str = "127.0.0.1:50051"
    #: Processes serving gRPC on the one address (SO_REUSEPORT); 0: one per core.
    grpc_processes: int = 0
    #: Pin each gRPC process to its own core.
    pin_processes: bool = True
    #: Threads serving gRPC calls in each process.
    grpc_workers: int = 8
    #: Seconds a call may wait on the database in all when its deadline is later or
    #: unset: for a pooled connection, a new connection, and its statements. Also each
    #: statement's limit on the database server (statement_timeout, max_statement_time).
    store_timeout_seconds: float = 5.0
    #: Calls admitted at once; beyond it a call gets RESOURCE_EXHAUSTED at once.
    max_concurrent_rpcs: int = 256
    #: Largest request accepted and largest reply sent, in bytes.
    max_receive_message_bytes: int = 1 * 1024 * 1024
    max_send_message_bytes: int = 64 * 1024 * 1024
    #: Seconds in-flight calls get to finish after SIGTERM.
    shutdown_grace_seconds: float = 10.0
    #: Words replaced by ****** wherever they appear in ex_data.
    secret_keywords: tuple[str, ...] = field(default_factory=tuple)
    #: Zone in which legacy JSON renders times.
    time_zone: str = "Asia/Shanghai"
    #: Megabytes of built replies kept for reuse while their task is unchanged; 0: none.
    reply_cache_mb: int = 64
    #: Seconds a verified app credential is trusted before it is checked again: the
    #: longest a revocation, rotation or grant change takes to apply.
    auth_cache_seconds: float = 10.0
    #: App secrets hashed (scrypt, ~16 MiB each) at once in each process; as many more
    #: checks wait for a slot, at most auth_hash_wait_seconds, and the rest are refused at
    #: once (RESOURCE_EXHAUSTED). A secret checked before never waits.
    auth_hash_slots: int = 1
    auth_hash_wait_seconds: float = 0.2
    #: Failed secret checks a caller (peer address) may make in a burst, and per minute
    #: after it; beyond, its checks are refused without hashing. 0: no limit per caller.
    auth_failures_per_minute: int = 30
    #: Logging level name.
    log_level: str = "INFO"
    #: How log lines are written: "text" for people, "json" for one object per line
    #: (server.logs).
    log_format: str = "text"
    #: Where each process's spans go (server.traces): "none" (no tracing at all),
    #: "console" (stdout, for a look) or "otlp" (OTLP over gRPC, to
    #: OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT).
    traces_exporter: str = "none"
    #: Share of traces recorded among calls whose caller sent no traceparent (a caller's
    #: sampled flag decides for its own calls): 1 all, 0 none ("sampling off").
    traces_sample_ratio: float = 1.0
    #: host:port serving Prometheus metrics on /metrics (the sum of every worker
    #: process); port 0 picks a free one; empty serves none.
    metrics_addr: str = ""
    #: host:port of the HTTP/JSON shim (server.gateway); port 0 picks a free one, empty
    #: serves no HTTP.
    http_addr: str = "127.0.0.1:8080"
    #: Path prefix of the API-gateway style route, e.g. "/prod" for
    #: /prod/get_task_node_detail/{task_id}/{bk_biz_id}/; empty for none.
    gateway_prefix: str = ""
    #: Largest HTTP request body the shim reads; beyond it the answer is 413.
    max_body_bytes: int = 64 * 1024
    #: Longest HTTP request line the shim reads (method, target, version); beyond it 414.
    max_request_line_bytes: int = 8 * 1024
    #: Largest HTTP request head (request line and headers) the shim reads; beyond it 431.
    max_header_bytes: int = 32 * 1024
    #: Seconds an HTTP request has to arrive whole, from its first byte (a new connection's
    #: first request: from the connection); beyond it 408, or nothing if nothing came,
    #: and the connection is closed.
    http_request_timeout_seconds: float = 20.0
    #: HTTP connections open at once per process; beyond it a new one is closed at once.
    max_http_connections: int = 1000
    #: host:port of the grpc.aio server of the watch streams (WatchTaskNode, WatchTask:
    #: server.watch); port 0 picks a free one; "off" serves none. Empty: grpc_addr's
    #: host and the port after its own (127.0.0.1:50052), a free one if that is 0.
    watch_addr: str = ""
    #: Seconds between two polls of the store for changes of the watched tasks (one
    #: poll per process, for all its streams).
    watch_interval: float = 0.25
    #: Seconds of quiet after which a watch stream is sent a heartbeat message.
    watch_heartbeat_seconds: float = 15.0
    #: Watch streams open at once per process; beyond it RESOURCE_EXHAUSTED (HTTP 429).
    watch_max_streams: int = 10_000
    #: Where the shim run on its own (python -m server gateway) finds gRPC: host:port, or
    #: several replicas (a comma list of IP address:port, an ipv4:/ipv6: list, a DNS name
    #: with a record per replica) it spreads calls over and retries reads on
    #: (server.channels); empty means grpc_addr.
    grpc_target: str = ""
    #: PEM files of the certificate (chain) and unencrypted private key both servers
    #: present: set both to serve gRPC and HTTP over TLS; empty serves plaintext.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: PEM file of the CA(s) whose client certificates gRPC requires (mTLS); empty asks
    #: for none. The HTTP side never asks for one.
    tls_client_ca_file: str = ""
    #: PEM file of the CA(s) the shim trusts for its gRPC target; set, the shim calls
    #: over TLS. In `serve` it defaults to tls_cert_file, the server's own certificate.
    grpc_target_ca_file: str = ""
    #: The name the certificates of the replicas grpc_target lists must carry (each may
    #: carry more); empty: the host of the list's first address. A single host:port or
    #: DNS name is checked against its own host and needs none.
    grpc_target_tls_name: str = ""
    #: PEM files of the certificate and key the shim presents to a gRPC server that
    #: requires client certificates.
    grpc_client_cert_file: str = ""
    grpc_client_key_file: str = ""

    def watch_listen(self) -> str:
        """Where the watch streams are served (see watch_addr); empty for nowhere."""
        if self.watch_addr == "off":
            return ""
        if self.watch_addr:
            return self.watch_addr
        host, port = self.grpc_addr.rsplit(":", 1)
        return f"{host}:{int(port) + 1 if int(port) else 0}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Build a Config from TASKNODE_* variables; unset ones keep their defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f"TASKNODE_{f.name.upper()}")
            if raw is None:
                continue
            values[f.name] = _parse(f.name, raw, cls.__dataclass_fields__[f.name].type)
        return cls(**values)  # type: ignore[arg-type]


def _parse(name: str, raw: str, type_name: object) -> object:
    try:
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        if type_name == "bool":
            if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if type_name == "tuple[str, ...]":
            return tuple(word.strip() for word in raw.split(",") if word.strip())
        if type_name == "URLs":
            return tuple(url.strip() for url in _NEXT_URL.split(raw) if url.strip())
    except ValueError:
        raise SystemExit(f"TASKNODE_{name.upper()}: {raw!r} is not a valid {type_name}") from None
    return raw
