"""Who is calling, as HTTP callers say it, and the shim's authentication seam.

server.auth owns credentials and checks them on every gRPC call. The shim only
collects them from where HTTP callers put them: the ``X-Bkapi-Authorization`` JSON
header the API gateway's SDKs send, or the ``bk_app_code``, ``bk_app_secret``,
``bk_username`` and ``bk_token`` parameters of old ESB callers (the header wins
field by field); it forwards them as the ``x-bkapi-authorization`` metadata.
"""

from __future__ import annotations

from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import fields

from server import errors
from server.auth import METADATA_KEY
from server.auth import Credentials

#: The header's name as ASGI gives it (lower case); the gRPC metadata key is the same.
HEADER = METADATA_KEY

#: Raises a ServiceError to refuse the caller, returns to let the request through.
Authenticate = Callable[[Credentials], Awaitable[None]]


async def accept_everyone(credentials: Credentials) -> None:
    """The seam for checks in the shim itself: none, since the gRPC server decides."""


def read_credentials(header: str | None, params: Mapping[str, object]) -> Credentials:
    """The credentials of a request: its header, then its parameters (legacy routes)."""
    try:
        claimed = Credentials.from_header(_utf8(header))
    except RecursionError:  # '[[[[…' nested past the parser's limit: as bad as any bad JSON
        raise errors.CredentialsInvalid(
            "X-Bkapi-Authorization is not valid JSON", {"field": METADATA_KEY}
        ) from None
    given = Credentials.from_mapping(params)
    return Credentials(
        **{f.name: getattr(claimed, f.name) or getattr(given, f.name) for f in fields(Credentials)}
    )


def _utf8(header: str | None) -> str | None:
    """The header's JSON text: ASGI hands header bytes over as Latin-1, JSON is UTF-8.

    Bytes that are not UTF-8 make the credentials unreadable, as they do over gRPC.
    """
    if header is None or header.isascii():
        return header
    try:
        return header.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise errors.CredentialsInvalid(
            "X-Bkapi-Authorization is not UTF-8", {"field": METADATA_KEY}
        ) from None


def metadata(credentials: Credentials) -> list[tuple[str, str]]:
    """The gRPC metadata that forwards credentials; none when there are none."""
    if credentials == Credentials():
        return []
    return [(METADATA_KEY, credentials.to_header())]
