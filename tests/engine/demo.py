"""`make demo-bksops`: real pipelines run by the real engine into a local database, then served.

    .venv/bin/python -m tests.engine.demo

The real engine (tests/engine/run_pipelines.py, in its own virtualenv) runs the harness's
pipelines into var/demo-bksops/engine.db (a fresh SQLite file each time); the service's own
database var/demo-bksops/own.db gets the plugins' output schemas and the demo app (granted
every business). Then `python -m server serve` reads the engine's database in place
(TASKNODE_BKSOPS_DATABASE_URL), with the addresses of TASKNODE_GRPC_ADDR and
TASKNODE_HTTP_ADDR (127.0.0.1:50051 and 127.0.0.1:8080 unless set), after printing grpcurl and
curl commands for a few of the engine's nodes. It lives beside the harness it drives.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from server.cli import DEMO_APP
from server.config import Config
from server.db.apps import AppStore
from server.db.connection import ensure_schema
from server.db.connection import open_database
from server.db.loader import FORMAT
from server.db.loader import load_document
from tests.engine.harness import ROOT
from tests.engine.harness import run_pipelines

WORK = ROOT / "var" / "demo-bksops"
SERVICE = "bksops.tasknode.v1.TaskNodeService"
#: (what it shows, pipeline, node label, its sub-process stack's labels, extra request fields)
SHOWN: tuple[tuple[str, str, str, tuple[str, ...], dict[str, Any]], ...] = (
    (
        "a node that failed, was retried with new inputs and succeeded",
        "services",
        "retried",
        (),
        {},
    ),
    ("loop 1 of a node the engine looped three times", "loop", "body", (), {"loop": 1}),
    ("a sub-process and its children's states", "nested", "outer", (), {}),
    ("a node two sub-processes deep", "nested", "deep", ("outer", "inner"), {}),
    ("a node still running (waiting for a callback)", "stuck", "wait", (), {}),
)


def prepare(work: Path) -> tuple[str, str, dict[str, Any]]:
    """Run the pipelines into work/engine.db and make work/own.db: (engine URL, own URL,
    the engine run's manifest)."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("engine.db", "own.db"):
        for suffix in ("", "-wal", "-shm"):
            (work / f"{name}{suffix}").unlink(missing_ok=True)
    engine = f"sqlite:///{work / 'engine.db'}"
    manifest = run_pipelines(engine, work)
    own = f"sqlite:///{work / 'own.db'}"
    db = open_database(own)
    ensure_schema(db)
    with db.connection_context():
        document = {"format": FORMAT, "projects": [], "tasks": []}
        load_document(db, {**document, "components": manifest["components"]})
        AppStore(db).add(
            DEMO_APP["bk_app_code"],
            DEMO_APP["bk_app_secret"],
            all_businesses=True,
            may_assert_user=True,
        )
    db.close()
    return engine, own, manifest


def commands(manifest: dict[str, Any], grpc_addr: str, http_addr: str) -> list[tuple[str, str]]:
    """(what it shows, shell command) pairs: a grpcurl and a curl command per SHOWN node."""
    grpcurl = str(Path(sys.executable).parent / "grpcurl")
    header = json.dumps(DEMO_APP)
    found = []
    for what, pipeline, label, stack, extra in SHOWN:
        entry = manifest["pipelines"][pipeline]
        nodes = entry["nodes"]
        request = {
            "bk_biz_id": str(entry["business_id"]),
            "task_id": str(entry["task_id"]),
            "node_id": nodes[label]["id"],
            "subprocess_stack": [nodes[s]["id"] for s in stack],
            **extra,
        }
        found.append(
            (
                what,
                f"{grpcurl} -plaintext -H {shlex.quote('x-bkapi-authorization: ' + header)}"
                f" -d {shlex.quote(json.dumps(request))} {grpc_addr} {SERVICE}/GetTaskNodeDetail",
            )
        )
        query = [
            ("bk_app_code", DEMO_APP["bk_app_code"]),
            ("bk_app_secret", DEMO_APP["bk_app_secret"]),
            ("bk_username", DEMO_APP["bk_username"]),
            ("bk_biz_id", request["bk_biz_id"]),
            ("task_id", request["task_id"]),
            ("node_id", request["node_id"]),
            ("subprocess_stack", json.dumps(request["subprocess_stack"])),
            *((key, str(value)) for key, value in extra.items()),
        ]
        found.append(
            (
                f"{what}, on the legacy ESB route",
                f"curl -sG http://{http_addr}/api/c/compapi/v2/sops/get_task_node_detail/ "
                + " ".join(f"--data-urlencode {shlex.quote(f'{k}={v}')}" for k, v in query),
            )
        )
    return found


def main() -> int:
    config = Config.from_env()
    print(f"running the real engine's pipelines into {WORK / 'engine.db'} ...", flush=True)
    engine, own, manifest = prepare(WORK)
    print(
        "\nThe engine's nodes, served from its own tables (the demo app may read every business):"
    )
    for what, command in commands(manifest, config.grpc_addr, config.http_addr):
        print(f"\n# {what}\n{command}")
    print(f"\nserving {engine} (own database {own}); Ctrl-C stops\n", flush=True)
    env = {
        **os.environ,
        "TASKNODE_DATABASE_URL": own,
        "TASKNODE_BKSOPS_DATABASE_URL": engine,
        "TASKNODE_GRPC_ADDR": config.grpc_addr,
        "TASKNODE_HTTP_ADDR": config.http_addr,
    }
    os.execve(sys.executable, [sys.executable, "-m", "server", "serve"], env)


if __name__ == "__main__":
    sys.exit(main())
