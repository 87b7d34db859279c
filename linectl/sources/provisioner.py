"""Keeps a pool product's serial pool filled from its L3/L4 source, while the line runs on what the pool holds.

One Provisioner per pool product with `serials.source`, run by the daemon's supervisor. The record comes first,
always (linectl/store/serial_requests.py): a request is stored before it is sent, its answer (raw) before a serial
of it is imported, and the import of a page and its state `imported` are one transaction. So a crash at any point
imports nothing twice and loses nothing silently:
- killed after sending, before the answer was stored: at the next start the request is sent again with the SAME key
  when the protocol honours keys (`source.idempotent`), else it is recorded `lost` with its size (the L3 may have
  allocated those numbers; they are never used here, and the record says how many);
- killed after the answer was stored, before the import: the import runs from the stored answer.
An L3 that is down is retried with capped jittered backoff; the line keeps running on its pool meanwhile, and one
alarm says so when the pool falls below low water while the source fails. An L3 that says no (SourceRefused) parks
the request with an alarm; an operator's `serials_retry` command sends it again. At batch close the batch's voided
(never printed) serials of this source are given back when the protocol has a return and the config asks, else
reported in the close result and the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from linectl.config import PoolSerials, Product
from linectl.drivers.base import Backoff
from linectl.events import Severity
from linectl.sources.base import SerialPage, SerialRequest, SerialSource, SourceError, SourceRefused, SourceUnavailable, source_class
from linectl.store.serial_requests import ImportResult

log = structlog.get_logger("linectl.provisioner")

#: exception class names (anywhere in the cause chain) that prove a request never reached the L3
_NEVER_SENT = frozenset({"ConnectError", "ConnectTimeout", "ConnectionRefusedError", "gaierror"})


class AlarmPort(Protocol):
    """What the provisioner needs of the line: its alarms and the lot being run."""

    async def alarm(self, code: str, message: str, severity: Severity, station: str | None = None) -> Any: ...

    @property
    def batch(self) -> Any: ...


def never_sent(exc: BaseException) -> bool:
    """True when the failure proves the request never reached the L3 (connection refused, name not resolved):
    then no numbers can have been allocated for it there."""
    seen: BaseException | None = exc
    depth = 0
    while seen is not None and depth < 10:
        if type(seen).__name__ in _NEVER_SENT:
            return True
        seen = seen.__cause__ or seen.__context__
        depth += 1
    return False


def build_source(product: Product) -> SerialSource:
    pool = product.serials
    assert isinstance(pool, PoolSerials) and pool.source is not None
    cls = source_class(pool.source.type)
    src: SerialSource = cls.from_config(pool.source)
    return src


class Provisioner:
    """The serial pool of one GTIN, kept above low water from one source."""

    def __init__(self, product: Product, source: SerialSource, store: Any, line: AlarmPort | None, *, actor: str = "system") -> None:
        assert isinstance(product.serials, PoolSerials)
        self.product = product
        self.pool: PoolSerials = product.serials
        self.gtin = product.gtin
        self.source = source
        self.store = store
        self.line = line
        self.actor = actor
        #: the protocol answers a repeated key with the numbers it already allocated (OPEN-SCS request tokens)
        self.idempotent = source.idempotent
        self.page_size = int(getattr(self.pool.source, "page_size", None) or self.pool.request_count)
        self._wake = asyncio.Event()
        self._backoff = Backoff(min(1.0, self.pool.retry_max_s), self.pool.retry_max_s)
        self.state = "starting"  # idle | requesting | failing | parked
        self.last_error: str | None = None
        self.last_error_at: str | None = None
        self.last_import: dict[str, Any] | None = None
        self._failing_since: float | None = None
        self._outage_alarmed = False
        self._stale_alarmed: set[int] = set()
        self._in_flight: tuple[int, float] | None = None  # (request id, monotonic time first sent)
        self.requests_sent = 0

    @property
    def name(self) -> str:
        return self.source.name

    def source_text(self, request_id: int) -> str:
        """serials.source of what a request imported: names the source and the request (`linectl trace` shows it)."""
        return f"{self.prefix}{request_id}"

    @property
    def prefix(self) -> str:
        return f"{self.source.name} request "

    # ------------------------------------------------------------------ operator and line hooks

    def nudge(self) -> None:
        """The line saw the pool below low water (Line.check_pool): look now rather than at the next interval."""
        self._wake.set()

    async def retry(self, actor: str, origin: str) -> dict[str, Any]:
        """An operator's serials_retry: parked requests go out again (same key: a refused request allocated nothing)."""
        ids = await self.store.requests_unpark(self.name, self.gtin, actor, origin)
        self._outage_alarmed = False
        self._backoff.reset()
        if ids and self.state == "parked":
            self.state = "idle"
        log.info("serial_requests_retried", source=self.name, gtin=self.gtin, requests=ids, actor=actor)
        self._wake.set()
        return {"gtin": self.gtin, "source": self.name, "retried": ids}

    async def batch_closed(self, lot: str) -> dict[str, Any] | None:
        """The batch's voided (never printed) serials of this source: recorded as a give-back, returned in the background
        when the protocol has a return and return_unused_at_close asks for it, else reported. None: there are none."""
        serials = self.store.voided_unreturned(self.gtin, lot, self.prefix)
        if not serials:
            return None
        rid = await self.store.request_new("return", self.name, self.gtin, len(serials), uuid.uuid4().hex, lot=lot, serials=serials)
        if not self.pool.return_unused_at_close:
            await self.store.request_failed(rid, "return_unused_at_close is off: reported, not given back", "reported", actor=self.actor)
            log.warning("unused_serials_reported", source=self.name, gtin=self.gtin, lot=lot, count=len(serials), request=rid)
            return {"source": self.name, "request": rid, "count": len(serials), "state": "reported"}
        self._wake.set()  # the give-back runs in the provisioner's task, not under the line's command lock
        return {"source": self.name, "request": rid, "count": len(serials), "state": "pending"}

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        open_rows = self.store.requests(source=self.name, gtin=self.gtin, states=("pending", "answered", "parked"))
        lost = self.store.requests(source=self.name, gtin=self.gtin, states=("lost",), kind="request", limit=100_000)
        now = datetime.now(UTC)
        oldest = min((r.created_at for r in open_rows if r.kind == "request"), default=None)
        age = None if oldest is None else round((now - datetime.fromisoformat(oldest)).total_seconds(), 1)
        try:
            src = dict(self.source.status())
        except Exception as exc:  # noqa: BLE001 - a source's status must not break the state topic
            src = {"error": str(exc)}
        return {
            "source": self.name,
            "gtin": self.gtin,
            "state": self.state,
            "connected": src.get("connected"),
            "available": self.store.available(self.gtin),
            "low_water": self.pool.low_water,
            "request_count": self.pool.request_count,
            "pending": sum(1 for r in open_rows if r.state in ("pending", "answered") and r.kind == "request"),
            "parked": [{"request": r.id, "size": r.size, "reason": r.error} for r in open_rows if r.state == "parked"],
            "returns_pending": sum(1 for r in open_rows if r.kind == "return"),
            "lost": len(lost),
            "serials_lost": sum(r.size for r in lost),
            "oldest_open_request_age_s": age,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "last_import": self.last_import,
            "requests_sent": self.requests_sent,
            "source_status": src,
        }

    # ------------------------------------------------------------------ the task

    async def run(self) -> None:
        await self.recover()
        while True:
            await self._step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.pool.check_interval_s)
            self._wake.clear()

    async def aclose(self) -> None:
        await self.source.aclose()

    async def recover(self) -> None:
        """After a start: finish what the last run left half done (see the module docstring)."""
        for r in self.store.requests(source=self.name, gtin=self.gtin, states=("answered",), kind="request"):
            await self._import(r.id, recovered=True)
            await self._rest_of_stored(r)
        for r in self.store.requests(source=self.name, gtin=self.gtin, states=("pending",), kind="request"):
            if self.idempotent:
                log.warning("serial_request_resent", source=self.name, request=r.id, key=r.key, why="pending at start")
                await self._rest_of(r, await self._send(r.id, r.size, r.key, r.page, r.lot, r.continuation))
            else:
                why = (f"linectl stopped between sending this request and storing its answer; {self.name} has no idempotency key, "
                       f"so the {r.size} serials the L3 may have allocated for it are never used")
                await self.store.request_failed(r.id, why, "lost", actor=self.actor)
                log.error("serial_request_lost", source=self.name, request=r.id, size=r.size, why=why)
                await self._alarm("serial_request_lost", f"serial request {r.id} to {self.name} ({r.size} serials of {self.gtin}) lost: {why}")
        parked = self.store.requests(source=self.name, gtin=self.gtin, states=("parked",), kind="request")
        if parked:
            self.state = "parked"
            await self._alarm("serial_request_parked", f"{len(parked)} serial request(s) to {self.name} for {self.gtin} are parked "
                              f"(last: {parked[-1].error}); retry with serials_retry once the L3 is fixed")
        if self.state == "starting":
            self.state = "idle"

    async def _step(self) -> None:
        await self._returns()
        for r in self.store.requests(source=self.name, gtin=self.gtin, states=("answered",), kind="request"):
            await self._import(r.id, recovered=True)
            await self._rest_of_stored(r)
        # requests an operator un-parked: the same request again
        for r in self.store.requests(source=self.name, gtin=self.gtin, states=("pending",), kind="request"):
            got = await self._send(r.id, r.size, r.key, r.page, r.lot, r.continuation)
            if got is None:
                return
            await self._rest_of(r, got)
        if self.store.requests(source=self.name, gtin=self.gtin, states=("parked",), kind="request", limit=1):
            self.state = "parked"
            return
        if self.store.available(self.gtin) < self.pool.low_water:
            await self.replenish()
        if self.state == "requesting":
            self.state = "idle"

    async def replenish(self) -> int:
        """Ask for request_count serials in pages of page_size; stop early when the L3 says there are no more.

        Returns the serials imported."""
        target = self.pool.request_count
        received = 0
        key, page, cont = uuid.uuid4().hex, 0, None
        size = 0
        while received < target:
            if page == 0:  # the pages of one request keep its size; the source's continuation says what is left
                size = min(self.page_size, target - received)
            lot = self.line.batch.lot if self.line is not None and self.line.batch is not None else None
            rid = await self.store.request_new("request", self.name, self.gtin, size, key, page=page, lot=lot, continuation=cont)
            got = await self._send(rid, size, key, page, lot, cont)
            if isinstance(got, str):  # lost: a new request, the lost one may hold numbers at the L3
                key, page, cont = uuid.uuid4().hex, 0, None
                continue
            if got is None:
                break  # parked
            pg, accepted = got
            received += accepted
            if pg.more:
                page, cont = page + 1, pg.continuation
                if cont is None:
                    key, page = uuid.uuid4().hex, 0
                continue
            if len(pg.serials) < size or accepted == 0:
                log.info("serial_source_short", source=self.name, gtin=self.gtin, asked=size, answered=len(pg.serials), accepted=accepted)
                break
            key, page, cont = uuid.uuid4().hex, 0, None
        return received

    async def _rest_of_stored(self, r: Any) -> None:
        """A page answered before a restart (imported now from its stored answer) may say more pages follow."""
        _raw, answer, _refused = self.store.request_answer(r.id)
        if answer and answer.get("more") and answer.get("continuation"):
            await self._pages_after(r, str(answer["continuation"]))

    async def _rest_of(self, r: Any, got: tuple[SerialPage, int] | str | None) -> None:
        """A page sent again (after a restart or an operator's retry) may say more pages follow: the L3 allocated them
        for this request, so they are fetched now rather than left allocated at the L3 and never used."""
        if isinstance(got, tuple) and got[0].more and got[0].continuation:
            await self._pages_after(r, got[0].continuation)

    async def _pages_after(self, r: Any, cont: str) -> None:
        """The pages of request `r.key` after page `r.page`, each recorded before it is sent (none already recorded)."""
        later = [x for x in self.store.requests(source=self.name, gtin=self.gtin, kind="request", limit=100_000)
                 if x.key == r.key and x.page > r.page]
        if later:  # the last run had recorded the next page already: it is handled as its own (pending/answered) row
            return
        page = r.page
        next_cont: str | None = cont
        while next_cont is not None:
            page += 1
            rid = await self.store.request_new("request", self.name, self.gtin, r.size, r.key, page=page, lot=r.lot, continuation=next_cont)
            got = await self._send(rid, r.size, r.key, page, r.lot, next_cont)
            if not isinstance(got, tuple):
                return  # parked or lost: recorded as such
            next_cont = got[0].continuation if got[0].more else None

    async def _send(self, rid: int, size: int, key: str, page: int, lot: str | None,
                    cont: str | None) -> tuple[SerialPage, int] | str | None:
        """Send one recorded request until it is answered ((page, accepted)), parked (None) or lost ("lost")."""
        req = SerialRequest(request_id=rid, gtin=self.gtin, size=size, key=key, lot=lot)
        first_sent = time.monotonic()
        self._in_flight = (rid, first_sent)
        self.state = "requesting" if self.state != "failing" else "failing"
        try:
            while True:
                await self.store.request_attempt(rid)
                self.requests_sent += 1
                try:
                    pg = await self.source.request(req, cont)
                except SourceRefused as exc:
                    await self._parked(rid, size, exc.reason)
                    return None
                except SourceUnavailable as exc:
                    await self._unavailable(exc.reason, first_sent, rid)
                    if not self.idempotent and not never_sent(exc):
                        why = f"{exc.reason}; the L3 may have allocated these {size} serials: never used here"
                        await self.store.request_failed(rid, why, "lost", actor=self.actor)
                        log.warning("serial_request_lost", source=self.name, request=rid, size=size, why=exc.reason)
                        return "lost"
                    await self.store.request_failed(rid, exc.reason)
                    await asyncio.sleep(self._backoff.next_delay())
                    continue
                except SourceError as exc:  # neither: a source that says no in its own words
                    await self._parked(rid, size, exc.reason)
                    return None
                break
            self._recovered()
            await self.store.request_answered(rid, pg.raw, {
                "serials": list(pg.serials), "foreign": [list(f) for f in pg.foreign], "more": pg.more, "continuation": pg.continuation,
            })
            accepted = await self._import(rid)
            return pg, accepted
        finally:
            self._in_flight = None

    async def _import(self, rid: int, *, recovered: bool = False) -> int:
        res: ImportResult = await self.store.request_import(rid, self.source_text(rid), actor=self.actor)
        self.last_import = {"request": rid, "accepted": res.accepted, "duplicates": res.duplicates, "invalid": res.invalid,
                            "foreign": res.foreign, "at": datetime.now(UTC).isoformat(), "from_stored_answer": recovered}
        if res.duplicates or res.invalid or res.foreign:
            log.warning("serials_refused", source=self.name, gtin=self.gtin, request=rid, duplicates=res.duplicates, invalid=res.invalid,
                        foreign=res.foreign, examples=res.problems[:3])
        if self.store.available(self.gtin) >= self.pool.low_water:
            self._outage_alarmed = False
        return int(res.accepted)

    async def _returns(self) -> None:
        """Give back what batch_closed recorded (pending returns), once per step; a transient failure waits for the next."""
        for r in self.store.requests(source=self.name, gtin=self.gtin, states=("pending",), kind="return"):
            _raw, answer, _ = self.store.request_answer(r.id)
            serials = list((answer or {}).get("serials") or [])
            await self.store.request_attempt(r.id)
            try:
                done = await self.source.give_back(self.gtin, serials, r.key)
            except SourceUnavailable as exc:
                await self.store.request_failed(r.id, exc.reason)
                log.warning("serials_return_failed", source=self.name, request=r.id, error=exc.reason)
                continue
            except SourceError as exc:
                await self.store.request_failed(r.id, f"the L3 refused the return: {exc.reason}", "reported", actor=self.actor)
                await self._alarm("serials_return_refused", f"{self.name} refused the return of {len(serials)} unused serials of "
                                  f"{self.gtin} (lot {r.lot}): {exc.reason}; they are reported, never used here")
                continue
            if done:
                await self.store.request_failed(r.id, f"{len(serials)} serials given back", "returned", actor=self.actor)
                log.info("unused_serials_returned", source=self.name, gtin=self.gtin, lot=r.lot, count=len(serials))
            else:
                await self.store.request_failed(r.id, f"{self.name} has no return: reported", "reported", actor=self.actor)
                log.warning("unused_serials_reported", source=self.name, gtin=self.gtin, lot=r.lot, count=len(serials))

    # ------------------------------------------------------------------ state changes and alarms

    async def _parked(self, rid: int, size: int, reason: str) -> None:
        await self.store.request_failed(rid, reason, "parked", actor=self.actor)
        self._error(reason)
        self.state = "parked"
        log.error("serial_request_parked", source=self.name, gtin=self.gtin, request=rid, reason=reason)
        await self._alarm("serial_request_parked", f"{self.name} refused serial request {rid} ({size} serials of {self.gtin}): {reason}; "
                          "parked until an operator retries (serials_retry)")

    async def _unavailable(self, reason: str, first_sent: float, rid: int) -> None:
        self._error(reason)
        if self.state != "failing":
            log.warning("serial_source_unavailable", source=self.name, gtin=self.gtin, reason=reason)
            self.state = "failing"
            self._failing_since = time.monotonic()
        available = self.store.available(self.gtin)
        if available < self.pool.low_water and not self._outage_alarmed:
            self._outage_alarmed = True
            await self._alarm("serial_source_down", f"{self.name} is unavailable ({reason}) and the pool of {self.gtin} is below low water "
                              f"({available} < {self.pool.low_water}); the line runs on the pool, requests wait")
        if time.monotonic() - first_sent >= self.pool.request_alarm_s and rid not in self._stale_alarmed:
            self._stale_alarmed.add(rid)
            await self._alarm("serial_request_stale", f"serial request {rid} to {self.name} has waited {int(time.monotonic() - first_sent)} s "
                              f"for its answer (last error: {reason})")

    def _recovered(self) -> None:
        if self.state == "failing":
            log.info("serial_source_available", source=self.name, gtin=self.gtin,
                     down_s=round(time.monotonic() - (self._failing_since or time.monotonic()), 1))
        self.state = "requesting"
        self._failing_since = None
        self._backoff.reset()

    def _error(self, reason: str) -> None:
        self.last_error = reason
        self.last_error_at = datetime.now(UTC).isoformat()

    async def _alarm(self, code: str, message: str) -> None:
        if self.line is None:
            log.warning("alarm_without_line", code=code, message=message)
            return
        await self.line.alarm(code, message, Severity.WARNING)
