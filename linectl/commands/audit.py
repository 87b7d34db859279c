"""`linectl audit verify`: walk the hash-chained audit trail; `linectl audit review`: the batch review document.

verify: exit 0 "audit trail OK: N records"; exit 1 naming the first bad record
(altered, deleted, or the tail truncated); 3 when the store cannot be opened.

review --batch LOT [--format json|html|pdf] [-o FILE]: the document a QA
reviewer signs (linectl.review). Exit 0 written; 1 written, but the hash
chain is broken (the document says so on its first line); 2 bad input (no
such lot, a PDF to a terminal); 3 the store cannot be opened.
"""

from __future__ import annotations

import argparse
import json
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
    r = asub.add_parser("review", help="the batch review document: identity, config hash, audit trail, signatures, challenge, "
                        "reconciliation, alarms, chain verification")
    add_db_options(r)
    r.add_argument("--batch", required=True, metavar="LOT")
    r.add_argument("--format", choices=("json", "html", "pdf"), default="json")
    r.add_argument("-o", "--output", metavar="FILE", help="write here (FILE.tmp, then renamed) instead of stdout")
    r.set_defaults(func=run_review)


def run_verify(args: argparse.Namespace) -> int:
    async def body(store: Store, cfg: LineConfig | None) -> int:
        check = store.verify_audit()
        if check.ok:
            print(f"audit trail OK: {check.checked} records")
            return 0
        print(f"audit trail BROKEN at record {check.first_bad_seq}: {check.reason} ({check.checked} records verified before it)")
        return 1

    return run_with_store(args, body, readonly=True)


def run_review(args: argparse.Namespace) -> int:
    import os
    import sys

    from linectl.review import UnknownLot, build_review
    from linectl.store.cliutil import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_OK

    if args.format == "pdf" and not args.output and sys.stdout.isatty():
        print("linectl: a PDF is not for a terminal: give -o FILE", file=sys.stderr)
        return EXIT_BAD_INPUT

    async def body(store: Store, cfg: LineConfig | None) -> int:
        from linectl.engine.line import zone_info
        from linectl.review_render import render_html, render_pdf

        try:
            doc = build_review(store, args.batch, zone=zone_info(cfg.line.zone) if cfg is not None else None)
        except UnknownLot as exc:
            print(f"linectl: {exc.args[0]}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if args.format == "json":
            data = (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        elif args.format == "html":
            data = render_html(doc).encode("utf-8")
        else:
            data = render_pdf(doc)
        if args.output:
            tmp = args.output + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, args.output)
        else:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        chain = doc["chain"]
        if not chain["verified"]:
            print(f"linectl: audit trail BROKEN at record {chain['first_bad_seq']}: {chain['problem']} (the review says so)", file=sys.stderr)
            return EXIT_CHECK_FAILED
        print(f"batch review {args.batch}: {len(doc['audit_trail']['records'])} audit records, chain verified to #{chain['head_seq']}, "
              f"review digest {doc['review_digest']}", file=sys.stderr)
        return EXIT_OK

    return run_with_store(args, body, readonly=True)
