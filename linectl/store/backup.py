"""The store file's own checks and copies for `linectl backup` / `linectl restore` (the command is
linectl/commands/backup.py): what SQLite vouches for (integrity_check, the online backup API), what linectl
adds (schema version, line identity, the audit hash chain), all SQL of it kept with the store.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass, field
from typing import Any

SIDE_FILES = ("-wal", "-shm")


class CheckFailed(Exception):
    """A store file that is not a sound linectl store: integrity, audit chain."""


class Refused(Exception):
    """A file linectl must not use as a store: missing, not SQLite, not linectl's, newer schema."""


@dataclass
class StoreSummary:
    """What a store file holds, as far as backup and restore need to know."""

    path: str
    schema_version: int
    last_seq: int
    events: int
    audit_records: int
    audit_head: str
    batches: int
    open_batches: list[str] = field(default_factory=list)
    identity: dict[str, str] | None = None
    bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "schema_version": self.schema_version,
            "last_seq": self.last_seq,
            "events": self.events,
            "audit_records": self.audit_records,
            "batches": self.batches,
            "open_batches": self.open_batches,
            "identity": self.identity,
            "bytes": self.bytes,
        }


def connect(path: str, *, live: bool) -> sqlite3.Connection:
    """A connection that never writes the file.

    live: a store another process may be writing (the daemon): an ordinary
    connection with query_only, so it takes part in WAL locking and its reads
    are snapshots. Otherwise a file nobody else writes (a backup): SQLite's
    read-only mode, immutable so no -wal/-shm is created beside it.
    """
    from urllib.parse import quote

    if live:
        conn = sqlite3.connect(path, timeout=10.0, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA query_only=ON")
        return conn
    return sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro&immutable=1", uri=True, isolation_level=None)


def check_header(path: str) -> None:
    from linectl.store.schema import SQLITE_HEADER

    try:
        if not os.path.isfile(path):
            raise Refused(f"{path}: no such file" if not os.path.exists(path) else f"{path}: not a regular file")
        with open(path, "rb") as fh:
            header = fh.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise Refused(f"{path}: cannot read: {exc.strerror or exc}") from None
    if header != SQLITE_HEADER:
        raise Refused(f"{path}: not a linectl store (no SQLite header)")


def inspect(conn: sqlite3.Connection, path: str, *, integrity: bool, audit: bool = True) -> StoreSummary:
    """Read and check one snapshot of a store: linectl's meta, schema not newer than ours, audit chain, counts.

    Refused for files that are not linectl stores or are too new; CheckFailed for a
    linectl store that fails integrity_check or whose audit chain does not verify.
    """
    from linectl.store.audit import GENESIS, META_COUNT, META_HEAD, verify_rows
    from linectl.store.schema import APP_ID, SCHEMA_VERSION

    try:
        conn.execute("BEGIN")  # one snapshot for everything below
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "meta" not in tables:
                raise Refused(f"{path}: not a linectl store (no meta table)")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("app_id") != APP_ID:
                raise Refused(f"{path}: not a linectl store (meta app_id is {meta.get('app_id')!r})")
            try:
                version = int(meta["schema_version"])
            except (KeyError, ValueError):
                raise Refused(f"{path}: meta schema_version is missing or not a number") from None
            if version > SCHEMA_VERSION:
                raise Refused(
                    f"{path}: schema version {version} is newer than this linectl supports ({SCHEMA_VERSION}); "
                    "use the linectl that wrote it"
                )
            if integrity:
                rows = [r[0] for r in conn.execute("PRAGMA integrity_check(20)")]
                if rows != ["ok"]:
                    raise CheckFailed(f"{path}: integrity_check failed: {'; '.join(rows[:5])}")
            audit_count = int(meta.get(META_COUNT, 0))
            if audit:
                audit_rows = conn.execute("SELECT seq, ts, actor, origin, action, detail, prev_hash, hash FROM audit ORDER BY seq")
                check = verify_rows((tuple(r) for r in audit_rows), audit_count, meta.get(META_HEAD, GENESIS))
                if not check.ok:
                    raise CheckFailed(f"{path}: audit trail BROKEN at record {check.first_bad_seq}: {check.reason}")
            seq_row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone() if "sqlite_sequence" in tables else None
            events = int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
            states = conn.execute("SELECT lot, state FROM batches ORDER BY lot").fetchall()
        finally:
            conn.execute("ROLLBACK")
    except sqlite3.DatabaseError as exc:
        msg = str(exc)
        if "not a database" in msg:
            raise Refused(f"{path}: not a linectl store ({msg})") from None
        raise CheckFailed(f"{path}: cannot be read as a store: {msg}") from None
    ident = meta.get("line_identity")
    return StoreSummary(
        path=path,
        schema_version=version,
        last_seq=int(seq_row[0]) if seq_row else 0,
        events=events,
        audit_records=audit_count,
        audit_head=meta.get(META_HEAD, GENESIS),
        batches=len(states),
        open_batches=[f"{lot} ({state})" for lot, state in states if state != "closed"],
        identity=json.loads(ident) if ident else None,
        bytes=os.path.getsize(path),
    )


def inspect_file(path: str, *, live: bool, integrity: bool = True, audit: bool = True) -> StoreSummary:
    check_header(path)
    try:
        conn = connect(path, live=live)
    except sqlite3.Error as exc:
        raise Refused(f"{path}: cannot open: {exc}") from None
    try:
        return inspect(conn, path, integrity=integrity, audit=audit)
    finally:
        conn.close()


def audit_hash(path: str, seq: int, *, live: bool) -> str | None:
    conn = connect(path, live=live)
    try:
        row = conn.execute("SELECT hash FROM audit WHERE seq = ?", (seq,)).fetchone()
        return str(row[0]) if row else None
    finally:
        conn.close()


# --------------------------------------------------------------------------- copying


def fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_store(src_path: str, dest_tmp: str, *, live: bool) -> None:
    """SQLite online backup of src into a new file dest_tmp, as one self-contained file (journal_mode=DELETE), fsynced.

    pages=-1: the whole copy is one step inside one read transaction, so it is
    the store as of one commit even while the daemon writes (stepping in
    chunks would restart on every write of another process).
    """
    src = connect(src_path, live=live)
    try:
        dst = sqlite3.connect(dest_tmp, isolation_level=None)
        try:
            src.backup(dst, pages=-1)
            mode = dst.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
            if str(mode).lower() != "delete":
                raise CheckFailed(f"{dest_tmp}: could not switch the copy to journal_mode=DELETE (got {mode!r})")
        finally:
            dst.close()
    finally:
        src.close()
    fd = os.open(dest_tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_store_files(path: str) -> None:
    for p in (path, *(path + s for s in SIDE_FILES)):
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def take_owner(path: str, target: str) -> None:
    """Give the restored file the replaced store's owner and mode (or, for a new store, its directory's owner).

    Run as root, a restore would otherwise leave a root-owned store (and lock
    file) that the service user cannot open: the daemon would refuse to start.
    """
    ref = target if os.path.exists(target) else os.path.dirname(os.path.abspath(target))
    st = os.stat(ref)
    if os.path.isfile(ref):
        os.chmod(path, st.st_mode & 0o7777)
    if os.geteuid() == 0:
        for p in (path, target + ".lock"):
            if os.path.exists(p):
                os.chown(p, st.st_uid, st.st_gid)
