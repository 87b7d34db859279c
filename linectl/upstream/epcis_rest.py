"""Sink "epcis_rest": the outbox's EPCIS events captured by EPCIS 2.0 repositories over REST (`upstream.epcis_rest`).

One instance per entry of `upstream.epcis_rest` (a list: a site may feed its own repository and a CMO's), each with
its own cursor `epcis_rest:<name>`. The interface is GS1's EPCIS 2.0 OpenAPI (linectl/standards/epcis/rest/openapi.json):

- **Discovery.** At connect (and after every outage) `OPTIONS <url>/capture` gives GS1-EPCIS-Capture-Limit and
  GS1-EPCIS-Capture-File-Size-Limit: documents are cut to the smaller of those and `max_events` / `max_bytes`
  (whole rows: a row's events are never split, except when one row alone is over the limit). A repository that
  announces `proceed` (or `all`) in GS1-Capture-Error-Behaviour is sent `proceed`, else `rollback` (the default).
  A repository without OPTIONS (404/405/501) is used with the configured limits.
- **Capture.** `POST <url>/capture` -> 202 + Location -> the capture job is polled until `running` is false.
  `success: true` delivers the document: the cursor moves (OutboxReader.delivered). Up to `inflight` documents are
  in flight at once, so the repository may capture document n+1 before document n (events carry their own
  eventTime; the EPCIS standard imposes no capture order); `inflight: 1` keeps the outbox order. The cursor itself
  only moves over an unbroken run of confirmed rows. **Catch-up**: with more than 20,000 rows waiting (an outage),
  rows stored from then on go in a live lane ahead of the backlog, so the line's new events arrive within about
  max_age_s while the backlog drains; once the backlog lane reaches where the live lane began they are one again.
  The backlog lane is paced to `catchup_max_rate` events/s (default 10,000): drained unpaced, days of backlog take
  the store's reads and the event loop from the line itself (measured: the line's appends p99 57 ms, max 656 ms at
  36,600 events/s), while 10,000/s still drains a week of a 600 upm line in about 10 minutes.
- **At least once, never a gap.** Before a document is sent the last seq dispatched is recorded as the cursor's
  pending delivery; a restart sends (cursor, pending] again first, cut at exactly that bound, then goes on. The
  repository answers the re-sent events with "already exists", which counts as delivered: a restart costs
  duplicates the repository refuses, never a lost event.
- **Events that exist already** (a re-send after a restart, a dropped answer, a job whose outcome was lost): a job
  error of type ResourceAlreadyExistsException, or a 409 on the capture itself. With `proceed` the repository has
  stored every other event of the document: the document is delivered. With `rollback` it has stored NONE of
  them (all or nothing), so "treat as delivered" would lose the new events of a partly re-sent document: the
  document is sent again without the events the errors name (their eventID in `instance` or `detail`); when the
  errors name none, it is split in halves until the refused part is one event, which then exists and is delivered.
- **Faults.** 400 (the repository says the document is invalid): it would fail forever, so the sink parks: it
  raises an alarm, sends nothing more (the cursor, and so the backlog alarm, stay put) and status() shows the
  document's seq range and the repository's reason. It un-parks on `unpark()` or a restart of the daemon (the
  document is sent again; after a fix on either side it goes through). 401/403: alarm once, retried slowly
  (credentials are read again at each connect, so a rotated secret file is picked up). 413: the part is halved
  and both halves sent; later documents stay at that size. 5xx, timeouts, refused or dropped connections, a job
  that fails or stays running past `job_timeout_s`: retried with capped jittered backoff (the document is sent
  again whole; what the failed attempt stored comes back as "already exists").
- **Alarms**: parked, authentication refused, and the oldest undelivered event older than `backlog_alarm_s`.
  Logged once per state change, not per retry.

Rows without an EPCIS event (alarms, batch states) have no place in an EPCIS document: the cursor passes them.
A row whose rendering failed (`!reason`) is logged and passed over, as in the file sink.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import structlog

from linectl import epcis
from linectl.drivers.base import Backoff
from linectl.upstream.outbox import OutboxReader, encoded_events, epoch

if TYPE_CHECKING:  # pragma: no cover
    from linectl.config import EpcisRestSinkConfig, LineConfig

log = structlog.get_logger("linectl.upstream.epcis_rest")

EPCIS_VERSION = "2.0.0"
ALREADY_EXISTS = "epcisException:ResourceAlreadyExistsException"
_EVENT_ID = re.compile(r'"eventID":"([^"\\]*)"')
#: what a document costs beyond its events: the head (with instanceIdentifier), the tail, a comma per event
_HEAD_ROOM = 400
DELAYS_KEPT = 10_000
CATCHUP_ROWS = 20_000  # rows waiting beyond which new rows take a live lane of their own (about a second of drain)
BACKLOG_COUNT_S = 5.0  # how often status()'s backlog_rows is counted
STOP_GRACE_S = 2.0  # stop(): captures in flight may finish this long  # capture delays kept for status() percentiles


class Outcome(Enum):
    CAPTURED = "captured"
    EXISTS = "exists"  # some events exist already (job errors or a 409); `names` lists those the answer names
    TOO_LARGE = "too_large"
    INVALID = "invalid"
    AUTH = "auth"
    TRANSIENT = "transient"


@dataclass
class Answer:
    outcome: Outcome
    reason: str = ""
    names: set[str] = field(default_factory=set)
    #: EXISTS: the repository stored the part's other events (a `proceed` job); False: it stored none of them
    others_stored: bool = False


@dataclass
class _Document:
    seqs: list[int]  # every row seq the document covers (event-less rows included)
    events: list[str]  # encoded EPCIS events, in outbox order
    oldest_event: float | None  # stored time of its first EPCIS event (max_age_s; delay)
    created: float | None  # stored time of its last row (creationDate)

    @property
    def first_seq(self) -> int:
        return self.seqs[0]

    @property
    def last_seq(self) -> int:
        return self.seqs[-1]


def event_id(encoded: str) -> str | None:
    m = _EVENT_ID.search(encoded)
    return m.group(1) if m else None


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class EpcisRestSink:
    """Delivers the outbox to one EPCIS 2.0 repository (`upstream.epcis_rest[i]`). `run()` until `stop()`."""

    def __init__(
        self,
        cfg: LineConfig,
        store: Any,
        rc: EpcisRestSinkConfig,
        *,
        page_size: int = 2000,
        poll_interval_s: float = 0.2,
        job_poll_s: float = 0.05,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        auth_retry_s: float = 60.0,
        catchup_rows: int = CATCHUP_ROWS,
        mapper: epcis.EpcisMapper | None = None,
    ) -> None:
        self.cfg = cfg
        self.rc = rc
        self.store = store
        self.name = f"epcis_rest:{rc.name}"
        self.base = rc.url.rstrip("/")
        self.page_size = page_size
        self.poll_interval_s = poll_interval_s
        self.job_poll_s = job_poll_s
        self.auth_retry_s = auth_retry_s
        self.mapper = mapper or epcis.EpcisMapper.from_config(cfg)
        self.reader = OutboxReader(store, self.name)
        self._backoff = Backoff(backoff_initial_s, backoff_max_s)
        self._auth_backoff = Backoff(auth_retry_s / 4, auth_retry_s)
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._unpark = asyncio.Event()
        self._confirm_lock = asyncio.Lock()
        self._running = False
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight: dict[int, _Document] = {}  # first_seq -> document being captured
        self._dispatched = 0  # last seq handed to a capture (or passed as event-less)
        self._pending_recorded: int | None = None
        self._restart_bound: int | None = None  # a pending delivery from before a restart: cut documents there
        # rows read past a document, by the seq they follow (the next document of that lane starts with them):
        # each row is read and decoded once
        self._ahead: dict[int, list[Any]] = {}
        self.catchup_rows = catchup_rows
        self._live_from: int | None = None  # catch-up: the live lane takes the rows after this seq
        self._live_dispatched = 0
        # catch-up pacing: backlog events dispatched since the catch-up began, and when it began (monotonic)
        self._paced_events = 0
        self._paced_since: float | None = None
        self._opened = False
        self._discovered = False
        # limits: the config's, capped by the repository's announcement, lowered by a 413
        self.capture_limit: int | None = None
        self.file_size_limit: int | None = None
        self.behaviour = "rollback"
        self.max_events = rc.max_events
        self.max_bytes = rc.max_bytes
        self.repository_version: str | None = None
        # state for status() and alarms
        self.connected = False
        self.last_error: str | None = None
        self.error_since: float | None = None
        self.parked: dict[str, Any] | None = None
        self.auth_failed = False
        self.backlog: int | None = None
        self.backlog_age_s: float | None = None
        self._backlog_at = 0.0
        self._counted_at = 0.0
        self._backlog_alarmed = False
        self.documents_sent = 0
        self.documents_delivered = 0
        self.events_delivered = 0
        self.events_already_there = 0
        self.splits = 0
        self.delays: deque[float] = deque(maxlen=DELAYS_KEPT)  # stored -> confirmed, seconds, per document
        #: an operator alarm (the daemon passes the line's); None: log only
        self.on_alarm: Any = None

    # ---------------------------------------------------------------- registry (linectl/upstream/sink.py)

    @classmethod
    def from_config(cls, cfg: LineConfig, store: Any, **kw: Any) -> list[EpcisRestSink]:
        return [cls(cfg, store, rc, **kw) for rc in cfg.upstream.epcis_rest]

    @staticmethod
    def enabled(cfg: LineConfig) -> bool:
        return bool(cfg.upstream.epcis_rest)

    @staticmethod
    def names(cfg: LineConfig) -> list[str]:
        return [f"epcis_rest:{rc.name}" for rc in cfg.upstream.epcis_rest]

    # ---------------------------------------------------------------- public

    def notify(self, *_: Any) -> None:
        self._wake.set()

    def unpark(self) -> bool:
        """The operator says the cause of a parked document is fixed: send it again. False when nothing is parked."""
        if self.parked is None:
            return False
        log.info("epcis_rest_unparked", sink=self.name, **{k: v for k, v in self.parked.items() if k != "since"})
        self._unpark.set()
        return True

    def status(self) -> dict[str, Any]:
        delays = list(self.delays)
        return {
            "sink": self.name,
            "url": self.base,
            "connected": self.connected,
            "cursor": self.reader.cursor,
            "backlog_rows": self.backlog,
            "backlog_age_s": None if self.backlog_age_s is None else round(self.backlog_age_s, 1),
            "last_error": self.last_error,
            "error_since": self.error_since,
            "parked": self.parked,
            "limits": {
                "events": self.max_events, "bytes": self.max_bytes,
                "repository_events": self.capture_limit, "repository_bytes": self.file_size_limit,
                "error_behaviour": self.behaviour,
            },
            "jobs_in_flight": len(self._inflight),
            "catching_up": self._live_from is not None,
            "documents_sent": self.documents_sent,
            "documents_delivered": self.documents_delivered,
            "events_delivered": self.events_delivered,
            "events_already_there": self.events_already_there,
            "delay_p50_s": _percentile(delays, 0.5),
            "delay_p99_s": _percentile(delays, 0.99),
        }

    async def stop(self, timeout: float = 3.0) -> None:
        """Stop sending; captures in flight get until `timeout` to be confirmed (and their cursor recorded)."""
        self._stop.set()
        self._wake.set()
        self._slot_free.set()
        deadline = time.monotonic() + timeout
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def run(self) -> None:
        """Deliver until stop(). Never raises for trouble on the repository's side: it alarms, backs off, retries."""
        self._running = True
        try:
            await self._dispatch()
        except asyncio.CancelledError:
            if not self._stop.is_set():
                raise
        finally:
            # captures already sent get a moment to be confirmed (their cursor recorded); the rest go again after a restart
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=STOP_GRACE_S)
            for t in list(self._tasks):
                t.cancel()
            for t in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            if self._client is not None:
                with contextlib.suppress(Exception):
                    await self._client.aclose()
                self._client = None
            with contextlib.suppress(Exception):  # the last state published at a clean stop: what is really left
                self.backlog = await asyncio.to_thread(self.reader.backlog)
            self._running = False

    # ---------------------------------------------------------------- the dispatcher

    async def _dispatch(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._opened:
                    cursor, pending = await self.reader.open()
                    self._dispatched = cursor
                    self._restart_bound = pending if pending is not None and pending > cursor else None
                    self._pending_recorded = pending
                    self._opened = True
                await self._watch_backlog()  # also while the repository is away: that is when it matters
                if not self._discovered and not self._inflight:
                    if not await self._discover():
                        continue
                wait = await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a store error: wait, retry (the sink never dies of it)
                self._trouble(f"{type(exc).__name__}: {exc}", exc)
                await self._sleep(self._backoff.next_delay())
                continue
            if wait is not None:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)

    async def _step(self) -> float | None:
        """Start the next capture if one is due and a slot is free; returns how long to wait (None: look again now).

        Catch-up: when more than `catchup_rows` rows wait, the rows stored from then on go in a live lane of their
        own, ahead of the backlog, so what the line makes now reaches the repository in about max_age_s however long
        the backlog takes; the backlog lane drains up to where the live lane began, then the two are one again."""
        if self.parked is not None or (self._inflight and not self.connected):
            return self.poll_interval_s  # parked: nothing more goes; an outage: only the documents in flight retry
        if len(self._inflight) >= self.rc.inflight:
            self._slot_free.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._slot_free.wait(), self.poll_interval_s)
            return None
        if self._live_from is None and self._restart_bound is None:
            last = int(await asyncio.to_thread(self.store.last_seq))
            if last - self._dispatched > self.catchup_rows:
                self._live_from = self._live_dispatched = last
                self._paced_events, self._paced_since = 0, time.monotonic()
                log.info("epcis_rest_catch_up", sink=self.name, backlog_rows=last - self._dispatched, live_from=last)
        if self._live_from is None:
            return await self._offer(await asyncio.to_thread(self._collect, self._dispatched, self._restart_bound), "main")
        wait = await self._offer(await asyncio.to_thread(self._collect, self._live_dispatched, None), "live")
        if wait is None:
            return None
        if self._dispatched >= self._live_from:  # the backlog is all dispatched: one lane again, from the live one's end
            log.info("epcis_rest_caught_up", sink=self.name, live_from=self._live_from, cursor=self.reader.cursor)
            self._dispatched, self._live_from = self._live_dispatched, None
            return None
        ahead = self._pace_ahead()
        if ahead > 0:  # the backlog lane is ahead of catchup_max_rate: only the live lane goes meanwhile
            return min(wait, ahead)
        doc = await asyncio.to_thread(self._collect, self._dispatched, self._live_from)
        backlog = await self._offer(doc, "backlog")
        if backlog is None and doc is not None:
            self._paced_events += len(doc.events)
        return None if backlog is None else min(wait, backlog)

    def _pace_ahead(self) -> float:
        """Seconds the backlog lane is ahead of `catchup_max_rate` (0 or less: it may send its next document)."""
        rate = self.rc.catchup_max_rate
        if rate is None or self._paced_since is None:
            return 0.0
        return self._paced_events / rate - (time.monotonic() - self._paced_since)

    async def _offer(self, doc: _Document | None, lane: str) -> float | None:
        """Dispatch `doc` (read for `lane`) if it is due: None when dispatched (or passed), else how long to wait."""
        if doc is None:
            return self.poll_interval_s
        if self.parked is not None or self._stop.is_set():  # parked while the rows were read: it waits (read again later)
            return self.poll_interval_s
        live = lane == "live"
        if not doc.events:  # only rows without EPCIS events: the cursor passes them once the rows before are confirmed
            self._advance_lane(live, doc.last_seq)
            await self._confirm(doc)
            return None
        # rows up to a bound all exist already: such a document never waits for more
        bounded = lane == "backlog" or (lane == "main" and self._restart_bound is not None)
        if not bounded and len(doc.events) < self.max_events and doc.oldest_event is not None:
            age = time.time() - doc.oldest_event
            if age < self.rc.max_age_s:
                return min(self.poll_interval_s, self.rc.max_age_s - age)
        if lane == "main" and self._restart_bound is not None and doc.last_seq >= self._restart_bound:
            log.info("epcis_rest_resent_pending", sink=self.name, cursor=self.reader.cursor, pending=self._restart_bound)
            self._restart_bound = None
        if self._pending_recorded is None or doc.last_seq > self._pending_recorded:
            await self.reader.pending(doc.last_seq)  # before sending: a restart sends exactly up to here again
            self._pending_recorded = doc.last_seq
        self._advance_lane(live, doc.last_seq)
        self._inflight[doc.first_seq] = doc
        task = asyncio.create_task(self._deliver(doc), name=f"{self.name}:{doc.first_seq}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return None

    def _advance_lane(self, live: bool, seq: int) -> None:
        if live:
            self._live_dispatched = seq
        else:
            self._dispatched = seq

    def _collect(self, after: int, until: int | None) -> _Document | None:
        """(worker thread) The next document's rows after `after`: whole rows up to the event and byte limits (or
        up to `until` at most). A leading run of rows without EPCIS events comes back alone, without events."""
        seqs: list[int] = []
        events: list[str] = []
        size = _HEAD_ROOM
        oldest = created = None
        while True:
            kept = self._ahead.pop(after, None)
            if kept:
                rows = kept
                full = True  # rows follow beyond the ones kept: look again once these are used
            else:
                rows = self.reader.page(after, self.page_size)
                full = len(rows) >= self.page_size
            for i, row in enumerate(rows):
                stop = until is not None and row.seq > until
                encoded: list[str] = []
                if not stop:
                    encoded, _error = encoded_events(row, self.store, self.mapper)
                    grow = sum(len(e) + 1 for e in encoded)
                    stop = bool(encoded) and bool(seqs) and (
                        not events  # the event-less run ends here
                        or len(events) + len(encoded) > self.max_events or size + grow > self.max_bytes
                    )
                if stop:
                    if len(self._ahead) >= 2:  # one per lane
                        self._ahead.clear()
                    self._ahead[seqs[-1] if seqs else after] = rows[i:]
                    return self._doc(seqs, events, oldest, created)
                seqs.append(row.seq)
                if encoded and oldest is None:
                    oldest = epoch(row.created_at)
                events.extend(encoded)
                size += grow
                created = row.created_at  # made epoch seconds once, for the document's last row
            if not full:
                return self._doc(seqs, events, oldest, created)
            after = rows[-1].seq

    @staticmethod
    def _doc(seqs: list[int], events: list[str], oldest: float | None, created: Any) -> _Document | None:
        return _Document(seqs, events, oldest, epoch(created)) if seqs else None

    async def _confirm(self, doc: _Document) -> None:
        async with self._confirm_lock:  # delivered() walks `held` across awaits: one at a time
            await self.reader.delivered(doc.seqs)

    # ---------------------------------------------------------------- one document, until it is captured

    async def _deliver(self, doc: _Document) -> None:
        try:
            parts: list[list[str]] = [doc.events]
            while parts:
                part = parts.pop()
                if len(part) > self.max_events:  # a 413 lowered the size since this part was cut: cut it again
                    n = self.max_events
                    parts += [part[i : i + n] for i in range(0, len(part), n)][::-1]
                    continue
                answer = await self._capture_until_answered(doc, part)
                if answer.outcome is Outcome.CAPTURED:
                    self.events_delivered += len(part)
                    continue
                if answer.outcome is Outcome.EXISTS:
                    parts += self._after_exists(part, answer)
                    continue
                # TOO_LARGE
                if len(part) == 1:
                    await self._park(doc, f"one event is larger than the repository takes: {answer.reason}")
                    parts.append(part)
                    continue
                half = len(part) // 2
                self.max_events = max(1, min(self.max_events, half))
                self.splits += 1
                log.warning("epcis_rest_document_too_large", sink=self.name, events=len(part), now_max_events=self.max_events, reason=answer.reason)
                parts += [part[half:], part[:half]]
            while True:  # captured: the cursor must learn it, or the rows stay behind it until a restart
                try:
                    await self._confirm(doc)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the store refused the cursor write: retry (a restart re-sends)
                    self._trouble(f"cursor not recorded: {type(exc).__name__}: {exc}", exc)
                    await self._sleep(self._backoff.next_delay())
            self.documents_delivered += 1
            if doc.oldest_event is not None:
                self.delays.append(max(0.0, time.time() - doc.oldest_event))
        finally:
            self._inflight.pop(doc.first_seq, None)
            self._slot_free.set()
            self._wake.set()

    def _after_exists(self, part: list[str], answer: Answer) -> list[list[str]]:
        """What is left to send of a part some of whose events exist already (see the module's docstring)."""
        if answer.others_stored:
            self.events_already_there += len(answer.names)
            self.events_delivered += len(part) - len(answer.names)
            return []  # a proceed job: the repository stored every other event of the part
        if answer.names:
            rest = [e for e in part if event_id(e) not in answer.names]
            there = len(part) - len(rest)
            if there:
                self.events_already_there += there
                return [rest] if rest else []
        if len(part) == 1:
            self.events_already_there += 1
            return []
        half = len(part) // 2
        self.splits += 1
        return [part[half:], part[:half]]

    async def _capture_until_answered(self, doc: _Document, part: list[str]) -> Answer:
        """Send `part` until the repository gives a final answer; transient trouble and auth refusals are waited out."""
        while True:
            try:
                answer = await self._capture(doc, part)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - refused/dropped connections, timeouts, TLS, a missing secret: retry
                answer = Answer(Outcome.TRANSIENT, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            if answer.outcome is Outcome.TRANSIENT:
                self._trouble(answer.reason)
                await self._sleep(self._backoff.next_delay())
                continue
            if answer.outcome is Outcome.AUTH:
                await self._auth_refused(answer.reason)
                await self._sleep(self._auth_backoff.next_delay())
                self._reset_client()  # credentials are read again
                continue
            if answer.outcome is Outcome.INVALID:
                await self._park(doc, answer.reason)
                continue
            self._healthy()
            return answer

    async def _capture(self, doc: _Document, part: list[str]) -> Answer:
        client = self._http()
        body = self._document(doc, part)
        self.documents_sent += 1
        resp = await client.post(
            f"{self.base}/capture", content=body,
            headers={"Content-Type": "application/json", "GS1-EPCIS-Version": EPCIS_VERSION, "GS1-Capture-Error-Behaviour": self.behaviour},
        )
        if resp.status_code == 202:
            location = resp.headers.get("Location")
            if not location:
                return Answer(Outcome.TRANSIENT, "202 without Location (no capture job to follow)")
            return await self._follow_job(str(resp.url.join(location)))
        return self._refusal(resp, part)

    async def _follow_job(self, url: str) -> Answer:
        client = self._http()
        deadline = time.monotonic() + self.rc.job_timeout_s
        delay = 0.0
        while True:
            if delay:
                await asyncio.sleep(delay)
            resp = await client.get(url)
            if resp.status_code != 200:
                refusal = self._refusal(resp, [])
                if refusal.outcome in (Outcome.AUTH, Outcome.TRANSIENT):
                    return refusal
                return Answer(Outcome.TRANSIENT, f"capture job {url}: HTTP {resp.status_code}")
            job = self._json(resp)
            if not isinstance(job, dict) or not isinstance(job.get("running"), bool):
                return Answer(Outcome.TRANSIENT, f"capture job {url}: not a capture job document")
            if not job["running"]:
                break
            if time.monotonic() > deadline:
                return Answer(Outcome.TRANSIENT, f"capture job {url} still running after {self.rc.job_timeout_s:g}s")
            delay = min(max(self.job_poll_s, delay * 2), self.poll_interval_s * 5)
        if job.get("success") is True:
            return Answer(Outcome.CAPTURED)
        errors = [e for e in job.get("errors") or [] if isinstance(e, dict)]
        if errors and all(e.get("type") == ALREADY_EXISTS for e in errors):
            names = {str(e.get("instance")) for e in errors if e.get("instance")}
            return Answer(Outcome.EXISTS, "events already captured", names, others_stored=job.get("captureErrorBehaviour") == "proceed")
        first = errors[0] if errors else {}
        reason = f"capture job failed: {first.get('type', 'no errors given')}: {first.get('detail') or first.get('title') or ''}".rstrip(": ")
        if any(str(e.get("type", "")).endswith("ValidationException") for e in errors):
            return Answer(Outcome.INVALID, reason)
        return Answer(Outcome.TRANSIENT, reason)  # an implementation exception: send again (what it stored exists)

    def _refusal(self, resp: httpx.Response, part: list[str]) -> Answer:
        status = resp.status_code
        detail = self._problem_text(resp)
        reason = f"HTTP {status}" + (f": {detail}" if detail else "")
        if status == 409:
            names = {eid for eid in map(event_id, part) if eid and eid in detail}
            return Answer(Outcome.EXISTS, reason, names)
        if status == 413:
            return Answer(Outcome.TOO_LARGE, reason)
        if status == 400:
            return Answer(Outcome.INVALID, reason)
        if status in (401, 403):
            return Answer(Outcome.AUTH, reason)
        if 400 <= status < 500 and status not in (408, 429):
            return Answer(Outcome.AUTH, reason)  # 404 (a wrong url), 415, ...: the configuration is wrong; retried slowly
        return Answer(Outcome.TRANSIENT, reason)

    @staticmethod
    def _json(resp: httpx.Response) -> Any:
        try:
            return resp.json()
        except ValueError:
            return None

    def _problem_text(self, resp: httpx.Response) -> str:
        """An RFC 7807 problem's title and detail; the start of anything else (an HTML error page)."""
        if "json" in resp.headers.get("Content-Type", ""):
            p = self._json(resp)
            if isinstance(p, dict):
                return " - ".join(str(p[k]) for k in ("type", "title", "detail") if p.get(k))[:2000]
        text = resp.text.strip()
        return (f"{resp.headers.get('Content-Type', 'no content type')}: {text[:120]}") if text else ""

    def _document(self, doc: _Document, part: list[str]) -> bytes:
        when = datetime.fromtimestamp(doc.created, UTC) if doc.created is not None else None
        full_head = epcis.document_head(when)
        cut = full_head.index('"epcisBody"')
        head = full_head[:cut] + f'"instanceIdentifier":"{doc.first_seq}-{doc.last_seq}",' + full_head[cut:]
        return (head + ",".join(part) + epcis.DOCUMENT_TAIL).encode()

    # ---------------------------------------------------------------- connection and discovery

    def _secret(self) -> str:
        rc = self.rc
        if rc.secret_env is not None:
            value = os.environ.get(rc.secret_env)
            if not value:
                raise RuntimeError(f"environment variable {rc.secret_env} (the {rc.auth} secret) is not set")
            return value
        assert rc.secret_file is not None
        try:
            return Path(rc.secret_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise RuntimeError(f"cannot read the {rc.auth} secret from {rc.secret_file}: {exc.strerror}") from None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            rc = self.rc
            headers = {}
            if rc.auth == "basic":
                headers["Authorization"] = "Basic " + base64.b64encode(f"{rc.username}:{self._secret()}".encode()).decode()
            elif rc.auth == "bearer":
                headers["Authorization"] = f"Bearer {self._secret()}"
            verify: ssl.SSLContext | bool = True
            if rc.url.startswith("https://"):
                ctx = ssl.create_default_context(cafile=rc.ca_file)
                if rc.client_cert:
                    ctx.load_cert_chain(rc.client_cert, rc.client_key)
                verify = ctx
            self._client = httpx.AsyncClient(
                headers=headers, verify=verify, timeout=httpx.Timeout(rc.timeout_s),
                limits=httpx.Limits(max_connections=rc.inflight * 2 + 1, max_keepalive_connections=rc.inflight * 2 + 1),
            )
        return self._client

    def _reset_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            task = asyncio.create_task(client.aclose())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _discover(self) -> bool:
        """OPTIONS <url>/capture: the repository's limits and error behaviours. False: wait and try again."""
        try:
            resp = await self._http().options(f"{self.base}/capture")
        except (httpx.HTTPError, RuntimeError, OSError, ssl.SSLError) as exc:
            self._trouble(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            self._reset_client()
            await self._sleep(self._backoff.next_delay())
            return False
        if resp.status_code in (401, 403):
            await self._auth_refused(f"HTTP {resp.status_code}: {self._problem_text(resp)}")
            self._reset_client()
            await self._sleep(self._auth_backoff.next_delay())
            return False
        if resp.status_code >= 500:
            self._trouble(f"OPTIONS /capture: HTTP {resp.status_code}: {self._problem_text(resp)}")
            await self._sleep(self._backoff.next_delay())
            return False
        h = resp.headers
        self.capture_limit = self._int_header(h.get("GS1-EPCIS-Capture-Limit"))
        self.file_size_limit = self._int_header(h.get("GS1-EPCIS-Capture-File-Size-Limit"))
        self.max_events = min(self.max_events, self.capture_limit or self.max_events)
        self.max_bytes = min(self.max_bytes, self.file_size_limit or self.max_bytes)
        announced = (h.get("GS1-Capture-Error-Behaviour") or "rollback").lower()
        self.behaviour = "proceed" if ("proceed" in announced or "all" in announced) else "rollback"
        self.repository_version = h.get("GS1-EPCIS-Version")
        if resp.status_code >= 400:
            log.warning("epcis_rest_no_discovery", sink=self.name, status=resp.status_code, max_events=self.max_events, max_bytes=self.max_bytes)
        else:
            log.info("epcis_rest_discovered", sink=self.name, url=self.base, capture_limit=self.capture_limit, file_size_limit=self.file_size_limit,
                     behaviour=self.behaviour, epcis_version=self.repository_version, max_events=self.max_events, max_bytes=self.max_bytes)
        self._discovered = True
        self._healthy()
        return True

    @staticmethod
    def _int_header(value: str | None) -> int | None:
        try:
            n = int(value) if value is not None else None
        except ValueError:
            return None
        return n if n is not None and n > 0 else None

    # ---------------------------------------------------------------- state changes, logged and alarmed once

    def _trouble(self, reason: str, exc: BaseException | None = None) -> None:
        if reason != self.last_error:
            if exc is not None:
                log.error("epcis_rest_error", sink=self.name, error=reason, exc_info=exc)
            else:
                log.warning("epcis_rest_unreachable", sink=self.name, url=self.base, error=reason, cursor=self.reader.cursor)
        if self.error_since is None:
            self.error_since = time.time()
        self.last_error = reason
        self.connected = False
        self._discovered = False

    def _healthy(self) -> None:
        if self.last_error is not None:
            log.info("epcis_rest_recovered", sink=self.name, url=self.base, cursor=self.reader.cursor,
                     failed_for_s=round(time.time() - (self.error_since or time.time()), 1))
        self.last_error = None
        self.error_since = None
        self.connected = True
        self.auth_failed = False
        self._backoff.reset()
        self._auth_backoff.reset()

    async def _auth_refused(self, reason: str) -> None:
        first = not self.auth_failed
        self._trouble(reason)
        self.auth_failed = True
        if first:
            await self._alarm("upstream_epcis_rest_auth", f"EPCIS repository {self.base} ({self.name}) refuses the sink: {reason}; "
                              f"check the credentials; retrying every {self.auth_retry_s:g}s, nothing is lost (rows wait in the store)")

    async def _park(self, doc: _Document, reason: str) -> None:
        """A document the repository refuses for good: alarm, send nothing more, wait for unpark() or a restart."""
        self.parked = {"first_seq": doc.first_seq, "last_seq": doc.last_seq, "events": len(doc.events), "reason": reason, "since": time.time()}
        log.error("epcis_rest_parked", sink=self.name, first_seq=doc.first_seq, last_seq=doc.last_seq, reason=reason)
        await self._alarm("upstream_epcis_rest_parked", f"EPCIS repository {self.base} ({self.name}) refuses outbox rows {doc.first_seq}-{doc.last_seq}: "
                          f"{reason}; delivery to it is stopped until this is fixed and the sink un-parked or the daemon restarted")
        self._unpark.clear()
        stop = asyncio.ensure_future(self._stop.wait())
        unpark = asyncio.ensure_future(self._unpark.wait())
        try:
            await asyncio.wait({stop, unpark}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            unpark.cancel()
        if self._stop.is_set():
            raise asyncio.CancelledError
        self.parked = None

    async def _watch_backlog(self) -> None:
        """Every second at most: the age of the oldest row behind; alarm once when it passes backlog_alarm_s. The
        count of rows behind (a scan of them: ~50 ms for a million) every BACKLOG_COUNT_S only."""
        now = time.monotonic()
        if now - self._backlog_at < 1.0:
            return
        self._backlog_at = now
        if now - self._counted_at >= BACKLOG_COUNT_S or self.backlog is None:
            self._counted_at = now
            self.backlog = await asyncio.to_thread(self.reader.backlog)
        oldest = await asyncio.to_thread(self.reader.oldest_undelivered)
        created = epoch(oldest.created_at) if oldest is not None else None
        self.backlog_age_s = max(0.0, time.time() - created) if created is not None else None
        late = self.backlog_age_s is not None and self.backlog_age_s > self.rc.backlog_alarm_s
        if late and not self._backlog_alarmed:
            self._backlog_alarmed = True
            log.error("epcis_rest_backlog_late", sink=self.name, backlog_rows=self.backlog, oldest_age_s=round(self.backlog_age_s or 0.0, 1))
            await self._alarm("upstream_epcis_rest_backlog", f"EPCIS repository {self.base} ({self.name}): {self.backlog} rows wait, the oldest since "
                              f"{self.backlog_age_s:.0f}s (> backlog_alarm_s {self.rc.backlog_alarm_s:g}s); last error: {self.last_error or 'none'}")
        elif not late and self._backlog_alarmed:
            self._backlog_alarmed = False
            log.info("epcis_rest_backlog_caught_up", sink=self.name, backlog_rows=self.backlog)

    async def _alarm(self, code: str, message: str) -> None:
        if self.on_alarm is None:
            return
        try:
            await self.on_alarm(code, message)
        except Exception as exc:  # noqa: BLE001 - the alarm is a courtesy; the log line is already written
            log.warning("epcis_rest_alarm_failed", sink=self.name, error=str(exc))

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        if self._stop.is_set():
            raise asyncio.CancelledError

