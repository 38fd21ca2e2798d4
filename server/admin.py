"""Command line for credentials: apps, their secrets and grants, and user tokens.

    python -m server apps add CODE [--business ID ...] [--all-businesses] [--may-assert-user]
    python -m server apps rotate CODE        a new secret, printed once
    python -m server apps revoke CODE
    python -m server apps grant CODE ID ...  /  withdraw CODE ID ...
    python -m server apps list
    python -m server tokens issue USERNAME [--seconds N]

Secrets and tokens are printed once, when made, and stored only as hashes.
"""

from __future__ import annotations

import argparse

from server.config import Config
from server.db.apps import AppStore
from server.db.connection import ensure_schema
from server.db.connection import open_database
from server.secrets import new_secret


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the apps and tokens commands to the main parser's subcommands."""
    apps = commands.add_parser("apps", help="add, rotate, revoke apps; grant businesses")
    verbs = apps.add_subparsers(dest="verb", required=True)
    add = verbs.add_parser("add", help="create an app and print its secret")
    add.add_argument("code")
    add.add_argument("--business", type=int, action="append", default=[], metavar="BK_BIZ_ID")
    add.add_argument("--all-businesses", action="store_true")
    add.add_argument(
        "--may-assert-user",
        action="store_true",
        help="let it name its user with bk_username instead of a bk_token",
    )
    for verb in ("rotate", "revoke"):
        verbs.add_parser(verb).add_argument("code")
    for verb in ("grant", "withdraw"):
        grants = verbs.add_parser(verb)
        grants.add_argument("code")
        grants.add_argument("businesses", type=int, nargs="+", metavar="BK_BIZ_ID")
    verbs.add_parser("list")
    tokens = commands.add_parser("tokens", help="issue bk_tokens for users")
    token_verbs = tokens.add_subparsers(dest="verb", required=True)
    issue = token_verbs.add_parser("issue", help="issue a token and print it")
    issue.add_argument("username")
    issue.add_argument("--seconds", type=int, default=86400)


def run(args: argparse.Namespace, config: Config) -> int:
    """Carry out an apps or tokens command."""
    db = open_database(config.database_url)
    ensure_schema(db)
    store = AppStore(db)
    with db.connection_context():
        if args.command == "tokens":
            print(store.issue_token(args.username, args.seconds))
            return 0
        if args.verb == "add":
            secret = new_secret()
            store.add(
                args.code,
                secret,
                businesses=args.business,
                all_businesses=args.all_businesses,
                may_assert_user=args.may_assert_user,
            )
            print(f"bk_app_code={args.code}\nbk_app_secret={secret}")
        elif args.verb == "rotate":
            secret = new_secret()
            store.rotate(args.code, secret)
            print(f"bk_app_code={args.code}\nbk_app_secret={secret}")
        elif args.verb == "revoke":
            store.revoke(args.code)
        elif args.verb == "grant":
            store.grant(args.code, args.businesses)
        elif args.verb == "withdraw":
            store.withdraw(args.code, args.businesses)
        else:
            for app in store.list():
                scope = "all" if app.all_businesses else ",".join(map(str, sorted(app.businesses)))
                flags = " revoked" if app.revoked else ""
                flags += " may-assert-user" if app.may_assert_user else ""
                print(f"{app.code}\tbusinesses={scope or '-'}{flags}")
    return 0
