"""A verify station downstream of a print_verify station, end to end on the simulators (config/verify-line.yaml).

The simulator passes every unit pv1's gate let through onto check1's conveyor and damages some on the way
(smudged, a copied code, a foreign label): its ground truth says which units check1's gate must reject. linectl's
record is compared unit by unit with what physically happened at check1's gate.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
from engine_helpers import (
    close_batch,
    settle,
    sim,
    simulated_line,
    wait_for,
    wait_stopped,
)

from linectl import gs1
from linectl.engine.verify_station import VerifyRuntime
from linectl.events import ReadRejected, UnitCommissioned, UnitInspected

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

#: the reject reason(s) check1 must give each kind of damage (simulators/conveyor.py DOWNSTREAM_DEFECTS)
DAMAGE_REASONS = {"smudged": {"low_grade", "no_read"}, "copied": {"duplicate"}, "foreign": {"wrong_content"}}


def serial_of(content: str | None) -> str | None:
    return gs1.parse(content).serial if content else None


async def test_verify_station_rejects_exactly_the_units_damaged_after_the_first_gate(tmp_path: Path) -> None:
    planned = 150
    async with simulated_line(tmp_path, rate=600, defect_rate=0.03, seed=5, base=ROOT / "config" / "verify-line.yaml",
                              simulation={"downstream_defect_rate": 0.08}) as sl:
        check = next(s for s in sl.line.stations if isinstance(s, VerifyRuntime))
        lot = await sl.create_batch(planned, challenge=True)
        await sl.start_batch()
        assert sl.line.challenge_passed is True
        await asyncio.wait_for(sl.line.completed.wait(), 90)
        await settle(sl)
        await close_batch(sl)
        status = await sim(sl, cmd="status")
        first_truth = await sim(sl, cmd="truth")  # pv1's gate
        units = (await sim(sl, cmd="units", conveyor="check1", last=1000))["units"]
        rows = sl.daemon.store.outbox(0, 100_000, only_unforwarded=False)
        counters = check.counters.as_dict()
        fault = sl.line.fault

    assert fault is None, f"the line stopped on {fault}"
    conv = status["conveyors"]["check1"]
    truth = conv["truth"]
    assert conv["fed_by"] == "pv1" and conv["done"] == len(units) == first_truth["passed"]
    # every unit pv1 passed reached check1: one per commissioned serial
    assert len(units) == planned == sum(1 for r in rows if isinstance(r.event, UnitCommissioned) and r.event.lot == lot)
    damaged = [u for u in units if u["defect"]]
    assert Counter(u["defect"] for u in damaged).keys() == DAMAGE_REASONS.keys(), f"seed gave too little damage: {damaged}"

    # ground truth at check1's gate: every damaged unit in the bin, every sound one through
    assert truth["missed_rejects"] == 0 and truth["false_rejects"] == 0, truth
    assert {u["seq"] for u in units if u["outcome"] == "rejected"} == {u["seq"] for u in damaged}

    # the record, unit by unit: a rejected read (with the damage's reason) for each damaged unit, an inspection
    # (EPCIS OBSERVE) of each unit that passed, and never an observation of a code that names no commissioned unit
    rejected = {r.event.seq: r for r in rows if isinstance(r.event, ReadRejected) and r.event.station == "check1"}
    inspected = [r for r in rows if isinstance(r.event, UnitInspected) and r.event.station == "check1"]
    assert set(rejected) == {u["seq"] for u in damaged}
    for u in damaged:
        ev = rejected[u["seq"]].event
        assert ev.reason.value in DAMAGE_REASONS[u["defect"]], (u, ev)
        assert ev.lot == lot and rejected[u["seq"]].epcis is None
    assert sorted(r.event.serial for r in inspected) == sorted(serial_of(u["content"]) for u in units if u["outcome"] == "passed")
    assert all(r.event.lot == lot and r.epcis and '"OBSERVE"' in r.epcis for r in inspected)
    assert counters["good"] == len(inspected) and counters["rejected_total"] == len(damaged)
    assert counters["reject_confirmed"] == len(damaged) and counters["failsafe_rejects"] == 0


async def test_a_verify_reject_the_gate_does_not_confirm_stops_the_line(tmp_path: Path) -> None:
    """The verify gate pushed nothing out (confirm lost): the unit may have passed, so the line stops naming it."""
    async with simulated_line(tmp_path, rate=600, defect_rate=0.0, seed=9, base=ROOT / "config" / "verify-line.yaml",
                              simulation={"downstream_defect_rate": 0.25}) as sl:
        check = next(s for s in sl.line.stations if isinstance(s, VerifyRuntime))
        await sim(sl, cmd="inject", device="plc2", fault="confirm_lost", units=1)
        await sl.create_batch(500, challenge=False)
        await sl.start_batch()
        await wait_for(lambda: sl.line.fault is not None, 30, "the line to stop")
        await wait_stopped(sl)
        alarms = [a for a in sl.line.alarms.values() if a.code == "reject_not_confirmed"]
        counters = check.counters.as_dict()
        fault = sl.line.fault
        rows = sl.daemon.store.outbox(0, 100_000, only_unforwarded=False)
    first = next(r.event.seq for r in rows if isinstance(r.event, ReadRejected) and r.event.station == "check1")
    assert fault == "reject_not_confirmed"
    # the first reject the gate took (the one whose confirm was lost) is the one named
    assert alarms and alarms[0].station == "check1" and alarms[0].message.startswith(f"reject of unit {first} not confirmed")
    assert 1 <= counters["rejected_total"] and counters["reject_confirmed"] <= counters["rejected_total"] - 1
