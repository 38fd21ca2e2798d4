"""Driving gRPC calls with h2load, and reading what it measured."""

from __future__ import annotations

import re
import statistics
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Load:
    """h2load's connections and streams per connection: clients x streams in flight."""

    clients: int
    streams: int

    @property
    def in_flight(self) -> int:
        return self.clients * self.streams


@dataclass(frozen=True)
class Run:
    """What one h2load run measured."""

    load: Load
    seconds: float
    succeeded: int
    failed: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def per_second(self) -> float:
        return self.succeeded / self.seconds


def grpc_body(request: bytes, path: Path) -> Path:
    """Write the HTTP/2 body of a unary gRPC call: uncompressed flag, length, message."""
    path.write_bytes(struct.pack(">BI", 0, len(request)) + request)
    return path


def h2load(
    url: str, body: Path, load: Load, seconds: float, headers: dict[str, str], warm_up: float = 1
) -> Run:
    """Run h2load for seconds (after warm_up) and parse its summary and per-request log."""
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        command = [
            "h2load",
            "-t",
            "1",
            "-c",
            str(load.clients),
            "-m",
            str(load.streams),
            "-D",
            f"{seconds:g}",
            f"--warm-up-time={warm_up}",
            "-d",
            str(body),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            f"--log-file={log.name}",
        ]
        for name, value in headers.items():
            command += ["-H", f"{name}: {value}"]
        result = subprocess.run(
            [*command, url],
            capture_output=True,
            text=True,
            timeout=seconds + warm_up + 60,
            check=True,
        )
        durations = sorted(
            int(line.split("\t")[2]) / 1000
            for line in Path(log.name).read_text().splitlines()
            if line.count("\t") >= 2
        )
    found = re.search(r"requests: .*? (\d+) succeeded, (\d+) failed", result.stdout)
    if not found or not durations:
        raise RuntimeError(f"h2load printed no result:\n{result.stdout}\n{result.stderr}")
    cut = statistics.quantiles(durations, n=100, method="inclusive")
    return Run(
        load=load,
        seconds=seconds,
        succeeded=int(found.group(1)),
        failed=int(found.group(2)),
        p50_ms=cut[49],
        p99_ms=cut[98],
        max_ms=durations[-1],
    )
