"""`linectl users add|list|passwd|roles|deactivate|lock|unlock|reactivate`: the line's users (linectl/access).

`list` reads the store (read-only, also beside a running daemon). The others change a user: the store has one
owner, so when a daemon holds it the change goes to the daemon as the command `users_admin` over MQTT (one-shot
credential of `--user`), otherwise the CLI takes the store's lock and makes the change itself (origin
`cli:offline`), through the same code. Either way it is one audit record with the old and the new value and
`--reason`. Only a user with the permission users_admin may change others; anyone may change their own password.
A store without any user takes its first `users add` without `--user` (actor `bootstrap:<login>`).

Passwords never on the command line: the acting user's from `--password-file`, LINECTL_PASSWORD or a prompt; the
new password (add, passwd) from `--new-password-file`, LINECTL_NEW_PASSWORD or a prompt (asked twice).

Exit 0 done, 1 refused (reply names why), 2 bad input, 3 the store refused.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import uuid
from typing import TYPE_CHECKING, Any

from linectl.access.client import add_sign_options, add_user_options, cli_user, send, signature_blocks, user_password
from linectl.store.cliutil import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_OK, BadInput, add_db_options, load_line_config, run_async, run_with_store

if TYPE_CHECKING:
    from linectl.config import LineConfig
    from linectl.store import Store

OFFLINE_ORIGIN = "cli:offline"
ACTIONS = ("add", "passwd", "roles", "deactivate", "lock", "unlock", "reactivate")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("users", help="the line's users: add, list, passwd, roles, deactivate, lock, unlock, reactivate")
    usub = p.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    ls = usub.add_parser("list", help="every user (never deleted: deactivated ones too), without hashes")
    add_db_options(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=run_list)
    helps = {
        "add": "a new user (roles from access.roles; --source ldap: a directory user)",
        "passwd": "set a user's password (your own: with your current password)",
        "roles": "replace a user's roles",
        "deactivate": "a user who may no longer log in (never deleted: the audit trail names them)",
        "lock": "lock a user until unlocked",
        "unlock": "unlock a user (locked by failed logins or by lock)",
        "reactivate": "let a deactivated user log in again",
    }
    for action in ACTIONS:
        a = usub.add_parser(action, help=helps[action])
        a.add_argument("username")
        a.add_argument("-c", "--config", required=True, metavar="CONFIG", help="line YAML (access:, the store, the broker)")
        a.add_argument("--db", metavar="PATH", help="store path (default: store.path of the config)")
        a.add_argument("--reason", required=True, help="why (recorded with the change)")
        if action == "add":
            a.add_argument("--name", dest="display_name", required=True, help="the person's full name (shown with signatures)")
            a.add_argument("--roles", required=True, help="comma-separated roles (operator, supervisor, qa, engineer, administrator, ...)")
            a.add_argument("--source", choices=["local", "ldap"], default="local",
                           help="ldap: the directory checks the password (a local one is optional: the fallback when it is down)")
            a.add_argument("--no-password", action="store_true", help="ldap users: no local fallback password")
        if action == "roles":
            a.add_argument("--roles", required=True, help="comma-separated roles")
        if action in ("add", "passwd"):
            a.add_argument("--new-password-file", dest="new_password_file", metavar="FILE",
                           help="the new password, first line of FILE (else $LINECTL_NEW_PASSWORD, else a prompt)")
        a.add_argument("--timeout", type=float, default=30.0)
        add_user_options(a)
        add_sign_options(a)
        a.set_defaults(func=run_change, users_action=action)


def run_list(args: argparse.Namespace) -> int:
    async def body(store: Store, cfg: LineConfig | None) -> int:
        users = [u.public() for u in store.users()]
        if args.json:
            print(json.dumps(users, indent=2))
            return EXIT_OK
        if not users:
            print("no users")
        for u in users:
            state = "active" if u["active"] else "deactivated"
            if u["locked_until"]:
                state += f", locked until {u['locked_until']}"
            print(f"{u['username']:<20} {u['display_name']:<28} {','.join(u['roles']):<28} {u['source']:<6} {state}")
        return EXIT_OK

    return run_with_store(args, body, readonly=True)


def build(args: argparse.Namespace) -> dict[str, Any]:
    """The users_admin command (with the new password in clear: it goes to the gate, which hashes it)."""
    from linectl.access.passwords import NEW_PASSWORD_ENV, read_password
    from linectl.control import AUTHENTICATED, COMMAND_ADAPTER

    body: dict[str, Any] = {"name": "users_admin", "command_id": uuid.uuid4().hex, "action": args.users_action, "username": args.username,
                            "reason": args.reason}
    if args.users_action == "add":
        body.update(display_name=args.display_name, roles=[r.strip() for r in args.roles.split(",") if r.strip()], source=args.source)
    if args.users_action == "roles":
        body["roles"] = [r.strip() for r in args.roles.split(",") if r.strip()]
    if args.users_action == "passwd" or (args.users_action == "add" and not (args.source == "ldap" and args.no_password)):
        body["new_password"] = read_password(file=args.new_password_file, env=NEW_PASSWORD_ENV, prompt=f"new password for {args.username}: ",
                                             confirm=True)
    COMMAND_ADAPTER.validate_python(body, context=AUTHENTICATED)
    return body


def run_change(args: argparse.Namespace) -> int:
    try:
        cfg = load_line_config(args)
        assert cfg is not None
        body = build(args)
    except BadInput as exc:
        print(f"linectl: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, OSError) as exc:
        print(f"linectl users {args.users_action}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    path = str(args.db or cfg.store.path)
    user = cli_user(args)

    typed: list[str] = []

    def password() -> str:  # asked once, for the login and the signature of this one command
        assert user is not None
        if not typed:
            typed.append(user_password(args, user))
        return typed[0]

    def blocks() -> dict[str, Any]:
        return signature_blocks(args, user, password() if args.sign and user else None)

    async def main() -> int:
        from linectl.store.lock import StoreLocked

        try:
            reply = await offline(cfg, body, path, user, password, blocks)
        except StoreLocked:
            reply = None
        if reply is None:  # a daemon owns the store: the change goes to it
            if not user:
                raise BadInput("a daemon runs this line: give --user NAME (a user who may administer users) to send the change to it")
            try:
                reply = await send(cfg, {**body, **blocks()}, args.timeout, user=user, password=password(), session="one_shot")
            except TimeoutError:  # an OSError to run_async: said here, with what to check
                print(f"linectl users {args.users_action}: the store is held (by a daemon?) and no daemon answered over MQTT within "
                      f"{args.timeout}s (is it running and connected to {cfg.mqtt.host}:{cfg.mqtt.port}?)", file=sys.stderr)
                return EXIT_CHECK_FAILED
        print(json.dumps(reply, indent=2))
        if not reply.get("ok"):
            print(f"linectl users {args.users_action}: refused: {reply['error']['message']}", file=sys.stderr)
            return EXIT_CHECK_FAILED
        return EXIT_OK

    try:
        return run_async(main)
    except ValueError as exc:  # no password to be had
        print(f"linectl users {args.users_action}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


async def offline(cfg: LineConfig, body: dict[str, Any], path: str, user: str | None, password: Any,
                  blocks: Any = dict) -> dict[str, Any] | None:
    """The change made on the store itself; StoreLocked (raised) when a daemon holds it. `blocks()`: the signature
    envelope (--sign), checked like the daemon checks it and written with the change's audit record."""
    from linectl.access.gate import Access
    from linectl.access.principal import permits
    from linectl.access.signing import sign
    from linectl.control import AUTHENTICATED, COMMAND_ADAPTER, CommandRejected, UsersAdmin
    from linectl.store.cliutil import open_store

    store = await open_store(path, cfg, readonly=False, command=f"linectl users {body['action']}", origin=OFFLINE_ORIGIN)
    access = Access(cfg.access, store)
    try:
        def refused(code: str, message: str) -> dict[str, Any]:
            return {"ok": False, "command_id": body["command_id"], "command": "users_admin", "error": {"code": code, "message": message}, "offline": True}

        if not store.users() and not user:
            if body["action"] != "add":
                return refused("unknown_user", "the store has no users yet: `linectl users add` the first one")
            actor = f"bootstrap:{_login()}"
            signed = None  # the first user: nobody to sign yet
        else:
            if not user:
                return refused("unauthenticated", "give --user NAME: a user who may administer users (or the user whose password changes)")
            cmd = COMMAND_ADAPTER.validate_python({**body, "actor": user}, context=AUTHENTICATED)
            try:
                principal = await access.credential({"username": user, "password": password()}, channel="cli", client_id="cli",
                                                    origin=OFFLINE_ORIGIN, command=cmd)
            except CommandRejected as exc:
                return refused(exc.code, exc.reason)
            why = permits(principal, cmd)
            if why is not None:
                access.deny("forbidden", why, OFFLINE_ORIGIN, principal.name)
                return refused("forbidden", why)
            actor = principal.name
            env = blocks()
            try:
                signed = await sign(access, cmd, principal, env.get("signature"), env.get("second_signature"), channel="cli",
                                    origin=OFFLINE_ORIGIN) if cfg.access.enabled else None
            except CommandRejected as exc:
                return refused(exc.code, exc.reason)
        change = UsersAdmin.model_validate({**body, "actor": actor}, context=AUTHENTICATED)
        try:
            result = await access.admin(change, actor, OFFLINE_ORIGIN, signature=None if signed is None else signed.spec())
        except CommandRejected as exc:
            return refused(exc.code, exc.reason)
        return {"ok": True, "command_id": body["command_id"], "command": "users_admin", "result": result, "offline": True}
    finally:
        await access.refusals.flush()
        await store.close()


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return "unknown"

