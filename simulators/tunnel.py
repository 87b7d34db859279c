"""The case packer's RFID tunnel: a full case passes the LLRP reader, the PLC counts it in.

What physically happens per case, in this order: the case's tags enter the
reader's field (spread over the tunnel's antennas), the PLC's photo-eye adds
1 to `case_trigger` (linectl opens its read window on that count), and the
tags leave the field when the next case enters or after `dwell_s`. Faults
(`simulation.rfid_tunnel`) are drawn per case with the line seed: a unit of
the neighbouring case at the edge of the field (weak), a dead tag, a unit
missing from the case, a tag that lingers into the next case's window.

Ground truth per case (`cases`): the units physically in the case and the
EPC each carries, and which fault was applied to which tag, so a test or
the demo can compare linectl's decisions with what was in the case.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog

from linectl.drivers.plc_tags import next_counter
from linectl.simulators.config import RfidTunnelSim
from linectl.simulators.model import SimUnit

log = structlog.get_logger("linectl.simulators.tunnel")

CASE_TRIGGER = "case_trigger"


@dataclass
class TunnelCase:
    """One case as it passed the tunnel (ground truth)."""

    case: int
    trigger: int | None = None
    #: EPC (lower-case hex) -> unit seq, of every unit physically in the case whose label has a tag
    in_case: dict[str, int] = field(default_factory=dict)
    untagged: list[int] = field(default_factory=list)  # unit seqs in the case without an EPC (no tag, void)
    missing: list[int] = field(default_factory=list)  # unit seqs that fell off before the tunnel
    dead: list[str] = field(default_factory=list)  # EPCs of tags in the case that do not answer
    stray: list[str] = field(default_factory=list)  # EPCs of neighbouring units at the edge of the field
    linger: list[str] = field(default_factory=list)  # EPCs left in the field for the next case's window

    @property
    def readable(self) -> set[str]:
        """EPCs a correct station takes as this case's units (dead tags cannot be read)."""
        return set(self.in_case) - set(self.dead)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RfidTunnel:
    def __init__(
        self,
        reader: Any,
        plc: Any,
        cfg: RfidTunnelSim,
        epc_of: Callable[[SimUnit], str | None],
        *,
        antennas: list[int],
        seed: int = 1,
    ) -> None:
        if not plc.has(CASE_TRIGGER):
            raise ValueError(f"PLC {plc.name} has no {CASE_TRIGGER} tag: nothing would count cases into the tunnel")
        self.reader = reader  # LlrpReaderSim
        self.plc = plc  # PlcSim
        self.cfg = cfg
        self.epc_of = epc_of
        self.antennas = antennas or [1]
        self.rng = random.Random(f"{seed}:rfid_tunnel")
        self.count = 0
        self.cases: deque[TunnelCase] = deque(maxlen=1000)
        self.faults: dict[str, int] = {"stray": 0, "dead": 0, "missing": 0, "linger": 0}
        self._in_field: list[str] = []
        self._linger: str | None = None

    def pass_case(self, units: list[SimUnit], neighbour: SimUnit | None = None) -> TunnelCase:
        """One case into the tunnel: its tags into the field, then the PLC counts it."""
        self._leave()
        self.count += 1
        tc = TunnelCase(self.count)
        cfg, rng = self.cfg, self.rng
        present = list(units)
        if len(present) > 1 and rng.random() < cfg.missing_unit_rate:
            tc.missing.append(present.pop(rng.randrange(len(present))).seq)
            self.faults["missing"] += 1
        tagged: list[tuple[str, SimUnit]] = []
        for u in present:
            e = self.epc_of(u)
            if e is None:
                tc.untagged.append(u.seq)
            else:
                tagged.append((e.lower(), u))
        dead = rng.randrange(len(tagged)) if tagged and rng.random() < cfg.dead_tag_rate else None
        for i, (e, u) in enumerate(tagged):
            self.reader.field_enter(e, antenna=self.antennas[i % len(self.antennas)], unit=f"unit {u.seq}", dead=i == dead)
            self._in_field.append(e)
            tc.in_case[e] = u.seq
            if i == dead:
                tc.dead.append(e)
                self.faults["dead"] += 1
        if neighbour is not None and rng.random() < cfg.stray_rate:
            e = self.epc_of(neighbour)
            if e is not None:
                e = e.lower()
                self.reader.field_enter(e, antenna=self.antennas[-1], rssi=cfg.stray_rssi, unit=f"unit {neighbour.seq}", stray=True)
                self._in_field.append(e)
                tc.stray.append(e)
                self.faults["stray"] += 1
        if tagged and rng.random() < cfg.linger_rate:
            self._linger = tagged[rng.randrange(len(tagged))][0]
            tc.linger.append(self._linger)
            self.faults["linger"] += 1
        tc.trigger = next_counter(self.plc.tags[CASE_TRIGGER].type, int(self.plc.get(CASE_TRIGGER) or 0))
        self.plc.set(CASE_TRIGGER, tc.trigger)
        self.cases.append(tc)
        asyncio.get_running_loop().call_later(cfg.dwell_s, self._dwell_over, tc.case)
        log.debug("tunnel_case", case=tc.case, trigger=tc.trigger, tags=len(tc.in_case), faults={k: v for k, v in tc.as_dict().items()
                                                                                                  if k in self.faults and v})
        return tc

    def _dwell_over(self, case: int) -> None:
        if case == self.count:
            self._leave()

    def _leave(self) -> None:
        """The case in the tunnel moves on; a lingering tag stays for one more window."""
        for e in self._in_field:
            self.reader.field_leave(e, after_windows=1 if e == self._linger else 0)
        self._in_field = []
        self._linger = None

    def status(self) -> dict[str, Any]:
        return {"cases": self.count, "faults": dict(self.faults), "last": [c.as_dict() for c in list(self.cases)[-5:]]}
