"""Resume tokens: what a watch stream's caller hands back to go on after a message.

A token holds only what the store's content determines, never an in-process counter,
so any server process can resume from it: for a node, the etag of the last detail sent
(server.nodes: a hash of the reply, equal in every process); for a task, 4 bytes of hash
of each node's summary as last sent. Resuming sends what differs from the token, so no
change after it is missed and nothing already sent is sent again. A token is bound to
the watch it came from (the node or task and how it is rendered): it is not a secret
and not signed, since it only decides what its own caller is sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable

from server import errors
from server.errors import FieldViolation

#: Bytes of hash kept per node in a task token: a changed node hashing like its old
#: summary (then not resent) has a chance of 2^-32.
NODE_HASH_BYTES = 4


def scope_of(*parts: object) -> str:
    """A short hash naming a watch (its node or task, and its rendering)."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest()


def node_token(scope: str, etag: str) -> str:
    return _encode({"s": scope, "e": etag})


def read_node_token(token: str, scope: str) -> str:
    """The etag a node token was made after; InvalidArgument if it is none of this watch's."""
    return str(_decode(token, scope).get("e", ""))


def summary_hash(summary: tuple[object, ...]) -> bytes:
    return hashlib.blake2b(repr(summary).encode(), digest_size=NODE_HASH_BYTES).digest()


def task_token(scope: str, hashes: Iterable[bytes]) -> str:
    joined = b"".join(sorted(hashes))
    return _encode({"s": scope, "h": base64.b64encode(joined).decode()})


def read_task_token(token: str, scope: str) -> frozenset[bytes]:
    """The node summary hashes a task token was made after."""
    raw = base64.b64decode(str(_decode(token, scope).get("h", "")))
    return frozenset(raw[i : i + NODE_HASH_BYTES] for i in range(0, len(raw), NODE_HASH_BYTES))


def _encode(fields: dict[str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(fields, separators=(",", ":")).encode()).decode()


def _decode(token: str, scope: str) -> dict[str, object]:
    try:
        fields = json.loads(base64.urlsafe_b64decode(token.encode()))
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        raise _bad("is not a resume token this service issued")
    if fields.get("s") != scope:
        raise _bad("was issued for another node, task or rendering")
    return fields


def _bad(problem: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(
        f"resume_token {problem}",
        {"fields": "resume_token"},
        [FieldViolation("resume_token", problem)],
    )
