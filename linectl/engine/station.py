"""Stations as plug-ins: one `Station` protocol, one `LinePort` back to the line, one registry.

The line holds one list of stations and drives them only through the hooks of
`Station` (tasks, begin_challenge / begin_production / pause / halt / drain,
snapshot, ...): it never asks what class a station is. A station talks back
through `LinePort`, a narrow typed view of the line (store, alarms, stop
requests, unit decided, batch counts, infeed), never by writing the line's
fields, so what a station may do to the line is written down in one place.

Adding a station type is one module with a `build(cfg, line, drivers)`
function and its entry in `STATIONS` below (plus its config model in
linectl/config.py). A config `type:` without an entry here is refused when the
config is loaded (`linectl check-config`), never at the first start.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Mapping
from typing import (
    TYPE_CHECKING,
    Any,
    Protocol,
    runtime_checkable,
)

if TYPE_CHECKING:
    from linectl.config import Product
    from linectl.drivers.base import Driver, Plc, Printer
    from linectl.engine.clock import Clock
    from linectl.engine.line import BatchContext
    from linectl.events import AlarmRaised, Severity
    from linectl.store.ports import EngineStore

#: a supervised task of a station: the supervisor calls it (again after a crash)
TaskFactory = Callable[[], Awaitable[None]]


class LinePort(Protocol):
    """What a station may ask of the line. `linectl.engine.line.Line` is the one implementation."""

    @property
    def store(self) -> EngineStore:
        """The store: durable writes and typed reads (linectl/store/ports.py)."""

    @property
    def batch(self) -> BatchContext | None:
        """The line's open batch (read it; its counters change only through `count_units`)."""

    @property
    def clock(self) -> Clock:
        """What the station's rule timers read (time.monotonic on a line; tests advance a fake one)."""

    @property
    def infeed_stopped(self) -> bool:
        """The infeed was closed because the planned count is on units (see `set_infeed`)."""

    async def record(self, *events: Any) -> bool:
        """Store events that may wait in memory while the store refuses writes (alarms, decommissionings)."""

    async def alarm(self, code: str, message: str, severity: Severity, station: str | None = None) -> AlarmRaised:
        """Raise an alarm operators see (store, MQTT state, PLC status)."""

    async def fault_stop(self, code: str, message: str, station: str | None = None) -> None:
        """Stop the line because a rule or a device says so (one alarm per cause)."""

    async def fault_overrides(self, code: str, message: str, station: str | None = None) -> None:
        """Stop the line with `code` as THE fault to reset, even when it is already stopping for another cause."""

    def unit_decided(self, station: str, good: bool, reason: str | None = None) -> None:
        """A unit was decided (the line's pace)."""

    def count_units(self, lot: str | None, *, good: int = 0, good_before: int = 0, decommissioned: int = 0) -> None:
        """Change the open batch's unit counts (ignored for another lot than the open batch's)."""

    async def set_infeed(self, station: str, on: bool) -> None:
        """Open or close the infeed (count reached / a unit to replace)."""

    async def planned_quantity_reached(self, station: str) -> None:
        """The planned quantity is commissioned: the line stops the batch."""

    async def challenge_finished(self, station: str, passed: bool, results: list[dict[str, Any]]) -> None:
        """This station's challenge test is over."""

    def check_pool(self, product: Product) -> None:
        """After an allocation: ask upstream for serials when the pool runs low."""


class Station(Protocol):
    """A station of the line, as the line drives it. Subclass it to inherit the defaults below."""

    name: str

    def tasks(self) -> dict[str, TaskFactory]:
        """The station's supervised tasks, by unique name."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """The station's state for the MQTT state topic and `linectl status`."""
        ...

    def line_plcs(self) -> list[Plc]:
        """PLCs whose infeed (line_mode), status tags and HMI commands this line drives."""
        return []

    @property
    def runs_challenge(self) -> bool:
        """The batch challenge test runs on this station (required kinds per station, see Line.challenge_missing)."""
        return False

    @property
    def in_challenge(self) -> bool:
        """The station's challenge test is still running."""
        return False

    def begin_challenge(self, batch: BatchContext, kinds: list[str]) -> None:
        """The batch enters its challenge test."""
        return

    def begin_production(self, batch: BatchContext) -> None:
        """The batch runs (started or resumed)."""
        return

    async def primed(self, timeout_s: float) -> bool:
        """Ready for product once the infeed opens (a printer holding its codes); waits at most timeout_s."""
        return True

    def pause(self) -> None:
        """The batch is paused."""
        return

    def halt(self) -> None:
        """Out of production at once, without a store write or an await (the store refuses writes)."""
        return

    def drain_timeout_s(self) -> float:
        """How long units on the belt may need to reach this station at a stop (0: nothing to wait for)."""
        return 0.0

    async def drain(self, timeout_s: float) -> None:
        """The line stopped: let units in flight be decided, then account for the rest."""
        return

    def serials_held(self) -> set[str]:
        """Serials this station tracks in memory (on a printer, on the belt): not strays of a refused write."""
        return set()

    def unused_serials(self) -> list[str]:
        """Serials allocated and never sent: returned or voided when the batch closes."""
        return []

    def unit_tally(self) -> tuple[int, int]:
        """(good, rejected) units of this station, for the PLC status tags good_count / reject_count."""
        return (0, 0)


@runtime_checkable
class PartialCloser(Protocol):
    """A station that can close its open parent short of the count (close_case command)."""

    name: str

    async def close_partial(self) -> dict[str, Any]: ...


@runtime_checkable
class ReworkBench(Protocol):
    """A station that takes rework operations (rework / rework_mode commands)."""

    name: str
    mode: str
    operator: str | None

    @property
    def printer(self) -> Printer | None: ...

    async def confirm_print(self, seq: int) -> bool: ...

    def set_mode(self, mode: str, operator: str | None = None) -> None: ...


StationBuilder = Callable[[Any, LinePort, Mapping[str, "Driver"]], Station]

#: config `type:` -> the module whose `build(cfg, line, drivers)` makes that station's runtime
STATIONS: dict[str, str] = {
    "print_verify": "linectl.engine.print_verify",
    "verify": "linectl.engine.verify_station",
    "case": "linectl.engine.aggregation",
    "pallet": "linectl.engine.aggregation",
    "rework": "linectl.engine.rework",
}


class UnknownStationType(ValueError):
    pass


def builder(kind: str) -> StationBuilder:
    """The builder of station type `kind`; UnknownStationType when this linectl has none."""
    mod_name = STATIONS.get(kind)
    if mod_name is None:
        raise UnknownStationType(f"station type {kind!r} is not built by this linectl (known: {', '.join(sorted(STATIONS))})")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name != mod_name:
            raise
        raise UnknownStationType(f"station type {kind!r}: its module {mod_name} is missing from this installation") from None
    try:
        build: StationBuilder = mod.build
    except AttributeError:
        raise UnknownStationType(f"station type {kind!r}: module {mod_name} has no build(cfg, line, drivers)") from None
    return build


def build_stations(cfgs: list[Any], line: LinePort, drivers: Mapping[str, Driver]) -> list[Station]:
    """One runtime per configured station, in config order."""
    return [builder(st.type)(st, line, drivers) for st in cfgs]
