"""`make demo-bksops` (tests/engine/demo.py): the commands it prints work against what it serves.

The demo's own preparation (the real engine's pipelines into a fresh SQLite file, the
service's database beside it) in a temporary directory, a server on it as the demo starts
one (here in process, on free ports), and every printed grpcurl and curl command run as a
shell would run it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from server.app import create_server
from server.config import Config
from server.gateway.local import LocalBackend
from tests.engine import demo
from tests.gateway.conftest import running_shim


def test_the_printed_commands_work(engine_venv: Path, tmp_path: Path) -> None:
    engine, own, manifest = demo.prepare(tmp_path)
    config = Config(database_url=own, bksops_database_url=engine, grpc_addr="127.0.0.1:0")
    server = create_server(config)
    server.start()
    try:
        backend = LocalBackend(server.handlers, server.workers)
        with running_shim(Config(grpc_addr="127.0.0.1:0"), backend) as http:
            printed = demo.commands(
                manifest, f"127.0.0.1:{server.port}", http.url.removeprefix("http://")
            )
            assert len(printed) == 2 * len(demo.SHOWN)
            for (what, command), (_, pipeline, label, _, extra) in zip(
                printed, [s for s in demo.SHOWN for _ in (0, 1)], strict=True
            ):
                done = subprocess.run(
                    ["bash", "-c", command], capture_output=True, text=True, timeout=30
                )
                assert done.returncode == 0, (what, done.stderr)
                reply = json.loads(done.stdout)
                node_id = manifest["pipelines"][pipeline]["nodes"][label]["id"]
                if command.startswith("curl"):
                    assert reply["result"] is True, (what, reply)
                    assert reply["data"]["id"] == node_id, what
                else:
                    assert reply["id"] == node_id, what
                    if "loop" in extra:
                        assert reply["loop"] == extra["loop"], what
    finally:
        server.stop(None)
