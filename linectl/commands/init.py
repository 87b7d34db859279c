"""`linectl init -c CONFIG [--db PATH]`: create the line's store, the only command that does.

Every other command refuses a missing store (exit 3), so a mistyped `--db`
never silently starts a new, empty serial registry (with sequential serials
that would restart numbering at 1). The new store records the identity of its
line (ISA-95 enterprise/site/area/line and GLN from the config) and the
configured products; a later open with another line's config is refused.

On a line with access control (`access:`), the store gets its default users:
operator (role operator), qa (qa) and admin (administrator). Their passwords
come from LINECTL_PASSWORD_OPERATOR, LINECTL_PASSWORD_QA, LINECTL_PASSWORD_ADMIN
or are generated and printed once, here (`--no-default-users`: none; then the
first `linectl users add` needs no --user).

Exit 0 created, 2 bad input (invalid config), 3 the store refused (the file
already exists, its directory is missing, or it cannot be written).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any

from linectl.store.cliutil import EXIT_BAD_INPUT, EXIT_STORE, BadInput, load_line_config, open_store, run_async


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("init", help="create the line's store (the only command that creates one)")
    p.add_argument("-c", "--config", required=True, metavar="CONFIG", help="line YAML: identity, products and store.path")
    p.add_argument("--db", metavar="PATH", help="store path (default: store.path of the config)")
    p.add_argument("--actor", default=None, help="who creates it, for the audit trail (default: cli:<login>)")
    p.add_argument("--no-default-users", dest="default_users", action="store_false",
                   help="create no default users (operator, qa, admin) on a line with access control")
    p.set_defaults(func=run)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return str(os.getuid())


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_line_config(args)
    except BadInput as exc:
        print(f"linectl: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    assert cfg is not None
    path = str(args.db or cfg.store.path)
    actor = args.actor or f"cli:{_user()}"
    if os.path.lexists(path) and not (os.path.isfile(path) and os.path.getsize(path) == 0):
        print(f"linectl: store refused: {path} already exists; `linectl init` never touches an existing store", file=sys.stderr)
        return EXIT_STORE
    if cfg.access.enabled and args.default_users:  # a password the policy refuses: refused before the store exists
        from linectl.access.bootstrap import password_env
        from linectl.access.gate import DEFAULT_USERS
        from linectl.access.passwords import PasswordRefused, check_policy

        for name, _display, _roles in DEFAULT_USERS:
            pw = os.environ.get(password_env(name))
            try:
                if pw:
                    check_policy(pw, cfg.access.password, name)
            except PasswordRefused as exc:
                print(f"linectl: {password_env(name)}: {exc}", file=sys.stderr)
                return EXIT_BAD_INPUT
    for side in ("-wal", "-shm"):
        if os.path.lexists(path + side):
            print(f"linectl: store refused: {path + side} exists without its store; move it away first", file=sys.stderr)
            return EXIT_STORE

    async def main() -> int:
        store = await open_store(path, cfg, readonly=False, command="linectl init", create=True, actor=actor)
        try:
            if store.opened_from_version != 0:  # someone else created it between our check and our lock
                print(f"linectl: store refused: {path} already exists", file=sys.stderr)
                return EXIT_STORE
            await store.upsert_products(cfg.products, actor=actor)
            generated: dict[str, str | None] = {}
            if cfg.access.enabled and args.default_users:
                from linectl.access.bootstrap import create_default_users

                generated = await create_default_users(cfg.access, store, actor=actor, origin="cli")
            await store.audit(actor, "cli", "store_initialised", {"config": os.path.abspath(args.config), "identity": store.identity()})
            ident: Any = store.identity()
        finally:
            await store.close()
        print(f"{path}: store created for line {ident['enterprise']}/{ident['site']}/{ident['area']}/{ident['line']} (GLN {ident['gln']}), "
              f"{len(cfg.products)} product(s)")
        for name, pw in generated.items():
            print(f"user {name}: " + (f"initial password {pw} (shown once: change it with `linectl users passwd {name}`)" if pw
                                      else "password from the environment"))
        return 0

    return run_async(main)
