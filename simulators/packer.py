"""Case packer and palletizer: where good units go after the reject gate, as the aggregation stations see them.

Why it exists: a case station config cannot be commissioned on a desk unless
something puts real unit codes in front of the case camera (or scanner) the
way a case packer does, and real SSCC labels in front of the label reader
and the palletizer's scanner. This module is that physical flow, on the
same device simulators (camera folder, scanner socket, ZPL port) the real
devices replace:

    gate "passed" --pack_delay--> case reader (one frame of N units, or N scans,
                                  or the N units' tags through an RFID tunnel: simulators/tunnel.py)
    case label printed by the ZPL sim --> label reader reads it
    --case_travel--> palletizer scanner reads the case's GS1-128 SSCC
    pallet label printed --> pallet label reader reads it

The simulator never asks linectl what it decided. A case whose label is
printed travels on to the palletizer, as on a real line: a case linectl
rejected after printing (its SSCC voided) is then refused by the pallet
station too. Units of a case linectl rejected before labelling (no label)
stay out of the flow, as a case pushed to rework would.

Delays stand for the conveyor between the gate and the packer
(`pack_delay_s`) and between the case labeller and the palletizer
(`case_travel_s`); both exceed the daemon's store commit time.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import structlog

from linectl.simulators.model import SimUnit
from linectl.simulators.tunnel import RfidTunnel

log = structlog.get_logger("linectl.simulators.packer")


@dataclass
class PackCounts:
    """What physically happened at the packer (ground truth, independent of linectl)."""

    units_in: int = 0  # good-gated units that reached the packer
    cases_presented: int = 0  # frames (or full scan sequences) shown to the case reader
    units_presented: int = 0
    case_labels: int = 0  # case labels the label printer produced
    cases_to_pallet: int = 0  # labelled cases scanned at the palletizer
    pallet_labels: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # units not packed, by why

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _sscc_of(content: str | None) -> str | None:
    if content and content.startswith("00") and len(content) >= 20 and content[2:20].isdigit():
        return content[2:20]
    return None


class Packer:
    """One case station and, optionally, the pallet station its cases go to."""

    def __init__(
        self,
        name: str,
        *,
        units_per_case: int,
        case_reader: Any,
        case_frame: bool,
        case_printer: Any | None = None,
        case_label_reader: Any | None = None,
        pallet_reader: Any | None = None,
        pallet_printer: Any | None = None,
        pallet_label_reader: Any | None = None,
        pack_delay_s: float = 0.5,
        case_travel_s: float = 1.5,
        tunnel: RfidTunnel | None = None,
    ) -> None:
        self.name = name
        self.per_case = units_per_case
        self.case_reader = case_reader
        self.case_frame = case_frame or tunnel is not None  # a tunnel reads the whole case at once, like a frame
        self.tunnel = tunnel
        self.case_label_reader = case_label_reader
        self.pallet_reader = pallet_reader
        self.pallet_label_reader = pallet_label_reader
        self.pack_delay_s = pack_delay_s
        self.case_travel_s = case_travel_s
        self.counts = PackCounts()
        self.open: list[SimUnit] = []  # frame mode: units waiting in the open case
        self.coming: list[SimUnit] = []  # units between the gate and the case, in order (next to arrive first)
        self._label_seq = 0
        if case_printer is not None:
            case_printer.on_label = self._case_label
        if pallet_printer is not None:
            pallet_printer.on_label = self._pallet_label

    # -- units from the gate

    def on_unit(self, unit: SimUnit) -> None:
        """Conveyor callback at the gate: good units go on to the case packer."""
        if unit.outcome != "passed":
            return
        if unit.challenge is not None:  # the operator takes challenge units off the line
            self._skip("challenge")
            return
        if unit.content is None:
            self._skip("nothing_printed")
            return
        self.counts.units_in += 1
        self.coming.append(unit)
        asyncio.get_running_loop().call_later(self.pack_delay_s, self._arrive, unit)

    def _skip(self, why: str) -> None:
        self.counts.skipped[why] = self.counts.skipped.get(why, 0) + 1

    def _arrive(self, unit: SimUnit) -> None:
        self.coming.remove(unit)
        if not self.case_frame:  # a scanner reads each unit as it drops into the case
            self.case_reader.present(unit)
            self.counts.units_presented += 1
            if self.counts.units_presented % self.per_case == 0:
                self.counts.cases_presented += 1
            return
        self.open.append(unit)
        if len(self.open) >= self.per_case:
            self._present_case()

    def _present_case(self) -> int:
        units, self.open = self.open[: self.per_case], self.open[self.per_case :]
        if not units:
            return 0
        if self.tunnel is not None:
            # the next unit, waiting or on its way in, is the neighbouring case's: it may stray into the field
            nxt = self.open[:1] or self.coming[:1]
            self.tunnel.pass_case(units, nxt[0] if nxt else None)
        else:
            self.case_reader.present_many(units)
        self.counts.cases_presented += 1
        self.counts.units_presented += len(units)
        log.debug("case_presented", packer=self.name, units=len(units))
        return len(units)

    def flush(self) -> int:
        """Batch end: show the partial case now (frame mode). Returns the units shown."""
        return self._present_case() if self.case_frame else 0

    # -- labels

    def _read_label(self, reader: Any | None, unit: SimUnit) -> None:
        if reader is not None:
            reader.present(unit)

    def _case_label(self, label: Any, unit: SimUnit) -> None:
        self.counts.case_labels += 1
        self._read_label(self.case_label_reader, unit)
        if self.pallet_reader is not None and _sscc_of(unit.content) is not None:
            asyncio.get_running_loop().call_later(self.case_travel_s, self._to_pallet, unit)

    def _to_pallet(self, case_label: SimUnit) -> None:
        """The palletizer's scanner reads the case's GS1-128 as the case is placed on the pallet."""
        self._label_seq += 1
        shown = SimUnit(seq=self._label_seq, content=case_label.content, symbology="]C1", quality=case_label.quality)
        shown.extras.update(case_label.extras)
        if self.pallet_reader is not None:  # checked by the caller: without a pallet reader no case comes here
            self.pallet_reader.present(shown)
        self.counts.cases_to_pallet += 1

    def _pallet_label(self, label: Any, unit: SimUnit) -> None:
        self.counts.pallet_labels += 1
        self._read_label(self.pallet_label_reader, unit)

    def status(self) -> dict[str, Any]:
        out = {**self.counts.as_dict(), "open_units": len(self.open), "per_case": self.per_case, "frame": self.case_frame}
        if self.tunnel is not None:
            out["tunnel"] = self.tunnel.status()
        return out
