"""The command line: serve (gRPC and HTTP), the HTTP shim alone, load, migrate, admin."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Mapping
from importlib import resources
from types import FrameType

from server import admin
from server import logs
from server import metrics
from server import tls
from server import traces
from server.app import SERVICE_NAME
from server.app import CannotListen
from server.app import create_server
from server.channels import BadTarget
from server.config import Config
from server.db.apps import AppExists
from server.db.apps import AppNotFound
from server.db.apps import AppStore
from server.db.connection import DatabaseURLError
from server.db.connection import ensure_schema
from server.db.connection import open_database
from server.db.loader import LoadError
from server.db.loader import load_document
from server.db.loader import load_file
from server.db.migrations import SchemaTooNew
from server.db.models import App
from server.db.models import Project
from server.gateway.examples import banner
from server.gateway.local import serve_shim
from server.gateway.runner import HttpServer
from server.gateway.runner import start_shim
from server.gateway.runner import url
from server.values import loads
from server.watch.service import serve_watch
from server.workers import Workers
from server.workers import worker_count

log = logging.getLogger("tasknode")

#: The demo app, with the credentials of the seed document's request example, so that
#: request works as written: granted business 2 (not 3), may name its user, and its
#: bk_token "xxx" stands for user admin. The only known secret, and only in a database
#: that started out as the demo.
DEMO_APP = {"bk_app_code": "esb_test", "bk_app_secret": "xxx", "bk_username": "admin"}
DEMO_TOKEN = "xxx"
DEMO_BUSINESS = 2
DEMO_TOKEN_SECONDS = 10 * 365 * 86400

DEMO_NODE = {
    "bk_biz_id": "2",
    "task_id": "10",
    "node_id": "node0df0431f8f553925af01a94854bd",
    "subprocess_stack": ["nodeaaa0ce51d2143aa9b0dbc27cb7df"],
    "component_code": "job_fast_execute_script",
}


def example_node(config: Config) -> Mapping[str, object]:
    """The request serve's printed example asks for: the demo's node, or, on a bk-sops
    database (whose tasks are not the demo's), placeholders for one of its own."""
    if config.bksops_database_url:
        return {"bk_biz_id": str(DEMO_BUSINESS), "task_id": "TASK_ID", "node_id": "NODE_ID"}
    return DEMO_NODE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="serve gRPC and the HTTP/JSON shim until SIGTERM or Ctrl-C"
    )
    serve.add_argument(
        "--demo", action="store_true", help="load the demo dataset into an empty database first"
    )
    commands.add_parser(
        "gateway", help="serve only the HTTP/JSON shim, calling gRPC at TASKNODE_GRPC_TARGET"
    )
    load = commands.add_parser("load", help="load import files (docs/import-format.md)")
    load.add_argument("files", nargs="+")
    commands.add_parser("migrate", help="create or upgrade the schema")
    admin.add_commands(commands)
    args = parser.parse_args(argv)

    config = Config.from_env()
    logs.configure(config)
    try:
        if args.command == "serve":
            return _serve(config, demo=args.demo)
        if args.command == "gateway":
            return _gateway(config)
        if args.command == "load":
            return _load(config, args.files)
        if args.command in ("apps", "tokens"):
            return admin.run(args, config)
        db = open_database(config.database_url)
        print("schema upgraded" if ensure_schema(db) else "schema is up to date")
        return 0
    except (
        DatabaseURLError,
        SchemaTooNew,
        LoadError,
        AppNotFound,
        AppExists,
        CannotListen,
        BadTarget,
        tls.TLSError,
    ) as exc:
        if config.log_format == "json":
            log.error("%s", exc)
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 2


def _load(config: Config, files: list[str]) -> int:
    db = open_database(config.database_url)
    ensure_schema(db)
    with db.connection_context():
        for path in files:
            print(f"{path}: {load_file(db, path, show_progress=True)}")
    return 0


def load_demo_if_empty(config: Config) -> bool:
    """Load the demo dataset and the demo app when the database has no business yet.

    True if it did. The demo app is the only credential with a known secret, and it
    exists only in a database that started out as the demo.

    With a bk-sops database (TASKNODE_BKSOPS_DATABASE_URL), nodes come from there and
    the own database never holds a business: "empty" is then "no app yet", and only the
    demo app and the demo's component schemas are added, no demo task.
    """
    db = open_database(config.database_url)
    ensure_schema(db)
    with db.connection_context():
        if Project.select().exists() or (config.bksops_database_url and App.select().exists()):
            return False
        demo = loads(resources.files("server.db").joinpath("demo.json").read_text(encoding="utf-8"))
        if config.bksops_database_url:
            demo = {"format": demo["format"], "components": demo["components"]}
        with db.atomic():
            report = load_document(db, demo)
            apps = AppStore(db)
            apps.add(
                DEMO_APP["bk_app_code"],
                DEMO_APP["bk_app_secret"],
                businesses=[DEMO_BUSINESS],
                may_assert_user=True,
            )
            apps.issue_token(DEMO_APP["bk_username"], DEMO_TOKEN_SECONDS, token=DEMO_TOKEN)
    log.info("loaded the demo dataset: %s; demo app %s", report, DEMO_APP["bk_app_code"])
    return True


def _serve(config: Config, demo: bool) -> int:
    # Bad TLS and trace settings fail here, before the database or any port is touched.
    tls.server_credentials(config)
    traces.check(config)
    if demo:
        load_demo_if_empty(config)
    count = worker_count(config)
    with contextlib.ExitStack() as run:
        metrics_url = ""
        if config.metrics_addr:
            # Workers write their values in a directory of this run; this process sums them.
            workers_dir = run.enter_context(metrics.multiprocess_dir()) if count > 1 else None
            metrics_url = _serve_metrics(config.metrics_addr, workers_dir)
        return _serve_calls(config, demo, count, metrics_url)


def _serve_metrics(addr: str, workers_dir: str | None) -> str:
    """Serve /metrics on addr (see server.metrics.serve): its URL."""
    try:
        port = metrics.serve(addr, workers_dir)
    except OSError as exc:
        raise CannotListen(f"cannot serve metrics on {addr}: {exc.strerror or exc}") from None
    return url("http", addr.rsplit(":", 1)[0], port) + "/metrics"


def _serve_calls(config: Config, demo: bool, count: int, metrics_url: str) -> int:
    """Serve gRPC and the shim in count processes until SIGTERM; log where."""
    # The shim runs beside gRPC in each serving process, calling it in-process.
    http_url = ""
    watch_port = 0
    if count > 1:
        ensure_schema(open_database(config.database_url))  # refuse a bad schema here, once
        workers = Workers(config, count, http=True)
        workers.start()
        port = workers.port
        watch_port = workers.watch_port
        if workers.http:
            http_url = _url(config, workers.http_port)

        def stop(signum: int, frame: FrameType | None) -> None:
            log.info(
                "got %s: draining for up to %.0fs",
                signal.Signals(signum).name,
                config.shutdown_grace_seconds,
            )
            workers.stop(config.shutdown_grace_seconds)

        wait = workers.watch
    else:
        traces.configure(config)
        server = create_server(config)
        server.start()
        port = server.port
        watch = serve_watch(config, server)
        watch_target = ""
        if watch is not None:
            watch_port = watch.port
            watch_target = f"{config.grpc_addr.rsplit(':', 1)[0]}:{watch_port}"
        http: HttpServer | None = None
        if config.http_addr:
            http = serve_shim(config, server, watch_target=watch_target)
            http_url = http.url

        # The handler only notes the signal: the main thread drains, outside the handler.
        received: list[signal.Signals] = []
        stopping = threading.Event()

        def stop(signum: int, frame: FrameType | None) -> None:
            received.append(signal.Signals(signum))
            stopping.set()

        def wait() -> None:
            stopping.wait()
            log.info(
                "got %s: draining for up to %.0fs",
                received[0].name,
                config.shutdown_grace_seconds,
            )
            alongside = [*([http.stop] if http else []), *([watch.stop] if watch else [])]
            server.drain_and_exit(config.shutdown_grace_seconds, *alongside)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host = config.grpc_addr.rsplit(":", 1)[0]
    address = f"{host}:{port}"
    log.info(
        "serving %s on %s in %d process%s (database %s)",
        SERVICE_NAME,
        address,
        count,
        "es" if count > 1 else "",
        config.database_url,
    )
    if demo:
        which = (
            "; TASK_ID and NODE_ID: a task of a project of business 2 in the bk-sops"
            " database, and one of its nodes"
            if config.bksops_database_url
            else ""
        )
        _tell(
            config,
            f"\nTry it (demo app credentials, granted business 2{which}):\n"
            f"  .venv/bin/grpcurl {_grpcurl_transport(config)}"
            f" -H 'x-bkapi-authorization: {_json(DEMO_APP)}' \\\n"
            f"    -d '{_json(example_node(config))}' \\\n"
            f"    {address} {SERVICE_NAME}/GetTaskNodeDetail\n",
        )
    if watch_port:
        log.info("serving the watch streams on %s:%d", host, watch_port)
    if http_url:
        _announce_shim(config, http_url, "in-process", examples=demo)
    if metrics_url:
        log.info("Prometheus metrics on %s", metrics_url)
    wait()
    log.info("stopped")
    return 0


def _url(config: Config, port: int) -> str:
    """The shim's URL on port (the workers' shared one)."""
    scheme = "https" if config.tls_cert_file else "http"
    return url(scheme, config.http_addr.rsplit(":", 1)[0], port)


def _announce_shim(config: Config, shim_url: str, calling: str, examples: bool) -> None:
    """Log where the shim serves and what it calls; with examples, print curl commands
    for every route (as the demo app)."""
    log.info("HTTP/JSON shim on %s, calling gRPC %s", shim_url, calling)
    if examples and not config.bksops_database_url:  # the banner's routes ask the demo's nodes
        _tell(config, banner(DEMO_APP, shim_url, config.gateway_prefix, _cacert(config)))


def _tell(config: Config, text: str) -> None:
    """Print text for the person who started serve; in JSON, log it, so that every
    line the process writes is one object."""
    if config.log_format == "json":
        log.info("%s", text.strip("\n"))
    else:
        print(text, flush=True)


def _gateway(config: Config) -> int:
    """Serve the HTTP/JSON shim alone until SIGTERM or Ctrl-C."""
    if not config.http_addr:
        print("error: TASKNODE_HTTP_ADDR is empty: nothing to serve", file=sys.stderr)
        return 2
    target = config.grpc_target or config.grpc_addr
    traces.configure(config)
    # One process: it serves its own metrics (its HTTP requests; the calls are gRPC's).
    metrics_url = _serve_metrics(config.metrics_addr, None) if config.metrics_addr else ""
    http = start_shim(config, target)
    _announce_shim(config, http.url, f"at {target}", examples=True)
    if metrics_url:
        log.info("Prometheus metrics on %s", metrics_url)
    stopping = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("got %s: draining", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    stopping.wait()
    http.stop()
    traces.shutdown()
    log.info("stopped")
    return 0


def _cacert(config: Config) -> str:
    """What a client of this server trusts: the configured CA, or the (self-signed)
    certificate itself; none without TLS."""
    if not config.tls_cert_file:
        return ""
    return config.grpc_target_ca_file or config.tls_cert_file


def _grpcurl_transport(config: Config) -> str:
    """grpcurl's flags to reach this server: plaintext, or trusting its certificate
    (with the shim's client certificate when the server requires one)."""
    if not config.tls_cert_file:
        return "-plaintext"
    flags = f"-cacert {_cacert(config)}"
    if config.grpc_client_cert_file:
        flags += f" -cert {config.grpc_client_cert_file} -key {config.grpc_client_key_file}"
    return flags


def _json(value: object) -> str:
    import json

    return json.dumps(value)
