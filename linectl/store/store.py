"""The Store facade: async writes through the single writer thread, sync reads on their own connections.

Every write coroutine returns only after its transaction is durable
(synchronous=FULL), so "await store.mark_sent(...)" returning means the serials
are recorded as sent before the printer sees them, and "await store.append(ev)"
returning means the event survives a power cut.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Connection

from linectl.jsonable import json_default
from linectl.store import containers, ops, plc_records, schema, serial_requests
from linectl.store import identity as people  # `identity` is the line identity here (Store.identity)
from linectl.store.lock import StoreLock
from linectl.store.model import (
    AuditCheck,
    AuditRecord,
    Batch,
    BatchTransition,
    Container,
    LotTallies,
    OutboxRow,
    ProvisionResult,
    SerialRecord,
    StoreError,
)
from linectl.store.reads import Reader
from linectl.store.serials import serial_problem
from linectl.store.writer import Op, Writer, _stop

log = structlog.get_logger("linectl.store")

_LOT_RE = re.compile(r"[!\"%&'()*+,\-./0-9:;<=>?A-Z_a-z]{1,20}")
PROBLEMS_SHOWN = 100
REJECTED_KEPT = 10_000
WRITER_CACHE_KIB = 32 * 1024
# Checkpoint every ~40 MB of WAL instead of SQLite's 4 MB: pages rewritten by many commits are copied
# back once, which is most of the difference under random-key (event_id) inserts. Costs WAL disk space.
WAL_AUTOCHECKPOINT_PAGES = 10_000
PURGE_CHUNK = 5000
STAMP_CHUNK = 5000  # rows stamped forwarded per writer operation


def _gtin(gtin: str) -> str:
    """GTIN-14 with a valid check digit; shorter GTINs are left-padded (GS1 rule)."""
    try:
        from linectl.gs1 import GS1Error, normalize_gtin
    except ImportError:  # gs1 still in progress elsewhere: minimal private check
        g = str(gtin).strip()
        if not g.isdigit() or len(g) not in (8, 12, 13, 14):
            raise StoreError(f"GTIN {gtin!r} must be 8, 12, 13 or 14 digits") from None
        g = g.zfill(14)
        total = sum(int(c) * (3 if i % 2 == 0 else 1) for i, c in enumerate(reversed(g[:-1])))
        if (10 - total % 10) % 10 != int(g[-1]):
            raise StoreError(f"GTIN {gtin} has a wrong check digit") from None
        return g
    try:
        return normalize_gtin(str(gtin))
    except GS1Error as exc:
        raise StoreError(f"GTIN {gtin!r}: {exc.reason}") from None


class Store:
    def __init__(self, path: str, reader: Reader, writer: Writer | None, queue_max: int) -> None:
        self.path = path
        self._reader = reader
        self._writer = writer
        self._slots = asyncio.Semaphore(queue_max)
        self._queue_max = queue_max
        self._closed = False
        self.opened_from_version = 0
        self._sinks: frozenset[str] | None = None  # enabled upstream sinks (set_sinks); None: every sink with a cursor
        self._epcis: Any = None  # linectl.epcis.EpcisMapper: renders each EPCIS event once, when it is stored
        #: the exclusive owner lock (`<db>.lock`) when this Store was opened with `lock=`; released by close()
        self.lock: StoreLock | None = None

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        group_commit_max: int = 2000,
        queue_max: int = 50_000,
        *,
        create: bool = True,
        readonly: bool = False,
        integrity: str = "quick",
        busy_timeout_s: float = 10.0,
        lock: str | None = None,
        identity: dict[str, str] | None = None,
        actor: str = "system",
        origin: str = "store",
    ) -> Store:
        """Open (create or migrate) the database and start the writer.

        integrity: "quick" (default, PRAGMA quick_check), "full" (integrity_check, slower on big files) or "none".
        readonly: no writer thread, no migration, no file created (SQLite read-only mode); the file must exist.
        lock: take the store's exclusive owner lock for this command (e.g. "linectl run") before anything
        touches the file, and hold it until close(); refused with StoreLocked naming the holder.
        identity: the line's identity (see line_identity()); a store recorded for another line is refused with
        IdentityMismatch; a writable store without one records it (audited), a read-only one is only checked.
        """
        p = os.fspath(path)
        held: StoreLock | None = None
        if lock is not None:
            if readonly:
                raise StoreError("a read-only open takes no owner lock")
            # a missing file (or directory) is refused before the lock file is made beside it
            await asyncio.to_thread(schema.check_file, p, create=create)
            held = await asyncio.to_thread(StoreLock.acquire, p, lock)
        try:
            store = await cls._open(p, group_commit_max, queue_max, create, readonly, integrity, busy_timeout_s)
        except BaseException:
            if held is not None:
                held.release()
            raise
        store.lock = held
        if identity is not None:
            try:
                await store._check_identity(identity, actor, origin)
            except BaseException:
                await store.close()
                raise
        return store

    async def _check_identity(self, identity: dict[str, str], actor: str, origin: str) -> None:
        if self._writer is None:
            raw = self._reader.meta().get("line_identity")
            if raw is not None:
                recorded = json.loads(raw)
                if recorded != identity:
                    raise ops.IdentityMismatch(recorded, identity)
            return
        res = await self._submit(ops.op_claim_identity, identity, actor, origin)
        if res["adopted"]:
            log.info("line_identity_recorded", path=self.path, **identity)

    def identity(self) -> dict[str, str] | None:
        """The line this store belongs to, as recorded at init (None: a store from before identities, not yet adopted)."""
        raw = self._reader.meta().get("line_identity")
        return None if raw is None else json.loads(raw)

    @classmethod
    async def _open(
        cls, p: str, group_commit_max: int, queue_max: int, create: bool, readonly: bool, integrity: str, busy_timeout_s: float
    ) -> Store:
        found = await asyncio.to_thread(
            schema.open_database, p, create=create, readonly=readonly, integrity=integrity, busy_timeout_s=busy_timeout_s
        )
        reader = Reader(schema.make_engine(p, begin="BEGIN", query_only=True, busy_timeout_s=busy_timeout_s, readonly=readonly), p)
        writer = None
        if not readonly:
            eng = schema.make_engine(
                p, busy_timeout_s=busy_timeout_s, cache_kib=WRITER_CACHE_KIB, pool_size=1, wal_autocheckpoint=WAL_AUTOCHECKPOINT_PAGES
            )
            writer = Writer(p, eng, group_commit_max)
            writer.start()
            await asyncio.to_thread(writer.ready.wait)
            if writer.start_error is not None:
                reader.engine.dispose()
                raise StoreError(f"{p}: cannot open the writer connection: {writer.start_error}")
        store = cls(p, reader, writer, queue_max)
        store.opened_from_version = found
        log.debug("store_opened", path=p, readonly=readonly, group_commit_max=group_commit_max, queue_max=queue_max)
        return store

    async def close(self) -> None:
        """Flush everything queued, stop the writer, release connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        w = self._writer
        if w is not None and w.is_alive():
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            w.submit(Op(_stop, (), fut, loop, None))
            await fut
            await asyncio.to_thread(w.join)
            w.engine.dispose()
        self._reader.engine.dispose()
        if self.lock is not None:
            self.lock.release()
        log.debug("store_closed", path=self.path)

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def readonly(self) -> bool:
        return self._writer is None

    @contextmanager
    def read_snapshot(self) -> Iterator[Connection]:
        """One read transaction on the read pool (one WAL snapshot), for readers that query in SQL (linectl.store.trace)."""
        with self._reader.snapshot() as c:
            yield c

    def writer_alive(self) -> bool:
        """The writer thread runs and takes operations: the daemon feeds the systemd watchdog only while it does."""
        w = self._writer
        return w is not None and not self._closed and w.is_alive()

    def writer_gone(self) -> StoreError:
        """A write to a store whose writer thread ended: refused like a write the database refuses (the line stops
        without the store, see Line.store_failed), never queued where nobody will ever answer it."""
        exc = StoreError(f"{self.path}: the store writer is not running; nothing can be recorded")
        exc.__cause__ = sqlite3.OperationalError("store writer thread ended")
        return exc

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.path}: store is closed")

    async def _submit(self, fn: Any, *args: Any) -> Any:
        self._check_open()
        if self._writer is None:
            raise StoreError(f"{self.path}: store was opened read-only")
        if not self._writer.is_alive():
            raise self.writer_gone()
        await self._slots.acquire()  # bounded queue: producers wait here when the writer is behind
        try:
            self._check_open()  # close() may have run while this waited for a slot
        except StoreError:
            self._slots.release()
            raise
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._writer.submit(Op(fn, args, fut, loop, self._slots.release))
        return await fut

    # ------------------------------------------------------------------ writes

    def set_epcis_mapper(self, mapper: Any) -> None:
        """Render every EPCIS event with `mapper` (the line's EpcisMapper) when it is appended and store the
        rendering with it: the record then says for ever what was published (station readPoint, offset
        in force, EPC form), whatever the config says later. Without one, rows are stored unrendered."""
        self._epcis = mapper

    async def append(self, *events: Any) -> list[int]:
        """Store events in the outbox and apply them to the registry, atomically; returns their outbox seqs."""
        if not events:
            return []
        items = []
        mapper = self._epcis
        for ev in events:
            if not hasattr(ev, "kind") or not hasattr(ev, "model_dump_json"):
                raise StoreError(f"append() takes linectl.events objects, got {type(ev).__name__}")
            items.append((ev, ev.model_dump_json(), mapper.renderings(ev) if mapper is not None else None))
        return await self._submit(ops.op_append, items)  # type: ignore[no-any-return]

    async def upsert_products(self, products: Iterable[Any], actor: str = "system") -> int:
        rows = []
        for p in products:
            rows.append((_gtin(p.gtin), p.name, p.serials.scheme, p.model_dump_json()))
        return await self._submit(ops.op_upsert_products, rows, actor)  # type: ignore[no-any-return]

    async def provision(self, gtin: str, serials: Iterable[str], source: str, *, actor: str = "system",
                        reason: str | None = None) -> ProvisionResult:
        """Add serials to the pool. Invalid and duplicate serials are counted and named, never stored.

        `reason`: why (an operator's import), recorded with the pool size before and after in the audit trail."""
        g = _gtin(gtin)
        items = list(serials)
        candidates, problems, rejected, invalid, repeats, positions = await asyncio.to_thread(_screen, items)
        inserted = await self._submit(ops.op_provision, g, candidates, source, actor, invalid, repeats, reason)
        dups = repeats
        if len(inserted) != len(candidates):
            got = set(inserted)
            for s in candidates:
                if s not in got:
                    dups += 1
                    i = positions[s]
                    if len(rejected) < REJECTED_KEPT:
                        rejected.append((i, s, f"duplicate: already known for GTIN {g}"))
                    if len(problems) < PROBLEMS_SHOWN:
                        problems.append(f"#{i + 1} {s!r}: duplicate: already known for GTIN {g}")
        rejected.sort()
        if invalid + dups > len(problems) and len(problems) >= PROBLEMS_SHOWN:
            problems.append(f"… and {invalid + dups - len(problems)} more problem(s)")
        log.info("serials_provisioned", gtin=g, source=source, accepted=len(inserted), duplicates=dups, invalid=invalid)
        return ProvisionResult(accepted=len(inserted), duplicates=dups, invalid=invalid, problems=problems, rejected=rejected)

    # ------------------------------------------------------------------ serial requests (linectl/sources/provisioner.py)

    async def request_new(self, kind: str, source: str, gtin: str, size: int, key: str, *, page: int = 0, lot: str | None = None,
                          continuation: str | None = None, serials: list[str] | None = None) -> int:
        """Record a request to a serial source (or a give-back of `serials`) as pending, durably, before it is sent."""
        return int(await self._submit(serial_requests.op_request_new, kind, source, _gtin(gtin), size, key, page, lot, continuation, serials))

    async def request_attempt(self, request_id: int) -> int:
        return int(await self._submit(serial_requests.op_request_attempt, int(request_id)))

    async def request_answered(self, request_id: int, raw: str, answer: dict[str, Any]) -> None:
        """The answer as received and what the source read in it, durably, before a single serial is imported."""
        await self._submit(serial_requests.op_request_answered, int(request_id), raw, answer)

    async def request_import(self, request_id: int, source_text: str, *, actor: str = "system") -> serial_requests.ImportResult:
        """Import an answered page into the pool and mark it imported in one transaction; an imported page is not imported again."""
        res: serial_requests.ImportResult = await self._submit(serial_requests.op_request_import, int(request_id), source_text, actor)
        log.info("serial_request_imported", request=request_id, accepted=res.accepted, duplicates=res.duplicates, invalid=res.invalid,
                 foreign=res.foreign, already=res.already)
        return res

    async def request_failed(self, request_id: int, error: str, state: str | None = None, *, actor: str = "system") -> None:
        """Keep an attempt's error; with `state` parked / lost / returned / reported the request ends there (audited)."""
        await self._submit(serial_requests.op_request_failed, int(request_id), error, state, actor)

    async def requests_unpark(self, source: str, gtin: str, actor: str, origin: str) -> list[int]:
        """Parked requests of (source, gtin) back to pending (an operator's retry, audited); their ids."""
        return list(await self._submit(serial_requests.op_request_unpark, source, _gtin(gtin), actor, origin))

    def requests(self, *, source: str | None = None, gtin: str | None = None, states: tuple[str, ...] | None = None,
                 kind: str | None = None, limit: int = 1000) -> list[serial_requests.RequestRecord]:
        with self._reader.snapshot() as c:
            return serial_requests.q_requests(c, source=source, gtin=gtin, states=states, kind=kind, limit=limit)

    def request_answer(self, request_id: int) -> tuple[str | None, dict[str, Any] | None, list[tuple[str, str]]]:
        """(raw answer, what the source read in it, refused serials with their reasons) of one request."""
        with self._reader.snapshot() as c:
            return serial_requests.q_answer(c, int(request_id))

    def requests_summary(self) -> dict[str, dict[str, Any]]:
        with self._reader.snapshot() as c:
            return serial_requests.q_summary(c)

    def voided_unreturned(self, gtin: str, lot: str, source_prefix: str) -> list[str]:
        with self._reader.snapshot() as c:
            return serial_requests.q_voided_unreturned(c, _gtin(gtin), lot, source_prefix)

    async def create_batch(self, lot: str, gtin: str, expiry: str, planned_qty: int, actor: str, origin: str | None = None,
                           challenge_required: list[str] | None = None, dates: dict[str, str] | None = None,
                           audit_extra: dict[str, Any] | None = None) -> Batch:
        """`audit_extra`: more facts for the batch_created audit record (the config's hashes: linectl.config_hash)."""
        if not isinstance(lot, str) or not _LOT_RE.fullmatch(lot):
            raise StoreError(f"lot {lot!r} must be 1-20 characters of GS1 character set 82")
        if not re.fullmatch(r"\d{6}", str(expiry)):
            raise StoreError(f"expiry {expiry!r} must be YYMMDD")
        if int(planned_qty) <= 0:
            raise StoreError(f"planned quantity must be positive, got {planned_qty}")
        for name, value in (dates or {}).items():
            if not re.fullmatch(r"\d{6}", str(value)):
                raise StoreError(f"{name} {value!r} must be YYMMDD")
        return await self._submit(  # type: ignore[no-any-return]
            ops.op_create_batch, lot, _gtin(gtin), str(expiry), int(planned_qty), actor, origin, challenge_required, dates, audit_extra)

    async def allocate(self, gtin: str, lot: str, n: int, scheme: Any) -> list[str]:
        """Take n never-used serials for the lot: pool (provisioned ones), random or sequential per the product's scheme."""
        return await self._submit(ops.op_allocate, _gtin(gtin), lot, int(n), scheme)  # type: ignore[no-any-return]

    async def mark_sent(self, gtin: str, lot: str, serials: Sequence[str]) -> None:
        """Record serials as sent, durably, before the printer gets them: a crash can then never lose track of one."""
        await self._submit(ops.op_mark_sent, _gtin(gtin), lot, list(serials))

    async def close_batch(
        self, lot: str, policy: str, actor: str, *, extra_unused: Iterable[str] = (), stop_reason: str | None = None
    ) -> dict[str, Any]:
        """Close a batch atomically (unused serials returned/voided, stray `sent` ones decommissioned); see ops.op_close_batch."""
        if policy not in ("return", "void"):
            raise StoreError(f"unused serials policy must be return or void, not {policy!r}")
        return await self._submit(ops.op_close_batch, lot, policy, sorted(set(extra_unused)), actor, stop_reason)  # type: ignore[no-any-return]

    async def stop_batch(self, lot: str, actor: str, reason: str) -> dict[str, Any]:
        """Record as stopped a batch a crash left running/challenge/paused (no line to drain: offline only)."""
        return await self._submit(ops.op_stop_batch, lot, actor, reason)  # type: ignore[no-any-return]

    async def next_sscc_refs(self, company_prefix: str, extension: int, n: int) -> list[int]:
        cp = str(company_prefix)
        if not cp.isdigit() or not 4 <= len(cp) <= 12:
            raise StoreError(f"company prefix {company_prefix!r} must be 4-12 digits")
        if not 0 <= int(extension) <= 9:
            raise StoreError(f"SSCC extension digit must be 0-9, got {extension}")
        if int(n) <= 0:
            return []
        return await self._submit(ops.op_next_sscc_refs, cp, int(extension), int(n))  # type: ignore[no-any-return]

    async def audit(
        self, actor: str, origin: str, action: str, detail: dict[str, Any] | None = None, *, command_id: str | None = None, reply: Any = None,
        signature: people.SignatureSpec | None = None,
    ) -> int:
        """Append a hash-chained audit record; returns its seq.

        With `command_id`, the command `action` is also recorded as executed with `reply` (its result), in the
        same transaction, so `command_reply(command_id)` answers a retry after a restart with the same reply.
        With `signature`, the electronic signature of this record (a signatures row and its `signature_added`
        record, seq + 1) is written in the same transaction.
        """
        command = None
        if command_id:
            command = (command_id, action, json.dumps(reply, separators=(",", ":"), default=json_default))
        return await self._submit(ops.op_audit, actor, origin, action, detail or {}, command, signature)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ people, sessions, signatures (linectl.store.identity)

    async def add_user(self, username: str, display_name: str, roles: Sequence[str], password_hash: str | None, source: str, *,
                       actor: str, origin: str, reason: str, signature: people.SignatureSpec | None = None) -> int:
        """A new user (audited with the reason); returns the audit seq. The hash is made by linectl.access, never here."""
        return int(await self._submit(people.op_user_add, username, display_name, list(roles), password_hash, source, actor, origin, reason,
                                      signature))

    async def change_user(self, username: str, changes: dict[str, Any], action: str, *, actor: str, origin: str, reason: str,
                          history_n: int = 0, signature: people.SignatureSpec | None = None) -> int:
        """Change a user's audited fields (roles, password_hash, active, locked_until, lock_reason, display_name, source)."""
        return int(await self._submit(people.op_user_change, username, dict(changes), action, actor, origin, reason, int(history_n),
                                      signature))

    async def login_result(self, username: str, ok: bool, *, attempts: int, lock_until: str, origin: str) -> dict[str, Any]:
        return await self._submit(people.op_login_result, username, bool(ok), int(attempts), lock_until, origin)  # type: ignore[no-any-return]

    async def open_session(self, token_hash: str, username: str, channel: str, client_id: str, expires_at: str, *, origin: str) -> int:
        return int(await self._submit(people.op_session_open, token_hash, username, channel, client_id, expires_at, origin))

    async def revoke_session(self, token_hash: str, *, actor: str, origin: str, reason: str) -> int | None:
        res = await self._submit(people.op_session_revoke, token_hash, actor, origin, reason)
        return None if res is None else int(res)

    def user(self, username: str) -> people.UserRecord | None:
        return people.read_user(self._reader, username)

    def users(self) -> list[people.UserRecord]:
        return people.read_users(self._reader)

    def session(self, token_hash: str) -> people.SessionRecord | None:
        return people.read_session(self._reader, token_hash)

    async def add_signature(self, record_ref: str, record_digest: str, signer: str, signer_name: str, meaning: str, *,
                            origin: str, second: tuple[str, str, str] | None = None) -> tuple[int, int]:
        """Record an electronic signature of `record_ref` ('audit:<seq>' / 'event:<event id>') whose content hashed to
        `record_digest` (sha256 hex); `second`: (username, display name, meaning) of a second signer.
        Returns (signature id, audit seq of the signature record). Verifying the signer is the caller's job."""
        return await self._submit(people.op_signature_add, record_ref, record_digest, signer, signer_name, meaning, second, origin)  # type: ignore[no-any-return]

    def signatures_for(self, record_ref: str) -> list[people.SignatureRecord]:
        return people.read_signatures(self._reader, record_ref)

    # ------------------------------------------------------------------ upstream sinks: one cursor each

    def set_sinks(self, names: Iterable[str]) -> None:
        """The upstream sinks this process runs (linectl/upstream/): a row counts as forwarded (forwarded_at) and may
        be purged only once every one of them has delivered it. Not set: every sink that has a cursor counts."""
        self._sinks = frozenset(names)

    def enabled_sinks(self) -> frozenset[str]:
        return self._sinks if self._sinks is not None else frozenset(self._reader.cursors())

    async def open_cursor(self, sink: str) -> tuple[int, int | None]:
        """The sink's durable (cursor, pending delivery); a new sink starts before the oldest row kept."""
        return await self._submit(ops.op_open_cursor, str(sink))  # type: ignore[no-any-return]

    async def set_cursor_pending(self, sink: str, last_seq: int | None) -> None:
        """Durably record the delivery (up to last_seq) a sink is about to make, so a restart repeats it exactly."""
        await self._submit(ops.op_cursor_pending, str(sink), None if last_seq is None else int(last_seq))

    async def advance_cursor(self, sink: str, seq: int) -> int:
        """The sink has delivered every row up to `seq`: move its cursor (never back), durably.

        Returns the rows that became forwarded (delivered by every enabled sink) and had forwarded_at set, in
        chunks of STAMP_CHUNK so the line's own appends never wait behind a long catch-up of the slowest sink.
        """
        n = await self._submit(ops.op_advance_cursor, str(sink), int(seq), self._sinks, STAMP_CHUNK)
        total = int(n)
        while n == STAMP_CHUNK:
            n = await self._submit(ops.op_stamp_forwarded, self._sinks, STAMP_CHUNK)
            total += int(n)
        return total

    def cursors(self) -> dict[str, dict[str, Any]]:
        """{sink: {seq, pending, updated_at}} for every sink that ever had a cursor."""
        return self._reader.cursors()

    def cursor(self, sink: str) -> int | None:
        c = self._reader.cursors().get(sink)
        return None if c is None else int(c["seq"])

    async def note_link_states(self, states: dict[str, dict[str, Any]]) -> None:
        """Record upstream links' states (sink:<name>, source:<name>:<gtin>) for `linectl upstream status` offline."""
        if states:
            await self._submit(ops.op_note_link_states, dict(states))

    def link_states(self) -> dict[str, dict[str, Any]]:
        """{link: last recorded state with its as_of time}."""
        return self._reader.link_states()

    def sink_backlog(self, sink: str) -> int:
        """Rows the sink has not delivered yet (all rows after its cursor)."""
        return self._reader.rows_after(self.cursor(sink) or 0)

    def seqs_after(self, after_seq: int, limit: int) -> list[int]:
        return self._reader.seqs_after(after_seq, limit)

    async def purge_forwarded(self, older_than_days: float, *, actor: str = "system") -> int:
        """Delete outbox rows forwarded more than `older_than_days` ago, in small transactions so the line never waits.

        Forwarded = delivered by every enabled sink: a row past the slowest sink's cursor is never purged, nor an
        unforwarded one. The serial registry and the audit trail are never purged.
        """
        if older_than_days < 0:
            raise StoreError("retention must not be negative")
        cutoff = (datetime.now(UTC) - timedelta(days=older_than_days)).isoformat(timespec="microseconds")
        total = 0
        after = 0
        bound = await asyncio.to_thread(self._reader.delivered_bound, self._sinks)
        while True:
            seqs = await asyncio.to_thread(self._reader.purgeable, cutoff, after, PURGE_CHUNK, bound)
            if not seqs:
                break
            total += await self._submit(ops.op_purge, seqs, cutoff, self._sinks)
            after = seqs[-1]
        if total:
            await self.audit(actor, "store", "outbox_purged", {"rows": total, "forwarded_before": cutoff, "delivered_up_to": bound})
            log.info("outbox_purged", rows=total, forwarded_before=cutoff, delivered_up_to=bound)
        commands = await self._submit(ops.op_purge_command_ids, cutoff)  # executed command ids: same retention
        if commands:
            log.info("command_ids_purged", rows=commands, before=cutoff)
        return total

    async def set_max_db_bytes(self, max_bytes: int | None) -> int:
        """Cap the database size (PRAGMA max_page_count on the writer); hitting it behaves exactly like a full disk.

        Useful to keep a shared disk from filling; None lifts the cap. Returns the cap in pages.
        """
        if max_bytes is None:
            return await self._submit(ops.op_set_max_pages, None)  # type: ignore[no-any-return]
        page = await self._submit(ops.op_page_size)
        return await self._submit(ops.op_set_max_pages, max(1, int(max_bytes) // page))  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ PLC epochs, unit fates, PLC counters

    async def save_plc_state(
        self,
        plc: str,
        epoch: int,
        epoch_tag: int | None,
        trigger_count: int | None,
        gated: int | None,
        carried: int = 0,
        foreign: dict[int, int] | None = None,
    ) -> None:
        """The PLC epoch and counters last seen, so a restarted daemon can tell whether the PLC restarted meanwhile.

        carried and foreign: what of an earlier epoch the counters and the reject ring of this one still hold.
        """
        await self._submit(plc_records.op_plc_state, plc, int(epoch), epoch_tag, trigger_count, gated, int(carried), dict(foreign or {}))

    async def mark_fate_unknown(self, rows: list[tuple[str, str, str | None, str, str, int, int | None, str]]) -> int:
        """Open fate_unknown records for commissioned units whose fate at the gate is not proven; returns how many."""
        if not rows:
            return 0
        return await self._submit(plc_records.op_fate_unknown, [(_gtin(r[0]), *r[1:]) for r in rows])  # type: ignore[no-any-return]

    async def resolve_fates(self, gtin: str, serials: Sequence[str], outcome: str, actor: str, origin: str,
                            reason: str | None = None) -> list[str]:
        return await self._submit(plc_records.op_resolve_fates, _gtin(gtin), list(serials), outcome, actor, origin, reason)  # type: ignore[no-any-return]

    async def save_plc_counters(self, lot: str, plc: str, epoch: int, point: str, values: dict[str, int | None]) -> None:
        await self._submit(plc_records.op_plc_counters, lot, plc, int(epoch), point, dict(values))

    async def count_packs(self, lot: str, kind: str, n: int = 1) -> None:
        """Count packs of the batch that carry none of its serials (kind 'blank': no code printed / not ours)."""
        await self._submit(plc_records.op_count_packs, lot, kind, int(n))

    def pack_counts(self, lot: str) -> dict[str, int]:
        return plc_records.read_pack_counts(self._reader, lot)

    def label_facts(self, sscc: str) -> containers.LabelFacts:
        """What a case/pallet label shows as the record says now (a reprint rebuilds the label from this)."""
        return containers.read_label_facts(self._reader, sscc)

    def label_intents(self, intent_action: str, recovery_action: str) -> containers.LabelIntents:
        """Label intents with no container row since the last recovery watermark (see engine recover_containers)."""
        return containers.read_label_intents(self._reader, intent_action, recovery_action)

    def packing_counts(self, lot: str) -> dict[str, int]:
        return containers.read_packing_counts(self._reader, lot)

    def hierarchy_problems(self) -> list[str]:
        """Every violation of the aggregation invariants, in words; [] when consistent."""
        return containers.read_hierarchy_problems(self._reader)

    def plc_state(self, plc: str) -> plc_records.PlcEpochState | None:
        return plc_records.read_plc_state(self._reader, plc)

    def unit_fates(self, lot: str | None = None, *, open_only: bool = False) -> list[plc_records.UnitFate]:
        return plc_records.read_fates(self._reader, lot, open_only=open_only)

    def rejected_copies(self, gtin: str, serial: str) -> list[plc_records.UnitCopy]:
        """Rejected units that carried a copy of this serial's code (printer duplicates): packs with its code in the bin."""
        return plc_records.read_copies(self._reader, _gtin(gtin), serial)

    def unit_fate(self, gtin: str, serial: str) -> plc_records.UnitFate | None:
        return plc_records.read_fate(self._reader, _gtin(gtin), serial)

    def lot_tallies(self, lot: str) -> LotTallies | None:
        return self._reader.lot_tallies(lot)

    def batch_history(self, lot: str) -> list[BatchTransition]:
        return self._reader.batch_history(lot)

    def plc_counters(self, lot: str) -> list[dict[str, Any]]:
        return plc_records.read_plc_counters(self._reader, lot)

    # ------------------------------------------------------------------ reads (sync)

    def outbox(self, after_seq: int = 0, limit: int = 1000, only_unforwarded: bool = True) -> list[OutboxRow]:
        return self._reader.outbox(after_seq, limit, only_unforwarded)

    def command_reply(self, command_id: str) -> dict[str, Any] | None:
        """The reply of a command already executed with this command_id ({ok, command_id, command, result}), or None."""
        return self._reader.command_reply(command_id)

    def backlog(self) -> int:
        return self._reader.backlog()

    def last_seq(self) -> int:
        return self._reader.last_seq()

    def events_of_lot(self, lot: str, after_seq: int = 0, limit: int = 10000) -> list[OutboxRow]:
        return self._reader.events_of_lot(lot, after_seq, limit)

    def serial_counts(self, gtin: str | None = None) -> dict[str, dict[str, int]]:
        return self._reader.serial_counts(None if gtin is None else _gtin(gtin))

    def lot_counts(self, lot: str) -> dict[str, int]:
        return self._reader.lot_counts(lot)

    def available(self, gtin: str) -> int:
        return self._reader.available(_gtin(gtin))

    def tally_mismatches(self) -> list[tuple[str, str, str, int, int]]:
        """Consistency check of the kept serial counts against a full count (slow on big stores)."""
        return self._reader.tally_mismatches()

    def serial(self, gtin: str, serial: str) -> SerialRecord | None:
        return self._reader.serial(_gtin(gtin), serial)

    def serial_history(self, gtin: str, serial: str) -> list[OutboxRow]:
        return self._reader.serial_history(_gtin(gtin), serial)

    def unrendered_epcis_rows(self) -> int:
        return self._reader.unrendered_epcis_rows()

    def was_commissioned(self, gtin: str, serial: str, before_seq: int) -> bool:
        return self._reader.was_commissioned(gtin, serial, before_seq)

    def batch(self, lot: str) -> Batch | None:
        return self._reader.batch(lot)

    def batches(self, state: str | None = None) -> list[Batch]:
        return self._reader.batches(state)

    def batch_dates(self, lot: str) -> dict[str, str]:
        """The batch's dates besides expiry as created (production_date, packaging_date, best_before, sell_by)."""
        return self._reader.batch_dates(lot)

    def batch_config(self, lot: str) -> dict[str, Any] | None:
        """The config hashes recorded with the batch at its creation (linectl.config_hash); None for a batch from before."""
        return self._reader.batch_config(lot)

    def in_flight(self, lot: str | None = None) -> list[tuple[str, str, str]]:
        return self._reader.in_flight(lot)

    def allocated(self, lot: str) -> list[tuple[str, str]]:
        return self._reader.allocated(lot)

    def container(self, sscc: str) -> Container | None:
        return self._reader.container(sscc)

    def container_history(self, sscc: str) -> list[OutboxRow]:
        return self._reader.container_history(sscc)

    def children(self, sscc: str) -> list[dict[str, Any]]:
        return self._reader.children(sscc)

    def parent_of(self, gtin: str | None = None, serial: str | None = None, sscc: str | None = None) -> str | None:
        if sscc is not None:
            return self._reader.parent_of("container", sscc)
        if gtin is None or serial is None:
            raise StoreError("parent_of needs gtin+serial or sscc")
        return self._reader.parent_of("unit", ops.unit_key(_gtin(gtin), serial))

    def verify_audit(self) -> AuditCheck:
        return self._reader.verify_audit()

    def audit_log(self, after_seq: int = 0, limit: int = 1000) -> list[AuditRecord]:
        return self._reader.audit_log(after_seq, limit)

    def integrity_check(self) -> list[str]:
        return self._reader.integrity_check()

    def stats(self) -> dict[str, Any]:
        m = self._reader.meta()
        out: dict[str, Any] = {
            "path": self.path,
            "schema_version": int(m.get("schema_version", 0)),
            "last_seq": self._reader.last_seq(),
            "backlog": self._reader.backlog(),
            "audit_records": int(m.get("audit_count", 0)),
            "audit_head": m.get("audit_head"),
            "db_bytes": _size(self.path),
            "wal_bytes": _size(self.path + "-wal"),
        }
        w = self._writer
        if w is not None:
            lat = sorted(w.commit_ms)
            out["writer"] = {
                "queue_depth": w.queue_depth(),
                "queue_max": self._queue_max,
                "groups": w.groups,
                "groups_failed": w.groups_failed,
                "ops_ok": w.ops_ok,
                "ops_failed": w.ops_failed,
                "last_group_size": w.last_group_size,
                "commit_ms_p50": lat[len(lat) // 2] if lat else None,
                "commit_ms_p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
                "commit_ms_max": lat[-1] if lat else None,
            }
        return out


def line_identity(cfg: Any) -> dict[str, str]:
    """What a store records of its line (ISA-95 names and GLN): a store opened with another line's config is refused."""
    ln = cfg.line
    return {"enterprise": ln.enterprise, "site": ln.site, "area": ln.area, "line": ln.name, "gln": ln.gln}


def _size(p: str) -> int:
    try:
        return os.path.getsize(p)
    except OSError:
        return 0


def _screen(items: list[Any]) -> tuple[list[str], list[str], list[tuple[int, str, str]], int, int, dict[str, int]]:
    """Split input into valid first occurrences and named problems (invalid, repeated in the input)."""
    problems: list[str] = []
    rejected: list[tuple[int, str, str]] = []
    first: dict[str, int] = {}
    candidates: list[str] = []
    invalid = repeats = 0
    for i, s in enumerate(items):
        why = serial_problem(s)
        if why is None:
            j = first.get(s)
            if j is None:
                first[s] = i
                candidates.append(s)
                continue
            repeats += 1
            why = f"duplicate: repeated in the input (first at #{j + 1})"
        else:
            invalid += 1
            why = f"invalid: {why}"
        if len(rejected) < REJECTED_KEPT:
            rejected.append((i, str(s), why))
        if len(problems) < PROBLEMS_SHOWN:
            problems.append(f"#{i + 1} {s!r}: {why}")
    return candidates, problems, rejected, invalid, repeats, first
