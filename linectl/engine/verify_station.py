"""The verify station: read codes printed elsewhere, check each against the store, reject what fails.

Where it sits: downstream of a print_verify station (a second check after its
gate, e.g. at the case packer's infeed), or on a line whose packs arrive
printed and commissioned. It prints nothing and commissions nothing. A unit is
good when its one code is a GS1 DataMatrix of the right grade that names a
serial this line commissioned for the open batch (GTIN, lot, expiry, the whole
element string as the line prints it), not decommissioned since, and not
already read on another unit at this station (a copied code).

What it records: a good read is a `UnitInspected` (EPCIS OBSERVE, bizStep
inspecting, at this station's readPoint); a failed read is a `ReadRejected`
record with its reason and what was read, never an EPCIS event, so a code
that names no commissioned unit never becomes an observation of a unit that
does not exist. Every failed read is also an alarm (`verify_rejected`).

With a `plc:` the station gates its units like print_verify does: a verdict
per unit sequence in the PLC's verdict_ring (good or reject), every reject
confirmed from reject_ring within the confirm wait or the line stops, and the
PLC rejects fail-safe any unit that got no good verdict. A rejected unit that
was commissioned stays commissioned: it is in the reject bin for an operator
to rework (rework bench) or decommission; linectl does not guess which.

Stop rules (`rules:`, as print_verify's): consecutive rejects, consecutive
no-reads, a reject not confirmed, and, with a PLC that reports trigger_count,
a reader that stays silent while units go by.

With an RFID reader (driver: llrp, `trigger: continuous`, no plc) each tag is
verified as the reader first reports it: its EPC decodes (linectl.epc) to a
GTIN + serial, which must pass the same store checks as a read code (known,
commissioned, of the open batch, not decommissioned, not carried by another
tag). Why continuous and no gate: a tag stream carries no unit sequence, so
there is nothing to key a gate verdict to, and a window per unit at line speed
would be a window per 100 ms. A tag is decided once: the reader reports it
again while it stays in the field (session 0) or after its flag decays, and
those reports are the same unit, not a copy (`rfid_repeats`). Tags weaker than
`rfid_min_rssi` are outside the read zone (`rfid_strays`). A cloned tag on a
second pack is indistinguishable from a repeat: RFID verification proves what
is in the stream, not how many packs carry it.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from linectl import gs1
from linectl.config import VerifyStation
from linectl.drivers.base import (
    CodeReader,
    Decoded,
    DeviceError,
    HealthState,
    Plc,
    Read,
    RfidReader,
    TagRead,
)
from linectl.drivers.plc_tags import VERDICT_GOOD, VERDICT_REJECT, PlcConfigBase
from linectl.engine.station import LinePort, Station, TaskFactory
from linectl.engine.stats import LatencyHistogram
from linectl.engine.verdict import Expected, Verdict, symbol_problem, verify_unit
from linectl.epc import EpcError, decode_epc
from linectl.events import ReadRejected, RejectReason, Severity, UnitInspected

if TYPE_CHECKING:
    from collections.abc import Mapping

    from linectl.drivers.base import Driver
    from linectl.engine.line import BatchContext

log = structlog.get_logger("linectl.verify_station")

#: a reject confirm may take this many times the read-to-gate travel time before the line stops
CONFIRM_MARGIN = 1.5
#: serials remembered per station to recognise a code read on a second unit (a copied code)
SEEN_MAX = 200_000


@dataclass
class VerifyCounters:
    read: int = 0
    good: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    reject_confirmed: int = 0
    failsafe_rejects: int = 0  # units the gate rejected without our reject order
    rfid_repeats: int = 0  # RFID: reports of a tag already decided (the same unit still in the field)
    rfid_strays: int = 0  # RFID: tags weaker than rfid_min_rssi, not verified

    def as_dict(self) -> dict[str, Any]:
        return {
            "rfid_repeats": self.rfid_repeats,
            "rfid_strays": self.rfid_strays,
            "read": self.read,
            "good": self.good,
            "rejected": dict(self.rejected),
            "rejected_total": sum(self.rejected.values()),
            "no_reads": self.rejected.get(RejectReason.NO_READ.value, 0),
            "reject_confirmed": self.reject_confirmed,
            "failsafe_rejects": self.failsafe_rejects,
        }


def ring_slots(plc: Plc) -> int:
    """R of the PLC's verdict ring (2*R elements: seq, verdict per slot)."""
    spec = (plc.config.model_dump().get("tags") or {}).get("verdict_ring") or {}
    count = int(spec.get("count") or 0)
    if count < 4 or count % 2:
        raise ValueError(f"PLC {plc.name}: tag verdict_ring must be an array of 2*R elements")
    return count // 2


def expected_for(batch: BatchContext, serial: str) -> Expected:
    """What a read of `serial` must show: the code the line printed for it (BatchContext.unit_code)."""
    return batch.unit_code(serial)[1]


class VerifyRuntime(Station):
    def __init__(self, cfg: VerifyStation, line: LinePort, reader: CodeReader | RfidReader, plc: Plc | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.line = line
        self.reader = reader
        self.plc = plc
        self.rules = cfg.rules
        self.log = log.bind(station=cfg.name)
        self.ring_slots = ring_slots(plc) if plc is not None else 0
        self.mode = "idle"  # idle | production (stop rules apply in production only)
        self.counters = VerifyCounters()
        self.latency = LatencyHistogram()
        self.recent: list[dict[str, Any]] = []  # last decisions, for the snapshot
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()  # (gtin, serial) -> unit seq it was read on
        self._decided: OrderedDict[int, bool] = OrderedDict()  # unit seq -> good?
        self._serial_of: dict[int, str] = {}  # unit seq -> serial, for units decided good (a fail-safe reject names it)
        self._pending: dict[int, float] = {}  # reject ordered, not confirmed: seq -> when ordered (monotonic)
        self._early: OrderedDict[int, None] = OrderedDict()  # the gate rejected it before our verdict
        self._ring_seen: list[int] | None = None
        self._last_seq = 0
        self._consecutive_rejects = 0
        self._consecutive_noreads = 0
        self._last_read_at = line.clock.monotonic()
        self._trigger_seen: int | None = None
        self._unread_since: float | None = None  # the PLC counted a unit not read yet, since
        self._pitch_s: float | None = None
        self._pace_last: tuple[int, float] | None = None
        self._epcs: OrderedDict[str, None] = OrderedDict()  # RFID: EPCs already decided at this station

    # ------------------------------------------------------------------ Station hooks

    def tasks(self) -> dict[str, TaskFactory]:
        t: dict[str, TaskFactory] = {f"{self.name}.reads": self._tags if isinstance(self.reader, RfidReader) else self._reads}
        if self.plc is not None:
            t[f"{self.name}.watch"] = self._watch
        return t

    def line_plcs(self) -> list[Plc]:
        return [self.plc] if self.plc is not None else []

    def begin_production(self, batch: BatchContext) -> None:
        self.mode = "production"
        self._consecutive_rejects = 0
        self._consecutive_noreads = 0
        self._unread_since = None
        self._last_read_at = self.line.clock.monotonic()

    def begin_challenge(self, batch: BatchContext, kinds: list[str]) -> None:
        self.mode = "idle"  # challenge units are print_verify's test; they never pass its gate

    def pause(self) -> None:
        self.mode = "idle"

    def halt(self) -> None:
        self.mode = "idle"

    def drain_timeout_s(self) -> float:
        return max(self.rules.drain_timeout_s, self.confirm_timeout_s()) if self.plc is not None else 0.0

    async def drain(self, timeout_s: float) -> None:
        """Units between reader and gate are still decided (reads keep coming); wait for their reject confirms."""
        self.mode = "idle"
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._pending:
            missing = sorted(self._pending)
            self._pending.clear()
            await self.line.alarm("reject_not_confirmed", f"rejects of units {missing[:10]} not confirmed at stop", Severity.CRITICAL, self.name)

    def unit_tally(self) -> tuple[int, int]:
        return (self.counters.good, sum(self.counters.rejected.values()))

    def snapshot(self) -> dict[str, Any]:
        return {
            "type": "verify",
            "mode": self.mode,
            "counters": self.counters.as_dict(),
            "decision_latency_ms": self.latency.summary(),
            "plc": None if self.plc is None else {"device": self.plc.name, "rejects_unconfirmed": len(self._pending)},
            "last": self.recent[-5:],
        }

    def confirm_timeout_s(self) -> float:
        """The configured floor, or 1.5x the time read_to_gate_units take at the measured pace."""
        floor = self.rules.reject_confirm_timeout_s
        n = self.rules.read_to_gate_units
        if n is None or self._pitch_s is None:
            return floor
        return max(floor, CONFIRM_MARGIN * n * self._pitch_s)

    # ------------------------------------------------------------------ reads

    async def _reads(self) -> None:
        assert isinstance(self.reader, CodeReader)
        async for r in self.reader.reads():
            self._last_read_at = self.line.clock.monotonic()
            self._unread_since = None
            self._measure_pace(r.seq, r.received_at)
            try:
                await self.handle_read(r)
            except DeviceError as exc:
                assert self.plc is not None
                await self.line.fault_stop("plc_write_failed", f"PLC {self.plc.name}: {exc.reason}", self.name)

    async def handle_read(self, r: Read) -> Verdict | None:
        """Decide one unit from its read; None for a second read of a unit already decided."""
        seq = r.seq if r.seq is not None else self._last_seq + 1
        if seq in self._decided:
            self.log.warning("second_read_for_unit", seq=seq)
            return None
        self._last_seq = max(self._last_seq, seq)
        self.counters.read += 1
        batch = self.line.batch
        v = self.check(r.codes, batch, seq)
        if v.good:
            assert batch is not None and v.seen_gtin is not None and v.seen_serial is not None
            await self._good(seq, v, batch, r.received_at)
        else:
            await self._bad(seq, v, batch, r.received_at)
        return v

    # ------------------------------------------------------------------ RFID (continuous)

    async def _tags(self) -> None:
        assert isinstance(self.reader, RfidReader)
        async for tag in self.reader.tags():
            self._last_read_at = self.line.clock.monotonic()
            try:
                await self.handle_tag(tag)
            except Exception as exc:  # noqa: BLE001 - one bad tag must not stop the station
                self.log.exception("tag_handling_failed", epc=tag.epc_hex, error=str(exc))

    async def handle_tag(self, tag: TagRead) -> Verdict | None:
        """Decide the unit of one tag report; None for a stray (below the floor) or a tag already decided."""
        if self.cfg.rfid_min_rssi is not None and tag.peak_rssi is not None and tag.peak_rssi < self.cfg.rfid_min_rssi:
            self.counters.rfid_strays += 1
            return None
        if tag.epc_hex in self._epcs:
            self.counters.rfid_repeats += 1
            self._epcs.move_to_end(tag.epc_hex)
            return None
        self._epcs[tag.epc_hex] = None
        while len(self._epcs) > SEEN_MAX:
            self._epcs.popitem(last=False)
        received = time.monotonic()
        seq = self._last_seq + 1
        self._last_seq = seq
        self.counters.read += 1
        batch = self.line.batch
        v = self.check_tag(tag, batch, seq)
        if v.good:
            assert batch is not None
            await self._good(seq, v, batch, received)
        else:
            await self._bad(seq, v, batch, received)
        return v

    def check_tag(self, tag: TagRead, batch: BatchContext | None, seq: int) -> Verdict:
        """The verdict on one tag: its EPC decodes to a unit identity, which passes the store checks."""
        try:
            epc = decode_epc(tag.epc_hex)
        except EpcError as exc:
            return Verdict(False, RejectReason.WRONG_CONTENT, f"tag EPC {tag.epc_hex[:60]}: {exc}")
        if epc.gtin is None or epc.serial is None:
            return Verdict(False, RejectReason.WRONG_CONTENT, f"tag {epc.pure_uri}: an SSCC (a case label), not a unit identity")
        bad = self._identity(epc.gtin, epc.serial, batch, seq)
        if bad is not None:
            return bad
        return Verdict(True, None, "", None, seen_gtin=epc.gtin, seen_serial=epc.serial)

    # ------------------------------------------------------------------ codes

    def check(self, codes: tuple[Decoded, ...], batch: BatchContext | None, seq: int) -> Verdict:
        """The verdict on one unit's codes. Order: what the reader saw (no read, symbology, element string), then
        what the store says of that serial (unknown, decommissioned, not commissioned, another batch), then whether
        another unit carried it, then the batch's data and the grade (verify_unit, as print_verify checks)."""
        min_grade = batch.product.min_grade if batch is not None else 1.5
        allow_dmre = batch.product.allow_dmre if batch is not None else False
        bad = symbol_problem(codes, require_gs1=self.rules.require_gs1, allow_dmre=allow_dmre)
        if bad is not None:
            return bad
        try:
            parsed = gs1.parse(codes[0].data)
        except gs1.GS1Error as exc:
            return Verdict(False, RejectReason.WRONG_CONTENT, f"not a valid GS1 element string: {exc.reason}")
        g, s = parsed.gtin, parsed.serial
        if not g or not s:
            return Verdict(False, RejectReason.WRONG_CONTENT, f"{parsed.hri}: not a GS1 unit identity (GTIN + serial)")
        bad = self._identity(g, s, batch, seq)
        if bad is not None:
            return bad
        assert batch is not None
        v = verify_unit(
            expected_for(batch, s), codes, min_grade=min_grade, require_gs1=self.rules.require_gs1, check_grade=self.rules.check_grade, allow_dmre=allow_dmre
        )
        if v.good:
            return Verdict(True, None, "", v.grade, seen_gtin=g, seen_serial=s)
        return Verdict(False, v.reason, v.detail, v.grade, seen_gtin=g, seen_serial=s)

    def _identity(self, g: str, s: str, batch: BatchContext | None, seq: int) -> Verdict | None:
        """What the store says of GTIN + serial read on unit `seq` (known, state, batch, not on another unit); None = fine."""
        first_on = self._seen.get((g, s))
        self._seen[(g, s)] = first_on if first_on is not None else seq
        self._seen.move_to_end((g, s))
        while len(self._seen) > SEEN_MAX:
            self._seen.popitem(last=False)
        rec = self.line.store.serial(g, s)
        if rec is None:
            return Verdict(False, RejectReason.WRONG_CONTENT, f"(01){g}(21){s} is not a serial of this line", seen_gtin=g, seen_serial=s)
        if rec.state == "decommissioned":
            return Verdict(False, RejectReason.DECOMMISSIONED, f"serial {s} was decommissioned", seen_gtin=g, seen_serial=s)
        if rec.state != "commissioned":
            return Verdict(False, RejectReason.NOT_COMMISSIONED, f"serial {s} is {rec.state}, not commissioned", seen_gtin=g, seen_serial=s)
        if batch is None:
            return Verdict(False, RejectReason.DATA_MISMATCH, f"serial {s} of lot {rec.lot}: no open batch on the line", seen_gtin=g, seen_serial=s)
        if g != batch.gtin or rec.lot != batch.lot:
            return Verdict(
                False,
                RejectReason.DATA_MISMATCH,
                f"serial {s} is of GTIN {g} lot {rec.lot}, the open batch is {batch.gtin} lot {batch.lot}",
                seen_gtin=g,
                seen_serial=s,
            )
        if first_on is not None and first_on != seq:
            return Verdict(False, RejectReason.DUPLICATE, f"serial {s} was already read on unit {first_on}", seen_gtin=g, seen_serial=s)
        return None

    async def _good(self, seq: int, v: Verdict, batch: BatchContext, received_at: float) -> None:
        assert v.seen_gtin is not None and v.seen_serial is not None
        # on record before the gate hears "good": the record never lacks an observation of a unit that passed
        await self.line.record(UnitInspected(gtin=v.seen_gtin, serial=v.seen_serial, lot=batch.lot, station=self.name))
        self._remember(seq, True, v.seen_serial)
        self.counters.good += 1
        self._consecutive_rejects = 0
        self._consecutive_noreads = 0
        self._note(seq, v)
        if self.plc is not None:
            if seq in self._early:
                del self._early[seq]  # the gate rejected it meanwhile (verdict too late)
                await self._failsafe_reject(seq)
                return
            await self.plc.write_tag("verdict_ring", [seq, VERDICT_GOOD], index=2 * (seq % self.ring_slots))
        self.latency.add((time.monotonic() - received_at) * 1000.0)

    async def _bad(self, seq: int, v: Verdict, batch: BatchContext | None, received_at: float) -> None:
        assert v.reason is not None
        write_error: DeviceError | None = None
        if self.plc is not None:
            try:  # the reject order first: it is the safety-relevant write
                await self.plc.write_tag("verdict_ring", [seq, VERDICT_REJECT], index=2 * (seq % self.ring_slots))
            except DeviceError as exc:
                write_error = exc  # the gate rejects a unit without a good verdict anyway: book it, then report
            if seq in self._early:
                del self._early[seq]
                self.counters.reject_confirmed += 1
            else:
                self._pending[seq] = self.line.clock.monotonic()
        self.latency.add((time.monotonic() - received_at) * 1000.0)
        self._remember(seq, False, None)
        self.counters.rejected[v.reason.value] = self.counters.rejected.get(v.reason.value, 0) + 1
        self._note(seq, v)
        await self.line.record(
            ReadRejected(
                reason=v.reason,
                detail=v.detail[:500],
                seq=seq,
                gtin=v.seen_gtin,
                serial=v.seen_serial,
                lot=batch.lot if batch is not None else None,
                station=self.name,
            )
        )
        where = "rejected at the gate" if self.plc is not None else "take it off the line"
        what = f" (serial {v.seen_serial})" if v.seen_serial else ""
        await self.line.alarm("verify_rejected", f"unit {seq}{what}: {v.reason.value}: {v.detail}; {where}"[:500], Severity.WARNING, self.name)
        if write_error is not None:
            raise write_error
        self._consecutive_rejects += 1
        self._consecutive_noreads = self._consecutive_noreads + 1 if v.reason == RejectReason.NO_READ else 0
        if self.mode != "production":
            return  # stop rules guard production; units drained after a stop are decided all the same
        if self._consecutive_noreads >= self.rules.no_read_limit:
            await self.line.fault_stop("no_read_limit", f"{self._consecutive_noreads} consecutive no-reads (limit {self.rules.no_read_limit})", self.name)
        elif self._consecutive_rejects >= self.rules.consecutive_reject_limit:
            await self.line.fault_stop(
                "consecutive_rejects",
                f"{self._consecutive_rejects} consecutive rejects (limit {self.rules.consecutive_reject_limit}), last: {v.reason.value}",
                self.name,
            )

    def _remember(self, seq: int, good: bool, serial: str | None) -> None:
        self._decided[seq] = good
        if serial is not None:
            self._serial_of[seq] = serial
        bound = max(64, 4 * self.ring_slots)
        while len(self._decided) > bound:
            old, _ = self._decided.popitem(last=False)
            self._serial_of.pop(old, None)

    def _note(self, seq: int, v: Verdict) -> None:
        self.recent.append({"seq": seq, "good": v.good, "reason": v.reason.value if v.reason else None, "serial": v.seen_serial})
        del self.recent[:-20]

    def _measure_pace(self, seq: int | None, at: float) -> None:
        """Seconds per unit from consecutive reads (EWMA); gaps (a stopped infeed) are not pace."""
        if seq is None:
            return
        last, self._pace_last = self._pace_last, (seq, at)
        if last is None or seq <= last[0] or seq - last[0] > 4:
            return
        sample = (at - last[1]) / (seq - last[0])
        if 0 < sample <= 10.0:
            self._pitch_s = sample if self._pitch_s is None else 0.8 * self._pitch_s + 0.2 * sample

    # ------------------------------------------------------------------ the gate (with a PLC)

    async def _watch(self) -> None:
        assert self.plc is not None
        cfg = self.plc.config
        interval = max(0.005, cfg.poll_interval_s if isinstance(cfg, PlcConfigBase) else 0.02)
        while True:
            await asyncio.sleep(interval)
            await self.check_gate()

    async def check_gate(self) -> None:
        """Reject confirmations from the reject ring, the confirm wait, a silent reader."""
        assert self.plc is not None
        latest = self.plc.latest()
        ring = latest.get("reject_ring")
        if ring:
            ring = [int(x or 0) for x in ring]
            if self._ring_seen is None or len(self._ring_seen) != len(ring):
                self._ring_seen = ring  # what the ring held before this daemon watched it says nothing of its units
            else:
                changed = sorted({v for i, v in enumerate(ring) if v and v != self._ring_seen[i]})
                self._ring_seen = ring
                for seq in changed:
                    await self._gate_rejected(seq)
        now = self.line.clock.monotonic()
        wait = self.confirm_timeout_s()
        for seq in [s for s, at in self._pending.items() if now - at > wait]:
            del self._pending[seq]
            await self.line.fault_stop("reject_not_confirmed", f"reject of unit {seq} not confirmed within {wait:.2f}s", self.name)
        tc = latest.get("trigger_count")
        if isinstance(tc, int) and self.plc.health.state != HealthState.DISCONNECTED:
            if tc != self._trigger_seen:
                if self._trigger_seen is not None and tc > self._last_seq and self._unread_since is None:
                    self._unread_since = now
                self._trigger_seen = tc
            if (
                self.mode == "production"
                and self._unread_since is not None
                and now - self._unread_since > self.rules.read_timeout_s
                and now - self._last_read_at > self.rules.read_timeout_s
            ):
                await self.line.fault_stop(
                    "reader_silent", f"reader {self.reader.name}: no read for {self.rules.read_timeout_s}s while units went by", self.name
                )
                self._unread_since = None

    async def _gate_rejected(self, seq: int) -> None:
        if seq in self._pending:
            del self._pending[seq]
            self.counters.reject_confirmed += 1
            return
        good = self._decided.get(seq)
        if good is None:
            # rejected before its read was handled (or never read): its reject order, if one comes, finds it here
            # (counted when its read decides it: a confirmed reject, or a fail-safe reject of a good unit)
            self._early[seq] = None
            while len(self._early) > max(64, 4 * self.ring_slots):
                self._early.popitem(last=False)
        elif good:
            await self._failsafe_reject(seq)

    async def _failsafe_reject(self, seq: int) -> None:
        """A unit inspected good went to the reject bin (its verdict reached the gate too late)."""
        self.counters.failsafe_rejects += 1
        serial = self._serial_of.get(seq)
        await self.line.alarm(
            "failsafe_reject",
            f"unit {seq}{f' (serial {serial}, inspected good)' if serial else ''} was rejected by PLC {self.plc.name if self.plc else '?'} "
            "fail-safe: a commissioned pack is in the reject bin; rework or decommission it",
            Severity.WARNING,
            self.name,
        )


def build(cfg: VerifyStation, line: LinePort, drivers: Mapping[str, Driver]) -> VerifyRuntime:
    """The registry's builder (linectl/engine/station.py) for `type: verify`."""
    reader = drivers[cfg.reader]
    plc = drivers[cfg.plc] if cfg.plc else None
    assert isinstance(reader, (CodeReader, RfidReader))  # roles are checked at config load
    assert plc is None or isinstance(plc, Plc)
    return VerifyRuntime(cfg, line, reader, plc)
