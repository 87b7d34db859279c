"""`linectl trace CODE`: everything the store knows about one unit or SSCC, as JSON.

CODE may be a raw scan, HRI "(01)…(21)…", an EPC URN or a GS1 Digital Link.
Exit 0 found, 1 not in this store, 2 the code is not a GS1 unit/SSCC identity, 3 store error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from linectl.store.cliutil import EXIT_BAD_INPUT, add_db_options, run_with_store


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("trace", help="trace a unit or SSCC: identity, state, lot, parents, every event")
    p.add_argument("code", help="raw scan, HRI, EPC URN or Digital Link")
    add_db_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from linectl.store.trace import TraceError, identify
    from linectl.trace import trace

    try:
        identify(args.code)
    except TraceError as exc:
        print(f"linectl: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    async def body(store: Any, cfg: Any | None) -> int:
        result = trace(store, args.code)  # identity, status, events, parent chain and, for a container, its tree
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0 if result["found"] else 1

    return run_with_store(args, body, readonly=True)
