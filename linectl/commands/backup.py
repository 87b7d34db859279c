"""`linectl backup` and `linectl restore`: a consistent copy of the store, and putting one back with checks.

The store is the system of record, so a backup must be a copy SQLite itself
vouches for, taken while the line runs:

* `backup` reads the live store through SQLite's online backup API inside one
  read transaction (WAL mode: the daemon's writer carries on, and the copy is
  the store as of one commit). It is a reader like `linectl report`: it never
  takes the store's owner lock. The copy is written beside FILE under a
  temporary name, switched to a single-file journal mode, checked
  (integrity_check, linectl schema, audit chain), fsynced and only then renamed
  to FILE: a FILE that exists is a whole, verified backup.
* `restore` takes the target store's owner lock (so it refuses while a daemon
  owns it, and no daemon can start mid-restore), checks the backup the same
  way, compares it with the store it would replace (line identity, audit chain,
  how many records the replaced store has beyond the backup), keeps the
  replaced store aside as PATH.replaced-<UTC time> and puts a verified copy in
  its place. Nothing is deleted.

Exit codes: 0 done; 1 a check failed (the backup or the copy is not a sound
linectl store, or restore would lose records or replace another line's store
without --force); 2 bad arguments (FILE exists without --force, missing
directory); 3 the store refused (missing, not a linectl store, newer schema,
held by a daemon).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from datetime import UTC, datetime
from typing import Any

from linectl.store.backup import (
    SIDE_FILES,
    CheckFailed,
    Refused,
    StoreSummary,
    audit_hash,
    copy_store,
    fsync_dir,
    inspect_file,
    remove_store_files,
    take_owner,
)
from linectl.store.cliutil import (
    EXIT_BAD_INPUT,
    EXIT_CHECK_FAILED,
    EXIT_OK,
    EXIT_STORE,
    BadInput,
    add_db_options,
    db_path,
    load_line_config,
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    b = sub.add_parser("backup", help="consistent, verified copy of a store (also while the daemon runs)")
    add_db_options(b)
    b.add_argument("--out", required=True, metavar="FILE", help="backup file to write (refused if it exists, unless --force)")
    b.add_argument("--force", action="store_true", help="replace an existing FILE")
    b.add_argument("--json", action="store_true", help="print what was copied as one JSON object")
    b.set_defaults(func=run_backup)

    r = sub.add_parser("restore", help="put a backup back in place of a store (refused while a daemon owns it)")
    r.add_argument("--from", dest="source", required=True, metavar="FILE", help="backup file made by `linectl backup`")
    add_db_options(r)
    r.add_argument(
        "--force",
        action="store_true",
        help="restore even when the replaced store has records the backup lacks, belongs to another line, or cannot be read",
    )
    r.add_argument("--json", action="store_true", help="print what was restored as one JSON object")
    r.set_defaults(func=run_restore)


# --------------------------------------------------------------------------- checking a store file


def _print(summary: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(summary))
    else:
        for line in lines:
            print(line)


def _describe(s: StoreSummary) -> str:
    ident = s.identity
    line = f"line {ident['enterprise']}/{ident['site']}/{ident['area']}/{ident['line']}" if ident else "no line identity recorded"
    return (
        f"schema version {s.schema_version}, last seq {s.last_seq} ({s.events} events kept), {s.audit_records} audit records "
        f"(chain verified), {s.batches} batch(es){' (open: ' + ', '.join(s.open_batches) + ')' if s.open_batches else ''}, "
        f"{line}, {s.bytes} bytes"
    )


# --------------------------------------------------------------------------- linectl backup


def run_backup(args: argparse.Namespace) -> int:
    try:
        src = db_path(args)
    except BadInput as exc:
        print(f"linectl backup: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = str(args.out)
    if os.path.isdir(out):
        print(f"linectl backup: {out} is a directory; give the backup file name", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        print(f"linectl backup: directory {os.path.dirname(os.path.abspath(out))} does not exist", file=sys.stderr)
        return EXIT_BAD_INPUT
    if os.path.abspath(out) == os.path.abspath(src):
        print("linectl backup: --out is the store itself", file=sys.stderr)
        return EXIT_BAD_INPUT
    if os.path.lexists(out) and not args.force:
        print(f"linectl backup: {out} exists; give another --out or --force to replace it", file=sys.stderr)
        return EXIT_BAD_INPUT
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        # the source must be a linectl store of a schema we understand before anything is copied
        inspect_file(src, live=True, integrity=False, audit=False)
        remove_store_files(tmp)
        copy_store(src, tmp, live=True)
        summary = inspect_file(tmp, live=False, integrity=True)
        os.replace(tmp, out)
        fsync_dir(out)
    except Refused as exc:
        remove_store_files(tmp)
        print(f"linectl backup: store refused: {exc}", file=sys.stderr)
        return EXIT_STORE
    except CheckFailed as exc:
        remove_store_files(tmp)
        print(
            f"linectl backup: the copy failed its checks, nothing written to {out}: {exc} (the copy is the store as of one "
            f"commit: check the store itself with `linectl audit verify --db {src}`)",
            file=sys.stderr,
        )
        return EXIT_CHECK_FAILED
    except (OSError, sqlite3.Error) as exc:
        remove_store_files(tmp)
        where = f"{exc.filename}: " if isinstance(exc, OSError) and exc.filename else ""
        msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"linectl backup: {where}{msg}", file=sys.stderr)
        return EXIT_STORE if isinstance(exc, sqlite3.Error) else EXIT_BAD_INPUT
    summary.path = out
    result = {"backup": out, "source": src, **summary.as_dict()}
    _print(result, args.json, [f"{out}: backup of {src}: {_describe(summary)}"])
    return EXIT_OK


# --------------------------------------------------------------------------- linectl restore


def _compare(backup: StoreSummary, bpath: str, target: StoreSummary, tpath: str) -> list[str]:
    """Why replacing `target` by `backup` needs --force: another line's store, a diverged history, records lost."""
    why: list[str] = []
    if backup.identity and target.identity and backup.identity != target.identity:
        why.append(f"{tpath} belongs to another line ({target.identity}) than the backup ({backup.identity})")
    common = min(backup.audit_records, target.audit_records)
    if common and audit_hash(bpath, common, live=False) != audit_hash(tpath, common, live=True):
        why.append(f"{tpath} and the backup have different histories (audit record {common} differs): not a backup of this store")
    if target.last_seq > backup.last_seq:
        why.append(
            f"{tpath} has {target.last_seq - backup.last_seq} event record(s) the backup lacks (seq {backup.last_seq + 1}.."
            f"{target.last_seq}) and {max(0, target.audit_records - backup.audit_records)} audit record(s): restoring loses them"
        )
    elif target.audit_records > backup.audit_records:
        why.append(
            f"{tpath} has {target.audit_records - backup.audit_records} audit record(s) the backup lacks "
            f"(records {backup.audit_records + 1}..{target.audit_records}): restoring loses them"
        )
    return why


def run_restore(args: argparse.Namespace) -> int:
    from linectl.store.lock import StoreLock
    from linectl.store.model import StoreError
    from linectl.store.store import line_identity

    try:
        cfg = load_line_config(args)
        target = db_path(args, cfg)
    except BadInput as exc:
        print(f"linectl restore: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    source = str(args.source)
    if os.path.abspath(source) == os.path.abspath(target):
        print("linectl restore: --from is the store itself", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not os.path.isdir(os.path.dirname(os.path.abspath(target))):
        print(f"linectl restore: directory {os.path.dirname(os.path.abspath(target))} does not exist", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        backup = inspect_file(source, live=True, integrity=True)
    except Refused as exc:
        print(f"linectl restore: backup refused: {exc}", file=sys.stderr)
        return EXIT_STORE
    except CheckFailed as exc:
        print(f"linectl restore: backup refused: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    try:
        lock = StoreLock.acquire(target, "linectl restore")
    except StoreError as exc:
        print(f"linectl restore: store refused: {exc}", file=sys.stderr)
        return EXIT_STORE
    try:
        return _restore_locked(args, source, backup, target, line_identity(cfg) if cfg is not None else None)
    finally:
        lock.release()


def _restore_locked(args: argparse.Namespace, source: str, backup: StoreSummary, target: str, line: dict[str, str] | None) -> int:
    """Under the target's owner lock: compare, copy, verify, swap (old store kept aside)."""
    exists = os.path.lexists(target)
    problems: list[str] = []
    if line is not None and backup.identity is not None and backup.identity != line:
        # the daemon would refuse the restored store at its next start (another line's store)
        problems.append(f"the backup is another line's store ({backup.identity}) than the config's ({line})")
    replaced: StoreSummary | None = None
    if exists:
        try:
            replaced = inspect_file(target, live=True, integrity=False)
        except (Refused, CheckFailed) as exc:
            problems.append(f"the store to replace cannot be checked ({exc}), so what it holds beyond the backup is unknown")
        else:
            problems.extend(_compare(backup, source, replaced, target))
    else:
        stray = [target + s for s in SIDE_FILES if os.path.lexists(target + s)]
        if stray:
            print(f"linectl restore: {', '.join(stray)} exist(s) without their store; move them away first", file=sys.stderr)
            return EXIT_STORE
    if problems and not args.force:
        for p in problems:
            print(f"linectl restore: refused: {p}", file=sys.stderr)
        print("linectl restore: nothing changed; give --force to restore anyway (the replaced store is kept aside)", file=sys.stderr)
        return EXIT_CHECK_FAILED
    tmp = f"{target}.restore-tmp-{os.getpid()}"
    aside: str | None = None
    try:
        remove_store_files(tmp)
        copy_store(source, tmp, live=True)
        restored = inspect_file(tmp, live=False, integrity=True)
        take_owner(tmp, target)
        if restored.audit_head != backup.audit_head or restored.last_seq != backup.last_seq:
            raise CheckFailed(f"{tmp}: the copy does not match the backup it was made from")
        if exists:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            aside = f"{target}.replaced-{stamp}"
            n = 1
            while any(os.path.lexists(aside + s) for s in ("", *SIDE_FILES)):
                n += 1
                aside = f"{target}.replaced-{stamp}.{n}"
            # the WAL first: a stale -wal beside the new file would be replayed into it
            for s in SIDE_FILES:
                if os.path.lexists(target + s):
                    os.rename(target + s, aside + s)
            os.rename(target, aside)
        os.replace(tmp, target)
        fsync_dir(target)
    except CheckFailed as exc:
        remove_store_files(tmp)
        print(f"linectl restore: the copy failed its checks, {target} unchanged: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except (OSError, sqlite3.Error) as exc:
        remove_store_files(tmp)
        msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = f"{exc.filename}: " if isinstance(exc, OSError) and exc.filename else ""
        kept = f" (the replaced store was moved to {aside})" if aside and not os.path.lexists(target) else ""
        print(f"linectl restore: {where}{msg}{kept}", file=sys.stderr)
        return EXIT_STORE
    restored.path = target
    result = {
        "restored": target,
        "from": source,
        **restored.as_dict(),
        "replaced": aside,
        "replaced_last_seq": replaced.last_seq if replaced else None,
        "forced": bool(problems),
        "problems": problems,
    }
    lines = [f"{target}: restored from {source}: {_describe(restored)}"]
    if aside:
        lines.append(f"  the replaced store is kept as {aside}")
    for p in problems:
        lines.append(f"  forced past: {p}")
    if restored.open_batches:
        lines.append(f"  open batch(es) {', '.join(restored.open_batches)}: the daemon resumes them as the backup left them")
    from linectl.store.schema import SCHEMA_VERSION

    if restored.schema_version < SCHEMA_VERSION:
        lines.append(f"  schema version {restored.schema_version}: migrated to {SCHEMA_VERSION} at the next read-write open (`linectl run`)")
    _print(result, args.json, lines)
    return EXIT_OK
