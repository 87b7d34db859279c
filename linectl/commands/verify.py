"""`linectl verify CODE`: is this scanned code genuine? JSON verdict on stdout.

Verdicts: genuine, decommissioned, recalled, unknown (possible counterfeit),
suspicious (possible diversion or clone). Exit 0 genuine, 1 anything else,
2 bad arguments, 3 store error. Read-only: no alarm is recorded from the CLI.
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
    p = sub.add_parser("verify", help="verify a scanned code: genuine / decommissioned / recalled / unknown / suspicious")
    p.add_argument("code", help="raw scan (]d2…), HRI, EPC URN or Digital Link of a unit or SSCC")
    p.add_argument("--where", metavar="SSCC", help="the case/pallet the code was found in (detects diversion)")
    add_db_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from linectl.store.trace import TraceError, verify_code

    async def body(store: Store, cfg: LineConfig | None) -> int:
        try:
            result = verify_code(store, args.code, where=args.where)
        except TraceError as exc:
            print(f"linectl: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0 if result["verdict"] == "genuine" else 1

    return run_with_store(args, body, readonly=True)
