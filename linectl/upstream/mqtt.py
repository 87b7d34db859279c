"""Outbox -> MQTT: every stored event reaches upstream at least once, in order, after any outage.

The SQLite outbox is the only buffer. A row is marked forwarded only after the
broker's PUBACK for the message that carries it and for every message
published before it (confirm="puback"), or only after the upstream consumer
confirms it on <root>/confirm (confirm="upstream"). So a crash, a dead broker
or a cut cable can cause a duplicate upstream (same eventID), never a gap.
Sessions are clean: after every (re)connect the forwarder starts again from
the first outbox row that is neither marked nor acknowledged; nothing relies
on a broker or client session surviving.

Custody: a PUBACK means the broker has the message. A broker that is killed
before it delivers (or a non-persistent subscriber) can still lose it; only
confirm="upstream" closes that gap (the consumer confirms
{"ranges": [[first_seq, last_seq], ...]} once it has stored a message, and an
unconfirmed message is sent again after confirm_timeout_s). The mode and timeout
come from mqtt.delivery_confirm and mqtt.confirm_timeout_s unless given here.

Topics (root = mqtt.topic_root or <enterprise>/<site>/<area>/<line>):
  <root>/events   EPCISDocument (EPCIS 2.0 JSON-LD), many events per message
  <root>/alarms   one JSON object per AlarmRaised / AlarmAcknowledged row
  <root>/records  one JSON object per other row (batch state, challenge results,
                  serials returned, an SSCC voided before it was commissioned...)
All QoS 1, not retained. Every message names its outbox seq range: MQTT 5 user
properties first_seq/last_seq, the document's instanceIdentifier "first-last",
`seq` (= `first_seq` = `last_seq`) in alarm/record payloads; an event's own unit
sequence travels there as `unit_seq`, never as `seq`. Non-EPCIS rows travel in the same ordered
stream as the EPCIS ones, so "forwarded" means the same thing for every row.

Ordering. Messages are built from consecutive outbox rows in seq order and
published in that order over one connection, so a subscriber sees them in seq
order. Catch-up: when a (re)connect finds more than `catchup_threshold`
unforwarded rows, the forwarder freezes the boundary S = last seq at that
moment and runs two lanes over the same bounded window of unacknowledged
messages: the backlog lane (rows <= S, oldest first) and the live lane
(rows > S). A ready live message always goes first, so a live event waits for
at most one window slot (one document round-trip), not for the backlog.
Guarantee, exactly: within each lane rows are published in seq order; a live
row (> S) may arrive before older backlog rows (<= S), also of the same lot;
rows are never marked out of publish order; eventTime, eventID and the seq
range let a consumer that needs strict order restore it. Below the threshold
(the normal case, and any short outage) there is one lane and strict seq
order. `catchup_threshold=None` keeps strict order always, at the price of a
live delay equal to the drain time. The backlog lane is paced
(`catchup_max_rate` rows/s) so that draining days of backlog never slows the
line itself, which shares this process and the store's single writer.

Sink "mqtt" (linectl.upstream.sink): its cursor in sink_cursors is the last seq of the unbroken run of rows
acknowledged (puback) or confirmed (upstream); rows acknowledged beyond it (catch-up lanes) wait in the
OutboxReader, not resent while the forwarder runs. Connection plumbing (AckingClient, options, reconnect
loop) is linectl.upstream.mqtt_client, shared with the command bridge.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import signal
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from linectl import epcis
from linectl.drivers.base import Backoff
from linectl.events import AlarmAcknowledged, AlarmRaised
from linectl.upstream.mqtt_client import (
    AckingClient,
    PublishRefused,
    client_options,
    default_client_id,
    reconnect_loop,
    track_link,
)
from linectl.upstream.outbox import BacklogAlarm, OutboxReader, encoded_events, epoch

if TYPE_CHECKING:  # pragma: no cover
    from linectl.config import LineConfig

log = structlog.get_logger("linectl.forwarder")

ALARM_KINDS = frozenset({AlarmRaised.model_fields["kind"].default, AlarmAcknowledged.model_fields["kind"].default})


# --------------------------------------------------------------------------- messages and lanes


@dataclass
class _Message:
    topic: str
    payload: bytes
    lane: str
    first_seq: int
    last_seq: int
    seqs: list[int]  # rows completed by this message (a row split over several documents rides on its last one)
    events: int


@dataclass
class _Lane:
    name: str
    cursor: int  # last seq read
    end: int | None  # inclusive upper bound (backlog lane) or None (follows the outbox)
    queue: asyncio.Queue[_Message]
    done: bool = False


class _SessionEnd(Exception):
    """Leave the current connection and reconnect (reason in args[0])."""


# --------------------------------------------------------------------------- forwarder


class Forwarder:
    """Publishes the outbox to MQTT. `run()` is the whole life: connect, forward, reconnect, until `stop()`.

    The upstream sink registered as "mqtt" (config key `mqtt`, enabled by mqtt.enabled)."""

    name = "mqtt"

    def __init__(
        self,
        cfg: LineConfig,
        store: Any,
        *,
        client_id: str | None = None,
        max_inflight: int = 20,
        page_size: int = 500,
        catchup_max_rate: float | None = 10_000.0,
        catchup_threshold: int | None = 20_000,
        poll_interval_s: float = 0.05,
        ack_timeout_s: float = 30.0,
        stats_interval_s: float = 1.0,
        max_unmarked: int = 20_000,
        mark_chunk: int = 1000,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 10.0,
        mapper: epcis.EpcisMapper | None = None,
        confirm: str | None = None,
        confirm_timeout_s: float | None = None,
        max_unconfirmed: int | None = None,
    ) -> None:
        # default: mqtt.delivery_confirm / mqtt.confirm_timeout_s, so the daemon and the side-car follow the config
        confirm = confirm or cfg.mqtt.delivery_confirm
        confirm_timeout_s = cfg.mqtt.confirm_timeout_s if confirm_timeout_s is None else confirm_timeout_s
        if confirm not in ("puback", "upstream"):
            raise ValueError("confirm must be 'puback' or 'upstream'")
        self.cfg = cfg
        self.mqtt = cfg.mqtt
        self.store = store
        self.reader = OutboxReader(store, self.name)
        self._opened = False
        # called only for the backlog-age alarm (mqtt.backlog_alarm_s): a broker outage as such is shown on the state
        # topic (connected, last_error, backlog), as it always was
        self.on_alarm: Any = None
        self.backlog_alarm = BacklogAlarm(self.name, cfg.mqtt.backlog_alarm_s, "upstream_mqtt_backlog", f"MQTT broker {cfg.mqtt.host}:{cfg.mqtt.port}")
        self.root = cfg.topic_root
        self.client_id = client_id or f"{cfg.mqtt.client_id or default_client_id(cfg)}-fwd"
        self.mapper = mapper or epcis.EpcisMapper.from_config(cfg)
        self.max_inflight = max_inflight
        # Small pages: reading and decoding a page holds the GIL in long C calls, which the line's event
        # loop and the store writer (same process) feel as latency.
        self.page_size = page_size
        # The backlog lane is paced (rows/s) so a catch-up leaves CPU to the line: it shares the process,
        # the GIL and the store writer with the engine (measured on 2 CPUs: unpaced, the line's appends
        # reached p99 ~100-350 ms during a 1M-row catch-up). None = as fast as possible.
        self.catchup_max_rate = catchup_max_rate
        self.catchup_threshold = catchup_threshold
        self.poll_interval_s = poll_interval_s
        self.ack_timeout_s = ack_timeout_s
        self.stats_interval_s = stats_interval_s
        self.max_unmarked = max_unmarked
        # The store has one writer for everything: the line's own appends queue behind whatever we
        # submit. Marks go in small operations, one at a time, so an append never waits behind a big one.
        self.mark_chunk = mark_chunk
        self.max_events = cfg.mqtt.max_events_per_message
        self.max_bytes = cfg.mqtt.max_bytes_per_message
        self.v5 = cfg.mqtt.protocol == "5"
        self._backoff = Backoff(backoff_initial_s, backoff_max_s)
        self.topic_events = f"{self.root}/events"
        self.topic_alarms = f"{self.root}/alarms"
        self.topic_records = f"{self.root}/records"
        self.topic_confirm = f"{self.root}/confirm"
        self.confirm = confirm
        self.confirm_timeout_s = confirm_timeout_s
        # upstream mode: acknowledged but unconfirmed messages, bounded so a slow consumer slows the
        # forwarder down instead of letting confirmations fall behind the timeout (go-back-N livelock)
        self.max_unconfirmed = max_unconfirmed or 4 * max_inflight
        # upstream mode: acknowledged messages waiting for the consumer's confirmation, oldest first; by seq range
        # a list, since the parts of one split row share the range (first, last) = (row, row)
        self._awaiting: collections.OrderedDict[int, list[Any]] = collections.OrderedDict()  # id -> [msg, t, confirmed]
        self._awaiting_by_range: dict[tuple[int, int], collections.deque[int]] = {}
        self._awaiting_ids = 0
        self._awaiting_rows = 0

        self._stop = asyncio.Event()
        self._wake_live = asyncio.Event()
        self._ready = asyncio.Event()
        self._lanes: list[_Lane] = []
        self._mark_pending: list[int] = []
        self._unmarked_acked: set[int] = set()
        self._mark_event = asyncio.Event()
        self._connected = False
        self._connected_since: float | None = None
        self._last_error: str | None = None
        self._inflight = 0
        self.forwarded_rows = 0
        self.published_messages = 0
        self.published_events = 0
        self.last_ack_at: float | None = None
        self.backlog: int | None = None
        self.oldest_age_s: float | None = None
        self.catch_up: dict[str, Any] | None = None
        self._running = False

    @classmethod
    def from_config(cls, cfg: LineConfig, store: Any, **kw: Any) -> list[Forwarder]:
        """The registry's convention (linectl/upstream/sink.py): a list of instances; this key makes one."""
        return [cls(cfg, store, **kw)]

    @staticmethod
    def enabled(cfg: LineConfig) -> bool:
        return cfg.mqtt.enabled

    @staticmethod
    def names(cfg: LineConfig) -> list[str]:
        return ["mqtt"]

    # ---------------------------------------------------------------- public

    def notify(self, *_: Any) -> None:
        """Rows were appended: look at the outbox now rather than at the next poll."""
        self._wake_live.set()

    def unpark(self) -> bool:
        """Never parked: the forwarder reconnects to the broker by itself."""
        return False

    def status(self) -> dict[str, Any]:
        """For the retained state topic: backlog in rows, ages in seconds, times in epoch seconds."""
        return {
            "sink": self.name,
            "cursor": self.reader.cursor,
            "confirm": self.confirm,
            "awaiting_confirmation_rows": self._awaiting_rows,
            "connected": self._connected,
            "connected_since": self._connected_since,
            "last_error": self._last_error,
            "backlog_rows": self.backlog,
            "oldest_unforwarded_age_s": None if self.oldest_age_s is None else round(self.oldest_age_s, 3),
            "backlog_alarm": self.backlog_alarm.alarmed,
            "forwarded_rows": self.forwarded_rows,
            "published_messages": self.published_messages,
            "inflight_messages": self._inflight,
            "last_ack_at": self.last_ack_at,
            "mode": "catch_up" if self.catch_up else "normal",
            "catch_up": dict(self.catch_up) if self.catch_up else None,
        }

    def acknowledged_unmarked(self) -> set[int]:
        """Seqs acknowledged (or confirmed) whose cursor has not durably passed them yet."""
        return self._unmarked_acked | self.reader.held

    async def stop(self, timeout: float = 3.0) -> None:
        """Stop publishing, wait (bounded) for outstanding acks and record them as forwarded."""
        self._stop.set()
        self._ready.set()
        deadline = time.monotonic() + timeout
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def run(self) -> None:
        """Forward until stop() or cancellation. Never raises for broker/network trouble; it reconnects."""
        self._running = True
        marker = asyncio.create_task(self._marker(), name="forwarder.marker")
        stats = asyncio.create_task(self._stats_loop(), name="forwarder.stats")
        try:
            await reconnect_loop(
                stop=self._stop,
                backoff=self._backoff,
                connect=self._connect_once,
                down=lambda reason: self._set_connected(False, reason),
                expected=(aiomqtt.MqttError, _SessionEnd, OSError),
                error_event="forwarder_error",  # e.g. the store refusing a read: retry, never die silently
                logger=log,
            )
        finally:
            self._set_connected(False, "stopped")
            # the marker first (a batch it was writing goes back to _mark_pending; moving a cursor again to the same
            # seq is a no-op), then every mark, then the count: the last state shows what is really left
            for t in (marker, stats):
                t.cancel()
            await asyncio.gather(marker, stats, return_exceptions=True)
            await self._flush_marks()
            await self._recount()
            self._running = False

    async def _connect_once(self) -> None:
        if not self._opened:  # the durable cursor, before the first connection (a store error here is retried)
            await self.reader.open()
            self._opened = True
        client = AckingClient(**client_options(self.mqtt, self.client_id, max_inflight=self.max_inflight), timeout=10.0)
        try:
            async with client:
                self._set_connected(True)
                try:
                    await self._session(client)
                finally:
                    client.abandon_pending()
        finally:
            if client.disconnected.done() and not client.disconnected.cancelled():
                client.disconnected.exception()  # retrieved: no "exception never retrieved" noise

    # ---------------------------------------------------------------- connection state

    def _set_connected(self, up: bool, reason: str = "") -> None:
        track_link(self, up, reason, "forwarder", connect_ctx={"client_id": self.client_id}, backlog=self.backlog)

    # ---------------------------------------------------------------- session

    async def _session(self, client: AckingClient) -> None:
        if self.confirm == "upstream":
            await client.subscribe(self.topic_confirm, qos=1)
        self._lanes = await self._plan_lanes()
        fillers = [asyncio.create_task(self._fill(lane), name=f"forwarder.fill.{lane.name}") for lane in self._lanes]
        if self.confirm == "upstream":
            fillers.append(asyncio.create_task(self._confirmations(client), name="forwarder.confirm"))
        inflight: collections.deque[tuple[_Message, asyncio.Future[ReasonCode], float]] = collections.deque()
        acked_once = False
        try:
            while True:
                for f in fillers:
                    if f.done() and f.exception() is not None:
                        raise f.exception()  # type: ignore[misc]
                # fill the window: live lane first, so a live event never queues behind the backlog
                self._ready.clear()
                while len(inflight) < self.max_inflight and not self._stop.is_set() and len(self._awaiting) < self.max_unconfirmed:
                    # too many rows acknowledged but not behind the cursor yet: only the backlog lane (the rows the
                    # cursor waits for) may go on, so the cursor always gets past them; with one lane, wait for the marker
                    held = len(self._unmarked_acked) + len(self.reader.held)
                    msg = self._next_message(backlog_only=held >= self.max_unmarked)
                    if msg is None:
                        break
                    props = self._properties(msg)
                    fut = client.publish_nowait(msg.topic, msg.payload, 1, False, props)
                    inflight.append((msg, fut, time.monotonic()))
                self._inflight = len(inflight)
                if self._stop.is_set() and not inflight:
                    return
                waits: list[asyncio.Future[Any]] = [client.disconnected]
                if inflight:
                    waits.append(inflight[0][1])
                helper = None
                if len(inflight) < self.max_inflight and not self._stop.is_set():
                    helper = asyncio.ensure_future(self._ready.wait())  # new messages, or the marker caught up
                    waits.append(helper)
                timeout = (2.0 if self._stop.is_set() else self.ack_timeout_s) if inflight else None
                if self._awaiting:
                    timeout = min(timeout or self.confirm_timeout_s, self.confirm_timeout_s / 4)
                done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if helper is not None and not helper.done():
                    helper.cancel()
                if client.disconnected.done():
                    exc = client.disconnected.exception() if not client.disconnected.cancelled() else None
                    raise _SessionEnd(f"connection lost: {exc}" if exc else "connection closed")
                # acknowledge strictly in publish order: a row is forwarded only once it and all before it are
                while inflight and inflight[0][1].done():
                    msg, fut, _t = inflight.popleft()
                    if fut.cancelled():
                        raise _SessionEnd("publish abandoned")
                    rc = fut.result()
                    if rc.is_failure:
                        raise PublishRefused(rc, msg.topic)
                    self._acked(msg)
                    if not acked_once:
                        acked_once = True
                        self._backoff.reset()
                self._inflight = len(inflight)
                if inflight and time.monotonic() - inflight[0][2] > self.ack_timeout_s:
                    raise _SessionEnd(f"no PUBACK within {self.ack_timeout_s:g} s")
                if self._awaiting and time.monotonic() - next(iter(self._awaiting.values()))[1] > self.confirm_timeout_s:
                    # go back: reconnect and resend from the first row not confirmed (upstream dedupes by eventID)
                    raise _SessionEnd(f"no upstream confirmation within {self.confirm_timeout_s:g} s")
                if self._stop.is_set() and (not inflight or not done):
                    return
        finally:
            self._inflight = 0
            for f in fillers:
                f.cancel()
            await asyncio.gather(*fillers, return_exceptions=True)
            self._lanes = []
            self._awaiting.clear()
            self._awaiting_by_range.clear()
            self._awaiting_rows = 0
            if self.catch_up is not None and not self.catch_up.get("done"):
                self.catch_up = None  # replanned on the next connection

    def _properties(self, msg: _Message) -> Properties | None:
        if not self.v5:
            return None
        p = Properties(PacketTypes.PUBLISH)
        p.ContentType = "application/ld+json" if msg.topic == self.topic_events else "application/json"
        p.PayloadFormatIndicator = 1
        p.UserProperty = [("first_seq", str(msg.first_seq)), ("last_seq", str(msg.last_seq))]
        return p

    def _next_message(self, backlog_only: bool = False) -> _Message | None:
        for lane in sorted(self._lanes, key=lambda ln: ln.name != "live"):
            if backlog_only and lane.end is None:
                continue
            try:
                return lane.queue.get_nowait()
            except asyncio.QueueEmpty:
                continue
        return None

    def _acked(self, msg: _Message) -> None:
        self.published_messages += 1
        self.published_events += msg.events
        self.last_ack_at = time.time()
        if self.confirm == "upstream":
            self._awaiting_ids += 1
            self._awaiting[self._awaiting_ids] = [msg, time.monotonic(), False]
            self._awaiting_by_range.setdefault((msg.first_seq, msg.last_seq), collections.deque()).append(self._awaiting_ids)
            self._awaiting_rows += len(msg.seqs) or 1
            return
        self._forwarded(msg)

    def _forwarded(self, msg: _Message) -> None:
        if msg.seqs:
            self._unmarked_acked.update(msg.seqs)
            self._mark_pending.extend(msg.seqs)
            self._mark_event.set()

    async def _confirmations(self, client: AckingClient) -> None:
        """Upstream says which messages it has stored: {"ranges": [[first_seq, last_seq], ...]}.

        Only a range that is exactly a message still awaiting confirmation counts, so a
        stale or wrong confirmation can never mark rows that were not delivered; and rows
        are marked in publish order (a row split over several documents is complete only
        when all of them are confirmed), as with PUBACKs."""
        async for m in client.messages:
            if str(m.topic) != self.topic_confirm:
                continue
            try:
                ranges = json.loads(m.payload)["ranges"]
                keys = [(int(a), int(b)) for a, b in ranges]
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("confirmation_ignored", error=str(exc), payload=bytes(m.payload)[:200])
                continue
            for key in keys:
                ids = self._awaiting_by_range.get(key)
                if not ids:
                    continue
                self._awaiting[ids.popleft()][2] = True
                if not ids:
                    del self._awaiting_by_range[key]
            while self._awaiting and next(iter(self._awaiting.values()))[2]:
                msg = self._awaiting.popitem(last=False)[1][0]
                self._awaiting_rows -= len(msg.seqs) or 1
                self._forwarded(msg)
            self._ready.set()

    # ---------------------------------------------------------------- planning and reading

    async def _plan_lanes(self) -> list[_Lane]:
        """Start after this sink's cursor; split into backlog + live lanes if the backlog is big."""
        start = self.reader.cursor
        backlog = await asyncio.to_thread(self.reader.backlog)
        self.backlog = backlog
        qmax = max(2, self.max_inflight)
        if self.catchup_threshold is None or backlog <= self.catchup_threshold:
            self.catch_up = None
            return [_Lane("live", start, None, asyncio.Queue(qmax))]
        boundary = await asyncio.to_thread(self.store.last_seq)
        self.catch_up = {"boundary_seq": boundary, "backlog_rows": backlog, "started_at": time.time(), "done": False}
        log.info("catch_up_started", backlog=backlog, boundary_seq=boundary)
        return [_Lane("backlog", start, boundary, asyncio.Queue(qmax)), _Lane("live", boundary, None, asyncio.Queue(qmax))]

    async def _fill(self, lane: _Lane) -> None:
        """Keep the lane's queue stocked with ready messages (bounded: the queue blocks when full)."""
        paced = lane.end is not None and self.catchup_max_rate
        t_start, rows_done = time.monotonic(), 0
        while True:
            if lane.end is None:
                self._wake_live.clear()
            msgs, cursor, n_rows, finished = await asyncio.to_thread(self._read_build, lane.cursor, lane.end, lane.name)
            if paced:
                rows_done += n_rows
                ahead = rows_done / self.catchup_max_rate - (time.monotonic() - t_start)  # type: ignore[operator]
                if ahead > 0:
                    await asyncio.sleep(ahead)
            lane.cursor = cursor
            for m in msgs:
                await lane.queue.put(m)
                self._ready.set()
            if finished:
                lane.done = True
                await self._lane_finished(lane)
                return
            if n_rows < self.page_size:  # at the end of the outbox: wait for new rows
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake_live.wait(), self.poll_interval_s)

    async def _lane_finished(self, lane: _Lane) -> None:
        while not lane.queue.empty():
            await asyncio.sleep(self.poll_interval_s)
        if self.catch_up is not None:
            took = time.time() - self.catch_up["started_at"]
            self.catch_up.update(done=True, drain_s=round(took, 3))
            log.info("catch_up_done", rows=self.catch_up["backlog_rows"], drain_s=round(took, 1))
            self.catch_up = None

    def _read_build(self, cursor: int, end: int | None, lane: str) -> tuple[list[_Message], int, int, bool]:
        """(worker thread) read one page after `cursor` and turn it into messages."""
        rows = self.reader.page(cursor, self.page_size)
        n = len(rows)
        finished = False
        if end is not None:
            inside = [r for r in rows if r.seq <= end]
            finished = len(inside) < len(rows) or n < self.page_size
            rows = inside
        new_cursor = rows[-1].seq if rows else cursor
        if end is not None and new_cursor >= end:
            finished = True
        # already delivered: behind the durable cursor, or acknowledged above it (earlier on this connection or
        # a previous one of this run)
        done, skip, held = self.reader.cursor, self._unmarked_acked, self.reader.held
        rows = [r for r in rows if r.seq > done and r.seq not in skip and r.seq not in held]
        return self.build_messages(rows, lane), new_cursor, n, finished

    # ---------------------------------------------------------------- message building

    def build_messages(self, rows: list[Any], lane: str = "live") -> list[_Message]:
        """Rows (in seq order) -> messages (in the same order). EPCIS rows are packed into documents
        bounded by max_events_per_message and max_bytes_per_message; any other row is its own message."""
        out: list[_Message] = []
        # the document names its seq range (instanceIdentifier "first-last"): for MQTT 3.1.1 consumers, which
        # have no user properties, to restore order during catch-up and to confirm in upstream mode
        full_head = epcis.document_head()
        cut = full_head.index('"epcisBody"')
        head, body_open = full_head[:cut].encode(), full_head[cut:].encode()
        budget = self.max_bytes - len(full_head) - len(epcis.DOCUMENT_TAIL) - 48
        doc: list[str] = []
        size = 0
        seqs: list[int] = []
        first = last = 0

        def flush() -> None:
            nonlocal doc, size, seqs
            if doc:
                payload = head + f'"instanceIdentifier":"{first}-{last}",'.encode() + body_open + ",".join(doc).encode() + epcis.DOCUMENT_TAIL.encode()
                out.append(_Message(self.topic_events, payload, lane, first, last, seqs, len(doc)))
            doc, size, seqs = [], 0, []

        for row in rows:
            encoded, error = self._encoded(row)
            if encoded:
                for enc in encoded:
                    if doc and (len(doc) >= self.max_events or size + len(enc) + 1 > budget):
                        flush()
                    if not doc:
                        first = row.seq
                    doc.append(enc)
                    size += len(enc) + 1
                    last = row.seq
                seqs.append(row.seq)
                continue
            flush()
            out.append(self._record_message(row, lane, epoch(row.created_at), error))
        flush()
        return out

    def _encoded(self, row: Any) -> tuple[list[str], str | None]:
        """The row's stored EPCIS rendering, published as stored; a row stored without one is rendered now."""
        return encoded_events(row, self.store, self.mapper)

    def _record_message(self, row: Any, lane: str, created: float | None, error: str | None) -> _Message:
        """`seq`/`first_seq`/`last_seq` are the outbox seq, what a consumer confirms. An event's own `seq` (the
        unit's trigger count, e.g. on challenge_result) travels as `unit_seq`: it must never shadow the store's."""
        event = row.event.model_dump(mode="json")
        if "seq" in event:
            event["unit_seq"] = event.pop("seq")
        body: dict[str, Any] = {"seq": row.seq, "first_seq": row.seq, "last_seq": row.seq, "line": self.root}
        if created is not None:
            body["stored_at"] = datetime.fromtimestamp(created, UTC).isoformat()
        body.update({k: v for k, v in event.items() if k not in body})
        if error:
            body["epcis_error"] = error
        topic = self.topic_alarms if row.kind in ALARM_KINDS else self.topic_records
        return _Message(topic, json.dumps(body, separators=(",", ":")).encode(), lane, row.seq, row.seq, [row.seq], 1)

    # ---------------------------------------------------------------- marking and stats

    async def _marker(self) -> None:
        """Move the cursor over acknowledged rows, batching whatever accumulated while the last write ran."""
        while True:
            await self._mark_event.wait()
            self._mark_event.clear()
            await self._flush_marks(retry=True)
            if self._inflight == 0 and not self._mark_pending:
                await self._recount()  # all delivered: the state shows 0 now, not a count taken while rows were in flight

    async def _recount(self) -> None:
        """Count the backlog now (a count over the rows after the cursor: cheap when little is left)."""
        with contextlib.suppress(Exception):
            self.backlog, self.oldest_age_s = await asyncio.to_thread(self._backlog_now)

    async def _flush_marks(self, retry: bool = False) -> None:
        while self._mark_pending:
            batch, self._mark_pending = self._mark_pending[: self.mark_chunk], self._mark_pending[self.mark_chunk :]
            try:
                await self.reader.delivered(batch)
            except asyncio.CancelledError:
                self._mark_pending[:0] = batch
                raise
            except Exception as exc:  # noqa: BLE001 - unmarked rows are resent later: a duplicate, not a loss
                self._mark_pending[:0] = batch
                log.error("cursor_advance_failed", sink=self.name, rows=len(batch), error=str(exc))
                if not retry:
                    return
                await asyncio.sleep(1.0)
                continue
            self._unmarked_acked.difference_update(batch)
            self.forwarded_rows += len(batch)
            self._ready.set()  # the window may have been held back by max_unmarked

    async def _stats_loop(self) -> None:
        last_log = time.monotonic()
        while True:
            with contextlib.suppress(Exception):
                self.backlog, self.oldest_age_s = await asyncio.to_thread(self._backlog_now)
                await self.backlog_alarm.check(self.oldest_age_s, self.backlog, self._last_error, self.on_alarm)
            if self.catch_up and time.monotonic() - last_log >= 10.0:
                last_log = time.monotonic()
                log.info("catch_up_progress", backlog=self.backlog, oldest_age_s=self.oldest_age_s, forwarded=self.forwarded_rows)
            await asyncio.sleep(self.stats_interval_s)

    def _backlog_now(self) -> tuple[int, float | None]:
        n = self.reader.backlog()
        first = self.reader.oldest_undelivered() if n else None
        created = epoch(first.created_at) if first is not None else None
        return n, (max(0.0, time.time() - created) if created is not None else None)


# --------------------------------------------------------------------------- standalone runner


def main(argv: list[str] | None = None) -> int:
    """`python -m linectl.forwarder -c CONFIG --db PATH`: the MQTT sink alone (tests, benches, a side-car).

    The store's enabled sinks are the config's (enabled_names), so rows count as forwarded only once every sink the
    config enables has them, even though the side-car runs only this one."""
    p = argparse.ArgumentParser(prog="python -m linectl.forwarder")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--db", help="store path (default: store.path of the config)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--topic-root")
    p.add_argument("--max-inflight", type=int, default=20)
    p.add_argument("--catchup-threshold", type=int, default=20_000)
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)

    from linectl.config import load_config
    from linectl.logging import setup_logging

    setup_logging(args.log_level)
    cfg = load_config(args.config)
    upd: dict[str, Any] = {}
    if args.host:
        upd["host"] = args.host
    if args.port:
        upd["port"] = args.port
    if args.topic_root:
        upd["topic_root"] = args.topic_root
    if upd:
        cfg = cfg.model_copy(update={"mqtt": cfg.mqtt.model_copy(update=upd)})

    async def go() -> None:
        from linectl.store import Store, StoreError

        # one store, one owner: the side-car takes the owner lock like the daemon, so it never runs beside one
        try:
            store = await Store.open(args.db or cfg.store.path, create=False, lock="python -m linectl.forwarder")
        except StoreError as exc:
            print(f"linectl forwarder: {exc}", file=sys.stderr)
            raise SystemExit(3) from None
        from linectl.upstream.sink import enabled_names

        store.set_sinks(enabled_names(cfg))  # the config's sinks: rows count as forwarded once all of them have them
        fwd = Forwarder(cfg, store, max_inflight=args.max_inflight, catchup_threshold=args.catchup_threshold)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(fwd.stop()))
        print("FORWARDER READY", flush=True)
        try:
            await fwd.run()
        finally:
            await store.close()

    asyncio.run(go())
    return 0


MqttSink = Forwarder  # the registry's name for it (linectl.upstream.sink)


if __name__ == "__main__":
    sys.exit(main())
