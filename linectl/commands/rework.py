"""`linectl rework …`: rework operations on the store, with the operator's name in the audit trail.

    linectl rework remove CODE --db PATH --actor NAME
    linectl rework add SSCC CODE --db PATH --actor NAME
    linectl rework replace OLD NEW [--decommission-old] --db PATH --actor NAME
    linectl rework dissolve SSCC [--keep-sscc] [--reason TEXT] --db PATH --actor NAME
    linectl rework decommission CODE [--detail TEXT] --db PATH --actor NAME
    linectl rework reprint SSCC [--printer DEVICE -c CONFIG] --actor NAME
    linectl rework check --db PATH

Works directly on the store (the daemon need not run; SQLite serialises
writers if it does, but a running station is not told). Prints the result as
JSON. Exit 0 done, 1 refused (the reason says why; nothing changed) or
`check` found violations, 2 bad input, 3 store error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from linectl.store.cliutil import EXIT_BAD_INPUT, BadInput, add_db_options, run_with_store

if TYPE_CHECKING:
    from linectl.config import LineConfig
    from linectl.store import Store


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("rework", help="rework: remove/add/replace units, dissolve containers, decommission, reprint labels")
    rsub = p.add_subparsers(dest="rework_command", metavar="OPERATION", required=True)

    def op(name: str, help_: str, actor: bool = True) -> argparse.ArgumentParser:
        q = rsub.add_parser(name, help=help_)
        add_db_options(q)
        if actor:
            q.add_argument("--actor", required=True, help="operator id, recorded in the audit trail")
        q.set_defaults(func=run)
        return q

    op("remove", "take a unit out of its case").add_argument("code")
    q = op("add", "put a free commissioned unit into a case")
    q.add_argument("sscc")
    q.add_argument("code")
    q = op("replace", "swap a packed unit for a free one")
    q.add_argument("old")
    q.add_argument("new")
    q.add_argument("--decommission-old", action="store_true", help="also destroy the unit taken out (damaged)")
    q = op("dissolve", "empty a case or pallet (children become free)")
    q.add_argument("sscc")
    q.add_argument("--keep-sscc", action="store_true", help="keep the container commissioned (default: void its SSCC)")
    q.add_argument("--reason", default="dissolved")
    q = op("decommission", "destroy a damaged unit (taken out of its case first)")
    q.add_argument("code")
    q.add_argument("--detail", default="damaged")
    q = op("reprint", "print a case/pallet label again (same SSCC)")
    q.add_argument("sscc")
    q.add_argument("--printer", metavar="DEVICE", help="printer device from the line config (-c); without it only the reprint is recorded")
    q.add_argument("--timeout", type=float, default=10.0)
    op("check", "check the aggregation invariants", actor=False)


async def _reprint(store: Store, cfg: LineConfig | None, args: argparse.Namespace, actor: str) -> dict[str, Any]:
    from linectl.drivers.base import Printer
    from linectl.drivers.registry import driver_class
    from linectl.engine.rework import reprint_label

    if not args.printer:
        return await reprint_label(store, args.sscc, actor)
    if cfg is None or args.printer not in cfg.devices:
        raise BadInput(f"--printer {args.printer}: give the line config with -c and a printer device of it")
    dev = cfg.devices[args.printer]
    printer = driver_class(dev.driver)(args.printer, dev)
    if not isinstance(printer, Printer):
        raise BadInput(f"--printer {args.printer}: device {args.printer} is a {dev.driver}, not a printer")
    await printer.start()
    try:
        if not await printer.wait_connected(args.timeout):
            raise BadInput(f"printer {args.printer} not reachable: {printer.health.reason}")
        return await reprint_label(store, args.sscc, actor, printer=printer, timeout_s=args.timeout)
    finally:
        await printer.stop()


def run(args: argparse.Namespace) -> int:
    from linectl.engine import rework as R

    cmd = args.rework_command
    given: str | None = getattr(args, "actor", None)  # argparse: only the operations that record an actor have --actor
    actor = ""
    if given is not None:
        actor = given.strip()
        if not actor:
            print("linectl: --actor must name the operator", file=sys.stderr)
            return EXIT_BAD_INPUT
        actor = actor if ":" in actor else f"cli:{actor}"

    async def body(store: Store, cfg: LineConfig | None) -> int:
        if cfg is not None:
            await store.upsert_products(cfg.products)
        try:
            if cmd == "check":
                problems = R.check_hierarchy(store)
                print(json.dumps({"ok": not problems, "problems": problems}, indent=2))
                return 0 if not problems else 1
            if cmd == "remove":
                res = await R.remove_unit(store, args.code, actor)
            elif cmd == "add":
                res = await R.add_unit(store, args.sscc, args.code, actor)
            elif cmd == "replace":
                res = await R.replace_unit(store, args.old, args.new, actor, decommission_old=args.decommission_old)
            elif cmd == "dissolve":
                res = await R.dissolve(store, args.sscc, actor, void_sscc=not args.keep_sscc, reason=args.reason)
            elif cmd == "decommission":
                res = await R.decommission_unit(store, args.code, actor, detail=args.detail)
            elif cmd == "reprint":
                res = await _reprint(store, cfg, args, actor)
            else:  # pragma: no cover - argparse restricts the choices
                raise BadInput(f"unknown rework operation {cmd}")
        except R.ReworkError as exc:
            print(json.dumps({"ok": False, "op": cmd, "code": exc.code, "reason": exc.message}, indent=2))
            print(f"linectl: rework {cmd} refused: {exc.message}", file=sys.stderr)
            return 1
        print(json.dumps({"ok": True, **res}, indent=2))
        return 0

    return run_with_store(args, body, readonly=(cmd == "check"))
