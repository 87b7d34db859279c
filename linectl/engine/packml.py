"""PackML (ISA-TR88.00.02, OPC 30050) view of the line: state, unit mode, StopReason, Admin counters, Blocked/Starved.

Packaging lines are integrated through PackML, so a MES, a line PLC or an OPC UA client must see linectl as one
PackML unit. linectl keeps its own batch lifecycle (created, challenge, running, paused, stopped, closed); the
PackML state is *derived* from it plus a small overlay for what the batch lifecycle does not carry (a Reset that
armed the line, an Abort, a Complete, a Suspend). Nothing here runs SQL: `packtags()` is read on the hot path by the
PLC handshake and the OPC UA server, so the counters come from what the engine already counts in memory.

The numbers are those of the official nodeset (standards/opcua/Opc.Ua.PackML.NodeSet2.xml: each state's
StateNumber; ProductionMaintenanceModeEnum for the unit mode) and of TR88 PackTags CntrlCmd for the commands (the
nodeset has methods, not a command enumeration). The mapping table is in README.md ("PackML").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from linectl.events import BatchState


class PackmlState(IntEnum):
    """PackTags Status.StateCurrent (= StateNumber of each state object in the OPC 30050 nodeset)."""

    Undefined = 0
    Clearing = 1
    Stopped = 2
    Starting = 3
    Idle = 4
    Suspended = 5
    Execute = 6
    Stopping = 7
    Aborting = 8
    Aborted = 9
    Holding = 10
    Held = 11
    Unholding = 12
    Suspending = 13
    Unsuspending = 14
    Resetting = 15
    Completing = 16
    Complete = 17


class PackmlCommand(IntEnum):
    """PackTags Command.CntrlCmd (TR88.00.02)."""

    Undefined = 0
    Reset = 1
    Start = 2
    Stop = 3
    Hold = 4
    Unhold = 5
    Suspend = 6
    Unsuspend = 7
    Abort = 8
    Clear = 9
    Complete = 10


class UnitMode(IntEnum):
    """PackTags UnitModeCurrent (OPC 30050 ProductionMaintenanceModeEnum: Invalid=0, Produce=1, ...)."""

    Invalid = 0
    Production = 1
    Maintenance = 2
    Manual = 3


_ANY_NOT_ABORT = {PackmlCommand.Stop, PackmlCommand.Abort}

#: which commands each state accepts: the transitions of the OPC 30050 nodeset with a HasCause method (Hold also in
#: Starting, Suspending, Suspended, Unsuspending, Unholding; Complete is its ToComplete), Stop in every state of its
#: Running composite state, Abort in every state of its Cleared composite state (tests/test_packml.py checks this
#: against the nodeset file).
ALLOWED: dict[PackmlState, set[PackmlCommand]] = {
    PackmlState.Undefined: set(),
    PackmlState.Clearing: {PackmlCommand.Abort},
    PackmlState.Stopped: {PackmlCommand.Reset, PackmlCommand.Abort},
    PackmlState.Starting: {PackmlCommand.Hold} | _ANY_NOT_ABORT,
    PackmlState.Idle: {PackmlCommand.Start} | _ANY_NOT_ABORT,
    PackmlState.Suspended: {PackmlCommand.Unsuspend, PackmlCommand.Hold} | _ANY_NOT_ABORT,
    PackmlState.Execute: {PackmlCommand.Hold, PackmlCommand.Suspend, PackmlCommand.Complete} | _ANY_NOT_ABORT,
    PackmlState.Stopping: {PackmlCommand.Abort},
    PackmlState.Aborting: set(),
    PackmlState.Aborted: {PackmlCommand.Clear},
    PackmlState.Holding: set(_ANY_NOT_ABORT),
    PackmlState.Held: {PackmlCommand.Unhold} | _ANY_NOT_ABORT,
    PackmlState.Unholding: {PackmlCommand.Hold} | _ANY_NOT_ABORT,
    PackmlState.Suspending: {PackmlCommand.Hold} | _ANY_NOT_ABORT,
    PackmlState.Unsuspending: {PackmlCommand.Hold} | _ANY_NOT_ABORT,
    PackmlState.Resetting: set(_ANY_NOT_ABORT),
    PackmlState.Completing: set(_ANY_NOT_ABORT),
    PackmlState.Complete: {PackmlCommand.Reset} | _ANY_NOT_ABORT,
}

#: the acting (transient) states; a command arriving while the line is in one is refused as invalid_state
ACTING = frozenset(
    {
        PackmlState.Clearing,
        PackmlState.Starting,
        PackmlState.Stopping,
        PackmlState.Aborting,
        PackmlState.Holding,
        PackmlState.Unholding,
        PackmlState.Suspending,
        PackmlState.Unsuspending,
        PackmlState.Resetting,
        PackmlState.Completing,
    }
)


def parse_command(value: str | int) -> PackmlCommand:
    """A PackML command by name (case-insensitive) or CntrlCmd number; ValueError names the accepted ones."""
    if isinstance(value, bool):
        raise ValueError("command must be a PackML command name or number, not a boolean")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        n = int(value)
        try:
            cmd = PackmlCommand(n)
        except ValueError:
            raise ValueError(f"PackML command number {n} unknown; known: {_known()}") from None
    else:
        by_name = {c.name.lower(): c for c in PackmlCommand}
        found = by_name.get(str(value).strip().lower())
        if found is None:
            raise ValueError(f"PackML command {str(value)[:40]!r} unknown; known: {_known()}")
        cmd = found
    if cmd is PackmlCommand.Undefined:
        raise ValueError(f"PackML command Undefined (0) is no command; known: {_known()}")
    return cmd


def _known() -> str:
    return ", ".join(f"{c.name}={c.value}" for c in PackmlCommand if c is not PackmlCommand.Undefined)


#: first-out codes of a stop a command asked for (Admin.StopReason ID 0): pause (Hold, Suspend), stop, abort, the
#: planned quantity reached (Complete)
COMMAND_STOP_CODES = frozenset({"pause", "stop", "abort", "planned_quantity"})


@dataclass(frozen=True)
class StopReason:
    """Admin.StopReason: the first-out cause of the last stop (ID = linectl alarm code number, 0 = a command).

    Derived from the line's first-out (Line.stop_cause), never latched separately: PackML, OPC UA, the PLC tag and
    `<root>/state` always name the same cause, also when a root cause (e-stop, PLC lost) takes over from its
    consequence or an e-stop comes while the line is Held."""

    id: int
    code: str
    message: str
    at: float | None

    def to_json(self) -> dict[str, Any]:
        return {"ID": self.id, "Code": self.code, "Message": self.message, "DateTime": self.at}


@dataclass(frozen=True)
class AdminCounters:
    """Admin counters of the open (or last) batch: ProdProcessedCount, ProdDefectiveCount (by reason), ProdConsumedCount."""

    lot: str | None
    planned: int
    processed: int
    good: int
    defective: dict[str, int]
    consumed_serials: int

    def to_json(self) -> dict[str, Any]:
        return {
            "Lot": self.lot,
            "PlannedCount": self.planned,
            "ProdProcessedCount": self.processed,
            "GoodCount": self.good,
            "ProdDefectiveCount": sum(self.defective.values()),
            "DefectiveByReason": dict(self.defective),
            "ProdConsumedCount": self.consumed_serials,
        }


@dataclass(frozen=True)
class PackTags:
    """One consistent reading of the line's PackTags (Status + Admin), for MQTT, the PLC handshake and OPC UA."""

    state: PackmlState
    unit_mode: UnitMode
    stop_reason: StopReason | None
    blocked: bool
    starved: bool
    mach_speed: float
    cur_mach_speed: float
    admin: AdminCounters
    at: float
    #: the batch state the PackML state was derived from ("idle" without an open batch), for operators
    engine_state: str = "idle"
    #: commands the current state accepts (ALLOWED), by name, so a client can grey out buttons
    allowed: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {
            "StateCurrent": int(self.state),
            "State": self.state.name,
            "UnitModeCurrent": int(self.unit_mode),
            "UnitMode": self.unit_mode.name,
            "StopReason": self.stop_reason.to_json() if self.stop_reason is not None else None,
            "EquipmentBlocked": self.blocked,
            "EquipmentStarved": self.starved,
            "MachSpeed": self.mach_speed,
            "CurMachSpeed": self.cur_mach_speed,
            "Admin": self.admin.to_json(),
            "EngineState": self.engine_state,
            "Allowed": list(self.allowed),
            "ts": self.at,
        }


__all__ = [
    "ACTING",
    "ALLOWED",
    "COMMAND_STOP_CODES",
    "AdminCounters",
    "PackTags",
    "PackmlCommand",
    "PackmlState",
    "StopReason",
    "UnitMode",
    "parse_command",
    "parse_unit_mode",
]


def parse_unit_mode(value: str | int) -> UnitMode:
    """A unit mode by name (case-insensitive; OPC 30050's "Produce" too) or number; Invalid (0) is refused."""
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        try:
            mode = UnitMode(int(value))
        except ValueError:
            mode = UnitMode.Invalid
    else:
        name = str(value).strip().lower()
        mode = {"produce": UnitMode.Production, **{m.name.lower(): m for m in UnitMode}}.get(name, UnitMode.Invalid)
    if mode is UnitMode.Invalid:
        known = ", ".join(f"{m.name}={m.value}" for m in UnitMode if m is not UnitMode.Invalid)
        raise ValueError(f"unit mode {str(value)[:40]!r} unknown; known: {known}")
    return mode


#: faults that hold the line rather than abort it: the line is sound, material is missing (Held, Unhold restarts)
HOLD_FAULTS = frozenset({"no_serials"})


class PackmlUnit:
    """The PackML overlay of one line: what the batch lifecycle does not say, and the in-memory Admin counters.

    The line owns one (`line.packml`); `state()` derives StateCurrent from the batch state, the line's fault and
    this overlay, so the PackML state can never disagree with what the engine does. Commands (`Line._cmd_packml_command`)
    set the overlay and run the line's own commands, so PackML, MQTT, the CLI and PLC tags share one validation and
    one audit trail."""

    def __init__(self, *, mach_speed: float = 0.0, starved_after_s: float = 10.0) -> None:
        self.unit_mode = UnitMode.Production
        #: the acting state shown while a command's action runs (start priming the printers, stop draining the belt)
        self.acting: PackmlState | None = None
        self.armed = False  # Reset done: Idle (a Start is expected)
        self.aborted = False  # Abort command: Aborted until Clear
        self.complete = False  # planned quantity reached or Complete command: Complete until Reset
        self.completing = False
        self.suspended = False  # Suspend command: the batch is paused as Suspended, not Held
        self.mach_speed = mach_speed
        self.starved_after_s = starved_after_s
        #: what each PLC reports of the equipment around the line (tags downstream_blocked / infeed_starved, polled by
        #: the PLC surface), by PLC name; a PLC without the tag, or gone, reports nothing
        self.blocked_by: dict[str, bool] = {}
        self.starved_by: dict[str, bool] = {}
        self._lot: str | None = None
        self.defective: dict[str, int] = {}
        self.decommissioned_before = 0
        self.last_unit = time.monotonic()
        self.producing_since = time.monotonic()
        self._engine_state: str | None = None

    # ---- counters (called from Line hooks; cheap)

    def batch_loaded(self, lot: str, *, defective_before: int = 0) -> None:
        """A batch (new, or reopened after a restart) is the one the counters are about."""
        if lot != self._lot:
            self._lot = lot
            self.defective = {"before_restart": defective_before} if defective_before else {}
            self.decommissioned_before = defective_before

    def unit_decided(self, lot: str | None, good: bool, reason: str | None, producing: bool) -> None:
        self.last_unit = time.monotonic()
        if good or not producing or lot is None:
            return  # challenge units are rejected on purpose: they are not defective production
        if lot != self._lot:
            self.batch_loaded(lot)
        key = reason or "unknown"
        self.defective[key] = self.defective.get(key, 0) + 1

    def equipment(self, source: str, *, blocked: bool | None, starved: bool | None) -> bool:
        """What PLC `source` reports now (None: it has no such tag, or is gone); True when that changed anything."""
        before = (dict(self.blocked_by), dict(self.starved_by))
        for seen, value in ((self.blocked_by, blocked), (self.starved_by, starved)):
            if value is None:
                seen.pop(source, None)
            else:
                seen[source] = value
        return (self.blocked_by, self.starved_by) != before

    def blocked(self) -> bool:
        """EquipmentBlocked: a PLC reports the machine downstream takes no product (whatever the batch does)."""
        return any(self.blocked_by.values())

    def engine_changed(self, engine: str) -> None:
        """The batch changed state: drop overlays that no longer describe it."""
        if engine == self._engine_state:
            return
        self._engine_state = engine
        if engine in (BatchState.RUNNING.value, BatchState.CHALLENGE.value):
            self.armed = self.aborted = self.complete = self.completing = False
            if engine == BatchState.RUNNING.value:
                self.suspended = False
                self.producing_since = self.last_unit = time.monotonic()
        elif engine == BatchState.PAUSED.value:
            self.armed = False
        elif engine == BatchState.STOPPED.value:
            self.armed = False
            self.suspended = False
            if self.completing:
                self.complete, self.completing = True, False

    # ---- state

    def state(self, engine: str, fault: str | None, stopping: bool, infeed_stopped: bool) -> PackmlState:
        if self.acting is not None:
            return self.acting
        if stopping:
            if self.aborted or (fault is not None and fault not in HOLD_FAULTS):
                return PackmlState.Aborting
            if fault in HOLD_FAULTS:
                return PackmlState.Holding
            return PackmlState.Completing if self.completing else PackmlState.Stopping
        if engine == BatchState.RUNNING.value:
            # blocked downstream or starved upstream: the line cannot produce, through no fault of its own, and
            # produces again by itself once product flows (TR88 Suspended)
            suspended = self.blocked() or self.starved(engine, infeed_stopped)
            return PackmlState.Suspended if suspended else PackmlState.Execute
        if engine == BatchState.CHALLENGE.value:
            return PackmlState.Starting
        if engine == BatchState.PAUSED.value:
            if fault is not None and fault not in HOLD_FAULTS:
                return PackmlState.Aborted
            return PackmlState.Suspended if self.suspended else PackmlState.Held
        if self.aborted:
            return PackmlState.Aborted
        if fault is not None:
            return PackmlState.Held if fault in HOLD_FAULTS and engine == BatchState.STOPPED.value else PackmlState.Aborted
        if self.complete:
            return PackmlState.Complete
        return PackmlState.Idle if self.armed else PackmlState.Stopped

    def starved(self, engine: str, infeed_stopped: bool) -> bool:
        """EquipmentStarved: a PLC reports its infeed empty (whatever the batch does), or no unit came for
        `starved_after_s` while the batch runs with the infeed open and nothing downstream is blocked (a blocked
        line gets no units either: that is Blocked, not Starved)."""
        if any(self.starved_by.values()):
            return True
        if engine != BatchState.RUNNING.value or infeed_stopped or self.starved_after_s <= 0 or self.blocked():
            return False
        return time.monotonic() - max(self.last_unit, self.producing_since) > self.starved_after_s
