"""`linectl report --db PATH --batch LOT [--json]`: the batch reconciliation report."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="batch reconciliation report")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--db")
    g.add_argument("-c", "--config")
    p.add_argument("--batch", required=True, metavar="LOT")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def db_path(args: argparse.Namespace) -> str:
    if getattr(args, "db", None):
        return args.db
    from linectl.config import load_config

    return load_config(args.config).store.path


def run(args: argparse.Namespace) -> int:
    from linectl.report import batch_report, format_report
    from linectl.store import Store, StoreError

    async def go() -> dict:
        store = await Store.open(db_path(args), create=False)
        try:
            return batch_report(store, args.batch)
        finally:
            await store.close()

    try:
        r = asyncio.run(go())
    except StoreError as exc:
        print(f"linectl: {exc}", file=sys.stderr)
        return 3
    except KeyError as exc:
        print(f"linectl: {exc.args[0]}", file=sys.stderr)
        return 2
    print(json.dumps(r) if args.json else format_report(r))
    return 0 if r["balanced"] else 1
