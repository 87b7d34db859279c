"""Sink "file": the outbox's EPCIS events as EPCIS 2.0 JSON-LD documents in a directory (`upstream.file`).

For sites where a transfer gateway (an MFT agent, a watched folder synchronised to L3/L4) picks documents up
from a directory, instead of or beside MQTT. What a gateway can rely on:

- **Never half a file.** A document is written to a hidden temporary name in the same directory
  (`.<name>.tmp`), fsynced, renamed to `<prefix>-<first_seq>-<last_seq>.json` (atomic on one filesystem),
  and the directory is fsynced. Only complete documents ever carry a `.json` name.
- **Names sort in delivery order and never collide.** first_seq/last_seq are the outbox seqs of the first and
  last row the document covers, zero-padded to 12 digits; consecutive documents cover consecutive rows.
  The document's `instanceIdentifier` is "<first_seq>-<last_seq>" too, as on MQTT.
- **At least once, never a gap, never other bounds.** Before writing, the sink records in its cursor row
  (sink_cursors.pending) the last seq the document will cover; after the rename it moves its cursor there.
  A crash between the two makes the restarted sink write the same rows under the same name with the same bytes
  (creationDate is the stored time of the document's last row), so the gateway sees at most the same file again.
- **Trouble on the far side is waited out.** A full disk, a missing or unwritable directory: logged once per
  distinct reason (and shown in `status()`, hence on `<root>/state`), retried with capped jittered backoff,
  nothing skipped; the cursor stays where it is and retention keeps the rows (it follows the slowest sink).

Rows without an EPCIS event (alarms, batch states, records) have no place in an EPCIS document: the cursor
moves past them (a document's seq range includes those between its events). A row whose rendering failed
(`!reason`) is logged and passed over the same way; it travels on MQTT as a record with `epcis_error`.
Batching: up to `max_events` events per document (a row's events are never split, so one row with more
events makes a bigger document); fewer once the first of them was stored `max_age_s` ago.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from linectl import epcis
from linectl.drivers.base import Backoff
from linectl.upstream.outbox import BacklogAlarm, OutboxReader, encoded_events, epoch, oldest_age_s

if TYPE_CHECKING:  # pragma: no cover
    from linectl.config import LineConfig

log = structlog.get_logger("linectl.upstream.file")

SEQ_DIGITS = 12
#: how often the age of the oldest undelivered row is looked at (backlog_alarm_s), and the rows behind counted
BACKLOG_WATCH_S = 1.0
BACKLOG_COUNT_S = 5.0


@dataclass
class _Document:
    first_seq: int
    last_seq: int
    events: list[str]
    created: float | None  # stored time of the last row (the document's creationDate)
    oldest_event: float | None  # stored time of its first EPCIS event (for max_age_s)


class FileSink:
    """Writes the outbox's EPCIS events into `upstream.file.dir`. `run()` until `stop()`."""

    name = "file"

    def __init__(
        self,
        cfg: LineConfig,
        store: Any,
        *,
        page_size: int = 1000,
        poll_interval_s: float = 0.2,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        mapper: epcis.EpcisMapper | None = None,
    ) -> None:
        fc = cfg.upstream.file
        if fc is None:
            raise ValueError("upstream.file is not configured")
        self._setup(cfg, store, Path(fc.dir), fc.max_events, fc.max_age_s, fc.prefix, page_size=page_size, poll_interval_s=poll_interval_s,
                    backoff_initial_s=backoff_initial_s, backoff_max_s=backoff_max_s, mapper=mapper,
                    backlog_alarm=BacklogAlarm(self.name, fc.backlog_alarm_s, "upstream_file_backlog", f"file sink to {fc.dir}"))

    def _setup(
        self, cfg: LineConfig, store: Any, directory: Path, max_events: int, max_age_s: float, prefix: str | None, *, page_size: int,
        poll_interval_s: float, backoff_initial_s: float, backoff_max_s: float, mapper: epcis.EpcisMapper | None, backlog_alarm: BacklogAlarm,
    ) -> None:
        """The state of a sink that cuts the outbox into documents (this one, and linectl.upstream.epcis_xml's), its
        cursor named by `self.name`."""
        self.cfg = cfg
        self.store = store
        self.dir = directory
        self.max_events = max_events
        self.max_age_s = max_age_s
        self.prefix = prefix or cfg.line.name
        self.page_size = page_size
        self.poll_interval_s = poll_interval_s
        self.mapper = mapper or epcis.EpcisMapper.from_config(cfg)
        self.reader = OutboxReader(store, self.name)
        self._backoff = Backoff(backoff_initial_s, backoff_max_s)
        self._stop = asyncio.Event()
        self._retry_now = asyncio.Event()  # stop() or an operator's unpark() cut a backoff wait short
        self._wake = asyncio.Event()
        self._running = False
        self._opened = False
        self._pending: int | None = None
        self.files_written = 0
        self.events_written = 0
        self.last_file: str | None = None
        self.last_error: str | None = None
        self.error_since: float | None = None
        self.backlog: int | None = None
        self._backlog_at = 0.0
        #: age of the oldest row not delivered, looked at every BACKLOG_WATCH_S by its own task (also during an outage)
        self.backlog_age_s: float | None = None
        self.backlog_alarm = backlog_alarm
        #: an operator alarm once per outage (the daemon passes the line's); None: log only
        self.on_alarm: Any = None

    @classmethod
    def from_config(cls, cfg: LineConfig, store: Any, **kw: Any) -> list[FileSink]:
        """The registry's convention (linectl/upstream/sink.py): a list of instances; this key makes one."""
        return [cls(cfg, store, **kw)]

    @staticmethod
    def enabled(cfg: LineConfig) -> bool:
        return cfg.upstream.file is not None

    @staticmethod
    def names(cfg: LineConfig) -> list[str]:
        return ["file"]

    # ---------------------------------------------------------------- public

    def notify(self, *_: Any) -> None:
        self._wake.set()

    def status(self) -> dict[str, Any]:
        return {
            "sink": self.name,
            "dir": str(self.dir),
            "cursor": self.reader.cursor,
            "backlog_rows": self.backlog,
            "backlog_age_s": None if self.backlog_age_s is None else round(self.backlog_age_s, 1),
            "backlog_alarm": self.backlog_alarm.alarmed,
            "files_written": self.files_written,
            "events_written": self.events_written,
            "last_file": self.last_file,
            "last_error": self.last_error,
            "error_since": self.error_since,
        }

    def unpark(self) -> bool:
        """The operator says the cause is fixed (a directory mounted again): try now rather than after the backoff.
        False: nothing was failing."""
        if self.last_error is None:
            return False
        self._backoff.reset()
        self._retry_now.set()
        return True

    def file_name(self, first_seq: int, last_seq: int) -> str:
        return f"{self.prefix}-{first_seq:0{SEQ_DIGITS}d}-{last_seq:0{SEQ_DIGITS}d}.json"

    async def stop(self, timeout: float = 3.0) -> None:
        """Stop after the document being written (if any) is renamed and its cursor recorded (bounded wait)."""
        self._stop.set()
        self._wake.set()
        self._retry_now.set()
        deadline = time.monotonic() + timeout
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def run(self) -> None:
        """Write documents until stop(). Never raises for disk or store trouble: it logs once and retries."""
        self._running = True
        watch = asyncio.create_task(self._watch_backlog(), name=f"{self.name}.backlog")
        try:
            while not self._stop.is_set():
                try:
                    if not self._opened:
                        _, self._pending = await self.reader.open()
                        self._opened = True
                    wait = await self._step()
                    self._recovered()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - ENOSPC, EACCES, a missing dir, a store error: wait, retry
                    first = self.last_error is None
                    self._failed(exc)
                    if first:
                        await self._alarm()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._retry_now.wait(), self._backoff.next_delay())
                    self._retry_now.clear()
                    continue
                if wait is not None:
                    self._wake.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            # the last state published at a clean stop shows what is really left (the count is otherwise at most
            # a second old, and rows stored in that second would show as delivered)
            with contextlib.suppress(Exception):
                self.backlog = await asyncio.to_thread(self.reader.backlog)
            self._running = False

    async def _watch_backlog(self) -> None:
        """The backlog-age alarm (backlog_alarm_s), in a task of its own: a failing delivery waits in its backoff."""
        counted = 0.0
        while True:
            await asyncio.sleep(BACKLOG_WATCH_S)
            try:
                self.backlog_age_s = await asyncio.to_thread(oldest_age_s, self.reader)
                if self.backlog_age_s is not None and time.monotonic() - counted >= BACKLOG_COUNT_S:
                    counted = time.monotonic()
                    self.backlog = await asyncio.to_thread(self.reader.backlog)
                await self.backlog_alarm.check(self.backlog_age_s, self.backlog, self.last_error, self.on_alarm)
            except Exception as exc:  # noqa: BLE001 - a store read failing: the delivery loop reports the store
                log.debug("backlog_watch_failed", sink=self.name, error=str(exc))

    # ---------------------------------------------------------------- one step

    async def _step(self) -> float | None:
        """Write the next document if it is due; returns how long to wait before looking again (None: at once)."""
        if self._pending is not None:  # a document begun before a restart: exactly its rows, under its name
            doc = await asyncio.to_thread(self._collect, self._pending)
            if doc is not None and doc.last_seq == self._pending:
                await self._deliver(doc)
            else:  # its rows are gone (cannot happen while retention follows this cursor): start afresh
                log.warning("file_sink_pending_rows_missing", pending=self._pending, cursor=self.reader.cursor)
                await self.reader.pending(None)
            self._pending = None
            return None
        doc = await asyncio.to_thread(self._collect, None)
        if time.monotonic() - self._backlog_at >= 1.0:  # a count over the rows behind: not once per document
            self._backlog_at = time.monotonic()
            self.backlog = await asyncio.to_thread(self.reader.backlog)
        if doc is None:
            if self.backlog:  # nothing left to collect: count now, so a delivered backlog shows 0 at once
                self.backlog = await asyncio.to_thread(self.reader.backlog)
            return self.poll_interval_s
        if not doc.events:  # only rows without EPCIS events: nothing to write, the cursor moves past them
            await self.reader.advance(doc.last_seq)
            return None
        if len(doc.events) < self.max_events and doc.oldest_event is not None:
            age = time.time() - doc.oldest_event
            if age < self.max_age_s:
                return min(self.poll_interval_s, self.max_age_s - age)
        await self.reader.pending(doc.last_seq)
        self._pending = doc.last_seq
        await self._deliver(doc)
        self._pending = None
        return None

    def _collect(self, until: int | None) -> _Document | None:
        """(worker thread) The next document's rows after the cursor: up to `until` exactly, or up to max_events
        events (whole rows). A leading run of rows without EPCIS events comes back alone (no events) so the cursor
        can pass it without a file."""
        after = self.reader.cursor
        first: int | None = None
        last = after
        events: list[str] = []
        created = oldest = None
        while True:
            rows = self.reader.page(after, self.page_size, learn=False)
            for row in rows:
                if until is not None and row.seq > until:
                    return self._doc(first, last, events, created, oldest)
                encoded, _error = encoded_events(row, self.store, self.mapper)
                if until is None:
                    if encoded and not events and first is not None:
                        return self._doc(first, last, events, created, oldest)  # the event-less run ends here
                    if encoded and events and len(events) + len(encoded) > self.max_events:
                        return self._doc(first, last, events, created, oldest)
                if first is None:
                    first = row.seq
                if encoded and oldest is None:
                    oldest = epoch(row.created_at)
                events.extend(encoded)
                last = row.seq
                created = epoch(row.created_at)
            if len(rows) < self.page_size:
                return self._doc(first, last, events, created, oldest)
            after = rows[-1].seq

    @staticmethod
    def _doc(first: int | None, last: int, events: list[str], created: float | None, oldest: float | None) -> _Document | None:
        if first is None:
            return None
        return _Document(first, last, events, created, oldest)

    async def _deliver(self, doc: _Document) -> None:
        name = self.file_name(doc.first_seq, doc.last_seq)
        if doc.events:
            await asyncio.to_thread(self._write, name, self._document(doc))
            self.files_written += 1
            self.events_written += len(doc.events)
            self.last_file = name
            log.debug("file_sink_written", file=name, events=len(doc.events))
        await self.reader.advance(doc.last_seq)  # also clears the pending delivery
        self._backoff.reset()

    def _document(self, doc: _Document) -> bytes:
        """The EPCISDocument: its bytes depend only on the rows, so a rewrite after a restart is identical."""
        when = datetime.fromtimestamp(doc.created, UTC) if doc.created is not None else None
        full_head = epcis.document_head(when)
        cut = full_head.index('"epcisBody"')
        head = full_head[:cut] + f'"instanceIdentifier":"{doc.first_seq}-{doc.last_seq}",' + full_head[cut:]
        return (head + ",".join(doc.events) + epcis.DOCUMENT_TAIL).encode()

    def _write(self, name: str, payload: bytes) -> None:
        """(worker thread) temp name in the same directory, fsync, rename, fsync the directory."""
        final = self.dir / name
        tmp = self.dir / f".{name}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # ---------------------------------------------------------------- trouble, once

    def _failed(self, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        if reason != self.last_error:
            if isinstance(exc, OSError):
                log.error("file_sink_write_failed", dir=str(self.dir), error=reason, cursor=self.reader.cursor, pending=self._pending)
            else:
                log.exception("file_sink_error", dir=str(self.dir), error=reason)
        if self.error_since is None:
            self.error_since = time.time()
        self.last_error = reason

    async def _alarm(self) -> None:
        """One alarm per outage: an operator must know that documents stopped reaching the transfer directory."""
        if self.on_alarm is None:
            return
        try:
            await self.on_alarm(
                "upstream_file_failed",
                f"file sink cannot write to {self.dir}: {self.last_error}; retrying, nothing is lost (rows wait in the store)",
            )
        except Exception as exc:  # noqa: BLE001 - the alarm is a courtesy; the log line is already written
            log.warning("file_sink_alarm_failed", error=str(exc))

    def _recovered(self) -> None:
        if self.last_error is not None:
            log.info(
                "file_sink_recovered", dir=str(self.dir), cursor=self.reader.cursor, failed_for_s=round(time.time() - (self.error_since or time.time()), 1)
            )
            self.last_error = None
            self.error_since = None
