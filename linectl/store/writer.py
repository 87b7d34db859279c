"""The single writer: one thread, one connection, group commit.

Why one thread: SQLite allows one writer at a time anyway, and a single owner
of the write connection means no "database is locked" inside the process and a
strict order of effects. Why group commit: with synchronous=FULL every COMMIT
costs an fsync; draining everything that is waiting into one transaction pays
that once for up to group_commit_max operations, which is where throughput
comes from, while a lone event still commits at once (latency = one fsync).

Failure isolation: a group first runs without savepoints (fast path). If one
operation is refused (validation, constraint), the whole transaction is rolled
back and the group re-run with a SAVEPOINT per operation, so only the refused
ones fail. Errors of the database itself (disk full, I/O, lock timeout) fail
the whole group: it is rolled back and nothing of it is written; the thread
keeps running and later groups succeed once the cause is gone.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog
from sqlalchemy import Engine

from linectl.store.audit import AuditHead, origin_of
from linectl.store.model import StoreError
from linectl.store.schema import now_iso

log = structlog.get_logger("linectl.store")

_OUTBOX_INSERT = (
    "INSERT INTO outbox(seq, event_id, kind, lot, gtin, serial, serial_id, created_at, body, epcis) VALUES (?,?,?,?,?,?,?,?,?,?)"
)


#: operation -> its form over a list of argument tuples, run once for consecutive ops of one group
#: (registered by the module that defines the operation)
BATCH_FORMS: dict[Callable[..., Any], Callable[[Tx, list[tuple[Any, ...]]], list[Any]]] = {}


class Op:
    __slots__ = ("fn", "args", "fut", "loop", "release", "result", "error")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], fut: asyncio.Future[Any] | None,
                 loop: asyncio.AbstractEventLoop | None, release: Callable[[], None] | None) -> None:
        self.fn = fn
        self.args = args
        self.fut = fut
        self.loop = loop
        self.release = release
        self.result: Any = None
        self.error: BaseException | None = None


def _stop(tx: Tx) -> None:  # sentinel operation
    return None


class _Refused(Exception):
    """An operation failed on its own merits during the fast path: re-run the group with savepoints."""


class Tx:
    """State of one write transaction: the next outbox seq, the audit head, rows to insert in bulk."""

    __slots__ = ("cur", "ts", "_seq", "_head", "_head_dirty", "rows", "post", "tally")

    def __init__(self, cur: sqlite3.Cursor) -> None:
        self.cur = cur
        self.ts = now_iso()
        self._seq: int | None = None
        self._head: AuditHead | None = None
        self._head_dirty = False
        self.rows: list[tuple[Any, ...]] = []
        self.post: list[Callable[[], None]] = []
        self.tally: dict[tuple[str, str, str], int] = {}

    def next_seq(self) -> int:
        if self._seq is None:
            # Read under the write lock each transaction: another process may have written since.
            r = self.cur.execute(
                "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name='outbox'), 0), "
                "coalesce((SELECT max(seq) FROM outbox), 0))"
            ).fetchone()
            self._seq = int(r[0]) + 1
        s = self._seq
        self._seq = s + 1
        return s

    def add_outbox(self, row: tuple[Any, ...]) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        if self.rows:
            self.cur.executemany(_OUTBOX_INSERT, self.rows)
            self.rows = []

    def audit(self, actor: str, origin: str | None, action: str, detail: dict[str, Any] | None) -> int:
        if self._head is None:
            self._head = AuditHead.load(self.cur)
        self._head_dirty = True
        return self._head.append(self.cur, self.ts, actor, origin or origin_of(actor), action, detail)

    def head_hash(self) -> str:
        """The chain hash of the last audit record (written in this transaction or before)."""
        if self._head is None:
            self._head = AuditHead.load(self.cur)
        return self._head.hash

    def next_audit_seq(self) -> int:
        """The seq the next `audit()` of this transaction gets (a row digest chained to its own record needs it first)."""
        if self._head is None:
            self._head = AuditHead.load(self.cur)
        return self._head.count + 1

    def count(self, gtin: str, lot: str | None, state: str, n: int) -> None:
        """Adjust serial_tally for (gtin, lot, state) by n; written once per transaction in finish()."""
        k = (gtin, lot or "", state)
        self.tally[k] = self.tally.get(k, 0) + n

    def move(self, gtin: str, lot_from: str | None, state_from: str, lot_to: str | None, state_to: str, n: int = 1) -> None:
        self.count(gtin, lot_from, state_from, -n)
        self.count(gtin, lot_to, state_to, n)

    def after_commit(self, fn: Callable[[], None]) -> None:
        self.post.append(fn)

    def snapshot(self) -> tuple[Any, ...]:
        head = (self._head.count, self._head.hash) if self._head else None
        return (self._seq, head, self._head_dirty, len(self.rows), len(self.post), dict(self.tally))

    def restore(self, snap: tuple[Any, ...]) -> None:
        seq, head, dirty, nrows, npost, tally = snap
        self.tally = tally
        self._seq = seq
        if head is None:
            self._head = None
        else:
            assert self._head is not None
            self._head.count, self._head.hash = head
        self._head_dirty = dirty
        del self.rows[nrows:]
        del self.post[npost:]

    def finish(self) -> None:
        self.flush()
        if self.tally:
            self.cur.executemany(
                "INSERT INTO serial_tally(gtin, lot, state, n) VALUES (?,?,?,?) "
                "ON CONFLICT(gtin, lot, state) DO UPDATE SET n = n + excluded.n",
                [(g, lot, st, n) for (g, lot, st), n in self.tally.items() if n],
            )
            self.tally = {}
        if self._head_dirty and self._head is not None:
            self._head.save(self.cur)
            self._head_dirty = False


def _primary(exc: sqlite3.Error) -> int:
    return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF


def _is_group_error(exc: BaseException) -> bool:
    """Errors of the database itself (not of one operation's data)."""
    return isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError)


class Writer(threading.Thread):
    def __init__(self, path: str, engine: Engine, group_commit_max: int) -> None:
        super().__init__(name="linectl-store-writer", daemon=True)
        self.path = path
        self.engine = engine
        self.group_commit_max = max(1, int(group_commit_max))
        self.q: queue.SimpleQueue[Op] = queue.SimpleQueue()
        self.ready = threading.Event()
        self.start_error: BaseException | None = None
        # metrics (read from other threads without locks: ints and a deque are fine for monitoring)
        self.groups = 0
        self.ops_ok = 0
        self.ops_failed = 0
        self.groups_failed = 0
        self.last_group_size = 0
        self.commit_ms: deque[float] = deque(maxlen=2048)

    # ------------------------------------------------------------------ plumbing

    def submit(self, op: Op) -> None:
        self.q.put(op)

    def queue_depth(self) -> int:
        return self.q.qsize()

    def run(self) -> None:
        try:
            proxy = self.engine.raw_connection()
            conn = proxy.driver_connection
            assert isinstance(conn, sqlite3.Connection)
        except BaseException as exc:  # noqa: BLE001 - reported to Store.open
            self.start_error = exc
            self.ready.set()
            return
        self.ready.set()
        try:
            self._loop(conn)
        finally:
            try:
                proxy.close()
            except Exception:  # noqa: BLE001
                pass

    def _loop(self, conn: sqlite3.Connection) -> None:
        q = self.q
        while True:
            ops = [q.get()]
            while len(ops) < self.group_commit_max:
                try:
                    ops.append(q.get_nowait())
                except queue.Empty:
                    break
            stopping = [o for o in ops if o.fn is _stop]
            work = [o for o in ops if o.fn is not _stop]
            if work:
                try:
                    self._group(conn, work)
                except BaseException as exc:  # noqa: BLE001 - the writer must never die with futures pending
                    log.exception("store_writer_bug", error=repr(exc))
                    for o in work:
                        if o.error is None and o.result is None:
                            o.error = StoreError(f"{self.path}: internal error in the store writer: {exc!r}")
            self._resolve(work + stopping)
            if stopping:
                return

    @staticmethod
    def _resolve(ops: list[Op]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[Op]] = {}
        for o in ops:
            if o.loop is not None:
                by_loop.setdefault(o.loop, []).append(o)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_in_loop, items)
            except RuntimeError:  # loop closed: nobody is waiting any more
                pass

    # ------------------------------------------------------------------ group commit

    def _group(self, conn: sqlite3.Connection, ops: list[Op]) -> None:
        t0 = time.perf_counter()
        try:
            self._attempt(conn, ops, isolate=False)
        except _Refused:
            for o in ops:
                o.result = o.error = None
            self._attempt(conn, ops, isolate=True)
        dt = (time.perf_counter() - t0) * 1000.0
        self.commit_ms.append(dt)
        self.groups += 1
        self.last_group_size = len(ops)
        failed = sum(1 for o in ops if o.error is not None)
        self.ops_failed += failed
        self.ops_ok += len(ops) - failed

    def _attempt(self, conn: sqlite3.Connection, ops: list[Op], *, isolate: bool) -> None:
        cur = conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._fail_group(conn, ops, exc)
            return
        tx = Tx(cur)
        try:
            if isolate:
                for o in ops:
                    snap = tx.snapshot()
                    cur.execute("SAVEPOINT op")
                    try:
                        o.result = o.fn(tx, *o.args)
                        tx.flush()
                        cur.execute("RELEASE op")
                    except Exception as exc:  # noqa: BLE001
                        if _is_group_error(exc):
                            raise
                        cur.execute("ROLLBACK TO op")
                        cur.execute("RELEASE op")
                        tx.restore(snap)
                        o.result = None
                        o.error = self._op_error(o, exc)
                tx.finish()
            else:
                try:
                    self._run_fast(tx, ops)
                    tx.finish()
                except Exception as exc:  # noqa: BLE001
                    if _is_group_error(exc):
                        raise
                    self._rollback(conn)
                    if len(ops) > 1:
                        raise _Refused() from exc
                    ops[0].result = None
                    ops[0].error = self._op_error(ops[0], exc)
                    return
            cur.execute("COMMIT")
        except _Refused:
            raise
        except Exception as exc:  # noqa: BLE001 - database-level failure: nothing of the group is written
            self._fail_group(conn, ops, exc)
            return
        for fn in tx.post:
            try:
                fn()
            except Exception:  # noqa: BLE001
                log.exception("store_post_commit_hook_failed")

    @staticmethod
    def _run_fast(tx: Tx, ops: list[Op]) -> None:
        """Run the ops in order; consecutive ops of a function with a batch form (BATCH_FORMS) run as one call."""
        i, n = 0, len(ops)
        while i < n:
            o = ops[i]
            batch = BATCH_FORMS.get(o.fn)
            if batch is not None:
                j = i + 1
                while j < n and ops[j].fn is o.fn:
                    j += 1
                if j - i > 1:
                    for x, r in zip(ops[i:j], batch(tx, [x.args for x in ops[i:j]])):
                        x.result = r
                    i = j
                    continue
            o.result = o.fn(tx, *o.args)
            i += 1

    def _rollback(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.error("store_rollback_failed", path=self.path, error=str(exc))

    def _fail_group(self, conn: sqlite3.Connection, ops: list[Op], exc: BaseException) -> None:
        self._rollback(conn)
        self.groups_failed += 1
        msg = self._describe(exc)
        log.error("store_group_failed", path=self.path, ops=len(ops), error=msg)
        for o in ops:
            o.result = None
            e = StoreError(msg)
            e.__cause__ = exc
            o.error = e

    def _describe(self, exc: BaseException) -> str:
        code = _primary(exc) if isinstance(exc, sqlite3.Error) else 0
        if code == sqlite3.SQLITE_FULL:
            return f"database or disk is full: {self.path}: the transaction was rolled back, nothing of it was written"
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return f"database is locked by another process: {self.path}: {exc}; nothing was written"
        if code == sqlite3.SQLITE_IOERR:
            return f"disk I/O error on {self.path}: {exc}; this group was rolled back"
        if code == sqlite3.SQLITE_READONLY:
            return f"database is read-only: {self.path}: {exc}"
        return f"{self.path}: write failed: {exc}; this group was rolled back"

    def _op_error(self, op: Op, exc: BaseException) -> BaseException:
        if isinstance(exc, StoreError):
            return exc
        if isinstance(exc, sqlite3.IntegrityError):
            e: BaseException = StoreError(f"refused by a database constraint: {exc}")
        elif isinstance(exc, ValueError):
            e = StoreError(str(exc))
        else:
            log.error("store_op_bug", op=getattr(op.fn, "__name__", "?"), error=repr(exc))
            e = StoreError(f"internal error in {getattr(op.fn, '__name__', 'operation')}: {exc!r}")
        e.__cause__ = exc
        return e


def _resolve_in_loop(items: list[Op]) -> None:
    for o in items:
        if o.release is not None:
            o.release()
        f = o.fut
        if f is None or f.done():
            continue
        if o.error is not None:
            f.set_exception(o.error)
        else:
            f.set_result(o.result)
