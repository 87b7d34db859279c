"""`linectl trace CODE`: everything the store knows about one unit or SSCC, as JSON.

CODE may be a raw scan, HRI "(01)…(21)…", an EPC URN or a GS1 Digital Link.
Exit 0 found, 1 not in this store, 2 the code is not a GS1 unit/SSCC identity, 3 store error.
The command line only: the trace itself is linectl.trace.trace (shared with recall, verify and rework).
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
    p = sub.add_parser("trace", help="trace a unit or SSCC: identity, state, lot, parents, every event")
    p.add_argument("code", help="raw scan, HRI, EPC URN or Digital Link")
    add_db_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from linectl.store.trace import TraceError, identify_code, trace

    try:
        identify_code(args.code)  # a code that is no GS1 identity is refused before the store is opened
    except TraceError as exc:
        print(f"linectl: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    async def body(store: Store, cfg: LineConfig | None) -> int:
        result = trace(store, args.code)  # identity, status, events, parent chain and, for a container, its tree
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0 if result["found"] else 1

    return run_with_store(args, body, readonly=True)
