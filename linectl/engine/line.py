"""The line: batches and their lifecycle, commands, alarms, and the stations it runs.

Every command, whatever its origin (PLC tag, MQTT, CLI), enters through
`execute`, is validated, recorded in the audit trail with its origin, and is
idempotent by `command_id`. State changes are domain events in the store, so
the batch record answers "who started this and when" for an inspector.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

import structlog

from linectl import control as C
from linectl import gs1
from linectl.access.principal import Principal, permits
from linectl.access.signing import Signatures, requirement
from linectl.config import LineConfig, Product, ShiftConfig
from linectl.config_hash import config_fingerprint
from linectl.drivers.base import Driver, Plc
from linectl.engine import packml as P
from linectl.engine.audit_changes import before as changes_before
from linectl.engine.audit_changes import change_of, require_reason
from linectl.engine.clock import SYSTEM_CLOCK, Clock
from linectl.engine.station import PartialCloser, ReworkBench, Station, build_stations
from linectl.engine.verdict import Expected, challenge_status
from linectl.events import (
    AlarmAcknowledged,
    AlarmRaised,
    BatchState,
    BatchStateChanged,
    RejectReason,
    Severity,
    UnitDecommissioned,
)
from linectl.gs1 import GS1Error
from linectl.store.model import PoolExhausted, StoreError
from linectl.store.ports import EngineStore

log = structlog.get_logger("linectl.line")

LINE_MODE = {"idle": 0, "challenge": 1, "production": 2}
ALARM_CODES = {
    "consecutive_rejects": 10,
    "no_read_limit": 11,
    "reject_not_confirmed": 12,
    "reader_silent": 13,
    "printer_error": 20,
    "printer_fault": 21,
    "plc_lost": 30,
    "estop": 31,
    "plc_write_failed": 32,
    "challenge_failed": 40,
    "no_serials": 50,
    "pool_low": 51,
    "failsafe_reject": 60,
    "printer_not_primed": 22,
    "rfid_void_run": 23,  # print_verify: rules.rfid_void_limit labels in a row VOIDed by the RFID printer
    "rfid_epc_error": 24,  # print_verify: a serial's EPC cannot be encoded in the product's rfid.scheme
    "task_failed": 90,
    "store_error": 91,
}
#: the sliding window of rate_upm in the state message: units decided in the last RATE_WINDOW_S while the line runs
RATE_WINDOW_S = 60.0
#: causes that explain everything stopping after them: one arriving while the line already stops for a consequence
#: (a reject not confirmed because the e-stop stopped the belt) becomes the first-out, the earlier code a consequence
ROOT_CAUSES = frozenset({"estop", "plc_lost", "plc_restarted", "store_error"})
#: ... but only over a fault a root cause can produce (a stopped belt leaves rejects unconfirmed and units unread, a
#: lost PLC fails writes; a printer refusing a job or an empty serial pool are causes of their own), and only while the
#: stop is still under way or this soon after the first-out: an e-stop pressed later does not explain that stop
FOLLOWS_A_ROOT_CAUSE = frozenset(
    {"reject_not_confirmed", "no_read_limit", "reader_silent", "consecutive_rejects", "failsafe_reject", "plc_write_failed", "task_failed"}
)
ROOT_CAUSE_WINDOW_S = 5.0
#: consequences listed under one first-out (one per code); active alarms kept in memory, and shown in the state
MAX_CONSEQUENCES = 20
MAX_ALARMS = 100
ALARMS_SHOWN = 50
#: how long a start waits for the printer to hold its queue of codes before it refuses to feed product
PRIME_TIMEOUT_S = 3.0
#: most events kept in memory while the store refuses writes (alarms, state changes, decommissionings)
DEFERRED_MAX = 100_000

ALLOWED = {
    "start": {BatchState.CREATED, BatchState.STOPPED, BatchState.PAUSED},
    "pause": {BatchState.RUNNING},
    "resume": {BatchState.PAUSED},
    "stop": {BatchState.CHALLENGE, BatchState.RUNNING, BatchState.PAUSED},
    "close": {BatchState.STOPPED, BatchState.CREATED},
    "challenge": {BatchState.CREATED, BatchState.RUNNING, BatchState.PAUSED, BatchState.STOPPED},
}


@dataclass
class BatchContext:
    lot: str
    gtin: str
    expiry: str
    planned_qty: int
    product: Product
    state: BatchState
    challenge: bool = True
    #: kinds this batch must pass before production, fixed at create ([] = waived); see Line.challenge_missing
    challenge_required: list[str] | None = None
    #: dates besides expiry the code template prints (production_date, packaging_date, best_before, sell_by)
    dates: dict[str, str] = field(default_factory=dict)
    good: int = 0
    good_before: int = 0  # commissioned in earlier runs of the daemon (restart mid-batch)
    decommissioned: int = 0
    started_at: float | None = None

    def good_total(self) -> int:
        return self.good + self.good_before

    def code_values(self) -> dict[str, str | None]:
        """The batch attributes a CodeTemplate takes its per-batch AIs from (gs1.BATCH_SOURCES)."""
        return {"lot": self.lot, "expiry": self.expiry, **self.dates}

    def unit_code(self, serial: str) -> tuple[gs1.ParsedCode, Expected]:
        """The code the line prints for `serial` in this batch and what a read of it must show: one composition
        (the product's CodeTemplate) for the printer, print-and-verify and a downstream verify station."""
        tpl = self.product.template
        code = tpl.compose(self.gtin, serial, self.code_values())
        return code, Expected(self.gtin, serial, code.lot, code.expiry_raw, code.element_string, tpl.expected(code))


@dataclass
class ActiveAlarm:
    """An alarm until it is both acknowledged and cleared (critical ones clear on reset, the others when raised:
    nothing is tracked that would clear them), so a dashboard that starts late still shows it."""

    alarm_id: str
    code: str
    severity: str
    message: str
    station: str | None
    raised_at: str
    acknowledged: bool = False
    acknowledged_by: str | None = None
    acknowledged_at: str | None = None
    cleared: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.alarm_id,
            "alarm_id": self.alarm_id,
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "station": self.station,
            "since": self.raised_at,
            "raised_at": self.raised_at,
            "acknowledged": self.acknowledged,
            "acknowledged_by": self.acknowledged_by,
            "acknowledged_at": self.acknowledged_at,
        }


@dataclass
class Counters:
    """Units decided in production (challenge units apart): good, rejects by reason (RejectReason values)."""

    good: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)

    def add(self, good: bool, reason: str | None) -> None:
        if good:
            self.good += 1
        else:
            key = reason or "unknown"
            self.rejected_by_reason[key] = self.rejected_by_reason.get(key, 0) + 1

    def to_json(self) -> dict[str, Any]:
        return {
            "good": self.good,
            "rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
            "no_reads": self.rejected_by_reason.get(RejectReason.NO_READ.value, 0),
        }


@dataclass
class FirstOut:
    """Why the line stopped: the first cause, and what followed from it (README "Operators' view")."""

    code: str
    message: str
    at: str
    consequences: list[dict[str, Any]] = field(default_factory=list)
    #: an operator reset the fault since: still shown (the line has not run since), but the next cause starts anew
    reset: bool = False
    #: time.monotonic() when this cause was latched: a root cause seen later than ROOT_CAUSE_WINDOW_S is a new event
    latched: float = field(default_factory=time.monotonic)

    def add(self, code: str, message: str) -> None:
        if code != self.code and len(self.consequences) < MAX_CONSEQUENCES and all(c["code"] != code for c in self.consequences):
            self.consequences.append({"code": code, "message": message, "at": _now_iso()})

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "at": self.at, "consequences": [dict(c) for c in self.consequences]}


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def zone_info(zone: str) -> tzinfo:
    """line.zone (an IANA name or a fixed "+HH:MM") as a tzinfo."""
    if zone[:1] in "+-" and len(zone) == 6:
        sign = -1 if zone[0] == "-" else 1
        return timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
    return ZoneInfo(zone)


def current_shift(cfg: ShiftConfig, tz: tzinfo, now: datetime) -> tuple[str, datetime]:
    """(name, local start) of the shift `now` falls in: the last start at or before now, else yesterday's last one."""
    local = now.astimezone(tz)
    names = cfg.names or cfg.starts
    best: tuple[str, datetime] | None = None
    for day in (local.date() - timedelta(days=1), local.date()):
        for name, start in zip(names, cfg.starts, strict=True):
            hh, mm = int(start[:2]), int(start[3:])
            at = datetime(day.year, day.month, day.day, hh, mm, tzinfo=tz)
            if at <= local and (best is None or at > best[1]):
                best = (name, at)
    assert best is not None  # yesterday's starts are all before now
    return best




class Line:
    def __init__(self, cfg: LineConfig, store: EngineStore, drivers: dict[str, Driver], clock: Clock = SYSTEM_CLOCK) -> None:
        self.cfg = cfg
        self.store = store
        self.drivers = drivers
        #: what the stations' rule timers read (linectl/engine/clock.py); set before the stations are built
        self.clock = clock
        self.batch: BatchContext | None = None
        self.fault: str | None = None
        self.alarms: OrderedDict[str, ActiveAlarm] = OrderedDict()
        #: command_id -> (command name, reply) of commands executed by this process (the store keeps them across restarts)
        self._replies: OrderedDict[str, tuple[str, dict[str, Any]]] = OrderedDict()
        self.verify_tally = C.RefusalTally("verify_alarms_suppressed", store=store)
        #: commands refused for who sent them, every channel (the daemon hands the same tally to linectl.access.Access)
        self.access_refusals = C.RefusalTally("access_refused", store=store)
        #: users_admin (the daemon wires linectl.access.Access.admin): async (command, actor, origin) -> reply
        self.on_users_admin: Any = None
        self._lock = asyncio.Lock()
        self._stop_task: asyncio.Task[None] | None = None
        self._faulting = False
        self._fault_codes: set[str] = set()  # fault alarms raised since the last reset
        self._mode_wanted = "idle"
        self._mode_unsynced: set[str] = set()  # PLCs that missed the last line_mode write
        self._state_listeners: list[Any] = []
        self.started_at = time.time()
        self.shutting_down = False
        self.infeed_stopped = False
        #: called (gtin, count) when a pool product falls below its low-water mark; the daemon wires it to MQTT, or to the
        #: product's provisioner (linectl/sources/provisioner.py) when it has a serial source
        self.on_pool_low: Any = None
        #: serial sources (the daemon wires the provisioners): async (gtin, actor, origin) -> reply of serials_retry;
        #: async (lot, gtin) -> what became of the batch's unused serials at the source (close_batch's reply), or None
        self.on_serials_retry: Any = None
        #: upstream sinks (the daemon wires them): async (sink name, actor, origin) -> reply of sink_retry
        self.on_sink_retry: Any = None
        self.on_batch_closed: Any = None
        self._pool_requested: dict[str, float] = {}
        #: monotonic times of the units decided in the last RATE_WINDOW_S (bounded by the window, and by maxlen)
        self.rate_window: deque[float] = deque(maxlen=200_000)
        self._running_since: float | None = None  # monotonic; None while the line does not run
        #: first-out: the first cause of the current (or last) stop and its consequences; None while running
        self.first_out: FirstOut | None = None
        self.batch_counts = Counters()
        self.challenge_units = 0
        self._tz = zone_info(cfg.line.zone)
        self._shift: tuple[str, datetime] = current_shift(cfg.shift, self._tz, datetime.now(UTC))
        self.shift_counts = Counters()
        self.completed = asyncio.Event()
        self.challenge_done = asyncio.Event()
        self.challenge_passed: bool | None = None
        #: why the store refuses writes (disk full, I/O error), None while it works; see store_failed
        self.store_down: str | None = None
        self._deferred: deque[Any] = deque()  # events to store, in order, once the store takes writes again
        self._store_retry: asyncio.Task[None] | None = None
        #: every station of the config, in config order, built by the registry (linectl/engine/station.py); the
        #: line drives them through the Station hooks only, and they talk back through the LinePort methods
        self.stations: list[Station] = build_stations(cfg.stations, self, drivers)
        #: the PackML view of the line (README "PackML"): state derived from the batch, overlay, in-memory counters
        self.packml = P.PackmlUnit(mach_speed=cfg.packml.mach_speed_upm, starved_after_s=cfg.packml.starved_after_s)
        # whatever a PLC holds when linectl starts (a crash left it "production", a PLC with a long heartbeat
        # timeout kept feeding), the line is stopped until an operator starts it: line_mode idle goes to every PLC
        # as soon as it answers (resync_line_mode, called by the PLC surface on its first cycle)
        self._mode_unsynced = {plc.name for plc in self.plcs}
        self._idle_preamble(True)
        self._resyncs: set[asyncio.Task[None]] = set()
        for plc in self.plcs:
            plc.on_health(self._plc_health)
        for d in drivers.values():  # device health is in the state message: publish a change now, not at the next interval
            d.on_health(self._device_health)

    # ------------------------------------------------------------------ helpers for stations

    @property
    def plcs(self) -> list[Plc]:
        """PLCs whose line_mode, status tags and HMI commands this line drives (the stations say which)."""
        seen: list[Plc] = []
        for s in self.stations:
            for plc in s.line_plcs():
                if plc not in seen:
                    seen.append(plc)
        return seen

    def on_state_change(self, cb: Any) -> None:
        self._state_listeners.append(cb)

    def _notify(self) -> None:
        self.packml.engine_changed(self.batch.state.value if self.batch is not None else "idle")
        for cb in list(self._state_listeners):
            try:
                cb()
            except Exception:  # noqa: BLE001 - a listener must not break the line
                log.exception("state_listener_failed")

    async def record(self, *events: Any) -> bool:
        """Store events that may wait (alarms, state changes, decommissionings); True when stored now.

        While the store refuses writes they are kept in memory, in order, and stored by the retry task once it
        takes writes again: the line must be able to stop, and say why, without a single store write. Events
        that must be durable before the line acts on them (a commissioning before "good") never come here."""
        if self.store_down is None:
            try:
                await self.store.append(*events)
                return True
            except StoreError as exc:
                if not _is_store_full(exc):
                    raise
                await self.store_failed(exc)
        self._deferred.extend(events)
        while len(self._deferred) > DEFERRED_MAX:
            dropped = self._deferred.popleft()
            log.error("deferred_event_dropped", kind=type(dropped).__name__)
        return False

    async def store_failed(self, exc: BaseException) -> None:
        """The store refuses writes: stop the line by a path that needs none, tell everyone, retry until it works.

        Order matters: the infeed goes to idle on the PLC first (no store involved), then the fault is visible in
        memory (MQTT state, PLC status tags, log), then the batch stops; the alarm and the state change are kept
        in memory and stored by `_retry_store` as soon as the store takes writes again."""
        if self.store_down is not None:
            return
        self.store_down = str(exc) or type(exc).__name__
        log.critical("store_refuses_writes", error=self.store_down)
        await self.infeed_idle_now()
        self._promote_first_out("store_error", f"the store refuses writes: {self.store_down}")  # the cause operators must see
        self._fault_codes.add("store_error")
        if self._store_retry is None or self._store_retry.done():
            self._store_retry = asyncio.create_task(self._retry_store(), name="store_retry")
        await self.alarm("store_error", f"the store refuses writes; line stopped: {self.store_down}", Severity.CRITICAL)
        await self._write_status(force=True)
        if self.batch is not None and self.batch.state in ALLOWED["stop"] and (self._stop_task is None or self._stop_task.done()):
            self._stop_task = asyncio.create_task(self._stop_batch(actor="system", origin="rule:store_error", reason="the store refuses writes"))

    async def _retry_store(self, interval_s: float = 1.0) -> None:
        """Store what waited in memory, once the store takes writes again; then account for serials left 'sent'."""
        while True:
            await asyncio.sleep(interval_s)
            if self._stop_task is not None and not self._stop_task.done():
                continue  # the stop (drain) is still deciding units on the belt
            try:
                while self._deferred:
                    chunk = [self._deferred[i] for i in range(min(500, len(self._deferred)))]
                    await self.store.append(*chunk)
                    for _ in chunk:
                        self._deferred.popleft()
                if self.batch is not None and self.batch.state not in (BatchState.RUNNING, BatchState.CHALLENGE, BatchState.CLOSED):
                    await self._sweep_sent(self.batch.lot)
            except StoreError as exc:
                log.debug("store_still_refuses_writes", error=str(exc), waiting=len(self._deferred))
                continue
            log.warning("store_writes_again", was=self.store_down)
            self.store_down = None
            self._notify()
            return

    async def _sweep_sent(self, lot: str) -> None:
        """Serials left 'sent' by writes the store refused (a commissioning refused: the unit got no good verdict
        and the gate rejected it fail-safe). Only while the line is stopped, so none is on the printer or belt."""
        held = {serial for s in self.stations for serial in s.serials_held()}
        stray = [(g, s) for (g, s, _lot) in self.store.in_flight(lot) if s not in held]
        for i in range(0, len(stray), 500):
            await self.store.append(
                *[
                    UnitDecommissioned(
                        gtin=g,
                        serial=s,
                        lot=lot,
                        reason=RejectReason.LINE_STOPPED,
                        detail="sent while the store refused writes; no good verdict reached the gate",
                    )
                    for g, s in stray[i : i + 500]
                ]
            )
        if stray:
            log.warning("store_recovery_decommissioned", lot=lot, count=len(stray))

    async def infeed_idle_now(self) -> None:
        """line_mode idle on every PLC, stations out of production: nothing here touches the store."""
        self._mode_wanted = "idle"
        self._idle_preamble(True)
        for s in self.stations:
            s.halt()
        for plc in self.plcs:
            try:
                await plc.write_tag("line_mode", LINE_MODE["idle"])
                await plc.write_tag("line_running", False)
                self._mode_unsynced.discard(plc.name)
            except Exception as exc:  # noqa: BLE001 - resync_line_mode repeats it once the PLC answers
                self._mode_unsynced.add(plc.name)
                log.error("plc_idle_write_failed", plc=plc.name, error=str(exc))

    async def task_crashed(self, name: str, exc: BaseException) -> None:
        """A supervised task crashed: the infeed closes before anything else; a running batch stops.

        A crashed feeder, allocator or read task leaves packs going by that nobody prints or verifies; the
        supervisor restarts the task, but production only resumes when an operator resets and starts again."""
        if isinstance(exc, StoreError) and _is_store_full(exc):
            await self.store_failed(exc)
            return
        if isinstance(exc, PoolExhausted) and self.batch is not None and self.batch.state in (BatchState.RUNNING, BatchState.CHALLENGE):
            # an empty serial pool is missing material, not a broken task: the fault operators (and PackML: Held) see
            await self.infeed_idle_now()
            await self.fault_stop("no_serials", f"no serial available: {exc}")
            return
        if self.batch is not None and self.batch.state in (BatchState.RUNNING, BatchState.CHALLENGE):
            await self.infeed_idle_now()
            await self.fault_stop("task_failed", f"task {name} crashed: {exc}; line stopped")

    async def alarm(self, code: str, message: str, severity: Severity, station: str | None = None) -> AlarmRaised:
        ev = AlarmRaised(code=code, severity=severity, message=message, station=station, lot=self.batch.lot if self.batch else None)
        await self.record(ev)
        # an alarm that does not stop the line has no condition tracked that would clear it: it goes on acknowledgement
        cleared = severity != Severity.CRITICAL
        self.alarms[ev.alarm_id] = ActiveAlarm(ev.alarm_id, code, severity.value, message, station, ev.event_time.isoformat(), cleared=cleared)
        if self.first_out is not None:
            self.first_out.add(code, message)
        while len(self.alarms) > MAX_ALARMS:
            done = next((k for k, a in self.alarms.items() if a.acknowledged), None)
            if done is not None:
                del self.alarms[done]
            else:
                self.alarms.popitem(last=False)
        log.warning("alarm", code=code, severity=severity.value, message=message, station=station)
        self._notify()
        return ev

    async def fault_stop(self, code: str, message: str, station: str | None = None) -> None:
        """Stop the line because a rule or a device says so. Safe to call from inside station tasks."""
        if self.fault is not None and (self.batch is None or self.batch.state not in ALLOWED["stop"] or self._faulting or (
            self._stop_task is not None and not self._stop_task.done()
        )):
            # the line already stops (or stopped) for a fault: this one is a consequence, listed under the first-out,
            # unless it is a root cause arriving behind one of its own consequences (README "Operators' view")
            if code in self._fault_codes:
                log.warning("fault_repeated", code=code, message=message, station=station)  # one alarm per cause, not per unit
                return
            self._fault_codes.add(code)
            stopping = self._stop_task is not None and not self._stop_task.done()
            recent = self.first_out is not None and time.monotonic() - self.first_out.latched < ROOT_CAUSE_WINDOW_S
            if code in ROOT_CAUSES and self.fault in FOLLOWS_A_ROOT_CAUSE and (stopping or recent):
                self._promote_first_out(code, message)
            await self.alarm(code, message, Severity.CRITICAL, station)  # (alarm() lists it as a consequence)
            return
        self.fault = code
        b = self.batch
        if b is not None and b.state in (BatchState.RUNNING, BatchState.CHALLENGE) and self.first_out is not None and not self.first_out.reset:
            self.first_out.add(code, message[:500])  # a fault while a commanded stop drains the belt: its consequence
        else:  # the line runs, or stands for a command (pause, stop) or a fault already reset: this fault is the cause now
            self.first_out = FirstOut(code, message[:500], _now_iso())
        self._fault_codes.add(code)
        self._faulting = True  # the alarm append awaits: a second fault meanwhile must not start a second stop
        try:
            await self.alarm(code, message, Severity.CRITICAL, station)
        finally:
            self._faulting = False
        if self.batch is not None and self.batch.state in ALLOWED["stop"]:
            self._stop_task = asyncio.create_task(self._stop_batch(actor="system", origin=f"rule:{code}", reason=message))

    async def fault_overrides(self, code: str, message: str, station: str | None = None) -> None:
        """Stop with `code` as the fault to reset, also when the line is already stopping for another cause
        (a PLC restart seen while the line stops for the PLC's outage: the restart is what an operator must see)."""
        await self.fault_stop(code, message, station)
        if self.fault != code:
            self._promote_first_out(code, message)
            if not any(a.code == code and not a.acknowledged for a in self.alarms.values()):
                await self.alarm(code, message, Severity.CRITICAL, station)

    def _latch_first_out(self, code: str, message: str) -> None:
        """The first cause of a stop; later ones are its consequences until the line runs again."""
        if self.first_out is None or self.first_out.reset:
            self.first_out = FirstOut(code, message[:500], _now_iso())
        else:
            self.first_out.add(code, message[:500])

    def _promote_first_out(self, code: str, message: str) -> None:
        """`code` is the cause the operator must see: the first-out so far becomes its first consequence."""
        self.fault = code
        old = self.first_out
        self.first_out = FirstOut(code, message[:500], _now_iso())
        if old is not None:
            self.first_out.consequences.append({"code": old.code, "message": old.message, "at": old.at})
            for c in old.consequences:
                self.first_out.add(c["code"], c["message"])

    def count_units(self, lot: str | None, *, good: int = 0, good_before: int = 0, decommissioned: int = 0) -> None:
        """A station changed the unit counts of the open batch (a unit commissioned, decommissioned, or one of an
        earlier run decommissioned); counts of another lot than the open batch's are the store's alone."""
        b = self.batch
        if b is None or b.lot != lot:
            return
        b.good += good
        b.good_before += good_before
        b.decommissioned += decommissioned

    def unit_decided(self, station: str, good: bool, reason: str | None = None) -> None:
        b = self.batch
        self.packml.unit_decided(b.lot if b else None, good, reason, b is not None and b.state == BatchState.RUNNING)
        now = time.monotonic()
        self.rate_window.append(now)
        while self.rate_window and self.rate_window[0] < now - RATE_WINDOW_S:
            self.rate_window.popleft()
        if b is not None and b.state == BatchState.CHALLENGE:
            self.challenge_units += 1
            return
        self.batch_counts.add(good, reason)
        self._roll_shift()
        self.shift_counts.add(good, reason)

    def _roll_shift(self) -> None:
        shift = current_shift(self.cfg.shift, self._tz, datetime.now(UTC))
        if shift != self._shift:
            log.info("shift_changed", shift=shift[0], since=shift[1].isoformat(), previous=self._shift[0], **self.shift_counts.to_json())
            self._shift = shift
            self.shift_counts = Counters()

    def check_pool(self, product: Product) -> None:
        """After an allocation: below low water, ask upstream for more (once per hour per GTIN), keep running."""
        if product.serials.scheme != "pool" or self.on_pool_low is None:
            return
        available = self.store.available(product.gtin)
        if available >= product.serials.low_water:
            self._pool_requested.pop(product.gtin, None)
            return
        if product.serials.source is not None:
            self.on_pool_low(product.gtin, product.serials.request_count)  # a nudge: the provisioner paces its own requests
            return
        last = self._pool_requested.get(product.gtin)
        if last is not None and time.monotonic() - last < 3600:
            return
        self._pool_requested[product.gtin] = time.monotonic()
        rid = self.on_pool_low(product.gtin, product.serials.request_count)
        log.warning("serials_requested", gtin=product.gtin, available=available, count=product.serials.request_count, request_id=rid)

    async def set_infeed(self, station: str, on: bool) -> None:
        """Count reached: stop feeding product (the belt keeps running so units in flight reach the gate)."""
        if self.batch is None or self.batch.state != BatchState.RUNNING or on != self.infeed_stopped:
            return
        self.infeed_stopped = not on
        for plc in self.plcs:
            await plc.write_tag("line_mode", LINE_MODE["production" if on else "idle"])
        log.info("infeed", on=on, lot=self.batch.lot, good=self.batch.good_total())

    async def planned_quantity_reached(self, station: str) -> None:
        if self.batch is not None and self.batch.state == BatchState.RUNNING:
            log.info("planned_quantity_reached", lot=self.batch.lot, good=self.batch.good_total())
            self.packml.completing = True
            self._stop_task = asyncio.create_task(self._stop_batch(actor="system", origin="engine", reason="planned quantity reached"))

    async def challenge_finished(self, station: str, passed: bool, results: list[dict[str, Any]]) -> None:
        if self.batch is None:
            return
        if not any(s.in_challenge for s in self.stations):
            missing = self.challenge_missing(self.batch) if passed else []
            if missing:
                passed = False
                results = [*results, *({"challenge": m, "rejected": False, "reason_seen": "not recorded"} for m in missing)]
            self.challenge_passed = passed
            if passed:
                await self._set_state(BatchState.RUNNING, actor="system", reason="challenge passed")
                await self._begin_production(self.batch)
            else:
                detail = "; ".join(f"{r['challenge']}: {'rejected as ' + str(r['reason_seen']) if r['rejected'] else 'NOT rejected'}" for r in results)
                await self.fault_stop("challenge_failed", f"challenge test failed: {detail}")
            self.challenge_done.set()

    # ------------------------------------------------------------------ start-up

    async def load_open_batch(self) -> None:
        """After a restart: pick up the batch that was open, never silently running."""
        for b in self.store.batches():
            if b.state != BatchState.CLOSED.value:
                product = self.cfg.product(b.gtin)
                counts = self.store.lot_counts(b.lot)
                state = BatchState(b.state)
                self.batch = BatchContext(
                    b.lot,
                    b.gtin,
                    b.expiry,
                    b.planned_qty,
                    product,
                    state,
                    good_before=counts.get("commissioned", 0),
                    challenge=b.challenge_required != [],
                    challenge_required=b.challenge_required,
                    dates=self.store.batch_dates(b.lot),
                )
                if state in (BatchState.RUNNING, BatchState.CHALLENGE, BatchState.PAUSED):
                    await self._set_state(BatchState.STOPPED, actor="system", reason="daemon restarted; batch stopped until an operator starts it")
                self.packml.batch_loaded(b.lot, defective_before=counts.get("decommissioned", 0))
                self.batch_counts, self.challenge_units = Counters(), 0  # this run's units (good_before: the store's)
                log.info("batch_resumed", lot=b.lot, state=self.batch.state.value, good_before=self.batch.good_before)
                return

    async def recover_in_flight(self) -> int:
        """Serials sent to a printer but never decided before a crash: decommission, never commission blindly."""
        rows = self.store.in_flight()
        by_key: dict[tuple[str, str | None], list[str]] = {}
        for gtin, serial, lot in rows:
            by_key.setdefault((gtin, lot), []).append(serial)
        n = 0
        for (gtin, in_lot), serials in by_key.items():
            for i in range(0, len(serials), 500):
                await self.store.append(
                    *[
                        UnitDecommissioned(
                            gtin=gtin,
                            serial=s,
                            lot=in_lot,
                            reason=RejectReason.CRASH_RECOVERY,
                            detail="in flight when the daemon stopped; not commissioned blindly",
                        )
                        for s in serials[i : i + 500]
                    ]
                )
            n += len(serials)
        if n:
            await self.store.audit("system", "daemon", "crash_recovery", {"decommissioned": n})
            log.warning("crash_recovery", decommissioned=n)
        return n

    # ------------------------------------------------------------------ commands

    async def execute(self, command: Any, origin: str, principal: Principal | None = None, signatures: Signatures | None = None) -> dict[str, Any]:
        """Apply one command; `principal` is who a channel verified it came from (linectl/access).

        With a principal the command must be one its roles (or device permissions) allow, else CommandRejected
        `forbidden`, and its actor becomes the principal's name whatever the command said. Without one the caller is
        code in this process (the demo harness, a test) and the actor is taken as given: every channel from outside
        (MQTT, PLC tags, OPC UA) passes the principal it verified when access control is on.

        `signatures`: the command's electronic signatures, verified by linectl.access.signing.sign; they are written
        with the command's audit record in one transaction. A command from a principal that access.signatures
        requires to be signed is refused without them (signature_required: also every device, which cannot sign),
        and so is a sign_review from anyone."""
        if isinstance(command, dict):
            command = C.COMMAND_ADAPTER.validate_python(command, context=C.AUTHENTICATED if principal is not None else None)
        if principal is not None:
            refused = permits(principal, command)
            if refused is not None:
                if self.access_refusals.note("forbidden", origin, f"{principal.name[:64]}: {command.name}"):
                    log.warning("command_forbidden", command=command.name, actor=principal.name, origin=origin, reason=refused)
                raise C.CommandRejected(refused, "forbidden")
            if command.actor != principal.name:
                command = command.model_copy(update={"actor": principal.name})
        self._check_signed(command, origin, principal, signatures)
        if command.command_id:
            # a retry gets the reply the command got the first time, also after a restart (stored with its audit record)
            seen = self._replies.get(command.command_id)
            if seen is None:
                try:
                    done = await asyncio.to_thread(self.store.command_reply, command.command_id)
                except Exception as exc:  # noqa: BLE001 - cannot tell: refuse rather than risk running it twice
                    raise C.CommandRejected(f"cannot check command_id {command.command_id!r}: {exc}", "store_unavailable") from None
                if done is not None:
                    seen = self._replies[command.command_id] = (str(done["command"]), dict(done["result"]))
            if seen is not None:
                if seen[0] != command.name:
                    raise C.CommandRejected(f"command_id {command.command_id!r} was already used for {seen[0]}", "command_id_reused")
                return seen[1]
        if isinstance(command, C.PackmlCmd):
            await self._packml_precheck(command)
        require_reason(self.cfg.audit.reason_required, command)
        async with self._lock:
            handler = getattr(self, f"_cmd_{command.name}")
            try:
                if isinstance(command, C.PackmlCmd):
                    # whether an Unhold restarts the batch depends on the fault, which may have changed while this
                    # command waited for the lock: checked again here, with no await before the handler decides
                    self._check_signed(command, origin, principal, signatures)
                was = changes_before(self, command)
                result: dict[str, Any] = await handler(command, origin)
                if signatures is not None:
                    result = {**result, "signature": signatures.public()}
                if not isinstance(command, (C.RequestState, C.VerifyCode)):
                    await self.store.audit(
                        command.actor,
                        origin,
                        command.name,
                        {**command.model_dump(mode="json", exclude={"serials"}), "result": _short(result),
                         **change_of(self, command, was, result),
                         **({} if principal is None else {"auth": {"kind": principal.kind, "channel": principal.channel, "session": principal.session}}),
                         **({} if signatures is None else {"signature": signatures.public()})},
                        command_id=command.command_id,
                        reply=result,  # durable idempotency: a retry after a restart gets this reply
                        signature=None if signatures is None else signatures.spec(),  # same transaction (identity.sign_record)
                    )
            except StoreError as exc:
                if not _is_store_full(exc):
                    raise
                await self.store_failed(exc)
                raise C.CommandRejected(f"the store refuses writes ({exc}); nothing more was done", "store_unavailable") from None
        if command.command_id:
            self._replies[command.command_id] = (command.name, result)
            while len(self._replies) > 10_000:
                self._replies.popitem(last=False)
        self._notify()
        return result

    def _check_signed(self, command: Any, origin: str, principal: Principal | None, signatures: Signatures | None) -> None:
        """The signature rule (access.signatures) for a command that came through a channel, checked again here so a
        channel without a signature path (PLC tags, OPC UA methods) cannot bypass it."""
        if principal is None and signatures is None and not isinstance(command, C.SignReview):
            return  # code in this process (the demo harness, a test): trusted as it is, like its actor
        need = (requirement(self.cfg.access.signatures, command, starts_batch=self.restarts_batch(command))
                if self.cfg.access.enabled or isinstance(command, C.SignReview) else None)
        if need is None:
            return
        who = principal.name if principal is not None else command.actor
        if signatures is None or (need.second_meaning is not None and signatures.second is None):
            what = "a second person's signature" if signatures is not None else "an electronic signature"
            unhold = " (PackML Unhold of a line Held on an empty serial pool restarts the batch)" if self.restarts_batch(command) else ""
            why = (f"{command.name} needs {what} (access.signatures {need.action}){unhold}"
                   + ("; a device cannot sign: send it from a user (MQTT, CLI)" if principal is not None and principal.kind == "device" else ""))
            if self.access_refusals.note("signature_required", origin, f"{who[:64]}: {command.name}"):
                log.warning("signature_required", command=command.name, actor=who, origin=origin, action=need.action)
            raise C.CommandRejected(why, "signature_required")

    def restarts_batch(self, command: Any) -> bool:
        """A PackML Unhold of a line Held on a material fault (an empty serial pool): the fault stopped the batch, so
        the Unhold runs start_batch and is held to its signature rule (README "Electronic signatures")."""
        return isinstance(command, C.PackmlCmd) and command.cmd is P.PackmlCommand.Unhold and self.fault in P.HOLD_FAULTS

    async def _cmd_sign_review(self, c: C.SignReview, origin: str) -> dict[str, Any]:
        """The review of `c.lot` built again now: signed only when its digest is the one the signer's document shows."""
        from linectl.review import review_to_sign

        try:
            return await asyncio.to_thread(review_to_sign, self.store, c.lot, c.review_digest, zone=self._tz)  # type: ignore[arg-type]
        except C.CommandRejected as exc:
            if exc.code == "record_changed" and self.access_refusals.note("record_changed", origin, f"{c.actor[:64]}: sign_review {c.lot}"):
                log.warning("review_changed", lot=c.lot, signed_digest=c.review_digest, actor=c.actor, reason=exc.reason)
            raise

    async def _cmd_create_batch(self, c: C.CreateBatch, origin: str) -> dict[str, Any]:
        if self.batch is not None and self.batch.state != BatchState.CLOSED:
            raise C.CommandRejected(f"batch {self.batch.lot} is still {self.batch.state.value}; close it first", "batch_open")
        try:
            product = self.cfg.product(c.gtin)
        except (KeyError, Exception) as exc:
            raise C.CommandRejected(f"unknown GTIN {c.gtin}: not configured on this line", "unknown_gtin") from exc
        if self.store.batch(c.lot) is not None:
            raise C.CommandRejected(f"lot {c.lot} already exists", "lot_exists")
        self._check_expiry(c.expiry, product, production=c.production_date)
        C.check_batch_code(c, product.template, product.gtin, product.shelf_life_days is not None)
        required: list[str] = list(self.cfg.batch.challenge) if c.challenge else []
        await self.store.create_batch(c.lot, product.gtin, c.expiry, c.planned_qty, actor=c.actor, origin=origin, challenge_required=required,
                                      dates=c.dates, audit_extra={"config": config_fingerprint(self.cfg)})
        self.batch = BatchContext(
            c.lot, product.gtin, c.expiry, c.planned_qty, product, BatchState.CREATED, challenge=c.challenge, challenge_required=required, dates=c.dates
        )
        await self.store.append(BatchStateChanged(lot=c.lot, gtin=product.gtin, state=BatchState.CREATED, actor=f"{c.actor}@{origin}", reason="created"))
        self.completed.clear()
        self.packml.batch_loaded(c.lot)
        self.batch_counts, self.challenge_units = Counters(), 0
        return {"lot": c.lot, "state": "created"}

    @staticmethod
    def _check_expiry(expiry: str, product: Product, today: date | None = None, production: str | None = None) -> None:
        """Expiry against the calendar of the day the batch is created: not past, not beyond the shelf life.

        A pack printed with an expiry in the past, or later than the product's registered shelf life allows,
        is a pack that cannot be released: refuse it before a single code is printed. The shelf life runs from
        the batch's production_date when it gives one (its first day for DD=00), else from today."""
        today = today or date.today()
        last_day = C.expiry_date(expiry)
        if last_day < today:
            raise C.CommandRejected(f"expiry {expiry}: {last_day.isoformat()} is in the past (today is {today.isoformat()})", "invalid_expiry")
        if product.shelf_life_days is not None:
            start, since = (today, "today") if production is None else (C.batch_date(production, "production_date"), f"production_date {production}")
            latest = start + timedelta(days=product.shelf_life_days)
            if last_day > latest:
                raise C.CommandRejected(
                    f"expiry {expiry}: {last_day.isoformat()} is beyond the shelf life of {product.gtin} "
                    f"({product.shelf_life_days} days from {since}: {latest.isoformat()} at the latest)",
                    "invalid_expiry",
                )

    def _require_batch(self, action: str) -> BatchContext:
        if self.batch is None or self.batch.state == BatchState.CLOSED:
            raise C.CommandRejected("no open batch", "no_batch")
        if self.batch.state not in ALLOWED[action]:
            raise C.CommandRejected(f"cannot {action} batch {self.batch.lot} in state {self.batch.state.value}", "bad_state")
        return self.batch

    def _devices_ready(self) -> None:
        bad = [f"{d.name}: {d.health.state.value} {d.health.reason}".strip() for d in self.drivers.values() if d.health.state.value == "disconnected"]
        if bad:
            raise C.CommandRejected("devices not ready: " + "; ".join(bad), "devices_not_ready")

    async def _cmd_start_batch(self, c: C.StartBatch, origin: str) -> dict[str, Any]:
        b = self._require_batch("start")
        if c.lot is not None and c.lot != b.lot:
            raise C.CommandRejected(f"open batch is {b.lot}, not {c.lot}", "wrong_lot")
        if self.fault is not None:
            raise C.CommandRejected(f"line fault {self.fault} active; reset first", "fault_active")
        self._production_mode()
        self._require_reconciled(b)
        try:  # a batch from before its product's code_template gained a date AI cannot fill it: never print it empty
            b.product.template.batch_values(b.code_values())
        except GS1Error as exc:
            raise C.CommandRejected(f"batch {b.lot}: {exc.reason}; close it and create a new batch", "missing_dates") from None
        self._store_ok()
        self._devices_ready()
        if self.challenge_missing(b):
            # never started, or its challenge was cut short (crash, stop) or failed: the whole challenge runs
            # again, the way QA feeds the set of challenge packs, before a single production unit
            return await self._begin_challenge(c.actor, origin)
        await self._set_state(BatchState.RUNNING, actor=f"{c.actor}@{origin}", reason="start")
        b.started_at = b.started_at or time.time()
        await self._begin_production(b, command=True)
        return {"lot": b.lot, "state": b.state.value}

    def _store_ok(self) -> None:
        if self.store_down is not None:
            raise C.CommandRejected(f"the store refuses writes ({self.store_down}); free space first", "store_unavailable")

    def challenge_required(self, b: BatchContext) -> list[str]:
        if b.challenge_required is not None:
            return list(b.challenge_required)
        return list(self.cfg.batch.challenge) if b.challenge else []

    def challenge_missing(self, b: BatchContext) -> list[str]:
        """'station:kind' of every challenge unit this batch still needs: per station and required kind, the last
        stored result must be a unit rejected for that kind's own reason and confirmed by the gate.

        Read from the store (batches.challenge), not from memory: a restart must not forget a challenge that
        never finished, and a result the store did not take does not count."""
        required = self.challenge_required(b)
        testers = [s.name for s in self.stations if s.runs_challenge]
        if not required or not testers:
            return []  # (the challenge is a print_verify station's test: a line without one has none to run)
        rec = self.store.batch(b.lot)
        st = challenge_status(required, rec.challenge if rec is not None else [], testers)
        return [*st["failed"], *st["never_ran"]]

    async def _begin_production(self, b: BatchContext, *, command: bool = False) -> None:
        """Stations into production, then the infeed opens, only once every printer holds its queue of codes."""
        for s in self.stations:
            s.begin_production(b)
        slow = [s.name for s in await asyncio.gather(*(self._primed_or_none(s) for s in self.stations)) if s is not None]
        if slow:
            msg = f"printer of station(s) {', '.join(slow)} did not hold its queue of codes within {PRIME_TIMEOUT_S}s: production not started"
            await self.fault_stop("printer_not_primed", msg)
            if command:
                raise C.CommandRejected(msg + "; batch stopped", "printer_not_primed")
            return
        await self._write_line_mode("production")

    @staticmethod
    async def _primed_or_none(s: Station) -> Station | None:
        return None if await s.primed(PRIME_TIMEOUT_S) else s

    async def _begin_challenge(self, actor: str, origin: str) -> dict[str, Any]:
        b = self.batch
        assert b is not None
        kinds = self.challenge_required(b) or list(self.cfg.batch.challenge)
        self.challenge_done.clear()
        self.challenge_passed = None
        await self._set_state(BatchState.CHALLENGE, actor=f"{actor}@{origin}", reason="challenge test")
        for s in self.stations:
            s.begin_challenge(b, kinds)
        await self._write_line_mode("challenge")
        return {"lot": b.lot, "state": b.state.value, "challenge": kinds}

    async def _cmd_challenge(self, c: C.Challenge, origin: str) -> dict[str, Any]:
        self._require_batch("challenge")
        self._store_ok()
        if self.fault is not None:
            raise C.CommandRejected(f"line fault {self.fault} active; reset first", "fault_active")
        self._devices_ready()
        return await self._begin_challenge(c.actor, origin)

    async def _cmd_pause_batch(self, c: C.PauseBatch, origin: str) -> dict[str, Any]:
        b = self._require_batch("pause")
        await self._write_line_mode("idle")
        for s in self.stations:
            s.pause()
        self._latch_first_out("pause", f"paused by {c.actor}@{origin}")
        await self._set_state(BatchState.PAUSED, actor=f"{c.actor}@{origin}", reason="pause")
        return {"lot": b.lot, "state": b.state.value}

    async def _cmd_resume_batch(self, c: C.ResumeBatch, origin: str) -> dict[str, Any]:
        b = self._require_batch("resume")
        if self.fault is not None:
            raise C.CommandRejected(f"line fault {self.fault} active; reset first", "fault_active")
        self._production_mode()
        self._require_reconciled(b)
        self._store_ok()
        if self.challenge_missing(b):
            return await self._begin_challenge(c.actor, origin)
        await self._set_state(BatchState.RUNNING, actor=f"{c.actor}@{origin}", reason="resume")
        await self._begin_production(b, command=True)
        return {"lot": b.lot, "state": b.state.value}

    async def _cmd_stop_batch(self, c: C.StopBatch, origin: str) -> dict[str, Any]:
        self._require_batch("stop")
        await self._stop_batch(actor=c.actor, origin=origin, reason=c.reason or "stop", locked=True)
        assert self.batch is not None
        return {"lot": self.batch.lot, "state": self.batch.state.value}

    async def _stop_batch(self, *, actor: str, origin: str, reason: str, locked: bool = False) -> None:
        if not locked:
            async with self._lock:
                await self._stop_batch_inner(actor, origin, reason)
        else:
            await self._stop_batch_inner(actor, origin, reason)

    async def _stop_batch_inner(self, actor: str, origin: str, reason: str) -> None:
        b = self.batch
        if b is None or b.state not in ALLOWED["stop"]:
            return
        why = {"planned quantity reached": "planned_quantity", "PackML Abort": "abort"}.get(reason, "stop")
        if not origin.startswith("rule:"):  # a fault's own stop is how the fault acts, not another cause
            self._latch_first_out(why, f"{reason} ({actor}@{origin})")
        await self._write_line_mode("idle")
        # each station says how long units on the belt may need (a print_verify station: at least the confirm wait)
        drain = max((s.drain_timeout_s() for s in self.stations), default=1.0)
        await asyncio.gather(*(s.drain(drain) for s in self.stations))
        await self._set_state(BatchState.STOPPED, actor=f"{actor}@{origin}", reason=reason)
        await self._write_status(force=True)
        if reason == "planned quantity reached":
            self.completed.set()
        self.challenge_done.set()

    async def _cmd_close_batch(self, c: C.CloseBatch, origin: str) -> dict[str, Any]:
        b = self._require_batch("close")
        if c.lot is not None and c.lot != b.lot:
            raise C.CommandRejected(f"open batch is {b.lot}, not {c.lot}", "wrong_lot")
        policy = c.unused_serials or self.cfg.batch.unused_serials
        unused: set[str] = set()
        for s in self.stations:
            unused.update(s.unused_serials())
        # one store operation, shared with the offline `linectl batch close`: returned/voided, stray sent decommissioned
        res = await self.store.close_batch(b.lot, policy, f"{c.actor}@{origin}", extra_unused=unused)
        prev, b.state = b.state, BatchState.CLOSED
        log.info("batch_state", lot=b.lot, state=b.state.value, previous=prev.value, actor=f"{c.actor}@{origin}", reason="close")
        self._notify()
        from linectl.report import batch_report

        report = batch_report(self.store, b.lot)
        unused_serials: dict[str, Any] = {"policy": policy, "count": res["unused"]}
        if self.on_batch_closed is not None:  # voided serials of a serial source: given back, or reported
            upstream = await self.on_batch_closed(b.lot, b.gtin)
            if upstream is not None:
                unused_serials["source"] = upstream
        return {"lot": b.lot, "state": "closed", "unused_serials": unused_serials, "report": report}

    async def _cmd_provision_pool(self, c: C.ProvisionPool, origin: str) -> dict[str, Any]:
        try:
            product = self.cfg.product(c.gtin)
        except Exception as exc:  # noqa: BLE001
            raise C.CommandRejected(f"unknown GTIN {c.gtin}: not configured on this line", "unknown_gtin") from exc
        if product.serials.scheme != "pool":
            raise C.CommandRejected(f"GTIN {product.gtin} uses {product.serials.scheme} serials, not a pool", "not_pool")
        res = await self.store.provision(product.gtin, c.serial_list(), source=origin)
        if res.invalid or res.duplicates:
            if res.accepted == 0:
                raise C.CommandRejected(
                    f"no serial accepted: {res.duplicates} duplicates, {res.invalid} invalid; {'; '.join(res.problems[:5])}", "pool_rejected"
                )
        return {
            "gtin": product.gtin,
            "accepted": res.accepted,
            "duplicates": res.duplicates,
            "invalid": res.invalid,
            "problems": res.problems[:20],
            "request_id": c.request_id,
        }

    async def _cmd_serials_retry(self, c: C.SerialsRetry, origin: str) -> dict[str, Any]:
        try:
            product = self.cfg.product(c.gtin)
        except Exception as exc:  # noqa: BLE001
            raise C.CommandRejected(f"unknown GTIN {c.gtin}: not configured on this line", "unknown_gtin") from exc
        if product.serials.scheme != "pool" or product.serials.source is None or self.on_serials_retry is None:
            raise C.CommandRejected(f"GTIN {product.gtin} has no serial source to retry", "no_source")
        result: dict[str, Any] = await self.on_serials_retry(product.gtin, c.actor, origin)
        return result

    async def _cmd_sink_retry(self, c: C.SinkRetry, origin: str) -> dict[str, Any]:
        if self.on_sink_retry is None:
            raise C.CommandRejected("this line has no upstream sinks running", "unknown_sink")
        result: dict[str, Any] = await self.on_sink_retry(c.sink, c.actor, origin)
        return result

    async def _cmd_request_state(self, c: C.RequestState, origin: str) -> dict[str, Any]:
        return self.snapshot()

    async def _cmd_ack_alarm(self, c: C.AckAlarm, origin: str) -> dict[str, Any]:
        ids = [c.alarm_id] if c.alarm_id else [a.alarm_id for a in self.alarms.values() if not a.acknowledged]
        for aid in ids:
            if aid not in self.alarms:
                raise C.CommandRejected(f"no alarm {aid}", "unknown_alarm")
        for aid in ids:
            ev = AlarmAcknowledged(alarm_id=aid, actor=f"{c.actor}@{origin}")
            await self.store.append(ev)
            a = self.alarms[aid]
            a.acknowledged, a.acknowledged_by, a.acknowledged_at = True, ev.actor, ev.event_time.isoformat()
        self._drop_finished_alarms()
        return {"acknowledged": ids}

    def _drop_finished_alarms(self) -> None:
        for aid in [k for k, a in self.alarms.items() if a.acknowledged and a.cleared]:
            del self.alarms[aid]

    async def _cmd_reset(self, c: C.ResetLine, origin: str) -> dict[str, Any]:
        self._store_ok()  # a store_error clears once the store writes again, not before (and the reset is audited)
        was = self.fault
        self.fault = None
        self._fault_codes.clear()
        for a in self.alarms.values():  # the operator says the causes are fixed: what is acknowledged goes
            a.cleared = True
        if self.first_out is not None:
            self.first_out.reset = True
        self._drop_finished_alarms()
        await self._write_status(force=True)
        return {"fault_cleared": was}

    async def _cmd_verify_code(self, c: C.VerifyCode, origin: str) -> dict[str, Any]:
        from linectl.store.trace import alarm_event, verify_code_async

        result = await verify_code_async(self.store, c.code, where=c.where, raise_alarm=False)
        if result["verdict"] in ("suspicious", "unknown"):
            # one alarm per code while it is unacknowledged; further hits are counted into one audit record per
            # interval (C.RefusalTally), so a flood of garbage scans cannot grow the alarm and audit tables
            ev = alarm_event(result)
            active = next((a for a in self.alarms.values() if a.code == ev.code and not a.acknowledged), None)
            if active is None:
                result["alarm_id"] = (await self.alarm(ev.code, ev.message, ev.severity)).alarm_id
            else:
                self.verify_tally.note(ev.code, origin, ev.message)
                result["alarm_id"] = active.alarm_id
        return result

    async def _cmd_close_case(self, c: C.CloseCase, origin: str) -> dict[str, Any]:
        stations = [s for s in self.stations if isinstance(s, PartialCloser) and (c.station is None or s.name == c.station)]
        if not stations:
            raise C.CommandRejected(f"no case or pallet station{' named ' + c.station if c.station else ''}", "no_station")
        results = {}
        for s in stations:
            results[s.name] = await s.close_partial()
        return {"closed": _jsonable(results)}

    def _rework_benches(self, station: str | None) -> list[ReworkBench]:
        return [s for s in self.stations if isinstance(s, ReworkBench) and (station is None or s.name == station)]

    async def _cmd_rework(self, c: C.Rework, origin: str) -> dict[str, Any]:
        from linectl.engine import rework as R

        actor, store, op = f"{c.actor}@{origin}", self.store, c.operation
        try:
            if op == "remove":
                res = await R.remove_unit(store, c.code, actor)
            elif op == "add":
                assert c.child is not None
                res = await R.add_unit(store, c.code, c.child, actor)
            elif op == "replace":
                assert c.child is not None
                res = await R.replace_unit(store, c.code, c.child, actor, decommission_old=c.decommission_old, detail=c.reason)
            elif op == "dissolve":
                res = await R.dissolve(store, c.code, actor, void_sscc=not c.keep_sscc, reason=c.reason or "dissolved")
            elif op == "decommission":
                res = await R.decommission_unit(store, c.code, actor, detail=c.reason or "damaged")
            else:  # reprint: on a rework bench's printer, whose confirmation stream the bench owns
                benches = [b for b in self._rework_benches(c.station) if b.printer is not None]
                if not benches:
                    raise C.CommandRejected(f"no rework station{' ' + c.station if c.station else ''} with a printer to reprint on", "no_printer")
                b = benches[0]
                res = await R.reprint_label(store, c.code, actor, printer=b.printer, confirm=b.confirm_print, origin=origin)
        except R.ReworkError as exc:
            raise C.CommandRejected(exc.message, exc.code) from None
        return {"rework": res}

    async def _cmd_rework_mode(self, c: C.ReworkMode, origin: str) -> dict[str, Any]:
        benches = self._rework_benches(c.station)
        if not benches:
            raise C.CommandRejected(f"no rework station{' named ' + c.station if c.station else ''}", "no_station")
        if c.station is None and len(benches) > 1:
            raise C.CommandRejected(f"several rework stations ({', '.join(b.name for b in benches)}): name one", "ambiguous_station")
        b = benches[0]
        b.set_mode(c.mode, c.operator)  # execute() has put the command itself in the audit trail
        return {"station": b.name, "mode": b.mode, "operator": b.operator}

    # --- units of unknown fate (PLC restart; see PrintVerifyRuntime._new_epoch) ---

    def _require_reconciled(self, b: BatchContext) -> None:
        """Production does not resume over units nobody can vouch for: the operator reconciles them first."""
        fates = self.store.unit_fates(b.lot, open_only=True)
        if fates:
            shown = ", ".join(f.serial for f in fates[:10]) + (" …" if len(fates) > 10 else "")
            raise C.CommandRejected(
                f"{len(fates)} unit(s) of batch {b.lot} have an unknown fate after a PLC restart ({shown}): "
                "check the reject bin and reconcile them (reconcile_units) first",
                "units_fate_unknown",
            )

    async def _cmd_reconcile_units(self, c: C.ReconcileUnits, origin: str) -> dict[str, Any]:
        """The operator's finding for units of unknown fate: in the reject bin (decommission) or passed (keep)."""
        open_fates = {(f.gtin, f.serial): f for f in self.store.unit_fates(open_only=True)}
        picked = []
        unknown = []
        for s in c.serials:
            hits = [f for (g, ser), f in open_fates.items() if ser == s and (c.gtin is None or g == c.gtin.zfill(14))]
            if len(hits) != 1:
                unknown.append(s)
            else:
                picked.append(hits[0])
        if unknown:
            raise C.CommandRejected(f"no open fate_unknown record for serial(s) {', '.join(unknown[:10])}", "not_fate_unknown")
        if c.outcome == "in_bin":
            # a code found in the bin proves the unit is there only if the bin holds more packs with that code than
            # the copies of it already rejected (printer duplicates): otherwise the pack found may be such a copy
            doubtful = []
            for f in picked:
                copies = self.store.rejected_copies(f.gtin, f.serial)
                if copies and (c.copies is None or c.copies <= len(copies)):
                    seqs = ", ".join(str(x.unit_seq) for x in copies[:5])
                    doubtful.append(f"{f.serial} ({len(copies)} cop{'y' if len(copies) == 1 else 'ies'} rejected: unit {seqs})")
            if doubtful:
                raise C.CommandRejected(
                    "the bin already holds rejected copies of "
                    + "; ".join(doubtful[:10])
                    + ": a pack with such a code in the bin may be a copy, not the unit. Count the packs carrying the code: "
                    "in_bin with copies = that count only if it is more than the copies rejected, else passed",
                    "ambiguous_copies",
                )
        actor = f"{c.actor}@{origin}"
        if c.outcome == "in_bin":
            evs = [
                UnitDecommissioned(
                    gtin=f.gtin,
                    serial=f.serial,
                    lot=f.lot,
                    reason=RejectReason.PLC_FAILSAFE,
                    seq=f.seq,
                    station=f.station,
                    detail=f"found in the reject bin when reconciled by {actor} (unit of unknown fate after a PLC restart)",
                )
                for f in picked
                if (rec := self.store.serial(f.gtin, f.serial)) is not None and rec.state == "commissioned"
            ]
            if evs:
                await self.store.append(*evs)
            if self.batch is not None:
                n = sum(1 for e in evs if e.lot == self.batch.lot)
                self.batch.good_before -= n
                self.batch.decommissioned += n
        by_gtin: dict[str, list[str]] = {}
        for f in picked:
            by_gtin.setdefault(f.gtin, []).append(f.serial)
        for g, serials in by_gtin.items():
            await self.store.resolve_fates(g, serials, c.outcome, c.actor, origin, c.reason)
        left = len(self.store.unit_fates(self.batch.lot, open_only=True)) if self.batch is not None else 0
        return {"reconciled": len(picked), "outcome": c.outcome, "serials": [f.serial for f in picked], "still_unknown": left}

    # --- PackML (linectl/engine/packml.py; the mapping is the table in README "PackML")

    def packtags(self) -> P.PackTags:
        """PackTags now: no SQL, no await (the PLC handshake and the OPC UA server read it every cycle)."""
        b = self.batch
        open_b = b if b is not None and b.state != BatchState.CLOSED else None
        engine = open_b.state.value if open_b is not None else "idle"
        self.packml.engine_changed(b.state.value if b is not None else "idle")
        stopping = self._stop_task is not None and not self._stop_task.done()
        state = self.packml.state(engine, self.fault, stopping, self.infeed_stopped)
        pm = self.packml
        if b is not None:
            defective = dict(pm.defective) if pm._lot == b.lot else {}
            good = b.good_total()
            admin = P.AdminCounters(
                b.lot, b.planned_qty, good + sum(defective.values()), good, defective,
                good + b.decommissioned + (pm.decommissioned_before if pm._lot == b.lot else 0),
            )
        else:
            admin = P.AdminCounters(None, 0, 0, 0, {}, 0)
        blocked = pm.blocked()
        starved = pm.starved(engine, self.infeed_stopped)
        return P.PackTags(
            state, pm.unit_mode, self._packml_stop_reason(), blocked, starved, pm.mach_speed, self.achieved_rate_upm(), admin, time.time(),
            engine_state=b.state.value if b is not None else "idle",
            allowed=tuple(c.name for c in sorted(P.ALLOWED[state])),
        )

    def equipment_reported(self, plc: str, *, blocked: bool | None, starved: bool | None) -> None:
        """A PLC's downstream_blocked / infeed_starved as polled (None: no such tag, or the PLC is gone): PackML
        EquipmentBlocked / EquipmentStarved and, while the batch runs, Suspended (README "PackML")."""
        if self.packml.equipment(plc, blocked=blocked, starved=starved):
            log.info("packml_equipment", plc=plc, blocked=blocked, starved=starved)
            self._notify()

    def _production_mode(self) -> None:
        if self.packml.unit_mode != P.UnitMode.Production:
            raise C.CommandRejected(
                f"unit mode is {self.packml.unit_mode.name}: production does not start; set_unit_mode Production first", "unit_mode"
            )

    def _packml_refuse(self, cmd: P.PackmlCommand, state: P.PackmlState) -> None:
        if cmd not in P.ALLOWED[state]:
            allowed = ", ".join(c.name for c in sorted(P.ALLOWED[state])) or "none"
            raise C.CommandRejected(f"PackML {cmd.name} is not allowed in state {state.name} (allowed: {allowed})", "invalid_state")

    async def _packml_precheck(self, c: C.PackmlCmd) -> None:
        """Before waiting for the command lock: a command the current state forbids (Hold while Starting, a second
        Start) is refused at once, not queued behind the action it would contradict; an Abort closes the infeed at
        once, even while another command (a stop draining the belt) holds the lock."""
        cmd = c.cmd
        self._packml_refuse(cmd, self.packtags().state)
        if cmd is P.PackmlCommand.Abort:
            self.packml.aborted = True
            self._latch_first_out("abort", f"PackML Abort by {c.actor}")
            await self.infeed_idle_now()
            self._notify()

    async def _packml_acting(self, state: P.PackmlState, action: Any) -> Any:
        self.packml.acting = state
        self._notify()
        try:
            return await action
        finally:
            self.packml.acting = None

    async def _cmd_packml_command(self, c: C.PackmlCmd, origin: str) -> dict[str, Any]:
        cmd: P.PackmlCommand = c.cmd
        K, S = P.PackmlCommand, P.PackmlState
        before = self.packtags().state
        if cmd is not K.Abort:  # (Abort has set its overlay in the precheck: the state now reads Aborting/Aborted)
            self._packml_refuse(cmd, before)
        pm, b = self.packml, self.batch
        is_open = b is not None and b.state != BatchState.CLOSED
        if cmd is K.Reset:
            pm.armed, pm.complete = True, False
        elif cmd is K.Start:
            if not is_open:
                raise C.CommandRejected("no open batch: create_batch first, then Start", "no_batch")
            await self._packml_acting(S.Starting, self._cmd_start_batch(C.StartBatch(actor=c.actor), origin))
        elif cmd is K.Stop:
            if self.fault in P.HOLD_FAULTS:  # Held on a material fault: Stop ends the hold
                await self._cmd_reset(C.ResetLine(actor=c.actor), origin)
            pm.armed = pm.complete = pm.suspended = False
            if b is not None and b.state in ALLOWED["stop"]:
                await self._packml_acting(S.Stopping, self._stop_batch(actor=c.actor, origin=origin, reason="PackML Stop", locked=True))
        elif cmd in (K.Hold, K.Suspend):
            if b is None or b.state not in (BatchState.RUNNING, BatchState.PAUSED):
                what = f"batch {b.lot} is {b.state.value}" if b is not None else "no batch"
                raise C.CommandRejected(f"PackML {cmd.name}: {what}; only a producing batch can be held (a challenge test is stopped)", "bad_state")
            pm.suspended = cmd is K.Suspend
            if b.state == BatchState.RUNNING:
                acting = S.Holding if cmd is K.Hold else S.Suspending
                await self._packml_acting(acting, self._cmd_pause_batch(C.PauseBatch(actor=c.actor), origin))
        elif cmd is K.Unhold:
            if self.fault in P.HOLD_FAULTS:  # (restarts_batch: execute() checked its signature just before, no await between)
                await self._cmd_reset(C.ResetLine(actor=c.actor), origin)
                await self._packml_acting(S.Unholding, self._cmd_start_batch(C.StartBatch(actor=c.actor), origin))
            else:
                await self._packml_acting(S.Unholding, self._cmd_resume_batch(C.ResumeBatch(actor=c.actor), origin))
        elif cmd is K.Unsuspend:
            if b is None or b.state != BatchState.PAUSED:
                why = "blocked downstream" if self.packml.blocked() else "starved"
                raise C.CommandRejected(f"the line is Suspended because it is {why}: it resumes by itself when product flows again", "starved")
            await self._packml_acting(S.Unsuspending, self._cmd_resume_batch(C.ResumeBatch(actor=c.actor), origin))
        elif cmd is K.Complete:
            pm.completing = True
            if b is not None and b.state in ALLOWED["stop"]:
                await self._packml_acting(S.Completing, self._stop_batch(actor=c.actor, origin=origin, reason="PackML Complete", locked=True))
        elif cmd is K.Abort:
            pm.aborted = True
            if b is not None and b.state in ALLOWED["stop"]:
                await self._packml_acting(S.Aborting, self._stop_batch(actor=c.actor, origin=origin, reason="PackML Abort", locked=True))
        elif cmd is K.Clear:
            if self.fault is not None:
                await self._packml_acting(S.Clearing, self._cmd_reset(C.ResetLine(actor=c.actor), origin))
            pm.aborted = pm.armed = False
        after = self.packtags().state
        log.info("packml_command", command=cmd.name, before=before.name, after=after.name, actor=c.actor, origin=origin)
        return {"command": cmd.name, "from": before.name, "state": after.name, "StateCurrent": int(after)}

    async def _cmd_set_unit_mode(self, c: C.SetUnitMode, origin: str) -> dict[str, Any]:
        mode = P.UnitMode[c.mode]
        state = self.packtags().state
        if state not in (P.PackmlState.Stopped, P.PackmlState.Idle, P.PackmlState.Aborted, P.PackmlState.Complete):
            raise C.CommandRejected(f"unit mode changes only in Stopped, Idle, Aborted or Complete, not {state.name}", "invalid_state")
        was, self.packml.unit_mode = self.packml.unit_mode, mode
        log.info("packml_unit_mode", mode=mode.name, previous=was.name, actor=c.actor, origin=origin)
        return {"unit_mode": mode.name, "UnitModeCurrent": int(mode), "previous": was.name}

    async def _cmd_users_admin(self, c: C.UsersAdmin, origin: str) -> dict[str, Any]:
        if self.on_users_admin is None:
            raise C.CommandRejected("user administration is not available on this line (access control is off)", "unsupported")
        result: dict[str, Any] = await self.on_users_admin(c, c.actor, origin)
        return result

    async def _cmd_recall_batch(self, c: C.RecallBatch, origin: str) -> dict[str, Any]:
        from linectl.store.trace import mark_recalled

        if self.store.batch(c.lot) is None:
            raise C.CommandRejected(f"no batch {c.lot}", "unknown_lot")
        res = await mark_recalled(self.store, c.lot, c.actor, c.reason, origin=origin)
        return {"lot": c.lot, "recalled": True, "already": res["already"]}

    # ------------------------------------------------------------------ state, PLC outputs

    async def _set_state(self, state: BatchState, *, actor: str, reason: str) -> None:
        b = self.batch
        assert b is not None
        prev = b.state
        b.state = state
        if state in (BatchState.RUNNING, BatchState.CHALLENGE):
            if prev not in (BatchState.RUNNING, BatchState.CHALLENGE):
                self._running_since = time.monotonic()
            self.first_out = None  # the line runs again: the last stop's reason is history (the store keeps it)
        else:
            self._running_since = None
        await self.record(BatchStateChanged(lot=b.lot, gtin=b.gtin, state=state, previous=prev, actor=actor, reason=reason))
        log.info("batch_state", lot=b.lot, state=state.value, previous=prev.value, actor=actor, reason=reason)
        self._notify()

    async def _write_line_mode(self, mode: str) -> None:
        running = mode != "idle"
        self.infeed_stopped = False
        self._mode_wanted = mode
        self._idle_preamble(mode == "idle")
        for plc in self.plcs:
            try:
                await plc.write_tag("line_mode", LINE_MODE[mode])
                await plc.write_tag("line_running", running)
                self._mode_unsynced.discard(plc.name)
            except Exception as exc:  # noqa: BLE001 - a dead PLC cannot run the line anyway
                self._mode_unsynced.add(plc.name)
                log.error("plc_write_failed", plc=plc.name, error=str(exc))
                if running:
                    raise C.CommandRejected(f"PLC {plc.name} did not accept line_mode: {exc}", "plc_error") from exc

    def _device_health(self, _driver: Driver, _health: Any) -> None:
        for cb in list(self._state_listeners):
            try:
                cb()
            except Exception:  # noqa: BLE001 - a listener must not break the line
                log.exception("state_listener_failed")

    def _idle_preamble(self, idle: bool) -> None:
        """While the line is wanted idle, a PLC session starts with idle before this controller's first heartbeat
        (Plc.set_preamble): a linectl restarted within the PLC's heartbeat timeout must not keep the dead one's
        running mode alive, even for the moment until resync_line_mode."""
        for plc in self.plcs:
            names = set(plc.tag_names)
            values: dict[str, Any] = {"line_mode": LINE_MODE["idle"], "line_running": False} if idle else {}
            plc.set_preamble({k: v for k, v in values.items() if k in names})

    def _plc_health(self, plc: Plc, health: Any) -> None:
        """A PLC (re)connected: repeat idle at once if it may still hold a running line's mode (see resync_line_mode)."""
        if health.state.value == "connected" and plc.name in self._mode_unsynced and self._mode_wanted == "idle":
            t = asyncio.get_running_loop().create_task(self.resync_line_mode(plc))
            self._resyncs.add(t)
            t.add_done_callback(self._resyncs.discard)

    async def resync_line_mode(self, plc: Plc) -> None:
        """A PLC that was away when the line stopped still holds line_mode/line_running of a running line: a short
        outage (shorter than its heartbeat timeout) would let it keep feeding product. Repeat the idle once it answers."""
        if plc.name not in self._mode_unsynced or self._mode_wanted != "idle":
            return
        try:
            await plc.write_tag("line_mode", LINE_MODE["idle"])
            await plc.write_tag("line_running", False)
        except Exception as exc:  # noqa: BLE001 - retried on the next cycle
            log.debug("plc_resync_failed", plc=plc.name, error=str(exc))
            return
        self._mode_unsynced.discard(plc.name)
        log.warning("plc_line_mode_resynced", plc=plc.name, mode="idle")

    async def _write_status(self, force: bool = False) -> None:
        tallies = [s.unit_tally() for s in self.stations]
        good = sum(g for g, _ in tallies)
        rej = sum(r for _, r in tallies)
        code = ALARM_CODES.get(self.fault or "", 99 if self.fault else 0)
        for plc in self.plcs:
            try:
                await plc.write_tags({"fault": self.fault is not None, "alarm_code": code, "good_count": good, "reject_count": rej})
            except Exception as exc:  # noqa: BLE001
                log.debug("plc_status_write_failed", plc=plc.name, error=str(exc))

    def achieved_rate_upm(self) -> float:
        """Units/min decided over the last RATE_WINDOW_S of running (a shorter run: over the time it ran); 0 when the
        line does not run (paused, stopped, closed, no batch), so a rate never outlives the production it measured."""
        since = self._running_since
        if since is None or self.batch is None or self.batch.state not in (BatchState.RUNNING, BatchState.CHALLENGE):
            return 0.0
        now = time.monotonic()
        start = max(since, now - RATE_WINDOW_S)
        n = sum(1 for t in self.rate_window if t >= start)
        return round(60.0 * n / max(now - start, 1.0), 1)

    def _challenge_json(self, b: BatchContext) -> dict[str, Any] | None:
        if not b.challenge or b.challenge_required == []:
            return None
        return {"units": self.challenge_units, "passed": self.challenge_passed}

    def stop_cause(self) -> FirstOut | None:
        """The first-out of the current (or last) stop, as operators see it: the one source of `<root>/state`'s
        stop_reason and of PackML Admin.StopReason (MQTT packml/admin, OPC UA, the PLC tag packml_stop_reason).

        None while the line runs; shown from the moment a stop or pause begins (a drain: Stopping) until the line
        runs again, through a reset (the line has not run since)."""
        return self.first_out

    def _stop_reason_json(self) -> dict[str, Any] | None:
        cause = self.stop_cause()
        return None if cause is None else cause.to_json()

    def _packml_stop_reason(self) -> P.StopReason | None:
        """Admin.StopReason from the first-out: ID the alarm code number of a fault (99 one without a number), 0 for
        a command (pause, stop, abort, planned quantity)."""
        cause = self.stop_cause()
        if cause is None:
            return None
        id_ = ALARM_CODES.get(cause.code, 0 if cause.code in P.COMMAND_STOP_CODES else 99)
        return P.StopReason(id_, cause.code, cause.message, datetime.fromisoformat(cause.at).timestamp())

    def snapshot(self) -> dict[str, Any]:
        """The operators' view (README "Operators' view: the state message"); the MQTT bridge adds the stamps."""
        b = self.batch
        self._roll_shift()
        tags = self.packtags()
        stop = tags.stop_reason
        return {
            "ts": _now_iso(),
            "line": self.cfg.topic_root,
            "state": b.state.value if b else "idle",
            "fault": self.fault,
            "stop_reason": self._stop_reason_json(),
            "store_error": self.store_down,
            "batch": (
                {
                    "lot": b.lot,
                    "gtin": b.gtin,
                    "expiry": b.expiry,
                    "planned_qty": b.planned_qty,
                    "good": b.good_total(),
                    "state": b.state.value,
                    "rejected_by_reason": self.batch_counts.to_json()["rejected_by_reason"],
                    "no_reads": self.batch_counts.to_json()["no_reads"],
                    "challenge": self._challenge_json(b),
                }
                if b
                else None
            ),
            "shift": {"name": self._shift[0], "since": self._shift[1].astimezone(UTC).isoformat(), **self.shift_counts.to_json()},
            "rate_upm": self.achieved_rate_upm(),
            "rate_window_s": RATE_WINDOW_S,
            "stations": {s.name: s.snapshot() for s in self.stations},
            "devices": {n: _device_json(d) for n, d in self.drivers.items()},
            "alarms": [a.to_json() for a in self.alarms.values() if not (a.acknowledged and a.cleared)][-ALARMS_SHOWN:],
            "packml": {
                "State": tags.state.name,
                "StateCurrent": int(tags.state),
                "UnitMode": tags.unit_mode.name,
                "StopReason": stop.to_json() if stop is not None else None,
            },
            "units": {"rate": "units/min", "rate_window": "s", "latency": "ms", "times": "ISO 8601 UTC unless named *_epoch"},
        }


def _device_json(d: Driver) -> dict[str, Any]:
    h = d.health
    since = datetime.fromtimestamp(h.since, UTC).isoformat()
    return {"driver": d.config.driver, "role": d.role, "state": h.state.value, "reason": h.reason, "since": since, "since_epoch": h.since}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def _is_store_full(exc: BaseException) -> bool:
    """A write the database itself refused (full disk, page cap, I/O, read-only), not one refused on its merits."""
    import sqlite3

    cause = exc.__cause__
    return isinstance(cause, sqlite3.Error) and not isinstance(cause, sqlite3.IntegrityError)


def store_refuses_writes(exc: BaseException) -> bool:
    """For the supervisor: a task crashed because the store refuses writes (its restarts are not counted)."""
    return isinstance(exc, StoreError) and _is_store_full(exc)


def _short(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("report", "problems")}
