"""The conveyor: product triggers at line speed, units carried from printer to read point to reject gate.

Position, not time, is the conveyor's clock: the belt position advances at
rate_upm pitches per minute while the belt runs and freezes when the PLC
stops it (e-stop, dead controller), so units in flight stop where they are,
as on a real line. Every pending happening (next trigger, a unit reaching
the read point, a unit reaching the gate) sits in ONE heap keyed by belt
position and ONE task works through it; at 6,000 units/min that is ~300
events/s with no task per unit.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import string
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from linectl.drivers.plc_tags import MODE_CHALLENGE, MODE_PRODUCTION
from linectl.simulators.model import CHALLENGE_KINDS, PrintHead, ReadPoint, SimUnit, Truth, UnitJournal

log = structlog.get_logger("linectl.simulators.conveyor")

TRIGGER, READ, GATE = 0, 1, 2


#: a scheduler wake-up later than this counts as a simulator stall (belt frozen for the excess)
STALL_TOLERANCE_S = 0.005

class ChallengeFactory:
    """Pre-printed challenge units, the packs QA prepares to prove the line rejects bad ones.

    wrong_code: a valid GS1 code of the product that was never sent.
    duplicate: a real code printed earlier on this line when there is one,
    else the previous wrong_code unit's content again.
    not_gs1: a valid-looking code printed as plain DataMatrix (]d1).
    low_grade: a code printed at grade 0.5.
    no_code: nothing printed.
    """

    def __init__(self, gtin: str | None, seed: int, render: bool = False) -> None:
        self.gtin = gtin or "09506000134352"
        self.rng = random.Random(seed ^ 0xC4A11)
        self.render = render
        self.last_wrong: str | None = None
        self.last_printed: str | None = None  # set by the conveyor from production units

    def _serial(self) -> str:
        return "CH" + "".join(self.rng.choice(string.ascii_uppercase + string.digits) for _ in range(10))

    def foreign_code(self) -> str:
        """A valid GS1 code of the product this line never issued (a label from elsewhere)."""
        return self._code()

    def _code(self) -> str:
        serial = self._serial()
        try:
            from linectl import gs1

            return gs1.compose_unit(self.gtin, serial, lot="CHALLENGE", expiry="991231").element_string
        except Exception:  # noqa: BLE001 - gs1 unavailable or refusing: a hand-made element string will do
            return f"01{self.gtin}17991231" + "10CHALLENGE\x1d21" + serial

    def make(self, kind: str, seq: int) -> SimUnit:
        if kind not in CHALLENGE_KINDS:
            raise ValueError(f"unknown challenge kind {kind!r} (known: {', '.join(CHALLENGE_KINDS)})")
        unit = SimUnit(seq=seq, challenge=kind)
        if kind == "no_code":
            unit.content = None
            unit.quality = 0.0
        elif kind == "wrong_code":
            unit.content = self.last_wrong = self._code()
        elif kind == "duplicate":
            unit.content = self.last_printed or self.last_wrong or self._code()
            if self.last_wrong is None and self.last_printed is None:
                self.last_wrong = unit.content
        elif kind == "not_gs1":
            unit.content = self._code()
            unit.symbology = "]d1"
        elif kind == "low_grade":
            unit.content = self._code()
            unit.quality = 0.5
        if self.render and unit.content is not None:
            unit.image = _render(unit)
        return unit


def _render(unit: SimUnit) -> Any:
    try:
        from linectl import gs1

        if unit.symbology == "]d1":
            return gs1.render_plain_datamatrix(unit.content or "")
        return gs1.render_datamatrix(gs1.parse(unit.content or "", require_gs1=False))
    except Exception:  # noqa: BLE001 - the camera simulator can render from content itself
        return None


#: damage a downstream conveyor may do to a unit (simulation.downstream_defect_rate), in turn
DOWNSTREAM_DEFECTS = ("smudged", "copied", "foreign")


class Conveyor:
    """One conveyor: printer (optional) -> read point (optional) -> reject gate of `plc`.

    A conveyor `fed_by` another takes no product of its own: every unit the upstream gate passed enters it (a
    verify station downstream of a print_verify station), as a new unit of its PLC's trigger count carrying the
    same print; with `downstream_defect_rate` some are damaged on the way (DOWNSTREAM_DEFECTS)."""

    def __init__(
        self,
        name: str,
        plc: Any,
        truth: Truth,
        *,
        rate_upm: float,
        camera_distance: float,
        gate_distance: float,
        printer: PrintHead | None = None,
        reader: ReadPoint | None = None,
        challenge: ChallengeFactory | None = None,
        free_run: bool = False,
        units: int = 0,
        on_unit: Callable[[SimUnit], None] | None = None,
        journal: UnitJournal | None = None,
        fed_by: Conveyor | None = None,
        downstream_defect_rate: float = 0.0,
        seed: int = 1,
    ) -> None:
        self.name = name
        self.fed_by = fed_by
        self.downstream_defect_rate = downstream_defect_rate
        self._damage_rng = random.Random(f"{seed}:{name}:downstream")
        self._damaged = 0
        self._last_content: str | None = None
        self.plc = plc
        self.truth = truth
        self.printer = printer
        self.reader = reader
        self.challenge = challenge or ChallengeFactory(None, 0)
        self.camera_distance = camera_distance
        self.gate_distance = gate_distance
        self.free_run = free_run
        self.units_limit = units
        self.on_unit = on_unit
        self.journal = journal
        self.rate_upm = rate_upm
        self.challenge_queue: deque[str] = deque()
        self.recent: deque[dict[str, Any]] = deque(maxlen=1000)
        self.fed = 0
        self.done_units = 0
        self.in_flight = 0
        self.stalls = 0  # times the simulator woke late and froze the belt for the excess
        self.stall_s = 0.0
        self.errors = 0
        self.done = asyncio.Event()
        self._heap: list[tuple[float, int, int, SimUnit | None]] = []
        self._order = itertools.count()
        self._pos0 = 0.0
        self._t0 = 0.0
        self._running = False
        self._wake_fut: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.log = log.bind(conveyor=name)
        plc.on_change(self.wake)

    # -- control --------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._t0 = loop.time()
        if self.fed_by is None:
            self._push(0.0, TRIGGER, None)
        self._task = asyncio.create_task(self._run(), name=f"conveyor:{self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)

    def wake(self) -> None:
        fut = self._wake_fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def set_rate(self, rate_upm: float) -> None:
        if rate_upm <= 0:
            raise ValueError("rate_upm must be > 0")
        now = asyncio.get_running_loop().time()
        self._pos0 = self.position(now)
        self._t0 = now
        self.rate_upm = rate_upm
        self.wake()

    def queue_challenge(self, kinds: list[str]) -> int:
        for k in kinds:
            if k not in CHALLENGE_KINDS:
                raise ValueError(f"unknown challenge kind {k!r} (known: {', '.join(CHALLENGE_KINDS)})")
        self.challenge_queue.extend(kinds)
        self.wake()
        return len(self.challenge_queue)

    def position(self, now: float) -> float:
        if not self._running:
            return self._pos0
        return self._pos0 + (now - self._t0) * self.rate_upm / 60.0

    def status(self) -> dict[str, Any]:
        return {
            "rate_upm": self.rate_upm,
            "belt_running": self._running,
            "feed_mode": self._feed_mode(),
            "fed": self.fed,
            "done": self.done_units,
            "in_flight": self.in_flight,
            "challenge_queued": len(self.challenge_queue),
            "errors": self.errors,
            "stalls": self.stalls,
            "stall_s": round(self.stall_s, 3),
            **({"fed_by": self.fed_by.name, "truth": self.truth.as_dict()} if self.fed_by is not None else {}),
        }

    # -- the scheduler --------------------------------------------------------------

    def _push(self, pos: float, kind: int, unit: SimUnit | None) -> None:
        heapq.heappush(self._heap, (pos, next(self._order), kind, unit))

    def _belt(self) -> bool:
        return True if self.free_run else self.plc.belt_running()

    def _feed_mode(self) -> int:
        if self.free_run:
            mode = self.plc.line_mode
            return mode if mode in (MODE_CHALLENGE, MODE_PRODUCTION) else MODE_PRODUCTION
        return int(self.plc.feed_mode())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        heap = self._heap
        while True:
            now = loop.time()
            belt = self._belt()
            if belt != self._running:
                # Re-anchor so the position is continuous across stops and starts.
                self._pos0 = self.position(now)
                self._t0 = now
                self._running = belt
                self.log.info("belt", running=belt)
            pos = self.position(now)
            while heap and heap[0][0] <= pos:
                p, _, kind, unit = heapq.heappop(heap)
                try:
                    if kind == TRIGGER:
                        self._trigger(p)
                    elif kind == READ:
                        self._read(unit)  # type: ignore[arg-type]
                    else:
                        self._gate(unit)  # type: ignore[arg-type]
                except Exception as exc:  # noqa: BLE001 - one bad unit must not stop the line model
                    self.errors += 1
                    self.log.error("conveyor_event_failed", kind=kind, error=repr(exc))
            if self.units_limit and self.fed >= self.units_limit and self.in_flight == 0:
                self.done.set()
            elif self.fed_by is not None and self.fed_by.done.is_set() and self.in_flight == 0:
                self.done.set()
            if self._running and heap:
                delay = (heap[0][0] - pos) * 60.0 / self.rate_upm
            else:
                delay = 0.5
            planned = loop.time() + max(delay, 0.0)
            await self._sleep(max(delay, 0.0))
            late = loop.time() - planned
            if late > STALL_TOLERANCE_S and self._running:
                # The simulator process was not scheduled: the physical belt cannot have moved while nobody
                # simulated it, or a stall would send reads and gate the same units in one burst, leaving
                # the controller no time at all (false rejects that no real line would see).
                self._t0 += late - STALL_TOLERANCE_S
                self.stalls += 1
                self.stall_s += late - STALL_TOLERANCE_S

    async def _sleep(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._wake_fut = fut
        handle = loop.call_later(delay, _resolve, fut)
        try:
            await fut
        finally:
            handle.cancel()
            self._wake_fut = None

    # -- happenings -----------------------------------------------------------------

    def _trigger(self, pos: float) -> None:
        if not (self.units_limit and self.fed >= self.units_limit):
            self._push(pos + 1.0, TRIGGER, None)
        else:
            return
        mode = self._feed_mode()
        unit: SimUnit | None = None
        if mode == MODE_PRODUCTION:
            unit = SimUnit(seq=self.plc.count_trigger())
            if self.printer is not None:
                try:
                    self.printer.on_trigger(unit)
                except Exception as exc:  # noqa: BLE001 - the unit is on the belt whatever the printer model did
                    self.errors += 1
                    self.log.error("printer_sim_failed", seq=unit.seq, error=repr(exc))
                    if unit.content is None and unit.defect is None:
                        unit.defect = "no_print"
                if unit.content is not None and unit.defect is None and unit.challenge is None:
                    self.challenge.last_printed = unit.content
            else:
                unit.defect = "no_print"  # nothing prints on this line: truth must call it bad
        elif mode == MODE_CHALLENGE and self.challenge_queue:
            kind = self.challenge_queue.popleft()
            unit = self.challenge.make(kind, self.plc.count_trigger())
        if unit is None:
            return
        unit.extras["plc_epoch"] = self.plc.epoch  # seqs restart with a cold PLC restart: (epoch, seq) is the identity
        self.fed += 1
        self.in_flight += 1
        unit.extras["fed_at"] = time.time()
        if self.journal is not None:
            unit.extras["uid"] = uid = self.journal.uid(self.name, self.fed)
            self.journal.fed(uid, unit)
        if self.reader is not None:
            self._push(pos + self.camera_distance, READ, unit)
        self._push(pos + self.gate_distance, GATE, unit)

    def feed(self, src: SimUnit) -> SimUnit:
        """A unit the upstream gate passed enters this conveyor now (its print as it is, or damaged on the way)."""
        unit = SimUnit(seq=self.plc.count_trigger(), content=src.content, symbology=src.symbology, quality=src.quality,
                       defect=src.defect, variation=src.variation, job_seq=src.job_seq, image=src.image)
        unit.extras["upstream_seq"] = src.seq
        if src.defect is None and self.downstream_defect_rate and self._damage_rng.random() < self.downstream_defect_rate:
            kind = DOWNSTREAM_DEFECTS[self._damaged % len(DOWNSTREAM_DEFECTS)]
            if kind == "copied" and self._last_content is None:
                kind = "foreign"
            self._damaged += 1
            unit.defect = kind
            unit.image = None  # (a camera renders from content)
            if kind == "smudged":
                unit.quality = 0.5
            elif kind == "copied":
                unit.content = self._last_content
            else:
                unit.content = self.challenge.foreign_code()
        if src.content is not None and src.defect is None:
            self._last_content = src.content
        unit.extras["plc_epoch"] = self.plc.epoch
        self.fed += 1
        self.in_flight += 1
        unit.extras["fed_at"] = time.time()
        pos = self.position(asyncio.get_running_loop().time())
        if self.reader is not None:
            self._push(pos + self.camera_distance, READ, unit)
        self._push(pos + self.gate_distance, GATE, unit)
        self.wake()
        return unit

    def _read(self, unit: SimUnit) -> None:
        if self.reader is not None:
            self.reader.present(unit)

    def take_off(self, uids: set[str]) -> list[str]:
        """Packs an operator lifts off the stopped belt by hand into the reject bin (reconciling units of unknown
        fate): they never reach the reader or the gate any more; the journal records them rejected, by hand."""
        taken = {e[3].extras["uid"]: e[3] for e in self._heap if e[3] is not None and e[3].extras.get("uid") in uids and e[2] == GATE}
        if not taken:
            return []
        self._heap[:] = [e for e in self._heap if e[3] is None or e[3].extras.get("uid") not in taken]
        heapq.heapify(self._heap)
        for unit in taken.values():
            unit.extras["gate"] = "taken off by hand"
            self._settle(unit, "rejected")
        return sorted(taken)

    def _gate(self, unit: SimUnit) -> None:
        self._settle(unit, self.plc.gate(unit))

    def _settle(self, unit: SimUnit, outcome: str) -> None:
        self.in_flight -= 1
        unit.outcome = outcome
        self.truth.record(unit)
        if self.journal is not None and "uid" in unit.extras:
            self.journal.gate(unit.extras["uid"], unit)
        self.done_units += 1
        self.recent.append(
            {
                "seq": unit.seq,
                "outcome": unit.outcome,
                "defect": unit.defect,
                "variation": unit.variation,
                "challenge": unit.challenge,
                "job_seq": unit.job_seq,
                "content": unit.content,
                "wrong_ai": unit.extras.get("wrong_ai"),  # data_mismatch: the AI printed wrong
                "verdict": unit.extras.get("verdict"),
                "gate": unit.extras.get("gate"),
                "plc_epoch": unit.extras.get("plc_epoch"),
                "upstream_seq": unit.extras.get("upstream_seq"),
                # RFID label (RFID ZPL printer): what its tag answers (None: no tag, or VOID), the EPC the printer
                # was asked to write, whether the label came out VOID, and the injected fault that shaped it
                "rfid_epc": unit.rfid_epc,
                "rfid_epc_sent": unit.extras.get("rfid_epc_sent"),
                "rfid_void": unit.rfid_void,
                "rfid_fault": unit.extras.get("rfid_fault"),
            }
        )
        if self.on_unit is not None:
            self.on_unit(unit)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
