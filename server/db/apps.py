"""The credential store: apps, their business grants and issued user tokens.

Like server.db.store, the only code that queries these tables; the command line
uses the write methods, the authenticator the read ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Iterable
from functools import partial
from typing import NamedTuple
from typing import TypeVar

from peewee import Database

from server import secrets
from server.db.models import App
from server.db.models import AppGrant
from server.db.models import UserToken
from server.db.store import Store
from server.db.store import unavailable_on_db_error

T = TypeVar("T")


class AppRecord(NamedTuple):
    """What the authenticator needs to know about an app."""

    code: str
    secret_hash: str
    all_businesses: bool
    may_assert_user: bool
    revoked: bool
    businesses: frozenset[int]


class TokenRecord(NamedTuple):
    """Whom a live token stands for, and until when (microseconds since the epoch)."""

    username: str
    expires_at: int


class AppNotFound(LookupError):
    """The command line named an app that does not exist."""


class AppExists(ValueError):
    """The command line tried to add an app whose code is taken."""


def _now() -> int:
    return time.time_ns() // 1000


class AppStore:
    """Reads and writes app credentials in one database."""

    def __init__(
        self, db: Database, store: Store | None = None, serving: Store | None = None
    ) -> None:
        """With a store, reads run on the serving call's connection (Store.read), which
        is proven alive by the first of them.

        With serving too (a serving store that reads replicas), store is a store of its
        own on db, the primary: each read opens a session of its own there, within the
        time serving's call has left. A credential is then read as the primary has it,
        so a revocation applies within Config.auth_cache_seconds whatever a replica lags.
        """
        self.db = db
        self.store = store
        self.serving = serving

    def close(self) -> None:
        """Close the pool of a store of its own on the primary (with serving; otherwise
        the serving store's owner closes what this reads on)."""
        if self.serving is not None and self.store is not None:
            self.store.close()

    def _reading(self, work: Callable[[], T]) -> T:
        if self.store is None:
            with unavailable_on_db_error():
                return work()
        if self.serving is None:
            return self.store.read(work, name="credentials")
        with self.store.session(self.serving.time_left()):
            return self.store.read(work, name="credentials")

    def app(self, code: str) -> AppRecord | None:
        """The app with its grants, or None if there is no such app (two queries)."""
        return self._reading(partial(self._app, code))

    def _app(self, code: str) -> AppRecord | None:
        row = (
            App.select(
                App.code, App.secret_hash, App.all_businesses, App.may_assert_user, App.revoked
            )
            .where(App.code == code)
            .tuples()
            .first()
        )
        if row is None:
            return None
        grants = AppGrant.select(AppGrant.bk_biz_id).where(AppGrant.app == code).scalars()
        code_, secret_hash, all_businesses, may_assert_user, revoked = row
        return AppRecord(
            code=code_,
            secret_hash=secret_hash,
            all_businesses=all_businesses,
            may_assert_user=may_assert_user,
            revoked=revoked,
            businesses=frozenset(int(g) for g in grants),
        )

    def user_of_token(self, token: str) -> TokenRecord | None:
        """The user a live issued token stands for and its expiry, or None."""
        row = self._reading(
            lambda: (
                UserToken.select(UserToken.username, UserToken.expires_at)
                .where(UserToken.token_hash == secrets.token_digest(token))
                .tuples()
                .first()
            )
        )
        if row is None or row[1] <= _now():
            return None
        return TokenRecord(str(row[0]), int(row[1]))

    # Writes, for the command line ----------------------------------------------------

    def add(
        self,
        code: str,
        secret: str,
        businesses: Iterable[int] = (),
        all_businesses: bool = False,
        may_assert_user: bool = False,
    ) -> None:
        """Create an app (refusing an existing code) with its grants."""
        with self.db.atomic():
            if App.select().where(App.code == code).exists():
                raise AppExists(f"app {code} already exists; rotate its secret instead")
            App.insert(
                code=code,
                secret_hash=secrets.hash_secret(secret),
                all_businesses=all_businesses,
                may_assert_user=may_assert_user,
                updated_at=_now(),
            ).execute()
            self.grant(code, businesses)

    def rotate(self, code: str, secret: str) -> None:
        """Replace an app's secret (and lift a revocation)."""
        self._update(code, secret_hash=secrets.hash_secret(secret), revoked=False)

    def revoke(self, code: str) -> None:
        """Refuse the app from now on (within the authenticator's cache time)."""
        self._update(code, revoked=True)

    def set_all_businesses(self, code: str, value: bool) -> None:
        self._update(code, all_businesses=value)

    def grant(self, code: str, businesses: Iterable[int]) -> None:
        """Let the app read these businesses too."""
        with self.db.atomic():
            self._require(code)
            query = AppGrant.select(AppGrant.bk_biz_id).where(AppGrant.app == code)
            have = {int(g) for g in query.scalars()}
            rows = [{"app": code, "bk_biz_id": b} for b in sorted(set(businesses) - have)]
            if rows:
                AppGrant.insert_many(rows).execute()

    def withdraw(self, code: str, businesses: Iterable[int]) -> None:
        """Stop the app reading these businesses."""
        with self.db.atomic():
            self._require(code)
            AppGrant.delete().where(
                (AppGrant.app == code) & AppGrant.bk_biz_id.in_(list(businesses))
            ).execute()

    def list(self) -> list[AppRecord]:
        """Every app, by code."""
        codes = list(App.select(App.code).order_by(App.code).scalars())
        return [record for code in codes if (record := self.app(code)) is not None]

    def issue_token(self, username: str, seconds: int, token: str | None = None) -> str:
        """A new bk_token for username, valid for seconds; only its hash is stored.

        A given token is for the demo only; otherwise it is 256 random bits.
        """
        token = token or secrets.new_secret()
        UserToken.insert(
            token_hash=secrets.token_digest(token),
            username=username,
            expires_at=_now() + seconds * 1_000_000,
        ).execute()
        return token

    def _update(self, code: str, **changes: object) -> None:
        with self.db.atomic():
            self._require(code)
            App.update(updated_at=_now(), **changes).where(App.code == code).execute()

    def _require(self, code: str) -> None:
        if not App.select().where(App.code == code).exists():
            raise AppNotFound(f"there is no app {code}")
