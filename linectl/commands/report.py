"""`linectl report --db PATH|-c CONFIG --batch LOT [--json]`: the batch reconciliation report.

Read-only: works beside the running daemon and on a store no daemon holds
(e.g. after a crash, before or after `linectl batch close`). Exit 0 balanced,
1 not balanced, 2 bad input or no such batch, 3 the store refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from linectl.store.cliutil import EXIT_BAD_INPUT, add_db_options, run_with_store

if TYPE_CHECKING:
    from linectl.config import LineConfig
    from linectl.store import Store


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("report", help="batch reconciliation report")
    add_db_options(p)
    p.add_argument("--batch", required=True, metavar="LOT")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from linectl.report import batch_report, format_report

    async def body(store: Store, cfg: LineConfig | None) -> int:
        try:
            r = batch_report(store, args.batch)
        except KeyError as exc:
            print(f"linectl: {exc.args[0]}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(json.dumps(r) if args.json else format_report(r))
        return 0 if r["balanced"] else 1

    return run_with_store(args, body, readonly=True)
