"""`linectl recall --batch LOT`: every pallet, case and unit of a batch with status and parent.

Streams CSV or JSON to stdout or --out FILE (a 1,000,000-unit batch never
sits in memory). `--mark --actor NAME` also flags the batch as recalled in
the audit trail, after which `linectl verify` answers "recalled" for its codes.
On a line with access control (-c CONFIG with access:) the marking is the
command recall_batch of `--user` (password from --password-file,
LINECTL_PASSWORD or a prompt), signed with --sign when access.signatures
lists it (default: meaning approved); refused: exit 1 with the code.
Exit 0 listed, 1 no such batch or a refused marking, 2 bad input, 3 store error.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from linectl.access.client import add_sign_options, add_user_options, cli_user, signature_blocks, user_password
from linectl.store.cliutil import EXIT_BAD_INPUT, add_db_options, run_with_store

if TYPE_CHECKING:
    from linectl.config import LineConfig
    from linectl.store import Store


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("recall", help="list every pallet, case and unit of a batch (CSV or JSON)")
    p.add_argument("--batch", "--lot", dest="lot", required=True, metavar="LOT", help="batch / lot number")
    p.add_argument("--format", choices=("json", "csv"), default="json")
    p.add_argument("--out", metavar="FILE", help="write here instead of stdout (written to FILE.tmp, then renamed)")
    p.add_argument("--mark", action="store_true", help="also flag the batch as recalled (audit record; needs --actor)")
    p.add_argument("--actor", help="who marks the recall (with --mark)")
    p.add_argument("--reason", default="", help="why (with --mark; required unless the config's audit.reason_required omits recall_batch)")
    add_db_options(p)
    add_user_options(p)
    add_sign_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from linectl.engine.audit_changes import missing_reason, reason_required
    from linectl.store.trace import mark_recalled, write_recall_csv, write_recall_json

    user = cli_user(args)
    if args.mark and not args.actor and not user:
        print("linectl: --mark needs --actor NAME (or --user NAME on a line with access control)", file=sys.stderr)
        return EXIT_BAD_INPUT

    async def body(store: Store, cfg: LineConfig | None) -> int:
        if store.batch(args.lot) is None:
            print(f"linectl: no batch {args.lot} in {store.path}", file=sys.stderr)
            return 1
        if args.mark:
            refusal = missing_reason(reason_required(cfg), "recall_batch", args.reason)
            if refusal is not None:
                print(f"linectl: {refusal} (--reason)", file=sys.stderr)
                return EXIT_BAD_INPUT
            signed = None
            if cfg is not None and cfg.access.enabled:
                from linectl.access.gate import Access
                from linectl.access.signing import offline_signature
                from linectl.control import AUTHENTICATED, CommandRejected, RecallBatch

                access = Access(cfg.access, store)
                try:
                    if not user:
                        raise CommandRejected("this line has access control: give --user NAME", "unauthenticated")
                    if args.actor and args.actor != user:
                        raise CommandRejected(f"--actor {args.actor!r} is not --user {user!r}", "forged_actor")
                    password = user_password(args, user)
                    cmd = RecallBatch.model_validate({"lot": args.lot, "actor": user, "reason": args.reason}, context=AUTHENTICATED)
                    signed = await offline_signature(access, cmd, user, password, signature_blocks(args, user, password), origin="cli:offline")
                except (CommandRejected, ValueError) as exc:
                    code = exc.code if isinstance(exc, CommandRejected) else "invalid"
                    print(f"linectl recall --mark: refused ({code}): {exc}", file=sys.stderr)
                    return 1
                finally:
                    await access.refusals.flush()
                actor = user
            else:
                actor = args.actor if ":" in args.actor else f"cli:{args.actor}"
            res = await mark_recalled(store, args.lot, actor, args.reason, "cli:offline" if signed is not None else "cli",
                                      signature=None if signed is None else signed.spec())
            print(f"batch {args.lot} {'was already' if res['already'] else 'is now'} marked recalled", file=sys.stderr)
        writer = write_recall_csv if args.format == "csv" else write_recall_json
        if args.out:
            tmp = args.out + ".tmp"
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                counts = writer(store, args.lot, f)
            os.replace(tmp, args.out)
        else:
            counts = writer(store, args.lot, sys.stdout)
            if args.format == "json":
                sys.stdout.write("\n")
            sys.stdout.flush()
        summary = ", ".join(f"{lv}: " + " ".join(f"{st}={n}" for st, n in sorted(c.items())) for lv, c in counts.items())
        print(f"recall {args.lot}: {summary or 'nothing packed or printed'}", file=sys.stderr)
        return 0

    return run_with_store(args, body, readonly=not args.mark)
