"""`linectl audit verify`: walk the hash-chained audit trail.

Exit 0 "audit trail OK: N records"; exit 1 naming the first bad record
(altered, deleted, or the tail truncated); 3 when the store cannot be opened.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from linectl.store.cliutil import add_db_options, run_with_store

if TYPE_CHECKING:
    from linectl.config import LineConfig
    from linectl.store import Store


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("audit", help="audit trail tools")
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    v = asub.add_parser("verify", help="verify the audit trail's hash chain and its head kept in meta")
    add_db_options(v)
    v.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    async def body(store: Store, cfg: LineConfig | None) -> int:
        check = store.verify_audit()
        if check.ok:
            print(f"audit trail OK: {check.checked} records")
            return 0
        print(f"audit trail BROKEN at record {check.first_bad_seq}: {check.reason} ({check.checked} records verified before it)")
        return 1

    return run_with_store(args, body, readonly=True)
