"""The case station with an RFID tunnel: each case decided from ONE inventory window of the tunnel reader.

Why a window per case, opened by the PLC. A tunnel reader sees whatever tags
are in its field; only the line knows when a case is in it. The PLC counts
cases into the tunnel (`case_trigger`, +1 at its photo-eye); every count
opens one window of `window_ms` (the station's, else the reader's) and that
window alone decides the case. Windows are read by one task and decided by
another, so a slow label print never delays the next case's window. Counts
that arrive while a window is still open are cases that got no window of
their own: each is rejected (`no_window`), so every case gets exactly one
decision, in order, for the PLC's reject pusher.

What a window must prove, and the rules for what else is in it:

* a reader failure during the window (connection lost, malformed LLRP, not
  connected) rejects the case (`rfid_read_failed`); a window the reader did
  not confirm as ended (no End_Of_ROSpec) rejects it too
  (`rfid_window_incomplete`): a case is never decided on part of a window;
* strays are excluded and reported, never a reason on their own: a tag
  weaker than `rfid_min_rssi` (a neighbouring case at the edge of the field);
  a tag seen in two windows, i.e. a unit already packed into the case this
  station recorded last, or a tag taken as a unit in the previous window
  whatever became of that case (the previous case still in the field: after
  a rejected case its units are free in the store, and counting one would
  pack a unit that is physically in the reject lane); an SSCC-96 tag (a case
  label, not a unit). The case is then decided on the rest, and
  the strays are named in its AggResult, its `sscc_label_printing` audit
  record and an `rfid_stray_tags` alarm (or the reject alarm);
* a tag that does not decode as an SGTIN or SSCC EPC (linectl.epc) at or
  above the floor rejects the case (`foreign_tag`): inside the case, it might
  be a unit whose tag holds garbage;
* two tags naming one unit (GTIN + serial, e.g. an SGTIN-96 and an SGTIN-198
  label) reject it (`duplicate`);
* the rest are the case's units, checked exactly like camera-read children:
  count (a missing unit or a dead tag is `count_short`, never packed short;
  a unit of the next case above the floor is `count_over`), then known,
  commissioned, this batch, not packed elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from linectl.drivers.base import CodeReader, DeviceError, HealthState, Plc, Printer, RfidReader, RfidWindow, TagRead
from linectl.drivers.llrp import LlrpConfig
from linectl.drivers.plc_tags import CASE_TRIGGER, PlcConfigBase, counter_delta
from linectl.engine.aggregation import AggResult, CaseRuntime, Rejected, _short
from linectl.engine.station import LinePort, TaskFactory
from linectl.engine.stats import LatencyHistogram
from linectl.epc import EpcError, decode_epc
from linectl.store.trace import unit_facts

if TYPE_CHECKING:
    from linectl.config import CaseStation
    from linectl.engine.line import BatchContext
    from linectl.events import ChildRef

log = structlog.get_logger("linectl.rfid_tunnel")

#: a case_trigger jump larger than this between two polls is a PLC restart (counter reset), not that many cases
MAX_TRIGGER_JUMP = 1000
#: windows read but not decided yet (decisions wait on label printing); a full queue holds the window reader back
WINDOW_QUEUE = 32


@dataclass(frozen=True)
class TunnelRead:
    """One case at the tunnel: its window, or why it has none (`reason`, a REASONS code)."""

    trigger: int
    window: RfidWindow | None
    reason: str | None = None
    detail: str = ""
    closed_at: float = field(default_factory=time.monotonic)  # monotonic, when the window was closed (STOP_ROSPEC sent) or failed


@dataclass
class TunnelCounters:
    windows: int = 0  # windows read to the end
    no_window: int = 0  # cases counted by the PLC that got no window of their own
    read_failed: int = 0
    incomplete: int = 0
    tags: int = 0  # distinct EPCs over all windows
    strays: int = 0
    resyncs: int = 0  # case_trigger jumps taken for a PLC restart

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class TunnelCaseRuntime(CaseRuntime):
    """`type: case` whose `reader` is an RFID reader (driver: llrp, trigger: window) and whose `plc` has case_trigger."""

    def __init__(
        self,
        cfg: CaseStation,
        line: LinePort,
        reader: RfidReader,
        printer: Printer,
        label_reader: CodeReader | None = None,
        *,
        plc: Plc,
        label_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(cfg, line, reader, printer, label_reader, plc=plc, label_timeout_s=label_timeout_s, mode="frame")
        self.rfid = reader
        self.trigger_plc = plc
        rcfg = reader.config
        default_ms = rcfg.window_ms if isinstance(rcfg, LlrpConfig) else 500
        self.window_s = (cfg.window_ms or default_ms) / 1000.0
        self.min_rssi = cfg.rfid_min_rssi
        self.tunnel = TunnelCounters()
        #: window closed (STOP_ROSPEC sent) -> the case's children proven or rejected: the reader's last reports and
        #: End_Of_ROSpec, EPC decoding, the store checks, the count
        self.decision_ms = LatencyHistogram()
        #: window closed -> the decision on record (label printed and proven, store written, PLC told)
        self.settled_ms = LatencyHistogram()
        self.trigger_seen: int | None = None
        self._queue: asyncio.Queue[TunnelRead] = asyncio.Queue(maxsize=WINDOW_QUEUE)
        self._closed_at: float | None = None
        self._prev_units: set[str] = set()  # EPCs taken as units in the window decided last (whatever became of its case)
        self.log = log.bind(station=cfg.name, reader=reader.name)

    # ------------------------------------------------------------------ line interface

    def tasks(self) -> dict[str, TaskFactory]:
        t: dict[str, TaskFactory] = {
            f"{self.name}.tunnel": self._watch_trigger,
            f"{self.name}.decide": self._decide_loop,
            f"{self.name}.label_confirms": self._confirms,
        }
        if self.label_reader is not None:
            t[f"{self.name}.label_reads"] = self._label_reader_task
        return t

    def snapshot(self) -> dict[str, Any]:
        out = super().snapshot()
        out["rfid"] = {
            "reader": self.rfid.name,
            "window_ms": round(self.window_s * 1000),
            "min_rssi": self.min_rssi,
            "case_trigger": self.trigger_seen,
            "queued": self._queue.qsize(),
            "counters": self.tunnel.as_dict(),
            "decision_ms": self.decision_ms.summary(),
            "settled_ms": self.settled_ms.summary(),
        }
        return out

    # ------------------------------------------------------------------ trigger -> windows

    async def _watch_trigger(self) -> None:
        cfg = self.trigger_plc.config
        interval = max(0.005, cfg.poll_interval_s if isinstance(cfg, PlcConfigBase) else 0.02)
        while True:
            await asyncio.sleep(interval)
            try:
                for read in await self.poll_trigger():
                    await self._queue.put(read)
            except Exception as exc:  # noqa: BLE001 - one bad window must not stop the station
                self.log.exception("tunnel_window_failed", error=str(exc))

    async def poll_trigger(self) -> list[TunnelRead]:
        """The PLC's case count since the last poll: one window for the newest case, `no_window` for any before it."""
        if self.trigger_plc.health.state == HealthState.DISCONNECTED:
            return []
        value = self.trigger_plc.latest().get(CASE_TRIGGER)
        if not isinstance(value, int) or isinstance(value, bool):
            return []
        seen, self.trigger_seen = self.trigger_seen, value
        if seen is None or value == seen:
            return []  # what the PLC held when we started watching is no case
        n = counter_delta(self._trigger_type(), seen, value)
        if n > MAX_TRIGGER_JUMP:
            self.tunnel.resyncs += 1
            self.log.warning("case_trigger_resync", was=seen, now=value, note="counter jumped: PLC restart taken, no case")
            return []
        out = [
            TunnelRead(value - n + 1 + k, None, "no_window", f"case {value - n + 1 + k} entered the tunnel while another window was being read")
            for k in range(n - 1)
        ]
        self.tunnel.no_window += n - 1
        out.append(await self.read_window(value))
        return out

    def _trigger_type(self) -> str:
        spec = (getattr(self.trigger_plc.config, "tags", None) or {}).get(CASE_TRIGGER)
        return str(getattr(spec, "type", "uint32"))

    async def read_window(self, trigger: int) -> TunnelRead:
        """One inventory window of window_s for the case counted as `trigger`; a failure is the case's reason."""
        try:
            await self.rfid.start_window()
        except DeviceError as exc:
            self.tunnel.read_failed += 1
            return TunnelRead(trigger, None, "rfid_read_failed", f"reader {self.rfid.name} could not start the window: {exc.reason}")
        await asyncio.sleep(self.window_s)
        closing = time.monotonic()  # the window closes now (STOP_ROSPEC); decision times count from here
        try:
            win = await self.rfid.end_window()
        except DeviceError as exc:
            self.tunnel.read_failed += 1
            return TunnelRead(trigger, None, "rfid_read_failed", exc.reason, closing)
        if not win.complete:
            self.tunnel.incomplete += 1
            return TunnelRead(
                trigger, win, "rfid_window_incomplete",
                f"reader {self.rfid.name} sent no End_Of_ROSpec for the window ({len(win.tags)} tags seen): it may hold more reports", closing,
            )
        self.tunnel.windows += 1
        self.tunnel.tags += len(win.tags)
        return TunnelRead(trigger, win, closed_at=closing)

    # ------------------------------------------------------------------ windows -> decisions

    async def _decide_loop(self) -> None:
        while True:
            read = await self._queue.get()
            try:
                await self.decide(read)
            except Exception as exc:  # noqa: BLE001
                self.log.exception("tunnel_decision_failed", trigger=read.trigger, error=str(exc))
            finally:
                self.counters.reads += 1

    async def decide(self, read: TunnelRead) -> AggResult:
        """Record or reject the case of one tunnel read (exactly one decision per case, for the reject pusher)."""
        if read.reason is not None or read.window is None:
            n = len(read.window.tags) if read.window is not None else 0
            async with self._busy:
                self._strays = []
                res = await self._reject_early(n, read.reason or "rfid_read_failed", read.detail, False)
        else:
            partial, self._partial_armed = self._partial_armed, False  # close_partial: the next case read may be short
            self._closed_at = read.closed_at
            try:
                res = await self.close(list(read.window.tags), partial=partial, read_seq=read.trigger)
            finally:
                self._closed_at = None
        self.settled_ms.add((time.monotonic() - read.closed_at) * 1000.0)
        return res

    async def _children(self, codes: list[Any], batch: BatchContext, partial: bool) -> list[ChildRef]:
        try:
            kept, facts = await self._units_in_case(codes)
            self._check_count(len(kept), partial)
            return self._judge(kept, facts, batch)
        finally:
            if self._closed_at is not None:
                self.decision_ms.add((time.monotonic() - self._closed_at) * 1000.0)

    async def _units_in_case(self, tags: list[TagRead]) -> tuple[list[tuple[str, str]], dict[tuple[str, str], Any]]:
        """The window's tags as units of this case, strays set aside (self._strays), or Rejected."""
        strays: list[str] = []
        foreign: list[str] = []
        dups: list[str] = []
        units: dict[tuple[str, str], str] = {}
        for t in tags:
            if self.min_rssi is not None and t.peak_rssi is not None and t.peak_rssi < self.min_rssi:
                strays.append(f"{t.epc_hex}: {t.peak_rssi} dBm, weaker than rfid_min_rssi {self.min_rssi}")
                continue
            try:
                v = decode_epc(t.epc_hex)
            except EpcError as exc:
                foreign.append(f"{t.epc_hex[:32]} ({t.peak_rssi} dBm): {exc}")
                continue
            if v.gtin is None or v.serial is None:
                strays.append(f"{v.pure_uri}: an SSCC tag (a case label), not a unit")
                continue
            key = (v.gtin, v.serial)
            if key in units:
                dups.append(f"(01){v.gtin}(21){v.serial} in EPCs {units[key]} and {t.epc_hex}")
                continue
            units[key] = t.epc_hex
        self._strays = strays
        previous, self._prev_units = self._prev_units, set(units.values())
        if foreign:
            raise Rejected("foreign_tag", f"tag(s) that are no unit EPC: {_short(foreign)}")
        if dups:
            raise Rejected("duplicate", f"two tags for one unit: {_short(dups)}")
        facts = await asyncio.to_thread(unit_facts, self.line.store, list(units))
        kept: list[tuple[str, str]] = []
        for key, tag_epc in units.items():
            f = facts.get(key)
            if f is not None and f.parent is not None and f.parent == self.last_sscc:
                strays.append(f"(01){key[0]}(21){key[1]}: packed in the previous case {f.parent}, still in the field")
            elif tag_epc in previous:
                strays.append(f"(01){key[0]}(21){key[1]}: a unit of the previous case's window, still in the field")
            else:
                kept.append(key)
        self.tunnel.strays += len(strays)
        if strays:
            self.log.info("tunnel_strays", strays=len(strays), first=strays[:3])
        return kept, facts
