"""Schema (SQLAlchemy Core), opening checks and step-by-step migrations.

Opening never recreates or "repairs" a file: a regulated record that is
corrupt, foreign or from a newer linectl is refused with a message naming the
file and the problem, and the operator decides. Only a missing or completely
empty file is initialised.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import structlog
from sqlalchemy import (
    CheckConstraint,
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy import (
    exc as sa_exc,
)
from sqlalchemy.engine import URL
from sqlalchemy.pool import QueuePool

from linectl.store.audit import AuditHead
from linectl.store.model import StoreError

log = structlog.get_logger("linectl.store")

APP_ID = "linectl"
SCHEMA_VERSION = 10
SQLITE_HEADER = b"SQLite format 3\x00"

metadata = MetaData()

meta = Table(
    "meta",
    metadata,
    Column("key", Text, primary_key=True),
    Column("value", Text, nullable=False),
)

products = Table(
    "products",
    metadata,
    Column("gtin", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("scheme", Text, nullable=False),
    Column("config", Text, nullable=False),  # the Product as JSON, to show what was configured when
    Column("updated_at", Text, nullable=False),
)

batches = Table(
    "batches",
    metadata,
    Column("lot", Text, primary_key=True),
    Column("gtin", Text, nullable=False),
    Column("expiry", Text, nullable=False),
    Column("planned_qty", Integer, nullable=False),
    Column("state", Text, nullable=False),
    Column("created_by", Text, nullable=False),
    Column("created_at", Text, nullable=False),
    Column("started_at", Text),
    Column("stopped_at", Text),
    Column("closed_at", Text),
    Column("updated_at", Text, nullable=False),
    Column("challenge", Text, nullable=False, server_default="[]"),  # JSON list of challenge results
    # JSON list of the challenge kinds this batch must pass before production, fixed at create ([] = waived by
    # the operator at create); NULL for batches created before schema v3: the line's configured list applies
    Column("challenge_required", Text),
)

# id is an explicit INTEGER PRIMARY KEY (a stable rowid alias, unlike an implicit rowid VACUUM may renumber)
# so the outbox can point at a serial with a small, allocation-ordered key; (gtin, serial) is the real key.
serials = Table(
    "serials",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("gtin", Text, nullable=False),
    Column("serial", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("lot", Text),
    Column("source", Text, nullable=False),
    Column("updated_at", Text, nullable=False),
    Column("sent_at", Text),  # first time sent to a printer; never cleared: such a serial can never be returned
    UniqueConstraint("gtin", "serial", name="uq_serials_gtin_serial"),
    # no CHECK on state: only the writer writes it, and a CHECK costs ~2 us on every commissioning
)
# Partial indexes: each is touched only by the transitions into/out of its state, so the hot
# sent -> commissioned step maintains one small index instead of two full (gtin|lot, state) ones.
Index("ix_serials_pool", serials.c.gtin, serials.c.id, sqlite_where=serials.c.state == "provisioned")
Index("ix_serials_sent", serials.c.id, sqlite_where=serials.c.state == "sent")
Index("ix_serials_allocated", serials.c.lot, serials.c.id, sqlite_where=serials.c.state == "allocated")
Index("ix_serials_lot", serials.c.lot)

# Counts per (gtin, lot, state), kept by the writer in the same transaction as the state changes,
# so status, reconciliation and "available" are O(1) instead of a scan of millions of serials.
serial_tally = Table(
    "serial_tally",
    metadata,
    Column("gtin", Text, nullable=False),
    Column("lot", Text, nullable=False),  # '' for serials without a lot (the pool)
    Column("state", Text, nullable=False),
    Column("n", Integer, nullable=False),
    PrimaryKeyConstraint("gtin", "lot", "state"),
    sqlite_with_rowid=False,
)

counters = Table(
    "counters",
    metadata,
    Column("name", Text, primary_key=True),
    Column("value", Integer, nullable=False),
    Column("updated_at", Text, nullable=False),
)

outbox = Table(
    "outbox",
    metadata,
    Column("seq", Integer, primary_key=True),
    Column("event_id", Text, nullable=False, unique=True),
    Column("kind", Text, nullable=False),
    Column("lot", Text),
    Column("gtin", Text),
    Column("serial", Text),
    Column("serial_id", Integer),  # serials.id for single-unit events (history lookups)
    Column("created_at", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("forwarded_at", Text),
    # The EPCIS 2.0 rendering fixed when the event was stored (linectl.epcis.EpcisMapper.render): its encoded
    # events joined by newlines, '' = no EPCIS event, '!reason' = not expressible. NULL = not rendered (a row of
    # a schema-2 store, or a store used without a line config). The forwarder publishes exactly these bytes and
    # `export epcis` reproduces them, whatever the config says later.
    Column("epcis", Text),
    sqlite_autoincrement=True,  # seqs are never reused, even after a purge
)
Index("ix_outbox_unforwarded", outbox.c.seq, sqlite_where=outbox.c.forwarded_at.is_(None))
Index("ix_outbox_serial_id", outbox.c.serial_id, sqlite_where=outbox.c.serial_id.is_not(None))
Index("ix_outbox_lot", outbox.c.lot, outbox.c.seq)

# One delivery cursor per upstream sink (linectl/upstream/): every outbox row with seq <= `seq` has reached that
# sink. `pending` is the last seq of a delivery the sink has started but not confirmed (the file sink writes it
# before the file, so a restart rewrites the same file, never one with other bounds). outbox.forwarded_at is
# derived from these: it is set on a row once every enabled sink's cursor has passed it (v8, _migrate_sink_cursors).
sink_cursors = Table(
    "sink_cursors",
    metadata,
    Column("sink", Text, primary_key=True),
    Column("seq", Integer, nullable=False),
    Column("pending", Integer),
    Column("updated_at", Text, nullable=False),
)

# Which units/containers a multi-object event (void, return, pack, unpack, container events) touches.
event_refs = Table(
    "event_refs",
    metadata,
    Column("seq", Integer, nullable=False),
    Column("serial_id", Integer),
    Column("sscc", Text),
)
Index("ix_event_refs_seq", event_refs.c.seq)
Index("ix_event_refs_serial_id", event_refs.c.serial_id, sqlite_where=event_refs.c.serial_id.is_not(None))
Index("ix_event_refs_sscc", event_refs.c.sscc, sqlite_where=event_refs.c.sscc.is_not(None))

aggregation = Table(
    "aggregation",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("parent", Text, nullable=False),  # SSCC
    Column("child_kind", Text, nullable=False),  # 'unit' | 'container'
    Column("child_key", Text, nullable=False),  # '01<gtin>21<serial>' or the SSCC
    Column("child_gtin", Text),
    Column("child_serial", Text),
    Column("lot", Text),
    Column("added_seq", Integer, nullable=False),
    Column("removed_seq", Integer),
    CheckConstraint("child_kind IN ('unit','container')", name="ck_aggregation_kind"),
)
Index(
    "ux_aggregation_active_child",
    aggregation.c.child_kind,
    aggregation.c.child_key,
    unique=True,
    sqlite_where=aggregation.c.removed_seq.is_(None),
)
Index("ix_aggregation_child", aggregation.c.child_kind, aggregation.c.child_key)
Index("ix_aggregation_parent", aggregation.c.parent)

containers = Table(
    "containers",
    metadata,
    Column("sscc", Text, primary_key=True),
    Column("level", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("lot", Text),
    Column("gtin", Text),
    Column("updated_at", Text, nullable=False),
    CheckConstraint("state IN ('commissioned','decommissioned')", name="ck_containers_state"),
)

audit = Table(
    "audit",
    metadata,
    Column("seq", Integer, primary_key=True),
    Column("ts", Text, nullable=False),
    Column("actor", Text, nullable=False),
    Column("origin", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("detail", Text, nullable=False),
    Column("prev_hash", Text, nullable=False),
    Column("hash", Text, nullable=False),
)

# Commands already executed, by client command_id, with the reply they got: a command retried after a daemon
# restart gets this reply again instead of running twice. Written in the transaction of the command's audit
# record; purged with the outbox retention (store.retention_days).
command_ids = Table(
    "command_ids",
    metadata,
    Column("command_id", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("origin", Text, nullable=False),
    Column("reply", Text, nullable=False),
    Column("ts", Text, nullable=False),
    Index("ix_command_ids_ts", "ts"),
)

# --- PLC epochs, units of unknown fate, batch PLC counters (migration _migrate_plc_epochs) ---
# The last state seen of each PLC: which boot epoch it is in and how far its counters went, so a
# daemon restart can tell a PLC that restarted meanwhile (ring evidence of another epoch) from one that did not.
plc_epochs = Table(
    "plc_epochs",
    metadata,
    Column("plc", Text, primary_key=True),
    Column("epoch", Integer, nullable=False),  # linectl's count of epochs seen on this PLC (1 = first)
    Column("epoch_tag", Integer),  # the PLC's own boot counter (tag plc_epoch) when it offers one
    Column("trigger_count", Integer),  # last trigger_count seen in this epoch
    Column("gated", Integer),  # units the gate had decided in this epoch (pass + reject counters)
    # of those, units of the previous epoch that were still on the belt at a counter reset (v7, _migrate_plc_carried)
    Column("carried", Integer),
    # reject-ring slots whose value is a unit of an earlier epoch (JSON {"slot": seq}; v7): never this epoch's unit
    Column("foreign_ring", Text),
    Column("updated_at", Text, nullable=False),
)

# A rejected unit that carried a copy of another serial's code (a printer duplicate): the reject bin holds a pack
# with that code although that serial's own unit may have passed. Kept apart from the outbox (retention purges it)
# because reconciling a unit of unknown fate by its code depends on it for as long as the batch lives (v7).
unit_copies = Table(
    "unit_copies",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("gtin", Text, nullable=False),  # the serial whose code was on the rejected unit
    Column("serial", Text, nullable=False),
    Column("carrier_gtin", Text, nullable=False),  # the unit's own serial (decommissioned)
    Column("carrier_serial", Text, nullable=False),
    Column("lot", Text),
    Column("station", Text),
    Column("unit_seq", Integer),
    Column("reason", Text, nullable=False),
    Column("event_seq", Integer, nullable=False),
    Column("created_at", Text, nullable=False),
)
Index("ix_unit_copies_serial", unit_copies.c.gtin, unit_copies.c.serial)

# A unit whose fate at the reject gate is not proven (a PLC restart or power cut lost the evidence):
# open until an operator reconciles it (found in the bin -> decommissioned, passed -> stays commissioned).
unit_fates = Table(
    "unit_fates",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("gtin", Text, nullable=False),
    Column("serial", Text, nullable=False),
    Column("lot", Text),
    Column("station", Text),
    Column("plc", Text),
    Column("epoch", Integer),  # the PLC epoch the unit belonged to
    Column("seq", Integer),
    Column("state", Text, nullable=False),  # 'fate_unknown' | 'resolved'
    Column("cause", Text, nullable=False),
    Column("outcome", Text),  # 'in_bin' | 'passed' once resolved
    Column("resolved_by", Text),
    Column("created_at", Text, nullable=False),
    Column("resolved_at", Text),
    UniqueConstraint("gtin", "serial", name="uq_unit_fates_gtin_serial"),
    CheckConstraint("state IN ('fate_unknown','resolved')", name="ck_unit_fates_state"),
)
Index("ix_unit_fates_lot", unit_fates.c.lot, unit_fates.c.state)

# Snapshots of the PLC's physical counters per batch (start, stop, and the end of an epoch that a
# restart cut short), so packs can be reconciled against serials even across a cold restart.
plc_counters = Table(
    "plc_counters",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("lot", Text, nullable=False),
    Column("plc", Text, nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("point", Text, nullable=False),  # 'start' | 'stop' | 'epoch_end' | 'epoch_start'
    Column("trigger_count", Integer),
    Column("pass_total", Integer),
    Column("reject_total", Integer),  # confirmed in the bin
    Column("gate_reject_total", Integer),  # pushed out by the gate, confirmed or not
    Column("ts", Text, nullable=False),
)
Index("ix_plc_counters_lot", plc_counters.c.lot, plc_counters.c.id)

# Serial requests to an L3/L4 source and their answers (linectl/sources/provisioner.py, ops in serial_requests.py), v9.
# One row per page asked (kind 'request') or per give-back (kind 'return'). A row is written before its request is
# sent; the answer (raw as received, and what the source parsed of it) before a single serial is imported; the import
# and state 'imported' in one transaction. States: pending (recorded, maybe sent) -> answered -> imported;
# pending -> parked (the L3 refused; an operator retries) -> pending; pending -> lost (maybe allocated at the L3,
# answer never stored, protocol without idempotency key: those numbers are never used); returns: pending ->
# returned | reported (the protocol has no return).
serial_requests = Table(
    "serial_requests",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", Text, nullable=False),  # 'request' | 'return'
    Column("source", Text, nullable=False),  # SerialSource.name
    Column("gtin", Text, nullable=False),
    Column("size", Integer, nullable=False),  # serials asked for (request) / given back (return)
    Column("key", Text, nullable=False),  # idempotency key / request token, the same for every page of one request
    Column("page", Integer, nullable=False),  # 0 = first page of the request
    Column("lot", Text),
    Column("continuation", Text),  # what this page was asked with (the previous page's continuation)
    Column("state", Text, nullable=False),
    Column("created_at", Text, nullable=False),
    Column("sent_at", Text),
    Column("answered_at", Text),
    Column("imported_at", Text),
    Column("raw", Text),  # the answer as received
    Column("answer", Text),  # JSON {serials, foreign, more, continuation}: what the source read in raw
    Column("accepted", Integer),
    Column("duplicates", Integer),
    Column("invalid", Integer),
    Column("foreign_serials", Integer),
    Column("problems", Text),  # JSON [[serial, reason], ...]: every refused serial (kept up to REFUSED_KEPT)
    Column("error", Text),  # the last error of an attempt (or why parked / lost)
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("updated_at", Text, nullable=False),
    UniqueConstraint("kind", "key", "page", name="uq_serial_requests_key_page"),
)
Index("ix_serial_requests_open", serial_requests.c.source, serial_requests.c.state)

# People and their sessions (linectl/access, ops in identity.py), v10. A users row is never deleted (deactivated);
# every change is an audit record with old and new value and the reason, and the row's `digest` (sha256 over its
# fields, chained to that record's seq) is written in that record's detail too, so `audit verify` sees a row changed
# outside linectl. failed_attempts is a counter, not part of the digest (a lock it causes is an audited change).
users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("username", Text, nullable=False),
    Column("display_name", Text, nullable=False),
    Column("roles", Text, nullable=False),  # JSON list of role names
    Column("password_hash", Text),  # argon2id; NULL: no local password (a directory user without a fallback)
    Column("password_history", Text, nullable=False, server_default="[]"),  # JSON list of earlier hashes, newest first
    Column("source", Text, nullable=False),  # 'local' | 'ldap'
    Column("active", Integer, nullable=False, server_default="1"),  # 0: deactivated (never deleted)
    Column("locked_until", Text),  # UTC ISO; NULL: not locked; far future: locked until unlocked
    Column("lock_reason", Text),
    Column("failed_attempts", Integer, nullable=False, server_default="0"),
    Column("password_changed_at", Text),
    Column("created_at", Text, nullable=False),
    Column("changed_at", Text, nullable=False),
    Column("audit_seq", Integer, nullable=False),  # the audit record that made this version of the row
    Column("digest", Text, nullable=False),
    UniqueConstraint("username", name="uq_users_username"),
    CheckConstraint("source IN ('local','ldap')", name="ck_users_source"),
)

# Session tokens (only their sha256 is kept), bound to the channel and client they were issued to.
sessions = Table(
    "sessions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("token_hash", Text, nullable=False),
    Column("username", Text, nullable=False),
    Column("channel", Text, nullable=False),  # 'mqtt' | 'cli' | ...
    Column("client_id", Text, nullable=False),  # the MQTT client (origin) the token is bound to
    Column("issued_at", Text, nullable=False),
    Column("expires_at", Text, nullable=False),
    Column("revoked_at", Text),
    Column("revoked_by", Text),
    UniqueConstraint("token_hash", name="uq_sessions_token_hash"),
)
Index("ix_sessions_username", sessions.c.username, sessions.c.revoked_at)

# Electronic signatures (21 CFR 11.50/11.70): who signed which record, meaning, when; linked to the record by its
# digest, and to the audit record written with the signature (its detail carries this row's digest).
signatures = Table(
    "signatures",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("record_ref", Text, nullable=False),  # 'audit:<seq>' | 'event:<event id>'
    Column("record_digest", Text, nullable=False),  # sha256 of the signed record as it was signed
    Column("signer", Text, nullable=False),
    Column("signer_name", Text, nullable=False),
    Column("meaning", Text, nullable=False),
    Column("signed_at", Text, nullable=False),
    Column("second_signer", Text),
    Column("second_signer_name", Text),
    Column("second_meaning", Text),
    Column("second_signed_at", Text),
    Column("audit_seq", Integer, nullable=False),
    Column("digest", Text, nullable=False),
    CheckConstraint("meaning IN ('performed','reviewed','approved')", name="ck_signatures_meaning"),
    CheckConstraint("second_meaning IS NULL OR second_meaning IN ('performed','reviewed','approved')", name="ck_signatures_second_meaning"),
)
Index("ix_signatures_ref", signatures.c.record_ref)

# Guards against a code path that deletes by mistake; not against a person with the file (the hash chain is for that).
TRIGGERS = (
    "CREATE TRIGGER IF NOT EXISTS serials_never_deleted BEFORE DELETE ON serials "
    "BEGIN SELECT RAISE(ABORT, 'serials are never deleted'); END",
    "CREATE TRIGGER IF NOT EXISTS serials_key_immutable BEFORE UPDATE OF gtin, serial ON serials "
    "BEGIN SELECT RAISE(ABORT, 'a serial''s gtin/serial never change'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_never_updated BEFORE UPDATE ON audit "
    "BEGIN SELECT RAISE(ABORT, 'audit records are never changed'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_never_deleted BEFORE DELETE ON audit "
    "BEGIN SELECT RAISE(ABORT, 'audit records are never deleted'); END",
    "CREATE TRIGGER IF NOT EXISTS users_never_deleted BEFORE DELETE ON users "
    "BEGIN SELECT RAISE(ABORT, 'users are never deleted (deactivate them)'); END",
    "CREATE TRIGGER IF NOT EXISTS signatures_never_deleted BEFORE DELETE ON signatures "
    "BEGIN SELECT RAISE(ABORT, 'signatures are never deleted'); END",
)


def now_iso() -> str:
    """Fixed-width UTC timestamps, so text comparison is time comparison (retention, reports)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


# --------------------------------------------------------------------------- engines


def make_engine(
    path: str,
    *,
    begin: str | None = None,
    query_only: bool = False,
    busy_timeout_s: float = 10.0,
    cache_kib: int | None = None,
    pool_size: int = 4,
    wal_autocheckpoint: int | None = None,
    readonly: bool = False,
) -> Engine:
    """An engine whose connections leave transaction control to us (pysqlite's implicit BEGIN is off).

    `begin` is what SQLAlchemy's begin() emits: "BEGIN IMMEDIATE" for the admin
    connection (take the write lock up front: a deferred BEGIN that later writes
    fails with "database is locked" and busy_timeout cannot help), "BEGIN" for
    readers (one snapshot per `with engine.connect()` block).

    `readonly`: SQLite's own read-only mode (a URI), so this process can never
    write the file, and its last connection closing never checkpoints it.
    """
    if readonly:
        uri = readonly_uri(path)
        eng = create_engine(
            "sqlite://",
            creator=lambda: sqlite3.connect(uri, uri=True, timeout=busy_timeout_s, check_same_thread=False),
            poolclass=QueuePool,
            pool_size=pool_size,
            max_overflow=8,
        )
    else:
        eng = create_engine(
            URL.create("sqlite", database=str(path)),
            poolclass=QueuePool,
            pool_size=pool_size,
            max_overflow=8,
            connect_args={"timeout": busy_timeout_s, "check_same_thread": False},
        )

    @event.listens_for(eng, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _rec: object) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cur.execute("PRAGMA synchronous=FULL")
        if cache_kib:
            cur.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
        if query_only:
            cur.execute("PRAGMA query_only=ON")
        if wal_autocheckpoint is not None:
            cur.execute(f"PRAGMA wal_autocheckpoint={int(wal_autocheckpoint)}")
            cur.execute(f"PRAGMA journal_size_limit={int(wal_autocheckpoint) * 4096 * 2}")
        cur.close()

    if begin:

        @event.listens_for(eng, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql(begin)

    return eng


def readonly_uri(path: str) -> str:
    """`mode=ro`; plus `immutable=1` when there is no WAL file, because only then is the main file the whole store.

    A WAL file exists while any process has the store open (and after a crash,
    holding committed transactions): then the reader must read it, and SQLite
    needs the -shm index beside it, which the writer created. With no WAL file,
    `mode=ro` alone would create empty -wal/-shm files, i.e. a read-only command
    would leave files behind; `immutable=1` reads the main file and creates
    nothing. A daemon starting meanwhile writes to a new WAL, not to the main
    file (until a checkpoint), so the reader keeps a consistent older snapshot.
    """
    from urllib.parse import quote

    q = "mode=ro" if os.path.exists(path + "-wal") else "mode=ro&immutable=1"
    return f"file:{quote(os.path.abspath(path))}?{q}"


def orig(exc: BaseException) -> BaseException:
    return getattr(exc, "orig", None) or exc


# --------------------------------------------------------------------------- opening


def _refuse(path: str, what: str) -> StoreError:
    log.error("store_refused", path=path, reason=what)
    return StoreError(f"{path}: {what}")


def check_file(path: str, *, create: bool) -> bool:
    """Cheap checks before SQLite touches the file. Returns True when the file is new or empty."""
    p = Path(path)
    try:
        if not p.exists():
            if not create:
                raise _refuse(path, "no such database file; create the store once with `linectl init -c CONFIG`")
            if not p.parent.is_dir():
                raise _refuse(path, f"directory {p.parent} does not exist")
            return True
        if p.is_dir():
            raise _refuse(path, "is a directory, not a database file")
        if not p.is_file():
            raise _refuse(path, "is not a regular file")
        if p.stat().st_size == 0:
            return True
        with open(p, "rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise _refuse(path, f"cannot read: {exc.strerror or exc}") from None
    if header != SQLITE_HEADER:
        raise _refuse(path, "file is not a database (no SQLite header); refusing to touch it")
    return False


def _user_tables(conn: Connection) -> list[str]:
    return [r[0] for r in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]


def _integrity(conn: Connection, path: str, mode: str) -> None:
    if mode == "none":
        return
    pragma = "integrity_check" if mode == "full" else "quick_check"
    rows = [r[0] for r in conn.exec_driver_sql(f"PRAGMA {pragma}(20)")]
    if rows != ["ok"]:
        raise _refuse(path, "integrity_check failed: " + "; ".join(rows[:5]))


def _read_meta(conn: Connection, path: str, tables: list[str]) -> int:
    if "meta" not in tables:
        shown = ", ".join(sorted(tables)[:8])
        raise _refuse(path, f"not a linectl database: no meta table (it has: {shown})")
    m: dict[str, str] = dict(conn.exec_driver_sql("SELECT key, value FROM meta").all())
    if m.get("app_id") != APP_ID:
        raise _refuse(path, f"not a linectl database: meta app_id is {m.get('app_id')!r}")
    try:
        version = int(m["schema_version"])
    except (KeyError, ValueError):
        raise _refuse(path, f"meta schema_version is missing or not a number ({m.get('schema_version')!r})") from None
    if version > SCHEMA_VERSION:
        raise _refuse(
            path, f"schema version {version} is newer than this linectl supports ({SCHEMA_VERSION}); upgrade linectl, do not downgrade the database"
        )
    if version < 1:
        raise _refuse(path, f"meta schema_version {version} is not a valid version")
    return version


def _create(conn: Connection) -> None:
    metadata.create_all(conn)
    for ddl in TRIGGERS:
        conn.exec_driver_sql(ddl)
    ts = now_iso()
    conn.exec_driver_sql(
        "INSERT INTO meta(key, value) VALUES ('app_id', ?), ('schema_version', ?), ('created_at', ?)",
        (APP_ID, str(SCHEMA_VERSION), ts),
    )
    cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    head = AuditHead.load(cur)
    head.append(cur, ts, "system", "store", "store_created", {"schema_version": SCHEMA_VERSION})
    head.save(cur)


def _backup(path: str, version: int) -> str:
    """A consistent copy before migrating, via SQLite's backup API (safe while others read the WAL)."""
    dest = f"{path}.v{version}.bak"
    n = 1
    while os.path.exists(dest):
        n += 1
        dest = f"{path}.v{version}.{n}.bak"
    src = sqlite3.connect(path)
    try:
        dst = sqlite3.connect(dest)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()
    return dest


def open_database(path: str, *, create: bool = True, readonly: bool = False, integrity: str = "quick", busy_timeout_s: float = 10.0) -> int:
    """Check, create or migrate the file; returns the schema version found before migrating (0 = new)."""
    is_new = check_file(path, create=create and not readonly)
    if readonly and is_new:
        raise _refuse(path, "empty file, not a linectl database")
    if is_new and not create:
        raise _refuse(path, "empty file, not a linectl database; create the store once with `linectl init -c CONFIG`")
    if readonly:
        eng = make_engine(path, begin="BEGIN", busy_timeout_s=busy_timeout_s, pool_size=1, readonly=True)
    else:
        eng = make_engine(path, begin="BEGIN IMMEDIATE", busy_timeout_s=busy_timeout_s, pool_size=1)
    try:
        try:
            return _open(eng, path, readonly=readonly, integrity=integrity)
        except StoreError:
            raise
        except (sa_exc.DBAPIError, sqlite3.Error) as exc:
            e = orig(exc)
            msg = str(e)
            if "not a database" in msg:
                raise _refuse(path, f"file is not a database ({msg})") from None
            if "malformed" in msg or isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.OperationalError):
                raise _refuse(path, f"integrity_check failed: {msg}") from None
            raise _refuse(path, f"cannot open: {msg}") from None
        except OSError as exc:
            raise _refuse(path, f"cannot open: {exc.strerror or exc}") from None
    finally:
        eng.dispose()


def _open(eng: Engine, path: str, *, readonly: bool, integrity: str) -> int:
    with eng.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        # Read without the write lock first: a foreign or broken file must not even be locked for writing.
        tables = _user_tables(conn)
        _integrity(conn, path, integrity)
        version = _read_meta(conn, path, tables) if tables else 0
        conn.rollback()
        if readonly:
            if version == 0:
                raise _refuse(path, "empty file, not a linectl database")
            if version < SCHEMA_VERSION:
                raise _refuse(path, f"schema version {version} needs migrating to {SCHEMA_VERSION}: open it read-write once (e.g. start linectl)")
            return version
        mode = raw.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise _refuse(path, f"cannot switch to WAL journal mode (got {mode!r}); is the filesystem local?")
        if version and version < SCHEMA_VERSION:
            dest = _backup(path, version)
            log.info("store_backup_before_migration", path=path, backup=dest, from_version=version)
        with conn.begin():
            # Again under the write lock: another process may have created or migrated it meanwhile.
            tables = _user_tables(conn)
            current = _read_meta(conn, path, tables) if tables else 0
            if current == 0:
                _create(conn)
                log.info("store_created", path=path, schema_version=SCHEMA_VERSION)
            while 0 < current < SCHEMA_VERSION:
                MIGRATIONS[current](conn)
                conn.exec_driver_sql("UPDATE meta SET value=? WHERE key='schema_version'", (str(current + 1),))
                cur = raw.cursor()
                head = AuditHead.load(cur)
                head.append(cur, now_iso(), "system", "store", "schema_migrated", {"from": current, "to": current + 1})
                head.save(cur)
                log.info("store_migrated", path=path, from_version=current, to_version=current + 1)
                current += 1
            for ddl in TRIGGERS:
                conn.exec_driver_sql(ddl)
            missing = sorted(set(metadata.tables) - set(_user_tables(conn)))
            if missing:
                raise _refuse(path, f"schema version {current} but tables are missing: {', '.join(missing)}")
        return version


# --------------------------------------------------------------------------- migrations


def _migrate_1_to_2(conn: Connection) -> None:
    """v1 -> v2: cheaper hot path (history by serial id, partial state indexes, tallies) and an explicit 'ever sent'.

    v1 indexed outbox(gtin, serial) and serials(gtin, state), (lot, state):
    random serials made the first take one random page write per event, and
    every sent -> commissioned step rewrote both state indexes. v2 points outbox
    rows at serials.id (allocation-ordered, so almost append-only), puts the
    objects of multi-object events into event_refs, uses partial indexes per
    state and keeps counts in serial_tally. v1 decided "was this serial ever
    sent" from its current state; v2 keeps serials.sent_at.
    """
    x = conn.exec_driver_sql
    x("DROP INDEX IF EXISTS ix_serials_gtin_state")
    x("DROP INDEX IF EXISTS ix_serials_lot_state")
    for idx in serials.indexes:
        idx.create(conn)
    serial_tally.create(conn)
    x("INSERT INTO serial_tally(gtin, lot, state, n) SELECT gtin, coalesce(lot, ''), state, count(*) FROM serials GROUP BY 1, 2, 3")
    x("ALTER TABLE serials ADD COLUMN sent_at TEXT")
    x("UPDATE serials SET sent_at = updated_at WHERE state IN ('sent', 'commissioned', 'decommissioned')")
    x("ALTER TABLE outbox ADD COLUMN serial_id INTEGER")
    x(
        "UPDATE outbox SET serial_id = (SELECT s.id FROM serials s WHERE s.gtin = outbox.gtin AND s.serial = outbox.serial) "
        "WHERE serial IS NOT NULL"
    )
    x("DROP INDEX IF EXISTS ix_outbox_gtin_serial")
    event_refs.create(conn)  # with its indexes
    x("CREATE INDEX IF NOT EXISTS ix_outbox_serial_id ON outbox(serial_id) WHERE serial_id IS NOT NULL")
    x("CREATE INDEX IF NOT EXISTS ix_outbox_lot ON outbox(lot, seq)")
    x(
        "INSERT INTO event_refs(seq, serial_id) "
        "SELECT o.seq, s.id FROM outbox o, json_each(o.body, '$.serials') j "
        "JOIN serials s ON s.gtin = json_extract(o.body, '$.gtin') AND s.serial = j.value "
        "WHERE o.kind IN ('serials_voided', 'serials_returned')"
    )
    x(
        "INSERT INTO event_refs(seq, serial_id) "
        "SELECT o.seq, s.id FROM outbox o, json_each(o.body, '$.children') c "
        "JOIN serials s ON s.gtin = json_extract(c.value, '$.gtin') AND s.serial = json_extract(c.value, '$.serial') "
        "WHERE o.kind IN ('packed', 'unpacked')"
    )
    x(
        "INSERT INTO event_refs(seq, sscc) "
        "SELECT o.seq, json_extract(c.value, '$.sscc') FROM outbox o, json_each(o.body, '$.children') c "
        "WHERE o.kind IN ('packed', 'unpacked') AND json_extract(c.value, '$.sscc') IS NOT NULL"
    )
    x(
        "INSERT INTO event_refs(seq, sscc) SELECT seq, json_extract(body, '$.parent') FROM outbox "
        "WHERE kind IN ('packed', 'unpacked')"
    )
    x(
        "INSERT INTO event_refs(seq, sscc) SELECT seq, json_extract(body, '$.sscc') FROM outbox "
        "WHERE kind IN ('container_commissioned', 'container_decommissioned')"
    )


def _add_column(conn: Connection, table: str, ddl: str) -> None:
    """ALTER TABLE ADD COLUMN unless the column is there: a file made by tests or by hand may have it already."""
    name = ddl.split()[0]
    have = {r[1] for r in conn.exec_driver_sql(f"PRAGMA table_info({table})").fetchall()}
    if name not in have:
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {ddl}")


def _migrate_command_ids(conn: Connection) -> None:
    """v2 -> v3: the command_ids table (durable command idempotency across restarts). Nothing else changes."""
    command_ids.create(conn, checkfirst=True)  # with its index


def _migrate_epcis_context(conn: Connection) -> None:
    """v3 -> v4: outbox.epcis, each event's EPCIS rendering fixed when it is stored.

    Rows stored before keep NULL: their context (station readPoint, time zone offset then in force,
    company prefix lengths) was never recorded, and a migration has no config to invent it from.
    `export epcis` refuses them unless given -c CONFIG, and then says it reconstructs them.
    """
    _add_column(conn, "outbox", "epcis TEXT")


def _migrate_plc_epochs(conn: Connection) -> None:
    """v4 -> v5: PLC epochs, units of unknown fate and batch PLC counters (three new tables, nothing else changed).

    plc_epochs remembers per PLC the boot epoch and counters last seen, so crash
    recovery only trusts reject-ring evidence of the same PLC epoch; unit_fates
    holds units whose fate at the gate a PLC restart made unknown, until an
    operator reconciles them; plc_counters holds the PLC's pack counters per batch.
    """
    for t in (plc_epochs, unit_fates, plc_counters):
        t.create(conn, checkfirst=True)  # with its indexes


def _migrate_challenge_state(conn: Connection) -> None:
    """v5 -> v6: the challenge a batch must pass is durable with the batch.

    v2 kept the challenge results (batches.challenge) but not what the batch
    required: a batch whose challenge was waived at create and one whose
    challenge was cut short by a crash looked the same after a restart. Adds
    batches.challenge_required (JSON list of kinds, [] = waived); existing
    batches keep NULL, read as "the line's configured challenge".
    """
    _add_column(conn, "batches", "challenge_required TEXT")


def _migrate_plc_carried(conn: Connection) -> None:
    """v6 -> v7: what of an earlier PLC epoch the current one still shows (plc_epochs.carried, .foreign_ring),
    and the table unit_copies.

    After a cold restart the units still on the belt are gated (rejected fail-safe) after the
    counters went to 0: "gated" overstates how far this epoch's own unit numbers got by that
    many (carried), and their old unit numbers sit in this epoch's reject ring until overwritten
    (foreign_ring). A daemon restarted later must know both, or units it cannot prove gated look
    gated and an old unit's reject is matched to this epoch's unit of the same number.
    Existing rows keep NULL, read as 0 and {} (what a v6 daemon assumed).
    """
    _add_column(conn, "plc_epochs", "carried INTEGER")
    _add_column(conn, "plc_epochs", "foreign_ring TEXT")
    # and unit_copies: rejected units that carried a copy of another serial's code (reconcile_units counts them)
    unit_copies.create(conn, checkfirst=True)


def _migrate_sink_cursors(conn: Connection) -> None:
    """v7 -> v8: one cursor per upstream sink (sink_cursors) instead of the single outbox.forwarded_at state.

    A second upstream (the file sink) cannot share one "forwarded" column with MQTT. The MQTT forwarder's
    position carries over: its cursor is the last seq of the unbroken run of forwarded rows from the start
    (the first unforwarded row minus one, or the last seq ever stored when every row was forwarded), so an
    existing store resumes exactly where it was. forwarded_at stays on the rows already forwarded and from
    now on means "delivered by every enabled sink".
    """
    sink_cursors.create(conn, checkfirst=True)
    x = conn.exec_driver_sql
    first = x("SELECT min(seq) FROM outbox WHERE forwarded_at IS NULL").scalar()
    if first is not None:
        cursor = int(first) - 1
    else:
        cursor = int(x("SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name='outbox'), 0)").scalar() or 0)
    x("INSERT OR IGNORE INTO sink_cursors(sink, seq, pending, updated_at) VALUES ('mqtt', ?, NULL, ?)", (cursor, now_iso()))


def _migrate_serial_requests(conn: Connection) -> None:
    """v8 -> v9: the serial_requests table (requests to an L3/L4 serial source and their answers). Nothing else changes:
    serials imported before keep their source text; a pool without a `source` keeps working as before."""
    serial_requests.create(conn, checkfirst=True)  # with its index


def _migrate_identities(conn: Connection) -> None:
    """v9 -> v10: users, sessions and signatures (linectl/access). Nothing else changes: the actors of earlier
    records stay the names they were given; a line gets its users from `linectl init` or `linectl users add`."""
    for t in (users, sessions, signatures):
        t.create(conn, checkfirst=True)  # with their indexes


MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: _migrate_1_to_2,
    2: _migrate_command_ids,
    3: _migrate_epcis_context,
    4: _migrate_plc_epochs,
    5: _migrate_challenge_state,
    6: _migrate_plc_carried,
    7: _migrate_sink_cursors,
    8: _migrate_serial_requests,
    9: _migrate_identities,
}


def remove_files(path: str) -> None:
    """Test/bench helper: delete a database and its WAL/SHM side files."""
    for suffix in ("", "-wal", "-shm"):
        try:
            os.remove(path + suffix)
        except FileNotFoundError:
            pass

