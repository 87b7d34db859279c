"""The sink-agnostic side of upstream delivery: read the outbox after a sink's cursor, advance it durably.

Every upstream sink (MQTT, a directory of files, ...) owns one cursor in the store's sink_cursors table:
all outbox rows with seq <= cursor have reached that sink. A sink reads pages of rows after its cursor,
delivers them its own way, and only once the far side has confirmed them (a PUBACK or the consumer's
confirmation, a renamed and fsynced file) tells its OutboxReader, which moves the cursor. So a crash, a
dead broker or a full disk can make a sink deliver a row twice, never skip one, and one sink that is down
holds back only itself: the others keep their own cursors. The store marks a row forwarded (forwarded_at)
and lets retention purge it only once every enabled sink's cursor has passed it.

A sink may confirm rows out of order (the MQTT forwarder's backlog and live lanes during a catch-up): the
cursor then stops before the first row not yet confirmed, and the rows confirmed beyond it are remembered
here (`held`) so the sink does not send them again while it runs. After a restart they are sent again:
a duplicate, never a gap.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import structlog

from linectl import epcis
from linectl.events import UnitDecommissioned

log = structlog.get_logger("linectl.upstream")

WALK_PAGE = 5000  # seqs looked at per read when the cursor moves past rows confirmed out of order
NEXT_KNOWN_MAX = 200_000  # successor links kept from pages read (a cache: dropped whole when it grows past this)


class OutboxReader:
    """One sink's view of the outbox: pages after its cursor, and the cursor itself (durable in the store)."""

    def __init__(self, store: Any, sink: str) -> None:
        self.store = store
        self.sink = sink
        #: last seq durably recorded as delivered to this sink (loaded by open())
        self.cursor = 0
        #: rows confirmed but above the cursor (an earlier row is still on its way)
        self.held: set[int] = set()
        self.delivered_rows = 0
        # seq -> the next row's seq, learnt from the pages this sink read: no row can appear between them later
        # (one writer, seqs in commit order; purge stays behind every cursor), so the cursor usually moves
        # without reading the store again
        self._next: dict[int, int] = {}

    async def open(self) -> tuple[int, int | None]:
        """Load (creating if new) this sink's cursor; returns (cursor, pending delivery or None)."""
        cursor, pending = await self.store.open_cursor(self.sink)
        self.cursor = cursor
        return cursor, pending

    def page(self, after_seq: int, limit: int, *, learn: bool = True) -> list[Any]:
        """(worker thread) Up to `limit` outbox rows after `after_seq`, in seq order, whatever other sinks did.

        learn: remember which row follows which, for delivered(); a sink that only calls advance() passes False."""
        rows = list(self.store.outbox(after_seq, limit, only_unforwarded=False))
        if not learn:
            return rows
        if len(self._next) > NEXT_KNOWN_MAX:
            self._next = {}
        known = self._next
        prev = after_seq
        for r in rows:
            known[prev] = r.seq
            prev = r.seq
        return rows

    def backlog(self) -> int:
        """(worker thread) Rows stored after this sink's durable cursor."""
        return int(self.store.sink_backlog(self.sink))

    def oldest_undelivered(self) -> Any | None:
        """(worker thread) The first row after the cursor not already confirmed, or None."""
        after = self.cursor
        while True:
            rows = self.page(after, 64, learn=False)
            for r in rows:
                if r.seq not in self.held:
                    return r
            if len(rows) < 64:
                return None
            after = rows[-1].seq

    async def pending(self, last_seq: int | None) -> None:
        """Durably note the delivery about to be made (up to last_seq), so a restart repeats exactly it."""
        await self.store.set_cursor_pending(self.sink, last_seq)

    async def advance(self, seq: int) -> None:
        """Every row up to `seq` is delivered (the sink knows they are contiguous): move the cursor durably."""
        if seq <= self.cursor:
            return
        await self.store.advance_cursor(self.sink, seq)
        self.cursor = seq
        self.held = {s for s in self.held if s > seq}

    async def delivered(self, seqs: list[int]) -> int:
        """These rows are confirmed, in any order: the cursor moves over the unbroken run of confirmed rows.

        Returns how many of `seqs` were new. A row above the first unconfirmed one waits in `held`.
        """
        new = [s for s in seqs if s > self.cursor and s not in self.held]
        self.held.update(new)
        self.delivered_rows += len(new)
        target = self.cursor
        walked = 0  # held rows the cursor can pass: every row in (cursor, target] is one of them
        known = self._next
        while True:  # along the successor links learnt from pages read: no store read
            nxt = known.get(target)
            if nxt is None or nxt not in self.held:
                break
            known.pop(target, None)
            target = nxt
            walked += 1
        if len(self.held) > walked and target not in known:  # held rows beyond, next row unknown: ask the store
            while True:
                want = min(WALK_PAGE, len(self.held) - walked + 1)  # +1: to see the gap
                following = await asyncio.to_thread(self.store.seqs_after, target, want)
                gap = False
                for s in following:
                    if s not in self.held:
                        gap = True
                        break
                    target = s
                    walked += 1
                if gap or len(following) < want or len(self.held) <= walked:
                    break  # the first unconfirmed row, the end of the outbox, or nothing more held
        if target > self.cursor:
            await self.advance(target)
        return len(new)


# --------------------------------------------------------------------------- row helpers shared by sinks


def encoded_events(row: Any, store: Any, mapper: epcis.EpcisMapper | None) -> tuple[list[str], str | None]:
    """The row's encoded EPCIS events and mapping error. The rendering stored with the row is used as stored (byte
    for byte what `export epcis` gives); a row stored without one (older store, or a store used without a line
    config) is rendered now with `mapper`, deciding "was it commissioned" from the store, as before."""
    stored = row.epcis
    if stored is None:
        if not row.event.epcis or mapper is None:
            return [], None
        e = row.event
        commissioned = not isinstance(e, UnitDecommissioned) or store.was_commissioned(e.gtin, e.serial, row.seq)
        stored = mapper.render(e, commissioned=commissioned)
    if stored.startswith(epcis.RENDER_FAILED):
        error = stored[len(epcis.RENDER_FAILED):]
        log.error("epcis_mapping_failed", seq=row.seq, event_id=row.event_id, kind=row.kind, error=error)
        return [], error
    return epcis.stored_events(stored), None


def epoch(value: Any) -> float | None:
    """OutboxRow.created_at as epoch seconds, whatever the store hands back (float, datetime, ISO text)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    try:
        d = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        return (d if d.tzinfo else d.replace(tzinfo=UTC)).timestamp()
    except ValueError:
        return None


def oldest_age_s(reader: OutboxReader) -> float | None:
    """(worker thread) Seconds since the oldest row the sink has not delivered was stored; None: nothing waits."""
    first = reader.oldest_undelivered()
    created = epoch(first.created_at) if first is not None else None
    return None if created is None else max(0.0, time.time() - created)


class BacklogAlarm:
    """The sink's backlog-age alarm (config key `backlog_alarm_s` of every sink): once, when the oldest row the sink
    has not delivered is older than the limit, the operator alarm `code`; re-armed (and logged) once the backlog is
    back under it, so a later outage alarms again. A sink that keeps failing shows it already (its own alarm); this
    one also catches the sink that delivers, but too slowly for the line's rate, and one that hangs silently."""

    def __init__(self, sink: str, limit_s: float, code: str, where: str) -> None:
        self.sink = sink
        self.limit_s = limit_s
        self.code = code
        self.where = where
        self.alarmed = False

    async def check(self, age_s: float | None, backlog: int | None, last_error: str | None, on_alarm: Any) -> None:
        late = age_s is not None and age_s > self.limit_s
        if late and not self.alarmed:
            self.alarmed = True
            log.error("upstream_backlog_late", sink=self.sink, backlog_rows=backlog, oldest_age_s=round(age_s or 0.0, 1), limit_s=self.limit_s)
            if on_alarm is None:
                return
            try:
                await on_alarm(self.code, f"{self.where} ({self.sink}): {backlog if backlog is not None else 'some'} rows wait, the oldest "
                                          f"since {age_s:.0f}s (> backlog_alarm_s {self.limit_s:g}s); last error: {last_error or 'none'}")
            except Exception as exc:  # noqa: BLE001 - the alarm is a courtesy; the log line is already written
                log.warning("upstream_backlog_alarm_failed", sink=self.sink, error=str(exc))
        elif not late and self.alarmed:
            self.alarmed = False
            log.info("upstream_backlog_caught_up", sink=self.sink, backlog_rows=backlog)
