"""In-process fake devices behind the real role interfaces, and a clock a test advances.

The engine's rules (consecutive rejects, no-reads, reject confirm timeout,
challenge, ...) need a line, not processes: a `Line` with a real `Store` on a
temp file and these fakes runs them in milliseconds, inside the test's event
loop. The end-to-end tests (tests/engine_helpers.py `simulated_line`) keep
what needs real processes and wire protocols.

The fakes are thin on purpose and reuse the simulators' I/O-free parts, so a
fake never has its own opinion of what a device does:
- what lands on a pack: `simulators.printer.apply_print` (the defects),
  `simulators.conveyor.ChallengeFactory` (challenge packs);
- what a reader sends for a pack: `simulators.reader.ReaderSim.line_for`,
  parsed by the real driver's `LineReader.parse_line`;
- the PLC: a `simulators.plc.PlcSim` that is never started (no server, no scan
  loop): its tag memory and its reject-gate program (`gate`), faults included.

Each fake records what it was told (jobs printed, verdicts written, gate
outcomes) so a test asserts behaviour against the devices, not the engine's
internals.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import AsyncIterator
from datetime import date, timedelta
from typing import Any, Generic, TypeVar

from engine_helpers import wait_for

from linectl import control as C
from linectl.config import LineConfig
from linectl.config import PrintVerifyStation as PrintVerifyConfig
from linectl.config import VerifyStation as VerifyConfig
from linectl.drivers.base import (
    CodeReader,
    Decoded,
    DeviceError,
    Driver,
    DriverConfig,
    HealthState,
    Plc,
    PrintConfirm,
    Printer,
    PrintJob,
    Read,
)
from linectl.drivers.plc_tags import VERDICT_GOOD, PlcConfigBase
from linectl.drivers.reader import LineReader, ReaderConfig
from linectl.engine.line import LINE_MODE, Line
from linectl.engine.print_verify import PrintVerifyRuntime
from linectl.engine.supervisor import Supervisor
from linectl.engine.verify_station import VerifyRuntime
from linectl.events import UnitCommissioned, UnitDecommissioned
from linectl.simulators.conveyor import ChallengeFactory
from linectl.simulators.model import SimUnit
from linectl.simulators.plc import PlcSim
from linectl.simulators.printer import apply_print
from linectl.simulators.reader import ReaderSim
from linectl.store import Store

T = TypeVar("T")
D = TypeVar("D", bound=Driver)

#: how long a fake waits for the engine to take what it was fed before the test fails
SETTLE_S = 5.0


class FakeClock:
    """The line's rule clock (linectl.engine.clock.Clock), moved only by `advance`."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock never goes back")
        self.now += seconds


class Stream(Generic[T]):
    """What a device emits (confirmations, reads), and a way to know the engine has handled all of it.

    `handled()` returns once the consumer took every item and came back for the
    next one on an empty queue: the body of its `async for` (the engine's
    handling of the item) is then complete, which is the test's sync point.
    """

    def __init__(self) -> None:
        self._q: asyncio.Queue[T] = asyncio.Queue()
        self._idle = asyncio.Event()

    def put(self, item: T) -> None:
        self._idle.clear()
        self._q.put_nowait(item)

    async def items(self) -> AsyncIterator[T]:
        while True:
            if self._q.empty():
                self._idle.set()
            item = await self._q.get()
            yield item

    async def handled(self, timeout: float = SETTLE_S) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"the engine did not take what the device emitted within {timeout}s ({self._q.qsize()} waiting)") from None


class FakePrinter(Printer):
    """Holds the jobs it was sent; `on_trigger` prints the head job on a pack and confirms it (product count = unit seq)."""

    config_class = DriverConfig

    def __init__(self, name: str, config: DriverConfig, *, seed: int = 1) -> None:
        super().__init__(name, config)
        self.queued: deque[PrintJob] = deque()  # on the printer, not printed yet
        self.sent: list[PrintJob] = []  # every job it accepted
        self.printed: list[tuple[int, PrintJob]] = []  # (unit seq, job) in print order
        self.clears = 0
        #: the next send is refused with this reason (a NAK), once
        self.nak: str | None = None
        self.confirms: Stream[PrintConfirm] = Stream()
        self._rng = random.Random(seed)
        self._previous: str | None = None

    async def start(self) -> None:
        self.set_health(HealthState.CONNECTED)

    async def stop(self) -> None:
        self.set_health(HealthState.DISCONNECTED, "stopped")

    async def send(self, job: PrintJob) -> None:
        if self.nak is not None:
            reason, self.nak = self.nak, None
            raise DeviceError(reason, code="NAK")
        self.queued.append(job)
        self.sent.append(job)

    def confirmations(self) -> AsyncIterator[PrintConfirm]:
        return self.confirms.items()

    async def status(self) -> dict[str, Any]:
        return {"queued": len(self.queued), "printed": len(self.printed)}

    async def clear(self) -> None:
        self.queued.clear()
        self.clears += 1

    def on_trigger(self, unit: SimUnit, defect: str | None = None) -> PrintJob | None:
        """Print the head job on `unit` (damaged as `defect` says, like the printer simulator) and confirm it."""
        if not self.queued:
            unit.content, unit.quality, unit.defect = None, 0.0, "no_print"
            unit.extras["cause"] = "buffer underrun"
            return None
        job = self.queued.popleft()
        apply_print(unit, job.element_string, "]d2", defect, self._rng, self._previous)
        unit.job_seq = job.seq
        self._previous = job.element_string
        self.printed.append((unit.seq, job))
        self.confirms.put(PrintConfirm(job.seq, time.time(), product_count=unit.seq))
        return job


class FakeReader(CodeReader):
    """Emits the reads a test feeds: `present(unit)` speaks for a pack the way the reader simulator would,
    `read(...)` / `no_read(...)` give the read directly."""

    config_class = ReaderConfig

    def __init__(self, name: str, config: ReaderConfig) -> None:
        super().__init__(name, config)
        self._says = ReaderSim(config=config, name=name)  # the simulator's line for a pack (never started)
        self._parses = LineReader(name, config)  # the real driver's parser of that line (never started)
        self.fed: list[Read] = []
        self.stream: Stream[Read] = Stream()

    async def start(self) -> None:
        self.set_health(HealthState.CONNECTED)

    async def stop(self) -> None:
        self.set_health(HealthState.DISCONNECTED, "stopped")

    def reads(self) -> AsyncIterator[Read]:
        return self.stream.items()

    def feed(self, read: Read) -> Read:
        self.fed.append(read)
        self.stream.put(read)
        return read

    def present(self, unit: SimUnit) -> Read:
        raw = self._says.line_for(unit.seq, unit)
        text = raw.decode("latin-1").removesuffix(self._parses.config.terminator)
        return self.feed(self._parses.parse_line(text, raw, time.monotonic()))

    def read(self, seq: int, data: str, grade: float | None = 4.0, symbology: str | None = "]d2") -> Read:
        return self.feed(Read(seq, (Decoded(data, symbology, grade),), time.monotonic()))

    def no_read(self, seq: int) -> Read:
        return self.feed(Read(seq, (), time.monotonic()))


class FakePlc(Plc):
    """The PLC's tag map in memory and its reject-gate program, from an unstarted `PlcSim`.

    Writes go into the simulator's memory through its own value checks; `latest()`
    is the memory as it is now (every call is one poll of the engine's watch).
    `trigger()` counts a product at the trigger sensor; `gate(seq)` runs the
    simulator's gate program on that unit: it passes only with (seq, GOOD) in
    its verdict slot, else it is pushed out and confirmed in the reject ring
    (unless a gate fault injected with `sim.faults.set`, e.g. confirm_lost or
    gate_jam, says otherwise).
    """

    config_class = PlcConfigBase

    def __init__(self, name: str, config: PlcConfigBase) -> None:
        super().__init__(name, config)
        self.sim = PlcSim(name, config)
        self.writes: list[tuple[str, Any, int | None]] = []
        self.verdicts: dict[int, int] = {}  # unit seq -> last verdict written for it (1 good, 2 reject)
        self.outcomes: dict[int, str] = {}  # unit seq -> what the gate did ("passed" / "rejected")
        self.gated: dict[int, SimUnit] = {}
        self.polls = 0
        #: writes fail with this reason (the PLC does not answer) while set
        self.refuse_writes: str | None = None

    async def start(self) -> None:
        self.set_health(HealthState.CONNECTED)

    async def stop(self) -> None:
        self.set_health(HealthState.DISCONNECTED, "stopped")

    @property
    def tag_names(self) -> list[str]:
        return list(self.sim.tags)

    async def read_tags(self, names: list[str] | None = None) -> dict[str, Any]:
        return {n: self.sim.get(n) for n in (names or self.tag_names)}

    async def write_tag(self, name: str, value: Any, index: int | None = None) -> None:
        if self.refuse_writes is not None:
            raise DeviceError(self.refuse_writes)
        try:
            self.sim.set(name, value, index)
        except (KeyError, ValueError, TypeError) as exc:
            raise DeviceError(f"{self.name}: write {name} refused: {exc}") from None
        self.writes.append((name, value, index))
        if name == "verdict_ring" and isinstance(value, list):
            for k in range(0, len(value) - 1, 2):
                self.verdicts[int(value[k])] = int(value[k + 1])

    def latest(self) -> dict[str, Any]:
        self.polls += 1
        return {n: self.sim.get(n) for n in self.tag_names}

    def tag(self, name: str) -> Any:
        return self.sim.get(name)

    def trigger(self) -> int:
        """A product at the trigger sensor: the PLC counts it; the count is the unit's seq."""
        return self.sim.count_trigger()

    def gate(self, seq: int) -> str:
        """Unit `seq` at the reject gate: the simulator's gate program decides ("passed" / "rejected") and acts."""
        unit = SimUnit(seq)
        outcome = self.sim.gate(unit)
        self.outcomes[seq] = outcome
        self.gated[seq] = unit  # what the program noted (verdict seen, a jammed gate, a lost confirm)
        return outcome

    def good_verdicts(self) -> list[int]:
        return sorted(s for s, v in self.verdicts.items() if v == VERDICT_GOOD)

    def reject_verdicts(self) -> list[int]:
        return sorted(s for s, v in self.verdicts.items() if v != VERDICT_GOOD)

    async def polled(self, times: int = 2) -> None:
        """The engine's watch polled `times` more times (twice: one whole check cycle ran after a change)."""
        target = self.polls + times
        await wait_for(lambda: self.polls >= target, SETTLE_S, f"{times} polls of PLC {self.name}", interval=0.002)


# --------------------------------------------------------------------------- a line on fake devices


class FakeLine:
    """A `Line` of one print_verify station (and a verify station downstream, when configured) on fake devices,
    the stations' tasks supervised as the daemon does. No PLC surface (heartbeats, HMI commands) and no MQTT:
    the end-to-end tests have those.

    The helpers move packs the way the belt does, each one waiting until the
    engine has handled what it caused: `unit()` is trigger -> print -> read ->
    verdict (-> gate), so the test asserts right after it returns.
    """

    def __init__(self, line: Line, clock: FakeClock, devices: dict[str, FakePrinter | FakeReader | FakePlc]) -> None:
        self.line = line
        self.store: Store = line.store
        self.clock = clock
        self.devices = devices
        pv = [s for s in line.stations if isinstance(s, PrintVerifyRuntime)]
        assert len(pv) == 1, "FakeLine runs a line with one print_verify station"
        self.station: PrintVerifyRuntime = pv[0]
        #: the print_verify station's devices
        self.printer = self._device(self.station.cfg.printer, FakePrinter)
        self.reader = self._device(self.station.cfg.reader, FakeReader)
        self.plc = self._device(self.station.cfg.plc, FakePlc)
        #: a downstream verify station, when the config has one
        self.verify: VerifyRuntime | None = next((s for s in line.stations if isinstance(s, VerifyRuntime)), None)
        self.supervisor = Supervisor(on_crash=line.task_crashed)
        self.lot: str | None = None
        self._challenge = ChallengeFactory(line.cfg.products[0].gtin, seed=7)

    def _device(self, name: str, kind: type[D]) -> D:
        d = self.devices[name]
        assert isinstance(d, kind), f"device {name} is a {type(d).__name__}, not a {kind.__name__}"
        return d

    @classmethod
    async def build(cls, cfg: LineConfig, store: Store, clock: FakeClock | None = None) -> FakeLine:
        """Fakes for the devices of the config's print_verify and verify stations, by the role each station gives them."""
        devices: dict[str, FakePrinter | FakeReader | FakePlc] = {}
        for st in cfg.stations:
            readers, plcs = [], []
            if isinstance(st, PrintVerifyConfig):
                devices[st.printer] = FakePrinter(st.printer, cfg.devices[st.printer])
                readers, plcs = [st.reader], [st.plc]
            elif isinstance(st, VerifyConfig):
                readers, plcs = [st.reader], [st.plc] if st.plc is not None else []
            else:
                raise AssertionError(f"FakeLine has no fakes for a {st.type} station")
            for name in readers:
                rc = cfg.devices[name]
                assert isinstance(rc, ReaderConfig), f"{name}: FakeReader speaks for a line reader (driver: reader)"
                devices[name] = FakeReader(name, rc)
            for name in plcs:
                pc = cfg.devices[name]
                assert isinstance(pc, PlcConfigBase)
                devices[name] = FakePlc(name, pc)
        clock = clock or FakeClock()
        drivers: dict[str, Driver] = dict(devices)
        return cls(Line(cfg, store, drivers, clock=clock), clock, devices)

    async def start(self) -> None:
        for d in self.devices.values():
            await d.start()
        for st in self.line.stations:
            for name, factory in st.tasks().items():
                self.supervisor.start(name, factory)
        for d in self.devices.values():
            if isinstance(d, FakePlc):
                await d.polled()  # the watch has taken the PLC's ring as it is (the first poll after a start)

    async def stop(self) -> None:
        t = self.line._stop_task
        if t is not None and not t.done():
            t.cancel()  # a test that ended mid-stop: nothing may write to the store after it is closed
            await asyncio.gather(t, return_exceptions=True)
        await self.supervisor.stop()
        for d in self.devices.values():
            await d.stop()

    # ------------------------------------------------------------------ batches

    async def execute(self, command: Any) -> dict[str, Any]:
        return await self.line.execute(command, origin="test")

    async def start_batch(self, units: int = 100, *, challenge: bool = False, lot: str = "L1") -> str:
        """Create and start a batch of the config's first product; with `challenge` the line enters its challenge."""
        product = self.line.cfg.products[0]
        expiry = (date.today() + timedelta(days=400)).strftime("%y%m%d")
        await self.execute(C.CreateBatch(lot=lot, gtin=product.gtin, expiry=expiry, planned_qty=units, challenge=challenge))
        await self.execute(C.StartBatch(actor="test"))
        self.lot = lot
        if not challenge:
            await wait_for(lambda: self.plc.tag("line_mode") == LINE_MODE["production"], SETTLE_S, "line_mode production on the PLC", interval=0.002)
        return lot

    @property
    def state(self) -> str | None:
        b = self.line.batch
        return b.state.value if b is not None else None

    async def wait_stopped(self) -> None:
        """The batch is stopped and its stop (drain) has finished (engine_helpers.wait_stopped, for a FakeLine)."""

        def done() -> bool:
            t = self.line._stop_task
            return self.state == "stopped" and (t is None or t.done())

        await wait_for(done, SETTLE_S, "the batch to be stopped", interval=0.002)

    def alarm_codes(self) -> list[str]:
        return [a.code for a in self.line.alarms.values()]

    # ------------------------------------------------------------------ packs on the belt

    async def unit(self, defect: str | None = None, *, gate: bool = True) -> SimUnit:
        """One pack: triggered, printed (damaged as `defect` says: simulators.model.UNIT_DEFECTS), read and decided;
        then, with `gate`, through the reject gate (the engine has seen what the gate did)."""
        return await self.read(await self.printed(defect), gate=gate)

    async def printed(self, defect: str | None = None) -> SimUnit:
        """One pack triggered and printed (its print confirmation handled), not (yet) at the reader."""
        await wait_for(lambda: self.printer.queued, SETTLE_S, "a code queued on the printer", interval=0.002)
        unit = SimUnit(self.plc.trigger())
        self.printer.on_trigger(unit, defect)
        await self.printer.confirms.handled()
        return unit

    async def no_read(self, *, gate: bool = True) -> SimUnit:
        """One pack printed well, and the reader sends its no-read for it (dirty lens, pack skewed)."""
        unit = await self.printed()
        self.reader.no_read(unit.seq)
        return await self._decided(unit, gate)

    async def bad_read(self, data: str, *, grade: float | None = 4.0, symbology: str | None = "]d2", gate: bool = True) -> SimUnit:
        """One pack printed, and the reader reports `data` at `grade` for it (what the pack shows is the test's word)."""
        unit = await self.printed()
        self.reader.read(unit.seq, data, grade, symbology)
        return await self._decided(unit, gate)

    async def read(self, unit: SimUnit, *, gate: bool = True) -> SimUnit:
        """The pack at the reader (what the reader simulator would send for it), then at the gate."""
        self.reader.present(unit)
        return await self._decided(unit, gate)

    async def _decided(self, unit: SimUnit, gate: bool) -> SimUnit:
        await self.reader.stream.handled()
        if gate:
            await self.gate(unit)
        return unit

    async def challenge_unit(self, kind: str, *, gate: bool = True) -> SimUnit:
        """A challenge pack QA feeds (simulators.conveyor.ChallengeFactory): triggered, nothing printed by the line."""
        unit = self._challenge.make(kind, self.plc.trigger())
        if self.printer.printed:
            self._challenge.last_printed = self.printer.printed[-1][1].element_string
        return await self.read(unit, gate=gate)

    async def gate(self, unit: SimUnit) -> str:
        """The pack reaches the reject gate: the PLC program decides by its verdict slot; the engine's watch sees it."""
        unit.outcome = self.plc.gate(unit.seq)
        await self.plc.polled()
        return unit.outcome

    async def downstream(self, unit: SimUnit, *, content: str | None = None, gate: bool = True) -> SimUnit:
        """A pack that passed the print_verify gate reaches the verify station (its own trigger, reader and gate);
        `content` is what the pack shows there when it differs (damaged, swapped, a copy)."""
        v = self.verify
        assert v is not None, "the config has no verify station"
        reader = self._device(v.cfg.reader, FakeReader)
        plc = self._device(v.cfg.plc, FakePlc) if v.cfg.plc is not None else None
        there = SimUnit(plc.trigger() if plc is not None else unit.seq, content=unit.content if content is None else content, quality=unit.quality)
        there.symbology = unit.symbology
        reader.present(there)
        await reader.stream.handled()
        if gate and plc is not None:
            there.outcome = plc.gate(there.seq)
            await plc.polled()
        return there

    async def advance(self, seconds: float) -> None:
        """Move the rule clock, and let the watch run one check cycle at the new time."""
        self.clock.advance(seconds)
        for d in self.devices.values():
            if isinstance(d, FakePlc):
                await d.polled()

    def serial_on(self, unit: SimUnit) -> str:
        """The serial of the job printed on `unit`."""
        job = next(j for seq, j in self.printer.printed if seq == unit.seq)
        return job.fields["serial"]

    def record_of(self, unit: SimUnit) -> list[Any]:
        """The unit events the store holds for `unit` (by the serial printed on it), in order."""
        serial = self.serial_on(unit)
        assert self.lot is not None
        out: list[Any] = []
        after = 0
        while rows := self.store.events_of_lot(self.lot, after, 10000):
            out.extend(r.event for r in rows if isinstance(r.event, (UnitCommissioned, UnitDecommissioned)) and r.event.serial == serial)
            after = rows[-1].seq
        return out
