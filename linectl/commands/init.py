"""`linectl init -c CONFIG [--db PATH]`: create the line's store, the only command that does.

Every other command refuses a missing store (exit 3), so a mistyped `--db`
never silently starts a new, empty serial registry (with sequential serials
that would restart numbering at 1). The new store records the identity of its
line (ISA-95 enterprise/site/area/line and GLN from the config) and the
configured products; a later open with another line's config is refused.

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
            await store.audit(actor, "cli", "store_initialised", {"config": os.path.abspath(args.config), "identity": store.identity()})
            ident: Any = store.identity()
        finally:
            await store.close()
        print(f"{path}: store created for line {ident['enterprise']}/{ident['site']}/{ident['area']}/{ident['line']} (GLN {ident['gln']}), "
              f"{len(cfg.products)} product(s)")
        return 0

    return run_async(main)
