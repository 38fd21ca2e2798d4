"""The curl commands printed at start-up and shown in the docs work as printed."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from server.cli import DEMO_APP
from server.gateway.examples import curl_examples

ROOT = Path(__file__).parents[2]
DOCS = (ROOT / "README.md",)
DEFAULT_BASE = "http://127.0.0.1:8080"
CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="needs the curl command")


def documented_commands() -> list[str]:
    """Every curl command in a sh block of the docs' HTTP/JSON shim section (the TLS
    section's need a certificate), continuation lines joined."""
    text = "\n".join(path.read_text(encoding="utf-8") for path in DOCS if path.exists())
    text = text.split("## The HTTP/JSON shim", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for command in re.split(r"(?<!\\)\n", block):
            if command.startswith("curl "):
                commands.append(command)
    return commands


def run(command: str, base: str) -> tuple[int, Any]:
    """Run a printed curl command against base: (HTTP status, parsed JSON body)."""
    args = shlex.split(command.replace(DEFAULT_BASE, base).replace("\\\n", " "))
    args[1:1] = ["-s", "-w", "\n%{http_code}"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=30, check=True).stdout
    body, _, status = out.rpartition("\n")
    if "Grpc-Timeout" in command:  # a stream (NDJSON or SSE): its first message
        lines = body.splitlines()
        first = next(line for line in lines if line.startswith(("{", "data: ")))
        return int(status), json.loads(first.removeprefix("data: "))
    payload = body.rpartition("\n\n")[2]  # after -i headers
    return int(status), json.loads(payload) if payload.strip() else None  # None: 304


def test_the_docs_show_every_example_as_printed() -> None:
    documented = documented_commands()
    for example in curl_examples(DEMO_APP):
        assert example.command in documented, example.title


@needs_curl
def test_every_example_works(sqlite_shim: str) -> None:
    for example in curl_examples(DEMO_APP, sqlite_shim):
        status, answer = run(example.command, sqlite_shim)
        failed = answer.get("result") is False or "details" in answer
        assert (failed, status < 500) == (example.fails, True), (example.title, answer)


@needs_curl
def test_every_documented_command_works(sqlite_shim: str) -> None:
    commands = documented_commands()
    assert len(commands) >= len(curl_examples(DEMO_APP))
    for command in commands:
        status, answer = run(command, sqlite_shim)
        assert (status < 500 and isinstance(answer, dict)) or status == 304, (command, answer)


@needs_curl
def test_the_documented_if_none_match_gets_a_304(sqlite_shim: str) -> None:
    """The README's If-None-Match example names the seed node's etag as it is."""
    (command,) = [c for c in documented_commands() if "If-None-Match" in c]
    assert run(command, sqlite_shim) == (304, None)
