"""`linectl serials import|status`: fill the local serial pool from a file, and show the pool per GTIN.

import exit codes: 0 something was accepted and nothing was invalid (duplicates
are reported but harmless), 1 rows were refused (invalid, or nothing new was
accepted), 2 bad input (unreadable file, bad GTIN, no serials), 3 store error.
On a line with access control (-c CONFIG with access:) the import is the
command provision_pool of `--user`: the user proven and allowed it, and its
signature (--sign; access.signatures provision_pool, by default required)
verified before a serial is stored; after the import one record
`serials_import` (file, its sha256, counts) carries the signature. A refusal
exits 1 naming its code, nothing imported.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import io
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from linectl.access.client import add_sign_options, add_user_options, cli_user, signature_blocks, user_password
from linectl.store.cliutil import EXIT_BAD_INPUT, BadInput, add_db_options, run_with_store

if TYPE_CHECKING:
    from linectl.config import LineConfig
    from linectl.store import Store

CHUNK = 20_000  # serials per transaction, so an import never holds the writer long while a line runs
SHOW_PROBLEMS = 20
STATUS_COLUMNS = ("provisioned", "available", "allocated", "sent", "commissioned", "decommissioned", "voided")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serials", help="serial pool: import provisioned serials, show status")
    ssub = p.add_subparsers(dest="serials_command", metavar="ACTION", required=True)

    imp = ssub.add_parser("import", help="import serials from a CSV (with a 'serial' column) or a one-per-line list")
    imp.add_argument("file")
    imp.add_argument("--gtin", required=True)
    imp.add_argument("--source", help="where the serials came from (default: import:<file name>)")
    imp.add_argument("--actor", default=None, help="who imports, for the audit trail (default: cli:<login>)")
    imp.add_argument("--reason", default="", help="why, for the audit trail (required when the config's audit.reason_required lists serials_import)")
    add_db_options(imp)
    add_user_options(imp)
    add_sign_options(imp)
    imp.set_defaults(func=run_import)

    st = ssub.add_parser(
        "status",
        help="per GTIN: provisioned (all serials ever registered), available, allocated, sent, commissioned, decommissioned, voided",
    )
    st.add_argument("--gtin")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    add_db_options(st)
    st.set_defaults(func=run_status)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return str(os.getuid())


def read_serial_file(path: str) -> list[tuple[int, str]]:
    """(line number, serial) pairs. A header line with a `serial` column makes it CSV, else one serial per line."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise BadInput(f"{path} is not UTF-8 text: {exc}") from None
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    header = [c.strip().lower() for c in _split_header(first)]
    out: list[tuple[int, str]] = []
    if "serial" in header:
        dialect = _dialect(first)
        reader = csv.reader(io.StringIO(text, newline=""), dialect)
        col = -1
        for row in reader:
            if col < 0:
                if not any(c.strip() for c in row):
                    continue
                col = [c.strip().lower() for c in row].index("serial")
                continue
            if not any(c.strip() for c in row):
                continue
            out.append((reader.line_num, row[col].strip() if col < len(row) else ""))
    else:
        for i, ln in enumerate(lines, 1):
            s = ln.strip()
            if s:
                out.append((i, s))
    if not out:
        raise BadInput(f"{path}: no serials found")
    return out


def _dialect(line: str) -> Any:
    try:
        return csv.Sniffer().sniff(line, delimiters=",;\t|")
    except csv.Error:
        return csv.excel


def _split_header(line: str) -> list[str]:
    if not line:
        return []
    return next(csv.reader([line], _dialect(line)), [])


def run_import(args: argparse.Namespace) -> int:
    try:
        rows = read_serial_file(args.file)
    except BadInput as exc:
        print(f"linectl: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from linectl.store.model import StoreError
    from linectl.store.store import _gtin

    try:
        gtin = _gtin(args.gtin)
    except StoreError as exc:
        print(f"linectl: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    source = args.source or f"import:{os.path.basename(args.file)}"
    user = cli_user(args)
    actor = user or args.actor or f"cli:{_user()}"

    async def body(store: Store, cfg: LineConfig | None) -> int:
        from linectl.engine.audit_changes import missing_reason, reason_required

        refusal = missing_reason(reason_required(cfg), "serials_import", args.reason)
        if refusal is not None:
            raise BadInput(f"{refusal} (--reason)")
        if cfg is not None:
            try:
                cfg.product(gtin)
            except KeyError:
                raise BadInput(f"GTIN {gtin} is not configured in {args.config}") from None
        signed: Any = None
        checked = cfg is not None and cfg.access.enabled
        if checked:
            assert cfg is not None
            from linectl.access.gate import Access
            from linectl.access.signing import offline_signature
            from linectl.control import CommandRejected, ProvisionPool

            access = Access(cfg.access, store)
            try:
                if args.actor and args.actor != user:
                    raise CommandRejected(f"--actor {args.actor!r} is not --user {user!r}: with access control the actor is the user",
                                          "forged_actor")
                password = user_password(args, user) if user else None
                # the import is provision_pool for the permission and signature rules (the serials are checked below)
                probe = ProvisionPool.model_construct(name="provision_pool", gtin=gtin, actor=user or "", reason=args.reason)
                signed = await offline_signature(access, probe, user, password, signature_blocks(args, user, password), origin="cli:offline")
            except (CommandRejected, ValueError) as exc:
                code = exc.code if isinstance(exc, CommandRejected) else "invalid"
                print(f"linectl serials import: refused ({code}): {exc}", file=sys.stderr)
                return 1
            finally:
                await access.refusals.flush()
        # Repeats across the whole file are found here, so a repeat in a later chunk is named as such.
        first_line: dict[str, int] = {}
        unique: list[tuple[int, str]] = []
        problems: list[str] = []
        repeats = 0
        for line, s in rows:
            j = first_line.get(s)
            if j is None:
                first_line[s] = line
                unique.append((line, s))
            else:
                repeats += 1
                if len(problems) < SHOW_PROBLEMS:
                    problems.append(f"line {line}: {s!r}: duplicate: repeated in the file (first on line {j})")
        accepted = duplicates = invalid = 0
        for k in range(0, len(unique), CHUNK):
            chunk = unique[k : k + CHUNK]
            res = await store.provision(gtin, [s for _, s in chunk], source, actor=actor, reason=args.reason or None)
            accepted += res.accepted
            duplicates += res.duplicates
            invalid += res.invalid
            for idx, s, why in res.rejected:
                if len(problems) < SHOW_PROBLEMS:
                    problems.append(f"line {chunk[idx][0]}: {s!r}: {why}")
        duplicates += repeats
        if checked:
            import hashlib

            with open(args.file, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            await store.audit(actor, "cli:offline", "serials_import", {
                "gtin": gtin, "source": source, "file": os.path.basename(args.file), "file_sha256": digest, "read": len(rows),
                "accepted": accepted, "duplicates": duplicates, "invalid": invalid, "reason": args.reason or None,
                **({} if signed is None else {"signature": signed.public()})}, signature=None if signed is None else signed.spec())
        print(
            f"{args.file}: GTIN {gtin}, source {source}: {len(rows)} read, accepted {accepted}, "
            f"duplicates {duplicates}, invalid {invalid}"
        )
        for p in sorted(problems, key=lambda t: int(t.split(":", 1)[0].split()[1]))[:SHOW_PROBLEMS]:
            print(f"  {p}")
        more = duplicates + invalid - min(len(problems), SHOW_PROBLEMS)
        if more > 0:
            print(f"  … and {more} more")
        return 0 if accepted > 0 and invalid == 0 else 1

    return run_with_store(args, body, readonly=False, actor=actor)


def run_status(args: argparse.Namespace) -> int:
    async def body(store: Store, cfg: LineConfig | None) -> int:
        counts = store.serial_counts(args.gtin)
        if cfg is not None and not args.gtin:
            for p in cfg.products:
                counts.setdefault(p.gtin, store.serial_counts(p.gtin)[p.gtin])
        table: dict[str, dict[str, int]] = {}
        for gtin in sorted(counts):
            c = counts[gtin]
            table[gtin] = {"provisioned": sum(c.values()), "available": c["provisioned"], **{k: c[k] for k in STATUS_COLUMNS[2:]}}
            # commissioned units a PLC restart left of unknown fate (still commissioned until reconciled)
            table[gtin]["fate_unknown"] = sum(1 for f in store.unit_fates(open_only=True) if f.gtin == gtin)
        if args.json:
            print(json.dumps(table, indent=2))
            return 0
        if not table:
            print("no serials in the store")
            return 0
        cols = STATUS_COLUMNS + ("fate_unknown",)
        widths = [14] + [max(len(col), 9) for col in cols]
        print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(("GTIN",) + cols, widths))))
        for gtin, row in table.items():
            cells = [gtin.ljust(widths[0])] + [str(row[c]).rjust(w) for c, w in zip(cols, widths[1:])]
            print("  ".join(cells))
        print("provisioned = every serial ever registered for the GTIN; available = provisioned and not yet allocated")
        return 0

    return run_with_store(args, body, readonly=True)
