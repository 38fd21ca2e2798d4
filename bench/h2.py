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
        result = subprocess.run(
            _command(url, body, load, seconds, warm_up, headers, log.name),
            capture_output=True,
            text=True,
            timeout=seconds + warm_up + 60,
            check=True,
        )
        succeeded, failed = _summary(result.stdout, result.stderr)
        return _run(load, seconds, succeeded, failed, _durations(Path(log.name)))


def h2load_spread(url: str, bodies: list[Path], seconds: float, headers: dict[str, str]) -> Run:
    """One h2load per body, all at once, each one call in flight (h2load sends one body):
    len(bodies) calls in flight, each asking its own request; their figures merged."""
    with tempfile.TemporaryDirectory() as directory:
        logs = [Path(directory) / f"{i}.log" for i in range(len(bodies))]
        started = [
            subprocess.Popen(
                _command(url, body, Load(1, 1), seconds, 0, headers, str(log)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for body, log in zip(bodies, logs, strict=True)
        ]
        succeeded = failed = 0
        for process in started:
            out, err = process.communicate(timeout=seconds + 60)
            if process.returncode:
                raise RuntimeError(f"h2load failed:\n{out}\n{err}")
            done = _summary(out, err)
            succeeded, failed = succeeded + done[0], failed + done[1]
        durations = sorted(d for log in logs for d in _durations(log))
        return _run(Load(len(bodies), 1), seconds, succeeded, failed, durations)


def _command(
    url: str,
    body: Path,
    load: Load,
    seconds: float,
    warm_up: float,
    headers: dict[str, str],
    log: str,
) -> list[str]:
    command = [
        *("h2load", "-t", "1", "-c", str(load.clients), "-m", str(load.streams)),
        *("-D", f"{seconds:g}", f"--warm-up-time={warm_up}", "-d", str(body)),
        *("-H", "content-type: application/grpc", "-H", "te: trailers", f"--log-file={log}"),
    ]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    return [*command, url]


def _summary(stdout: str, stderr: str) -> tuple[int, int]:
    """The calls h2load counted as succeeded and failed."""
    found = re.search(r"requests: .*? (\d+) succeeded, (\d+) failed", stdout)
    if not found:
        raise RuntimeError(f"h2load printed no result:\n{stdout}\n{stderr}")
    return int(found.group(1)), int(found.group(2))


def _durations(log: Path) -> list[float]:
    """Each request's time in ms, sorted, from h2load's per-request log."""
    return sorted(
        int(line.split("\t")[2]) / 1000
        for line in log.read_text().splitlines()
        if line.count("\t") >= 2
    )


def _run(load: Load, seconds: float, succeeded: int, failed: int, durations: list[float]) -> Run:
    if not durations:
        raise RuntimeError("h2load logged no request")
    cut = statistics.quantiles(durations, n=100, method="inclusive")
    return Run(
        load=load,
        seconds=seconds,
        succeeded=succeeded,
        failed=failed,
        p50_ms=cut[49],
        p99_ms=cut[98],
        max_ms=durations[-1],
    )
