"""Who is calling: BlueKing app credentials, the user, and the businesses they may read.

Callers present the JSON the API gateway's X-Bkapi-Authorization header carries
(``{"bk_app_code", "bk_app_secret", "bk_username" | "bk_token"}``) in the gRPC
metadata ``x-bkapi-authorization``; the HTTP shim forwards it there from the header
or from the old ESB route's parameters.

Checking an app secret costs a slow hash (tens of milliseconds), far too much for
every call, so a verified identity is cached for ``cache_seconds``, keyed by a
keyed hash of the credentials (the cache holds no secret). A revocation, rotation
or grant change therefore takes effect within ``cache_seconds``.

A bk_token's expiry holds to the microsecond all the same: an identity verified with
a token carries the token's expiry and is checked again once it has passed.

Re-checking an identity when its entry expires reads the app's row again, but
does not hash the secret again while the row's stored hash is the one it was
checked against: that outcome is remembered per (secret, stored hash). Without
this every busy thread would run scrypt at once each ``cache_seconds``, a burst
of CPU that stalls every call in flight.

A secret that must be hashed (one not checked before against that stored hash) first
takes a token of its caller's failure budget and then one of a few hash slots
(server.throttle); without either it is refused at once, CREDENTIAL_CHECKS_THROTTLED,
and the refusal is not cached. Checks of one secret at once share one hash: a client's
first calls on several connections wait for the first one's answer instead of each
taking a slot (and being refused for want of one). An unknown app goes the same way and
hashes a decoy, so neither its answer nor its timing tells it from a wrong secret. Both tables are
bounded and forget the least recently used entry first, so a flood of random
credentials cannot push out the identities callers keep using.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from collections.abc import Mapping
from concurrent.futures import Future
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import NoReturn
from typing import Protocol
from typing import TypeVar

from server import errors
from server import metrics
from server import secrets
from server.db.apps import AppStore
from server.db.apps import TokenRecord
from server.throttle import FailureBudget
from server.throttle import HashSlots
from server.throttle import SlotsBusy
from server.throttle import caller_of

log = logging.getLogger("tasknode.auth")

#: The Principal of the call being served: set by the auth interceptor, None until then.
current_principal: ContextVar[Principal | None] = ContextVar("current_principal", default=None)

METADATA_KEY = "x-bkapi-authorization"
#: Where a gRPC client would put the credentials as bytes: refused, they are JSON text.
BINARY_KEY = f"{METADATA_KEY}-bin"
CREDENTIAL_FIELDS = ("bk_app_code", "bk_app_secret", "bk_username", "bk_token")
MAX_FIELD_LENGTH = 256
#: The action a read of a node detail needs, named in permission errors.
ACTION = "task_view"


@dataclass(frozen=True)
class Credentials:
    """What a caller presents; secrets in here are never logged."""

    app_code: str = ""
    app_secret: str = ""
    username: str = ""
    token: str = ""

    @classmethod
    def from_mapping(cls, fields: Mapping[str, object]) -> Credentials:
        """Credentials from the header's JSON object (or the ESB parameters)."""
        values: dict[str, str] = {}
        for name in CREDENTIAL_FIELDS:
            value = fields.get(name)
            if value is None:
                continue
            if not isinstance(value, str) or len(value) > MAX_FIELD_LENGTH:
                raise errors.CredentialsInvalid(
                    f"{name} must be a string of at most {MAX_FIELD_LENGTH} characters",
                    {"field": name},
                )
            values[name] = value
        return cls(
            app_code=values.get("bk_app_code", ""),
            app_secret=values.get("bk_app_secret", ""),
            username=values.get("bk_username", ""),
            token=values.get("bk_token", ""),
        )

    @classmethod
    def from_header(cls, text: str | None) -> Credentials:
        """Credentials from X-Bkapi-Authorization JSON text; none at all when absent."""
        if not text:
            return cls()
        try:
            fields = json.loads(text)
        except (ValueError, RecursionError):
            raise errors.CredentialsInvalid(
                "X-Bkapi-Authorization is not valid JSON", {"field": METADATA_KEY}
            ) from None
        if not isinstance(fields, dict):
            raise errors.CredentialsInvalid(
                "X-Bkapi-Authorization must be a JSON object", {"field": METADATA_KEY}
            )
        return cls.from_mapping(fields)

    def to_header(self) -> str:
        """The X-Bkapi-Authorization JSON for these credentials (to forward them)."""
        fields = dict(
            zip(
                CREDENTIAL_FIELDS,
                (self.app_code, self.app_secret, self.username, self.token),
                strict=True,
            )
        )
        return json.dumps({k: v for k, v in fields.items() if v})


@dataclass(frozen=True)
class Principal:
    """A verified app and user, and the businesses they may read (None: every one)."""

    app_code: str
    username: str
    businesses: frozenset[int] | None
    #: When the identity stops holding (its bk_token expires), in microseconds since the
    #: epoch; None: only the cache time bounds it.
    expires_at: int | None = None

    def lapsed(self) -> bool:
        """Whether the identity's expiry has passed."""
        return self.expires_at is not None and self.expires_at <= time.time_ns() // 1000

    def may_read(self, bk_biz_id: int | None) -> bool:
        if self.businesses is None:
            return True
        return bk_biz_id is not None and bk_biz_id in self.businesses

    def require(self, bk_biz_id: int | None, shown_id: int) -> None:
        """PermissionDenied unless the business may be read; shown_id is what the caller sent."""
        if not self.may_read(bk_biz_id):
            raise errors.PermissionDenied(
                f"APP [{self.app_code}] has no permission to perform action [{ACTION}] "
                f"on business [{shown_id}]",
                {"appCode": self.app_code, "action": ACTION, "bkBizId": str(shown_id)},
            )


class TokenVerifier(Protocol):
    """Turns a bk_token into its user and expiry; None when the token is not valid."""

    def user_for(self, token: str) -> TokenRecord | None: ...


class StoredTokenVerifier:
    """Accepts the tokens `python -m server tokens issue` made, until they expire."""

    def __init__(self, apps: AppStore) -> None:
        self.apps = apps

    def user_for(self, token: str) -> TokenRecord | None:
        return self.apps.user_of_token(token)


class Authenticator:
    """Verifies credentials into a Principal, caching what it verified for a while."""

    MAX_CACHED = 10_000

    def __init__(
        self,
        apps: AppStore,
        tokens: TokenVerifier,
        cache_seconds: float,
        slots: HashSlots,
        budget: FailureBudget,
    ) -> None:
        self.apps = apps
        self.tokens = tokens
        self.cache_seconds = cache_seconds
        self.slots = slots
        self.budget = budget
        self._cache: OrderedDict[bytes, tuple[float, Principal | errors.Unauthenticated]] = (
            OrderedDict()
        )
        #: Whether a secret (by fingerprint) matched a stored hash; see the module docstring.
        self._checked: OrderedDict[tuple[bytes, str], bool] = OrderedDict()
        #: The secrets being hashed now, each for one call; others with it wait for it.
        self._hashing: dict[tuple[bytes, str], Future[bool]] = {}
        self._lock = threading.Lock()

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]], peer: str) -> Principal:
        """The Principal for a call's metadata (its X-Bkapi-Authorization value, see
        header_of); Unauthenticated (logged) if not.

        The cache is keyed by a keyed hash of the header text, so a call whose
        credentials were checked lately costs one hash; failures are cached too, so
        repeating a wrong secret costs no more slow hashing.
        """
        try:
            header = header_of(metadata)
        except errors.Unauthenticated as exc:
            _refuse(exc, peer)
        key = _fingerprint(header or "")
        now = time.monotonic()
        with self._lock:
            cached = _recall(self._cache, key)
        lapsed = cached is not None and isinstance(cached[1], Principal) and cached[1].lapsed()
        if cached is None or cached[0] <= now or lapsed:
            metrics.CREDENTIAL_CACHE_MISSES.inc()
            try:
                outcome: Principal | errors.Unauthenticated = self._verify(
                    Credentials.from_header(header), caller_of(peer)
                )
            except errors.Unauthenticated as exc:
                # Cached as a fresh copy: the raised one holds its traceback, whose
                # frames hold the call (context, request), for as long as it is cached.
                outcome = type(exc)(exc.message, exc.metadata)
            with self._lock:
                _remember(self._cache, key, (now + self.cache_seconds, outcome), self.MAX_CACHED)
        else:
            metrics.CREDENTIAL_CACHE_HITS.inc()
            outcome = cached[1]
        if isinstance(outcome, Principal):
            return outcome
        _refuse(outcome, peer)

    def _verify(self, credentials: Credentials, caller: str) -> Principal:
        if not credentials.app_code:
            raise errors.CredentialsMissing("APP Code [bk_app_code] cannot be empty")
        if not credentials.app_secret:
            raise errors.CredentialsMissing(
                "APP Secret [bk_app_secret] cannot be empty", {"appCode": credentials.app_code[:64]}
            )
        app = self.apps.app(credentials.app_code)
        # Hash even for an unknown app, so its answer takes as long as a wrong secret's.
        stored = app.secret_hash if app is not None else _DECOY_HASH
        matches = self._matches(credentials.app_secret, stored, caller, credentials.app_code)
        if app is None or not matches or app.revoked:
            raise errors.CredentialsInvalid(
                "APP authentication failed: bk_app_code or bk_app_secret is invalid",
                {"appCode": credentials.app_code[:64]},
            )
        username, expires_at = self._user(credentials, app.may_assert_user)
        return Principal(
            app_code=app.code,
            username=username,
            businesses=None if app.all_businesses else app.businesses,
            expires_at=expires_at,
        )

    def _matches(self, secret: str, stored: str, caller: str, app_code: str) -> bool:
        """verify_secret, remembered for this secret and this stored hash; hashing only
        within caller's failure budget and a hash slot (see the module docstring)."""
        key = (_fingerprint(secret), stored)
        with self._lock:
            known = _recall(self._checked, key)
            pending = self._hashing.get(key) if known is None else None
            leader = known is None and pending is None
            if leader:
                pending = self._hashing[key] = Future()
        if known is not None:
            return known
        assert pending is not None
        if not leader:
            # The same secret is being hashed for another call (a client's first burst of
            # calls on several connections): its answer is this one's, at no cost.
            if pending.exception() is not None:
                raise errors.CredentialChecksThrottled(
                    "the server is checking as many credentials as it can at once; retry shortly",
                    {"appCode": app_code[:64]},
                )
            return bool(pending.result())
        try:
            known = self._hash(secret, stored, caller, app_code)
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        else:
            pending.set_result(known)
        finally:
            with self._lock:
                del self._hashing[key]
        with self._lock:
            _remember(self._checked, key, known, self.MAX_CACHED)
        return known

    def _hash(self, secret: str, stored: str, caller: str, app_code: str) -> bool:
        """verify_secret within caller's failure budget and a hash slot."""
        retry_in = math.ceil(self.budget.take(caller))
        if retry_in:
            raise errors.CredentialChecksThrottled(
                f"too many failed credential checks from this caller; retry in {retry_in} s",
                {"appCode": app_code[:64], "retryAfterSeconds": str(retry_in)},
            )
        try:
            known = self.slots.run(partial(secrets.verify_secret, secret, stored))
        except SlotsBusy:
            self.budget.give_back(caller)
            raise errors.CredentialChecksThrottled(
                "the server is checking as many credentials as it can at once; retry shortly",
                {"appCode": app_code[:64]},
            ) from None
        if known:
            self.budget.give_back(caller)
        return known

    def _user(self, credentials: Credentials, may_assert_user: bool) -> tuple[str, int | None]:
        """The verified username, and when it stops holding (None: no expiry)."""
        if credentials.token:
            found = self.tokens.user_for(credentials.token)
            if found is not None and found.username:
                return found.username, found.expires_at
        elif credentials.username and may_assert_user:
            return credentials.username, None
        raise errors.UserUnverified(
            "User authentication failed, please provide a valid user identity, "
            "such as bk_token, bk_username",
            {"appCode": credentials.app_code[:64]},
        )


def header_of(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The X-Bkapi-Authorization text in a call's gRPC metadata; None when it has none.

    Metadata that breaks gRPC's rules is refused as unreadable credentials, never
    guessed at: the key more than once, the -bin key, or a value that is not printable
    ASCII (gRPC's rule for text values; JSON escapes every other character). grpcio
    hands over a value that is not UTF-8 decoded as Latin-1, which is only told apart
    from a real one by this rule.
    """
    header: str | None = None
    for key, value in metadata:
        if key == METADATA_KEY:
            if header is not None:
                raise errors.CredentialsInvalid(
                    f"{METADATA_KEY} is given more than once", {"field": METADATA_KEY}
                )
            if not isinstance(value, str) or not (value.isascii() and value.isprintable()):
                raise errors.CredentialsInvalid(
                    f"{METADATA_KEY} must be printable ASCII: JSON with \\u escapes for "
                    "other characters",
                    {"field": METADATA_KEY},
                )
            header = value
        elif key == BINARY_KEY:
            raise errors.CredentialsInvalid(
                f"credentials go in {METADATA_KEY}, as JSON text, not in {BINARY_KEY}",
                {"field": BINARY_KEY},
            )
    return header


def _refuse(outcome: errors.Unauthenticated, peer: str) -> NoReturn:
    """Log a refused call (the app it claimed, never a secret) and raise a fresh copy of
    outcome, which may be cached and shared by threads."""
    log.warning(
        "authentication failed: app=%r peer=%s reason=%s",
        outcome.metadata.get("appCode", ""),
        peer,
        outcome.reason,
    )
    raise type(outcome)(outcome.message, outcome.metadata)


_DECOY_HASH = secrets.hash_secret(secrets.new_secret())
#: Keys the fingerprints of this process, so what it keeps in memory cannot be
#: tested against guessed secrets without this key.
_FINGERPRINT_KEY = os.urandom(32)


def _fingerprint(text: str) -> bytes:
    return hashlib.blake2b(
        text.encode("utf-8", "surrogatepass"), key=_FINGERPRINT_KEY, digest_size=32
    ).digest()


K = TypeVar("K")
V = TypeVar("V")


def _recall(table: OrderedDict[K, V], key: K) -> V | None:
    """table[key] (None if absent), now the most recently used (callers hold the lock)."""
    value = table.get(key)
    if value is not None:
        table.move_to_end(key)
    return value


def _remember(table: OrderedDict[K, V], key: K, value: V, limit: int) -> None:
    """Set table[key], forgetting the least recently used entry beyond limit (callers hold
    the lock)."""
    table[key] = value
    table.move_to_end(key)
    if len(table) > limit:
        table.popitem(last=False)
