"""The command line: serve, load an import file, create the schema."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from importlib import resources
from types import FrameType

from server.app import SERVICE_NAME
from server.app import create_server
from server.config import Config
from server.db.connection import DatabaseURLError
from server.db.connection import SchemaTooNew
from server.db.connection import ensure_schema
from server.db.connection import open_database
from server.db.loader import LoadError
from server.db.loader import load_document
from server.db.loader import load_file
from server.db.models import Project
from server.values import loads

log = logging.getLogger("tasknode")

DEMO_NODE = {
    "bk_biz_id": "2",
    "task_id": "10",
    "node_id": "node0df0431f8f553925af01a94854bd",
    "subprocess_stack": ["nodeaaa0ce51d2143aa9b0dbc27cb7df"],
    "component_code": "job_fast_execute_script",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve gRPC until SIGTERM or Ctrl-C")
    serve.add_argument(
        "--demo", action="store_true", help="load the demo dataset into an empty database first"
    )
    load = commands.add_parser("load", help="load import files (docs/import-format.md)")
    load.add_argument("files", nargs="+")
    commands.add_parser("migrate", help="create the schema, or check it is not newer than ours")
    args = parser.parse_args(argv)

    config = Config.from_env()
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "serve":
            return _serve(config, demo=args.demo)
        if args.command == "load":
            return _load(config, args.files)
        db = open_database(config.database_url)
        print("schema created" if ensure_schema(db) else "schema is up to date")
        return 0
    except (DatabaseURLError, SchemaTooNew, LoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _load(config: Config, files: list[str]) -> int:
    db = open_database(config.database_url)
    ensure_schema(db)
    with db.connection_context():
        for path in files:
            print(f"{path}: {load_file(db, path)}")
    return 0


def load_demo_if_empty(config: Config) -> bool:
    """Load the demo dataset when the database has no business yet; True if it did."""
    db = open_database(config.database_url)
    ensure_schema(db)
    with db.connection_context():
        if Project.select().exists():
            return False
        demo = resources.files("server.db").joinpath("demo.json").read_text(encoding="utf-8")
        report = load_document(db, loads(demo))
    log.info("loaded the demo dataset: %s", report)
    return True


def _serve(config: Config, demo: bool) -> int:
    if demo:
        load_demo_if_empty(config)
    server = create_server(config)
    server.start()
    host = config.grpc_addr.rsplit(":", 1)[0]
    address = f"{host}:{server.port}"
    log.info("serving %s on %s (database %s)", SERVICE_NAME, address, config.database_url)
    if demo:
        print(
            "\nTry it:\n  .venv/bin/grpcurl -plaintext -d "
            f"'{_json(DEMO_NODE)}' \\\n    {address} {SERVICE_NAME}/GetTaskNodeDetail\n",
            flush=True,
        )

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info(
            "got %s: draining for up to %.0fs",
            signal.Signals(signum).name,
            config.shutdown_grace_seconds,
        )
        server.stop(config.shutdown_grace_seconds)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.grpc_server.wait_for_termination()
    log.info("stopped")
    return 0


def _json(value: object) -> str:
    import json

    return json.dumps(value)
