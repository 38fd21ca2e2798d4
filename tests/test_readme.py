"""The README's grpcurl examples work as printed (against a test server on its own port)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from server.app import Server
from server.config import Config
from server.watch.service import serve_watch

README = Path(__file__).resolve().parent.parent / "README.md"
GRPCURL = str(Path(sys.executable).parent / "grpcurl")


def grpcurl_examples() -> list[tuple[str, str]]:
    """(comment above it, command) for each grpcurl command of the README's grpcurl section."""
    section = README.read_text(encoding="utf-8").split("## Calling it with grpcurl", 1)[1]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    examples, comment, command = [], "", ""
    for line in block.splitlines():
        if line.startswith("#"):
            comment = (comment + " " + line.lstrip("# ")) if not command else line.lstrip("# ")
            continue
        if not line.strip():
            continue
        command += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            examples.append((comment.strip(), command.strip()))
            command = ""
            comment = ""
    return examples


EXAMPLES = grpcurl_examples()


def expected(comment: str) -> str | None:
    """The grpcurl status text an example promises, or None for success."""
    if "-max-time" in comment:
        return "Code: DeadlineExceeded"
    if "PERMISSION_DENIED" in comment:
        return "Code: PermissionDenied"
    if "Errors" in comment:
        return "Code: InvalidArgument"
    return None


def test_the_readme_has_the_examples_it_should() -> None:
    commands = [command for _, command in EXAMPLES]
    assert any(c.endswith(" list") for c in commands)
    assert any(" describe " in c for c in commands)
    assert any("node0df0431f8f553925af01a94854bd" in c and "component_code" in c for c in commands)


@pytest.mark.parametrize(("comment", "command"), EXAMPLES, ids=[c[:60] for _, c in EXAMPLES])
def test_example_works_as_printed(
    server: Server, grpc_address: str, comment: str, command: str
) -> None:
    assert command.startswith(".venv/bin/grpcurl ")
    runnable = command.replace(".venv/bin/grpcurl", GRPCURL, 1).replace(
        "127.0.0.1:50051", grpc_address
    )
    watch = None
    if "127.0.0.1:50052" in runnable:  # a watch stream: the watch server beside the server
        watch = serve_watch(Config(grpc_addr="127.0.0.1:0", watch_addr="127.0.0.1:0"), server)
        assert watch is not None
        runnable = runnable.replace("127.0.0.1:50052", f"127.0.0.1:{watch.port}")
    try:
        result = subprocess.run(
            ["bash", "-c", runnable], capture_output=True, text=True, timeout=30, check=False
        )
    finally:
        if watch is not None:
            watch.stop(0)
    if watch is not None:  # the stream's first message came before -max-time ended it
        assert "resume_token" in result.stdout, result.stdout + result.stderr
    promised = expected(comment)
    if promised is None:
        assert result.returncode == 0, result.stdout + result.stderr
        assert re.search(r"\S", result.stdout)
    else:
        assert result.returncode != 0
        assert promised in result.stdout + result.stderr
