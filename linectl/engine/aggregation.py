"""Case and pallet stations: read the children, check them, label the parent with an SSCC, record the packing.

A case is only recorded when everything about it is proven: every child read
and known, commissioned, of the running batch and free; the count right; the
SSCC label printed and read back (or confirmed by the printer when there is
no label reader). Anything else rejects the whole case with a reason — an
alarm the operator sees and an event in the record — and leaves its children
unpacked, free to be packed again after rework.

Crash safety between label and record. The SSCC serial reference comes from
a durable store counter (never reused), and before the label is sent an
audit record `sscc_label_printing` names the SSCC. The label and the record
(ContainerCommissioned + Packed, one `store.append`, one transaction) cannot
be made atomic with each other, so the gap is closed at start-up:
`recover_containers(store)` voids (ContainerDecommissioned) every SSCC with
such an intent but no container row. A case is therefore either complete
and recorded, or not recorded with its SSCC voided — never half.

Physical divert. A case station with a `plc:` writes every decision to the
PLC that drives the case reject pusher (`case_result`, then `case_seq`; see
`AggregationRuntime._signal`). The store is the record and the PLC only
acts on it, so a failed PLC write never undoes or loses a decision: it is
an alarm, and the PLC program is expected to divert a case whose decision
does not arrive in time.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import structlog

from linectl import gs1
from linectl.config import CaseStation, PalletStation
from linectl.drivers.base import CodeReader, DeviceError, Plc, PrintConfirm, Printer, PrintJob, Read, RfidReader
from linectl.drivers.plc_tags import CASE_ACCEPT, CASE_REJECT, next_counter
from linectl.engine.station import LinePort, Station, TaskFactory
from linectl.events import ChildRef, ContainerCommissioned, ContainerDecommissioned, Packed, Severity
from linectl.store.trace import container_facts, unit_facts

if TYPE_CHECKING:
    from collections.abc import Mapping

    from linectl.drivers.base import Driver
    from linectl.engine.line import BatchContext

log = structlog.get_logger("linectl.aggregation")

LABEL_INTENT_ACTION = "sscc_label_printing"
RECOVERY_ACTION = "container_recovery"
OPEN_STATES = ("created", "challenge", "running", "paused", "stopped")

#: stable reason codes of a rejected case/pallet (reports, MQTT, alarms)
REASONS = {
    "no_batch": "no open batch to aggregate for",
    "count_short": "fewer children than the count",
    "count_over": "more children than the count",
    "duplicate": "the same child read twice",
    "unreadable": "a child code could not be read or is not a GS1 identity",
    "unknown": "child not known to this line",
    "not_commissioned": "child not commissioned",
    "decommissioned": "child decommissioned",
    "other_batch": "child of another batch",
    "already_packed": "child already packed in another parent",
    "wrong_level": "child is not of the level this station packs",
    "empty_case": "case holds no units",
    "label_print_failed": "the printer refused or failed the label",
    "label_unconfirmed": "the printer did not confirm the label",
    "label_unreadable": "the label was not read back",
    "label_mismatch": "the label read back is not the SSCC allocated",
    "commit_failed": "the store refused the aggregation",
    # RFID tunnel (linectl/engine/rfid_tunnel.py)
    "foreign_tag": "a tag in the case is no unit EPC this line decodes",
    "rfid_read_failed": "the tunnel reader failed during the case's window (connection lost, malformed LLRP, not connected)",
    "rfid_window_incomplete": "the reader did not confirm the end of the case's window: reports may be missing",
    "no_window": "a case passed the tunnel while the previous window was still being read",
}


class Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class AggResult:
    ok: bool
    level: str
    count: int
    sscc: str | None = None
    reason: str | None = None
    detail: str = ""
    partial: bool = False
    #: RFID tunnel: tags in the case's window that were excluded as not in this case (why, per tag)
    strays: list[str] = field(default_factory=list)
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="milliseconds"))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AggCounters:
    recorded: int = 0
    partial: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    labels_printed: int = 0
    sscc_voided: int = 0
    reads: int = 0  # reader results fully handled (frames, or single scans): lets a caller wait for "all seen"
    plc_signalled: int = 0  # decisions the PLC confirmed (case_result + case_seq written)
    plc_signal_failed: int = 0  # decisions the PLC was not told of (alarm raised; the record stands)

    def as_dict(self) -> dict[str, Any]:
        return {
            "recorded": self.recorded,
            "partial": self.partial,
            "rejected": dict(self.rejected),
            "rejected_total": sum(self.rejected.values()),
            "labels_printed": self.labels_printed,
            "sscc_voided": self.sscc_voided,
            "reads": self.reads,
            "plc_signalled": self.plc_signalled,
            "plc_signal_failed": self.plc_signal_failed,
        }


class AggregationRuntime(Station):
    """Shared by the case and pallet stations; subclasses say what a child is and how it is checked."""

    level: Literal["case", "pallet"] = "case"
    alarm_code = "case_rejected"

    def __init__(
        self,
        cfg: CaseStation | PalletStation,
        line: LinePort,
        reader: CodeReader | RfidReader,
        printer: Printer,
        label_reader: CodeReader | None = None,
        *,
        plc: Plc | None = None,
        label_timeout_s: float = 10.0,
        mode: Literal["frame", "scan"] | None = None,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.line = line
        self.reader = reader
        self.printer = printer
        self.label_reader = label_reader
        self.plc = plc
        self.label_timeout_s = label_timeout_s
        # A camera reports the whole open case in one frame; a scanner one child per trigger pull.
        self.mode = mode or ("frame" if getattr(reader.config, "max_codes", 1) > 1 else "scan")
        self.log = log.bind(station=cfg.name, level=self.level)
        self.counters = AggCounters()
        self.recent: deque[AggResult] = deque(maxlen=50)
        self._open: list[Any] = []  # scan mode: children read so far for the open parent
        self._partial_armed = False
        self._busy = asyncio.Lock()
        self._job_seq = 0
        self._waiting: dict[int, asyncio.Future[PrintConfirm]] = {}
        self._label_reads: asyncio.Queue[Read] = asyncio.Queue(maxsize=64)
        self._plc_seq: int | None = None  # last case_seq the PLC confirmed; None = ask the PLC first
        self._signal_lock = asyncio.Lock()  # scan-mode no-reads decide outside _busy: keep result/seq pairs whole
        self._strays: list[str] = []  # tags the parent being decided excluded (RFID tunnel); reset per parent
        self.last_sscc: str | None = None  # the parent this station recorded last

    @property
    def target(self) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------------ line interface

    def tasks(self) -> dict[str, TaskFactory]:
        t: dict[str, TaskFactory] = {f"{self.name}.reads": self._reads, f"{self.name}.label_confirms": self._confirms}
        if self.label_reader is not None:
            t[f"{self.name}.label_reads"] = self._label_reader_task
        return t

    # The line's run state does not hold a case station: it packs for the line's open batch (current_batch)
    # whether that batch runs, is paused or stopped, and a case in progress finishes on its own. So the line's
    # begin_production / pause / drain hooks are the Station defaults (nothing to do).

    def snapshot(self) -> dict[str, Any]:
        return {
            "type": self.level,
            "mode": self.mode,
            "target": self.target,
            "open": len(self._open),
            "partial_armed": self._partial_armed,
            "plc": None if self.plc is None else {"device": self.plc.name, "case_seq": self._plc_seq},
            "counters": self.counters.as_dict(),
            "last": [r.as_dict() for r in list(self.recent)[-5:]],
        }

    def current_batch(self) -> BatchContext | None:
        b = self.line.batch
        if b is None or b.state.value not in OPEN_STATES:
            return None
        return b

    async def close_partial(self) -> dict[str, Any]:
        """Batch end: record the open parent with fewer children than the count (operator command).

        Scan mode closes what was scanned so far; frame mode accepts the next
        frame with fewer children.
        """
        if self.mode == "frame":
            self._partial_armed = True
            self.log.info("partial_armed")
            return {"armed": True}
        children, self._open = self._open, []
        if not children:
            return {"closed": False, "reason": "nothing scanned"}
        res = await self.close(children, partial=True)
        return res.as_dict()

    # ------------------------------------------------------------------ reads

    async def _reads(self) -> None:
        assert isinstance(self.reader, CodeReader)
        async for r in self.reader.reads():
            try:
                await self.handle_read(r)
            except Exception as exc:  # noqa: BLE001 - one bad read must not stop the station
                self.log.exception("read_handling_failed", error=str(exc))
            finally:
                self.counters.reads += 1

    async def handle_read(self, r: Read) -> AggResult | None:
        if self.mode == "frame":
            partial, self._partial_armed = self._partial_armed, False
            return await self.close(list(r.codes), partial=partial, read_seq=r.seq)
        if not r.codes:
            if not self._open:
                self.log.info("noread_without_open_parent")
                return None
            children, self._open = self._open, []
            return await self._reject_early(len(children), "unreadable", "scanner reported a no-read", partial=False)
        self._open.extend(r.codes)
        if len(self._open) >= self.target:
            children, self._open = self._open, []
            return await self.close(children)
        return None

    async def _label_reader_task(self) -> None:
        assert self.label_reader is not None
        async for r in self.label_reader.reads():
            if self._label_reads.full():
                self._label_reads.get_nowait()
            self._label_reads.put_nowait(r)

    async def _confirms(self) -> None:
        async for c in self.printer.confirmations():
            fut = self._waiting.pop(c.seq, None)
            if fut is None:
                self.log.debug("label_confirm_unknown", job=c.seq)
            elif not fut.done():
                fut.set_result(c)

    # ------------------------------------------------------------------ one parent

    async def close(self, codes: list[Any], *, partial: bool = False, read_seq: int | None = None) -> AggResult:
        """Decide one parent from its children's codes (Decoded or raw strings): record it or reject it."""
        async with self._busy:
            return await self._close(codes, partial, read_seq)

    async def _close(self, codes: list[Any], partial: bool, read_seq: int | None) -> AggResult:
        self._strays = []
        batch = self.current_batch()
        if batch is None:
            return await self._reject_early(len(codes), "no_batch", "no open batch on the line", partial)
        try:
            refs = await self._children(codes, batch, partial)
        except Rejected as rj:
            return await self._reject_early(len(codes), rj.reason, rj.detail, partial)
        sscc = await self._allocate_sscc(batch)
        intent: dict[str, Any] = {
            "sscc": sscc, "level": self.level, "lot": batch.lot, "gtin": batch.gtin, "station": self.name, "count": len(refs), "read_seq": read_seq,
        }
        if self._strays:
            intent["strays"] = self._strays[:50]
        await self.line.store.audit("system", f"station:{self.name}", LABEL_INTENT_ACTION, intent)
        try:
            await self._label(sscc, batch, len(refs))
        except Rejected as rj:
            return await self._reject_labelled(sscc, len(refs), rj.reason, rj.detail, partial, batch)
        try:
            await self.line.store.append(
                ContainerCommissioned(sscc=sscc, level=self.level, gtin=batch.gtin, lot=batch.lot, station=self.name),
                Packed(parent=sscc, children=refs, lot=batch.lot, station=self.name),
            )
        except Exception as exc:  # noqa: BLE001 - StoreError: refused (a child changed meanwhile) or the store failed
            return await self._reject_labelled(sscc, len(refs), "commit_failed", str(exc)[:300], partial, batch)
        self.counters.recorded += 1
        self.counters.partial += int(partial)
        self.last_sscc = sscc
        res = AggResult(True, self.level, len(refs), sscc, partial=partial, strays=list(self._strays))
        await self._signal(res)
        if res.strays:
            await self._report_strays(res)
        self.recent.append(res)
        self.log.info("aggregated", sscc=sscc, children=len(refs), partial=partial, lot=batch.lot, read_seq=read_seq, strays=len(res.strays))
        return res

    async def _children(self, codes: list[Any], batch: BatchContext, partial: bool) -> list[ChildRef]:
        """The children of one parent, proven: parsed, counted, then checked against the store. Raises Rejected."""
        children = self._parse_children(codes, batch)
        self._check_count(len(children), partial)
        return await asyncio.to_thread(self._check_children, children, batch)

    async def _report_strays(self, res: AggResult) -> None:
        """A parent recorded although its read held tags of something else: the operator sees which, and why excluded."""
        msg = f"{self.level} {res.sscc} recorded with {res.count} children; {len(res.strays)} stray tag(s) excluded: {_short(res.strays)}"
        try:
            await self.line.alarm("rfid_stray_tags", msg[:500], Severity.INFO, self.name)
        except Exception as exc:  # noqa: BLE001
            self.log.error("alarm_failed", error=str(exc))

    def _check_count(self, n: int, partial: bool) -> None:
        if n > self.target:
            raise Rejected("count_over", f"{n} read, {self.level} holds {self.target}")
        if n < self.target and not (partial and n > 0):
            raise Rejected("count_short", f"{n} read, {self.level} holds {self.target}")

    async def _allocate_sscc(self, batch: BatchContext) -> str:
        cp = batch.gtin[1 : 1 + batch.product.company_prefix_length]
        ext = self.cfg.sscc_extension
        (ref,) = await self.line.store.next_sscc_refs(cp, ext, 1)
        return gs1.make_sscc(ext, cp, ref)

    def _label_job(self, sscc: str, batch: BatchContext, count: int) -> PrintJob:
        self._job_seq += 1
        code = gs1.compose({"00": sscc})
        fields = {
            "sscc": sscc,
            "product": batch.product.name,
            "gtin": batch.gtin,
            "lot": batch.lot,
            "expiry": batch.expiry,
            "count": str(count),
            "level": self.level,
        }
        return PrintJob(seq=self._job_seq, element_string=code.element_string, hri=code.hri, fields=fields)

    async def _label(self, sscc: str, batch: BatchContext, count: int) -> None:
        """Print the SSCC label and prove it: read back by the label reader, else the printer's confirmation."""
        job = self._label_job(sscc, batch, count)
        fut: asyncio.Future[PrintConfirm] = asyncio.get_running_loop().create_future()
        self._waiting[job.seq] = fut
        while not self._label_reads.empty():  # reads of earlier labels are not proof of this one
            self._label_reads.get_nowait()
        try:
            try:
                await self.printer.send(job)
            except DeviceError as exc:
                raise Rejected("label_print_failed", f"printer {self.printer.name}: {exc.reason}") from None
            self.counters.labels_printed += 1
            if self.label_reader is not None:
                await self._read_back(sscc)
            else:
                try:
                    await asyncio.wait_for(asyncio.shield(fut), self.label_timeout_s)
                except TimeoutError:
                    raise Rejected("label_unconfirmed", f"printer {self.printer.name} did not confirm the label within {self.label_timeout_s}s") from None
        finally:
            self._waiting.pop(job.seq, None)

    async def _read_back(self, sscc: str) -> None:
        deadline = time.monotonic() + self.label_timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Rejected("label_unreadable", f"no read of the label within {self.label_timeout_s}s")
            try:
                r = await asyncio.wait_for(self._label_reads.get(), left)
            except TimeoutError:
                continue
            if not r.codes:
                raise Rejected("label_unreadable", "label reader reported a no-read")
            seen = []
            for d in r.codes:
                try:
                    p = gs1.parse((d.symbology or "") + d.data)
                except gs1.GS1Error as exc:
                    seen.append(f"unparseable ({exc.reason})")
                    continue
                if d.symbology not in (None, "]d2", "]C1"):
                    seen.append(f"{d.symbology} symbol")
                    continue
                if p.sscc == sscc:
                    return
                seen.append(f"SSCC {p.sscc}" if p.sscc else p.hri)
            raise Rejected("label_mismatch", f"label reads {', '.join(seen)}; expected SSCC {sscc}")

    # ------------------------------------------------------------------ rejects

    async def _reject_early(self, n: int, reason: str, detail: str, partial: bool) -> AggResult:
        """Rejected before an SSCC was allocated: nothing to void, the children were never touched."""
        return await self._rejected(AggResult(False, self.level, n, None, reason, detail, partial, strays=list(self._strays)))

    async def _reject_labelled(self, sscc: str, n: int, reason: str, detail: str, partial: bool, batch: BatchContext) -> AggResult:
        try:
            await self.line.store.append(
                ContainerDecommissioned(
                    sscc=sscc, reason=f"{self.level} rejected: {reason}: {detail}"[:500], commissioned=False, lot=batch.lot, station=self.name
                )
            )
            self.counters.sscc_voided += 1
        except Exception as exc:  # noqa: BLE001 - the intent record makes recover_containers void it at the next start
            self.log.error("sscc_void_failed", sscc=sscc, error=str(exc))
        return await self._rejected(AggResult(False, self.level, n, sscc, reason, detail, partial, strays=list(self._strays)))

    async def _rejected(self, res: AggResult) -> AggResult:
        assert res.reason is not None
        await self._signal(res)  # first: the case is moving towards the pusher while the alarm is written
        self.counters.rejected[res.reason] = self.counters.rejected.get(res.reason, 0) + 1
        self.log.warning("rejected", reason=res.reason, detail=res.detail, sscc=res.sscc, children=res.count)
        msg = f"{self.level} rejected ({res.reason}): {res.detail}" + (f"; SSCC {res.sscc} voided" if res.sscc else "")
        if res.strays:
            msg += f"; stray tag(s) excluded: {_short(res.strays)}"
        try:
            await self.line.alarm(self.alarm_code, msg[:500], Severity.WARNING, self.name)
        except Exception as exc:  # noqa: BLE001
            self.log.error("alarm_failed", error=str(exc))
        self.recent.append(res)  # shown as decided once its alarm is on record
        return res

    # ------------------------------------------------------------------ PLC (reject pusher)

    async def _signal(self, res: AggResult) -> None:
        """Tell the PLC's reject pusher about the decision just taken: case_result, then case_seq + 1.

        The PLC acts on a change of case_seq, so the result must be in place
        before the counter moves, and two rejects in a row are still two
        changes. The counter continues from the value the PLC holds (read
        before the first write and again after any failed one) rather than
        from 0 at each start: after a daemon restart, 0 + 1 may be exactly what
        the PLC already holds, and that decision would never be acted on.
        Reading after a failure also settles whether a timed-out write landed.

        A failure is logged, counted and alarmed; it never raises, because the
        decision is already on record in the store and must stay there.
        """
        if self.plc is None:
            return
        result = CASE_ACCEPT if res.ok else CASE_REJECT
        async with self._signal_lock:
            try:
                if self._plc_seq is None:
                    self._plc_seq = int((await self.plc.read_tags(["case_seq"]))["case_seq"])
                seq = next_counter(self._seq_type(), self._plc_seq)
                await self.plc.write_tag("case_result", result)
                await self.plc.write_tag("case_seq", seq)
            except Exception as exc:  # noqa: BLE001 - DeviceError, or anything else: the decision must survive it
                self._plc_seq = None
                self.counters.plc_signal_failed += 1
                reason = exc.reason if isinstance(exc, DeviceError) else (str(exc) or type(exc).__name__)
            else:
                self._plc_seq = seq
                self.counters.plc_signalled += 1
                self.log.debug("plc_signalled", plc=self.plc.name, case_result=result, case_seq=seq, sscc=res.sscc)
                return
        self.log.error("plc_signal_failed", plc=self.plc.name, case_result=result, sscc=res.sscc, ok=res.ok, error=reason)
        what = f"{self.level} {'recorded' if res.ok else 'rejected'}" + (f" (SSCC {res.sscc})" if res.sscc else "")
        todo = (
            f"a fail-safe PLC diverts it: put the recorded {self.level} back on the line" if res.ok else "it may not be diverted: take it off the line by hand"
        )
        try:
            await self.line.alarm(
                f"{self.level}_signal_failed", f"{what}, but PLC {self.plc.name} was not told: {reason}; {todo}"[:500], Severity.WARNING, self.name
            )
        except Exception as exc:  # noqa: BLE001
            self.log.error("alarm_failed", error=str(exc))

    def _seq_type(self) -> str:
        spec = (getattr(self.plc.config, "tags", None) or {}).get("case_seq") if self.plc is not None else None
        return getattr(spec, "type", "uint32")

    # ------------------------------------------------------------------ children (per level)

    def _parse_children(self, codes: list[Any], batch: BatchContext) -> list[Any]:
        raise NotImplementedError

    def _check_children(self, children: list[Any], batch: BatchContext) -> list[ChildRef]:
        raise NotImplementedError


def _parse(code: Any) -> tuple[gs1.ParsedCode | None, str]:
    raw = code if isinstance(code, str) else (getattr(code, "symbology", None) or "") + code.data
    try:
        return gs1.parse(raw), raw
    except gs1.GS1Error as exc:
        return None, f"{raw[:40]!r}: {exc.reason}"


def _short(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


class CaseRuntime(AggregationRuntime):
    level = "case"
    alarm_code = "case_rejected"
    cfg: CaseStation

    @property
    def target(self) -> int:
        return self.cfg.units_per_case

    def _parse_children(self, codes: list[Any], batch: BatchContext) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        bad: list[str] = []
        for c in codes:
            p, why = _parse(c)
            if p is None:
                bad.append(why)
            elif p.symbology not in (None, "]d2"):
                bad.append(f"{p.hri}: {p.symbology} symbol, units carry GS1 DataMatrix")
            elif not (p.gtin and p.serial):
                bad.append(f"{p.hri}: no GTIN + serial")
            else:
                out.append((p.gtin, p.serial))
        if bad:
            raise Rejected("unreadable", _short(bad))
        seen: set[tuple[str, str]] = set()
        dups = [s for g, s in out if (g, s) in seen or seen.add((g, s))]  # type: ignore[func-returns-value]
        if dups:
            raise Rejected("duplicate", f"serial(s) {_short(dups)} read twice in this case")
        return out

    def _check_children(self, children: list[tuple[str, str]], batch: BatchContext) -> list[ChildRef]:
        return self._judge(children, unit_facts(self.line.store, children), batch)

    def _judge(self, children: list[tuple[str, str]], facts: Mapping[tuple[str, str], Any], batch: BatchContext) -> list[ChildRef]:
        """Every child known, commissioned, of the running batch and free, or Rejected naming every problem."""
        problems: dict[str, list[str]] = {}
        for g, s in children:
            f = facts.get((g, s))
            if f is None or f.state is None:
                problems.setdefault("unknown", []).append(s)
            elif f.state == "decommissioned":
                problems.setdefault("decommissioned", []).append(s)
            elif f.lot != batch.lot or g != batch.gtin:
                problems.setdefault("other_batch", []).append(f"{s} (lot {f.lot})")
            elif f.state != "commissioned":
                problems.setdefault("not_commissioned", []).append(f"{s} ({f.state})")
            elif f.parent is not None:
                problems.setdefault("already_packed", []).append(f"{s} (in {f.parent})")
        for reason in ("other_batch", "unknown", "decommissioned", "not_commissioned", "already_packed"):
            if reason in problems:  # the first reason by precedence; the detail names every problem found
                raise Rejected(reason, "; ".join(f"{k}: {_short(v)}" for k, v in problems.items()))
        return [ChildRef(gtin=g, serial=s) for g, s in children]


class PalletRuntime(AggregationRuntime):
    level = "pallet"
    alarm_code = "pallet_rejected"
    cfg: PalletStation

    @property
    def target(self) -> int:
        return self.cfg.cases_per_pallet

    def _parse_children(self, codes: list[Any], batch: BatchContext) -> list[str]:
        out: list[str] = []
        bad: list[str] = []
        for c in codes:
            p, why = _parse(c)
            if p is None:
                bad.append(why)
            elif not p.sscc:
                bad.append(f"{p.hri}: not an SSCC")
            else:
                out.append(p.sscc)
        if bad:
            raise Rejected("unreadable", _short(bad))
        seen: set[str] = set()
        dups = [s for s in out if s in seen or seen.add(s)]  # type: ignore[func-returns-value]
        if dups:
            raise Rejected("duplicate", f"SSCC(s) {_short(dups)} read twice on this pallet")
        return out

    def _check_children(self, children: list[str], batch: BatchContext) -> list[ChildRef]:
        facts = container_facts(self.line.store, children)
        problems: dict[str, list[str]] = {}
        for s in children:
            f = facts.get(s)
            if f is None or f.state is None:
                problems.setdefault("unknown", []).append(s)
            elif f.state == "decommissioned":
                problems.setdefault("decommissioned", []).append(s)
            elif f.level != "case":
                problems.setdefault("wrong_level", []).append(f"{s} ({f.level})")
            elif f.lot != batch.lot:
                problems.setdefault("other_batch", []).append(f"{s} (lot {f.lot})")
            elif f.parent is not None:
                problems.setdefault("already_packed", []).append(f"{s} (on {f.parent})")
            elif f.children == 0:
                problems.setdefault("empty_case", []).append(s)
        for reason in ("other_batch", "unknown", "decommissioned", "wrong_level", "already_packed", "empty_case"):
            if reason in problems:
                raise Rejected(reason, "; ".join(f"{k}: {_short(v)}" for k, v in problems.items()))
        return [ChildRef(sscc=s) for s in children]


# --------------------------------------------------------------------------- construction and recovery


def build(st: CaseStation | PalletStation, line: LinePort, drivers: Mapping[str, Driver]) -> AggregationRuntime:
    """The registry's builder (linectl/engine/station.py) for `type: case` and `type: pallet`."""
    reader, printer = drivers[st.reader], drivers[st.printer]
    label_reader = drivers[st.label_reader] if st.label_reader else None
    assert isinstance(printer, Printer)
    assert label_reader is None or isinstance(label_reader, CodeReader)
    if isinstance(st, CaseStation):
        plc = drivers[st.plc] if st.plc else None
        assert plc is None or isinstance(plc, Plc)
        if isinstance(reader, RfidReader):  # an RFID tunnel: config load checked its PLC and case_trigger
            from linectl.engine.rfid_tunnel import TunnelCaseRuntime

            assert plc is not None
            return TunnelCaseRuntime(st, line, reader, printer, label_reader, plc=plc)
        assert isinstance(reader, CodeReader)
        return CaseRuntime(st, line, reader, printer, label_reader, plc=plc)
    assert isinstance(reader, CodeReader)
    return PalletRuntime(st, line, reader, printer, label_reader)


async def recover_containers(store: Any, *, older_than_s: float = 0.0, actor: str = "system") -> list[str]:
    """Void every SSCC whose label may have been printed but whose aggregation was never recorded.

    The daemon calls this at start, before any station runs (then every
    intent belongs to an earlier run and is either recorded or abandoned).
    Called while stations run, pass `older_than_s` larger than a label cycle.
    Intents already examined are skipped by a watermark kept in the audit
    trail (`container_recovery`, written only when there was something new).
    Returns the SSCCs voided.
    """
    from linectl.events import ContainerDecommissioned

    intents = await asyncio.to_thread(store.label_intents, LABEL_INTENT_ACTION, RECOVERY_ACTION)
    upto, orphans, top = intents.checked_through, intents.orphans, intents.top
    now = datetime.now(UTC)
    voided: list[str] = []
    through = top
    for seq, ts, d in orphans:
        age = (now - datetime.fromisoformat(ts)).total_seconds()
        if age < older_than_s:
            through = min(through, seq - 1)  # still possibly in progress: look again next time
            continue
        sscc = d.get("sscc")
        if not sscc or store.container(sscc) is not None:
            continue
        ev = ContainerDecommissioned(
            sscc=sscc,
            reason=f"crash recovery: {d.get('level', 'container')} label printed, aggregation never recorded",
            commissioned=False,
            lot=d.get("lot"),
            station=d.get("station"),
        )
        await store.append(ev)
        voided.append(sscc)
    if top > upto:
        await store.audit(actor, "daemon", RECOVERY_ACTION, {"checked_through_seq": max(upto, through), "voided": voided})
    if voided:
        log.warning("containers_recovered", voided=len(voided), ssccs=voided[:20])
    return voided
