"""A 300 MB header against a real `serve` process: how soon it is refused, and what it
costs the worker (python -m bench.big_header).

One worker process (the shim in it) on a fresh SQLite demo database, default limits.
The client sends a request whose one header never ends, 64 KiB at a time, and reads
at the same time; it reports the time from its first byte to the answer, how much it
had sent by then, and the worker's RSS before and after, and its peak.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import procs

HEAD = b"GET /api/c/compapi/v2/sops/get_task_node_detail/ HTTP/1.1\r\nhost: x\r\nx-big: "


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise LookupError(field)


def attempt(port: int, total: int) -> tuple[float, int, bytes]:
    """Send a head with a total-byte header: (seconds to the answer, bytes sent by then,
    the answer's first bytes)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:

        def send() -> None:
            nonlocal sent
            chunk = b"b" * 65536
            try:
                sent += sock.send(HEAD)
                while sent < total:
                    sent += sock.send(chunk)
            except OSError:
                pass  # refused and closed

        started = time.monotonic()
        sender = threading.Thread(target=send)
        sender.start()
        answer = sock.recv(4096)
        waited = time.monotonic() - started
        sent_by_then = sent
        sender.join(120)
    return waited, sent_by_then, answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--megabytes", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        port = _free_port()
        env = {
            **os.environ,
            "TASKNODE_DATABASE_URL": f"sqlite:///{scratch}/db.sqlite",
            "TASKNODE_GRPC_ADDR": f"127.0.0.1:{_free_port()}",
            "TASKNODE_HTTP_ADDR": f"127.0.0.1:{port}",
            "TASKNODE_GRPC_PROCESSES": "1",
        }
        command = [sys.executable, "-m", "server", "serve", "--demo"]
        process = procs.start(command, env, Path(scratch) / "server.log", "HTTP/JSON shim on")
        try:
            before = _rss_mib(process.pid)
            waited, sent, answer = attempt(port, args.megabytes * 1024 * 1024)
            time.sleep(1)
            after, peak = _rss_mib(process.pid), _rss_mib(process.pid, "VmHWM")
        finally:
            procs.stop(process)
    status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
    print(f"answer: {status_line!r}")
    print(f"{waited * 1000:.1f} ms from the first byte to the answer, {sent:,} bytes sent by then")
    print(f"worker RSS {before:.1f} MiB before, {after:.1f} MiB after, peak {peak:.1f} MiB")


if __name__ == "__main__":
    main()
