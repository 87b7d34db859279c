"""The physical unit as the line simulator sees it, and the ground truth kept about it.

The simulators know what they damaged; the daemon does not. Comparing the
two is how missed rejects and false rejects are counted independently of
linectl's own opinion.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

#: unit defects the configured verification rules must reject
UNIT_DEFECTS = (
    "no_print",  # nothing printed
    "smudge_heavy",  # symbol damaged: grade below the minimum (or unreadable)
    "low_contrast",  # faded ink: grade below the minimum
    "partial",  # part of the symbol missing: unreadable
    "wrong_code",  # a valid GS1 code, but not the one sent
    "duplicate",  # the previous unit's code printed again
    "not_gs1",  # same content, plain DataMatrix (]d1): printer sent GS instead of FNC1
    "data_mismatch",  # right GTIN+serial, a wrong lot or date (the AI in SimUnit.extras["wrong_ai"])
)
#: harmless variations: must NOT be rejected (counted apart)
VARIATIONS = ("smudge_mild",)
#: challenge units an operator feeds at batch start
CHALLENGE_KINDS = ("no_code", "wrong_code", "duplicate", "not_gs1", "low_grade")


@dataclass
class SimUnit:
    seq: int  # product trigger count (1-based), the unit's identity on the conveyor
    content: str | None = None  # element string physically printed (GS separated); None = nothing printed
    symbology: str = "]d2"  # "]d1" when printed as a plain DataMatrix
    quality: float = 4.0  # ISO 15415-like overall grade the print deserves (0.0-4.0)
    defect: str | None = None  # ground truth: injected unit defect (must be rejected)
    variation: str | None = None  # ground truth: harmless variation
    challenge: str | None = None  # ground truth: this is a challenge unit of that kind
    job_seq: int | None = None  # the printer job it was printed from
    image: Any = None  # numpy uint8 rendering of what is on the pack, when a camera needs it
    outcome: str | None = None  # "passed" | "rejected", set by the reject gate
    extras: dict[str, Any] = field(default_factory=dict)
    #: RFID label on the unit (ground truth for reader simulators): the EPC (hex) its tag answers an
    #: inventory with, as its PC word's length says; None = no tag, or a tag that does not answer
    rfid_epc: str | None = None
    rfid_pc: str | None = None  # the tag's PC word (hex), None = no tag / no answer
    rfid_void: bool = False  # the printer voided this label: its tag failed, VOID printed instead of the code

    @property
    def bad(self) -> bool:
        return self.defect is not None or self.challenge is not None

    @property
    def rfid_labelled(self) -> bool:
        """An RFID printer encoded (or tried to encode) this unit's label: its tag, not its printed code, is what a
        reader finds, and `rfid_epc` None then means a tag that does not answer."""
        return "rfid_epc_sent" in self.extras


class PrintHead(Protocol):
    """A printer simulator as the conveyor sees it: prints its next queued job on the unit at the trigger."""

    def on_trigger(self, unit: SimUnit) -> None: ...


class ReadPoint(Protocol):
    """A reader or camera simulator: the unit has reached its reading position."""

    def present(self, unit: SimUnit) -> None: ...


@dataclass
class Truth:
    """Counts the simulators keep, independent of the daemon."""

    passed: int = 0
    rejected: int = 0
    missed_rejects: int = 0  # bad unit that passed the gate
    false_rejects: int = 0  # good unit that was rejected
    defects: dict[str, int] = field(default_factory=dict)
    variations: dict[str, int] = field(default_factory=dict)
    challenge_units: int = 0
    challenge_passed: int = 0  # challenge unit that passed the gate (a failed challenge)
    missed: list[int] = field(default_factory=list)  # seqs of missed rejects (first 100)
    false: list[int] = field(default_factory=list)  # seqs of false rejects (first 100)

    def record(self, unit: SimUnit) -> None:
        if unit.challenge is not None:
            self.challenge_units += 1
        if unit.defect:
            self.defects[unit.defect] = self.defects.get(unit.defect, 0) + 1
        if unit.variation:
            self.variations[unit.variation] = self.variations.get(unit.variation, 0) + 1
        if unit.outcome == "passed":
            self.passed += 1
            if unit.bad:
                if unit.challenge is not None:
                    self.challenge_passed += 1
                else:
                    self.missed_rejects += 1
                    if len(self.missed) < 100:
                        self.missed.append(unit.seq)
        elif unit.outcome == "rejected":
            self.rejected += 1
            if not unit.bad:
                self.false_rejects += 1
                if len(self.false) < 100:
                    self.false.append(unit.seq)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class UnitJournal:
    """Append-only ground truth, one JSON line per unit fed and per unit at the gate.

    `Truth` is a set of counters and `recent` a window of 1,000 units, and both
    die with the simulator process. A fault campaign kills the simulator, restarts
    PLCs and runs for hours, and then has to say for every physical unit which
    code it carried and where it went. Each line is one os.write() on an O_APPEND
    descriptor, so a kill -9 of the simulator loses no line already written and
    never leaves half a line. Units are identified by `uid` (simulator run +
    conveyor + feed count), because PLC trigger counts (`seq`) restart with a
    cold PLC or a new simulator.

    Records: {"ev":"start","run":R,"t":T}
             {"ev":"fed","uid":U,"seq":S,"t":T,"content":C|null,"defect":D,"challenge":K,"variation":V,"job_seq":J,"symbology":Y}
                 (+ "rfid_epc","rfid_void","rfid_epc_sent","rfid_fault" for a unit with an RFID label)
             {"ev":"gate","uid":U,"seq":S,"t":T,"outcome":"passed"|"rejected"}
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.run = f"{os.getpid()}-{int(time.time() * 1000)}-{uuid.uuid4().hex[:6]}"  # unique even for two journals in one ms
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.write({"ev": "start", "run": self.run})

    def write(self, rec: dict[str, Any]) -> None:
        rec.setdefault("t", time.time())
        os.write(self._fd, (json.dumps(rec, separators=(",", ":")) + "\n").encode())

    def uid(self, conveyor: str, n: int) -> str:
        return f"{self.run}:{conveyor}:{n}"

    def fed(self, uid: str, unit: SimUnit) -> None:
        self.write(
            {
                "ev": "fed", "uid": uid, "seq": unit.seq, "content": unit.content, "defect": unit.defect,
                "challenge": unit.challenge, "variation": unit.variation, "job_seq": unit.job_seq, "symbology": unit.symbology,
                **self._rfid(unit),
            }
        )

    @staticmethod
    def _rfid(unit: SimUnit) -> dict[str, Any]:
        """An RFID label's truth (what its tag answers, VOID, the EPC sent, the injected fault); nothing for other units."""
        if not unit.rfid_labelled:
            return {}
        return {"rfid_epc": unit.rfid_epc, "rfid_void": unit.rfid_void, "rfid_epc_sent": unit.extras["rfid_epc_sent"],
                "rfid_fault": unit.extras.get("rfid_fault")}

    def gate(self, uid: str, unit: SimUnit) -> None:
        self.write({"ev": "gate", "uid": uid, "seq": unit.seq, "outcome": unit.outcome})

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
