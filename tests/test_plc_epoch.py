"""End-to-end: PLC restarts (cold, warm, with and without the plc_epoch tag) against the simulator's ground truth.

A PLC that restarts starts a new sequence space: unit numbers, the reject ring
and its counters may start over. What linectl must never do is match evidence
of the new epoch to units of the old one (that decommissioned packs already on
the market), or leave a unit whose fate it cannot prove silently commissioned.
Every check is against what the simulator physically did at the gate.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from linectl import control as C
from linectl import gs1
from linectl.events import RejectReason, UnitDecommissioned
from linectl.report import batch_report
from linectl.yamlsource import load_yaml, to_plain
from tests.engine_helpers import (
    alarm_codes,
    db_query,
    gate_units,
    lot_events,
    settle,
    sim,
    simulated_line,
    state_of,
    wait_for,
    wait_good,
    wait_stopped,
)

PLANNED = 240


def _serial_of(content: str | None) -> str | None:
    if not content:
        return None
    try:
        return gs1.parse(content).serial
    except gs1.GS1Error:
        return None


def _states(db: Path, lot: str) -> dict[str, str]:
    return {s: st for s, st in db_query(db, "SELECT serial, state FROM serials WHERE lot=?", (lot,))}


def judge(units: list[dict[str, Any]], events: list[Any], states: dict[str, str], open_fates: set[str]) -> list[str]:
    """Ground truth vs the record. Returns the violations (empty = fine)."""
    bad: list[str] = []
    fate: dict[str, str] = {}  # serial -> physical outcome of the (last) unit carrying it
    unit_of: dict[str, dict[str, Any]] = {}
    for u in units:
        s = _serial_of(u["content"])
        if s is not None and not u.get("challenge"):
            if s in fate:
                bad.append(f"serial {s} on two physical units")
            fate[s] = u["outcome"]
            unit_of[s] = u
    decom = {e.serial: e for e in events if isinstance(e, UnitDecommissioned)}
    for s, outcome in fate.items():
        st = states.get(s)
        if outcome == "passed":
            if s in decom:
                bad.append(f"GENUINE PACK DECOMMISSIONED: serial {s} passed the gate, decommissioned {decom[s].reason.value}: {decom[s].detail}")
            elif st != "commissioned":
                bad.append(f"serial {s} passed the gate but is {st}")
        else:
            if st == "commissioned" and s not in open_fates:
                bad.append(f"serial {s} went to the reject bin but is silently commissioned (not fate_unknown); unit {unit_of[s]}")
    # (so every decommissioned serial is on a unit physically rejected, or on no unit at all: never printed)
    for s in open_fates:
        if s not in fate:
            bad.append(f"fate_unknown serial {s} was never printed on a unit")
    return bad


async def _fates(sl: Any, lot: str) -> set[str]:
    return {f.serial for f in sl.line.store.unit_fates(lot, open_only=True)}


async def _restart_and_judge(sl: Any, *, cold: bool, expect_epoch: bool, resume: bool = True) -> dict[str, Any]:
    """One batch: production, PLC restart mid-batch, stop, ground-truth check, reconcile, (resume to the end), close."""
    line = sl.line
    lot = await sl.create_batch(PLANNED, challenge=False)
    await sl.start_batch()
    await wait_good(sl, 40)
    await sim(sl, cmd="inject", device="plc1", fault="plc_restart", cold=cold)
    if expect_epoch:
        await wait_for(lambda: line.fault == "plc_restarted", 20, "the plc_restarted fault stop")
    else:
        await asyncio.sleep(3.0)
        assert line.fault != "plc_restarted", f"a warm restart with continuous counters and no epoch tag is the same PLC: {alarm_codes(sl)}"
        if line.fault is None and state_of(sl) == "running":
            await line.execute(C.StopBatch(actor="test"), origin="test")
    await wait_stopped(sl, 30)
    await settle(sl, 40)
    units = await gate_units(sl)
    events = lot_events(line.store, lot)
    states = _states(sl.db, lot)
    open_fates = await _fates(sl, lot)
    violations = judge(units, events, states, open_fates)
    assert not violations, "after the PLC restart:\n  " + "\n  ".join(violations[:30])
    rep = batch_report(line.store, lot)
    if open_fates:
        assert not rep["balanced"] and rep["fate_unknown"] == len(open_fates), rep
        assert any("unknown fate" in p for p in rep["problems"]), rep["problems"]
        assert "units_fate_unknown" in alarm_codes(sl)
        # production does not resume over units nobody can vouch for
        if line.fault is not None:
            await line.execute(C.ResetLine(actor="test"), origin="test")
        with pytest.raises(C.CommandRejected, match="unknown fate"):
            await line.execute(C.StartBatch(actor="test"), origin="test")
        # the operator checks the bin: reconcile with what is physically there (the simulator's truth)
        by_serial = {_serial_of(u["content"]): u["outcome"] for u in units}
        in_bin = sorted(s for s in open_fates if by_serial.get(s) == "rejected")
        passed = sorted(s for s in open_fates if by_serial.get(s) == "passed")
        if in_bin:
            await line.execute(C.ReconcileUnits(serials=in_bin, outcome="in_bin", actor="qa.jones", reason="reject bin checked"), origin="test")
        if passed:
            await line.execute(C.ReconcileUnits(serials=passed, outcome="passed", actor="qa.jones", reason="reject bin checked"), origin="test")
        assert await _fates(sl, lot) == set()
        fates = line.store.unit_fates(lot)
        assert all(f.state == "resolved" and f.resolved_by == "qa.jones@test" for f in fates)
    if line.fault is not None:
        await line.execute(C.ResetLine(actor="test"), origin="test")
    if resume:
        # the new epoch's units 1, 2, 3... are new units, not second reads of old ones
        await line.execute(C.StartBatch(actor="test"), origin="test")
        await wait_for(lambda: line.completed.is_set() or state_of(sl) == "stopped" and line._stop_task is not None and line._stop_task.done(), 120,
            "the batch to finish")
        if line.fault is not None:
            await settle(sl, 40)
            dbg = [u for u in await gate_units(sl) if u.get("plc_epoch") == 1][:12]
            raise AssertionError(f"line stopped after resuming in the new epoch: {line.fault} {alarm_codes(sl)} {dbg}")
        await wait_stopped(sl, 30)
        await settle(sl, 40)
    res = await line.execute(C.CloseBatch(actor="test"), origin="test")
    report = res["report"]
    units = await gate_units(sl)
    events = lot_events(line.store, lot)
    states = _states(sl.db, lot)
    violations = judge(units, events, states, set())
    assert not violations, "after reconciliation:\n  " + "\n  ".join(violations[:30])
    assert report["balanced"], report
    if resume:
        assert report["commissioned"] == PLANNED, report
    return {"lot": lot, "report": report, "units": units, "events": events}


async def test_cold_restart_mid_batch_never_decommissions_a_genuine_pack(tmp_path):
    async with simulated_line(tmp_path, rate=600) as sl:
        out = await _restart_and_judge(sl, cold=True, expect_epoch=True)
        st = await sim(sl, cmd="status")
        assert st["devices"]["plc1"]["restarts"][0]["cold"] is True
        # no unit decommissioned from reject-ring evidence of another epoch
        old_epoch = [e for e in out["events"] if isinstance(e, UnitDecommissioned) and "while linectl was down" in e.detail]
        assert not old_epoch
        # packs: the counters are summed per epoch; what a cold restart wiped (the PLC's counts after linectl's last
        # poll) is named, never papered over
        packs = out["report"]["packs"]
        passed = sum(1 for u in out["units"] if u["outcome"] == "passed")
        rejected = sum(1 for u in out["units"] if u["outcome"] == "rejected")
        assert packs["plc_counters"] and packs["balanced"] is False, packs
        assert any("cold restart" in p for p in packs["problems"]), packs["problems"]
        assert 0 <= passed - packs["passed"] <= 5 and 0 <= rejected - packs["rejected"] <= 5, (packs, passed, rejected)


async def test_warm_restart_with_epoch_tag_is_a_new_epoch(tmp_path):
    async with simulated_line(tmp_path, rate=600) as sl:
        out = await _restart_and_judge(sl, cold=False, expect_epoch=True)
        # retentive counters: the pack sums close exactly, against the simulator's own count
        packs = out["report"]["packs"]
        assert packs["balanced"], packs
        assert packs["passed"] == sum(1 for u in out["units"] if u["outcome"] == "passed"), packs
        assert packs["rejected"] == sum(1 for u in out["units"] if u["outcome"] == "rejected"), packs
        st = sl.line.stations[0]
        assert st.plc_epoch == 2
        saved = sl.line.store.plc_state("plc1")
        assert saved is not None and saved.epoch == 2 and saved.epoch_tag == 1


def _without_epoch_tag(tmp_path: Path) -> Path:
    """The demo line with a PLC that offers no boot counter (tag plc_epoch removed from the map)."""
    from ruamel.yaml import YAML

    from linectl.demo import DEFAULT_CONFIG

    raw = to_plain(load_yaml(DEFAULT_CONFIG))
    raw["devices"]["plc1"]["tags"].pop("plc_epoch")
    path = tmp_path / "no-epoch-tag.yaml"
    with open(path, "w", encoding="utf-8") as fh:
        YAML(typ="safe").dump(raw, fh)
    return path


async def test_warm_restart_without_epoch_tag_keeps_the_epoch(tmp_path):
    async with simulated_line(tmp_path, rate=600, base=_without_epoch_tag(tmp_path)) as sl:
        assert "plc_epoch" not in sl.line.stations[0].plc.tag_names
        await _restart_and_judge(sl, cold=False, expect_epoch=False, resume=False)
        assert sl.line.stations[0].plc_epoch == 1


async def test_counter_going_back_without_epoch_tag_is_a_new_epoch(tmp_path):
    async with simulated_line(tmp_path, rate=600, base=_without_epoch_tag(tmp_path)) as sl:
        await _restart_and_judge(sl, cold=True, expect_epoch=True)
        assert sl.line.stations[0].plc_epoch == 2


async def test_cold_restart_while_linectl_is_down(tmp_path):
    """Crash recovery trusts reject-ring values only of the PLC epoch it last saw (persisted in the store)."""
    async with simulated_line(tmp_path, rate=600) as sl:
        lot = await sl.create_batch(PLANNED, challenge=False)
        await sl.start_batch()
        await wait_good(sl, 40)
        await sl.daemon.shutdown("test: daemon goes away")
        sl.daemon = None
        await sim(sl, cmd="inject", device="plc1", fault="plc_restart", cold=True)
        await asyncio.sleep(1.5)
        await sl.start_daemon()
        line = sl.line
        await wait_for(lambda: line.fault == "plc_restarted", 20, "plc_restarted found at start-up")
        assert line.stations[0].plc_epoch == 2
        await settle(sl, 40)
        units = await gate_units(sl)
        events = lot_events(line.store, lot)
        violations = judge(units, events, _states(sl.db, lot), await _fates(sl, lot))
        assert not violations, "\n  ".join(violations[:30])
        assert not [e for e in events if isinstance(e, UnitDecommissioned) and "while linectl was down" in e.detail]


@pytest.mark.parametrize("driver", ["modbus_tcp", "s7", "opcua"])
async def test_sim_plc_restart_over_the_wire(driver):
    """The simulator's plc_restart: cold clears memory and counters, warm keeps retentive memory; both bump plc_epoch,
    drop the connection and stop the line; a driver reconnects and reads the new epoch."""
    from linectl.drivers.registry import driver_class
    from linectl.simulators.plc import PlcSim, default_config, free_tcp_port

    fast = {"heartbeat": False, "poll_interval_s": 0.02, "backoff_initial_s": 0.05, "backoff_max_s": 0.2}
    cfg = default_config(driver, port=free_tcp_port(), **fast)
    sim = PlcSim("plc1", cfg)
    await sim.start()
    drv = driver_class(driver)("plc1", cfg)
    await drv.start()
    try:
        assert await drv.wait_connected(5.0)
        for _ in range(5):
            sim.count_trigger()
        sim.set("reject_ring", 3, index=3)
        sim.set("line_running", 1)
        sessions = drv.stats["sessions"]
        assert sim.inject("plc_restart", cold=False)["epoch"] == 1
        await wait_for(lambda: drv.stats["sessions"] > sessions and drv.health.state.value == "connected", 10, "reconnect after warm restart")
        v = await drv.read_tags(["plc_epoch", "trigger_count", "reject_ring", "line_running"])
        assert v["plc_epoch"] == 1 and v["trigger_count"] == 5 and v["reject_ring"][3] == 3 and not v["line_running"]
        sessions = drv.stats["sessions"]
        assert sim.inject("plc_restart", cold=True)["epoch"] == 2
        await wait_for(lambda: drv.stats["sessions"] > sessions and drv.health.state.value == "connected", 10, "reconnect after cold restart")
        v = await drv.read_tags(["plc_epoch", "trigger_count", "reject_ring"])
        assert v["plc_epoch"] == 2 and v["trigger_count"] == 0 and v["reject_ring"][3] == 0
        assert sim.count_trigger() == 1  # the new epoch numbers its units from 1
        assert [r["cold"] for r in sim.status()["restarts"]] == [False, True]
    finally:
        await drv.stop()
        await sim.stop()


async def test_s7_sim_gate_decides_without_deadlock():
    """The S7 simulator's gate takes the program lock and then reads/writes tags: it must not wait on itself."""
    from linectl.simulators.model import SimUnit
    from linectl.simulators.plc import PlcSim, default_config, free_tcp_port

    sim = PlcSim("plc1", default_config("s7", port=free_tcp_port()))
    await sim.start()
    try:
        sim.set("verdict_ring", [1, 1], index=2)
        assert await asyncio.wait_for(asyncio.to_thread(sim.gate, SimUnit(seq=1)), 5) == "passed"
        assert await asyncio.wait_for(asyncio.to_thread(sim.gate, SimUnit(seq=2)), 5) == "rejected"
        assert sim.get("reject_ring")[2] == 2 and sim.get("gate_reject_total") == 1 and sim.get("pass_total") == 1
    finally:
        await sim.stop()


async def _reconcile_from_truth(sl: Any, lot: str) -> None:
    """The operator checks the bin for the units of unknown fate and reconciles them with what is physically there."""
    line = sl.line
    open_fates = await _fates(sl, lot)
    by_serial = {_serial_of(u["content"]): u["outcome"] for u in await gate_units(sl)}
    for outcome, physical in (("in_bin", "rejected"), ("passed", "passed")):
        serials = sorted(s for s in open_fates if by_serial.get(s) == physical)
        if serials:
            await line.execute(C.ReconcileUnits(serials=serials, outcome=outcome, actor="qa.jones", reason="reject bin checked"), origin="test")


@pytest.mark.parametrize("second", ["cold", "warm", "cold_after_daemon_restart"])
async def test_restart_after_a_cold_restart_counts_the_carried_units(tmp_path, second):
    """A cold restart with units on the belt: the gate counts those old units in the new epoch's counters. A
    second restart (cold, warm, or cold after the daemon itself restarted in between) must still put every unit it
    cannot prove through the gate in doubt: the gate counters overstate this epoch's progress by the carried units."""
    async with simulated_line(tmp_path, rate=600) as sl:
        lot = await sl.create_batch(2000, challenge=False)
        await sl.start_batch()
        await wait_good(sl, 40)
        await sim(sl, cmd="inject", device="plc1", fault="plc_restart", cold=True)
        await wait_for(lambda: sl.line.fault == "plc_restarted", 20, "the first plc_restarted")
        await wait_stopped(sl, 30)
        await settle(sl, 40)
        st = sl.line.stations[0]
        carried = st._carried
        assert carried > 0, "units were on the belt at the cold restart: the new epoch's counters carry them"
        saved = sl.line.store.plc_state("plc1")
        assert saved is not None and saved.carried == carried
        await _reconcile_from_truth(sl, lot)
        await sl.line.execute(C.ResetLine(actor="test"), origin="test")
        await sl.line.execute(C.StartBatch(actor="test"), origin="test")
        good = sl.line.batch.good_total()
        await wait_good(sl, good + 60)
        if second == "cold_after_daemon_restart":
            await sl.daemon.shutdown("test: daemon goes away")
            sl.daemon = None
            await sl.start_daemon()
            assert sl.line.stations[0]._carried == carried, "the carry survives a daemon restart (plc_epochs.carried)"
            await sl.line.execute(C.StartBatch(actor="test"), origin="test")
            good = sl.line.batch.good_total()
            await wait_good(sl, good + 30)
        else:
            await asyncio.sleep(0.5)
        # units are on the belt: commissioned, between reader and gate
        await sim(sl, cmd="inject", device="plc1", fault="plc_restart", cold=second != "warm")
        await wait_for(lambda: sl.line.fault == "plc_restarted", 20, "the second plc_restarted")
        await wait_stopped(sl, 30)
        await settle(sl, 40)
        units = await gate_units(sl)
        events = lot_events(sl.line.store, lot)
        open_fates = await _fates(sl, lot)
        violations = judge(units, events, _states(sl.db, lot), open_fates)
        assert not violations, f"after the second restart (carried {carried}):\n  " + "\n  ".join(violations[:30])
        assert open_fates, "units were on the belt at the second restart: some must be of unknown fate"
        if second == "warm":
            assert sl.line.stations[0]._carried == carried, "counters continue through a warm restart, so does the carry"


async def test_duplicate_copies_are_recorded_against_the_simulators_truth(tmp_path):
    """A unit that carried a copy of another serial's code (printer duplicate) is rejected, and the store records
    which code the bin now holds a copy of (unit_copies): exactly the duplicates the simulator printed."""
    async with simulated_line(tmp_path, rate=600) as sl:
        lot = await sl.create_batch(PLANNED, challenge=False)
        await sim(sl, cmd="set", defect_rate=0.25, defect_mix={"duplicate": 1.0})
        await sl.start_batch()
        await wait_good(sl, 30)
        await sl.line.execute(C.StopBatch(actor="test"), origin="test")
        await wait_stopped(sl, 30)
        await settle(sl, 40)
        gtin = sl.line.batch.gtin
        copies_printed: dict[str, int] = {}
        for u in await gate_units(sl):
            s = _serial_of(u["content"])
            if u.get("defect") == "duplicate" and s is not None:
                assert u["outcome"] == "rejected", u
                copies_printed[s] = copies_printed.get(s, 0) + 1
        assert copies_printed, "the simulator printed no duplicate"
        recorded = {s: len(sl.line.store.rejected_copies(gtin, s)) for s in copies_printed}
        assert recorded == copies_printed
        rows = db_query(sl.db, "SELECT serial, carrier_serial, reason FROM unit_copies")
        assert len(rows) == sum(copies_printed.values()) and all(r[2] == "duplicate" and r[0] != r[1] for r in rows), rows
        for _, carrier, _ in rows:
            assert _states(sl.db, lot)[carrier] == "decommissioned"


async def test_reconcile_in_bin_counts_the_rejected_copies_of_a_code(tmp_path):
    """Found by the fault campaign (seed 44): a unit of unknown fate whose code was also printed on a duplicate that
    the gate rejected. A pack with that code in the bin may be the copy: "found in the bin" proves the unit is there
    only when the bin holds more packs with the code than copies were rejected. The operator says how many."""
    async with simulated_line(tmp_path, rate=600) as sl:
        line = sl.line
        lot = await sl.create_batch(PLANNED, challenge=False)
        await sl.start_batch()
        await wait_good(sl, 12)
        await line.execute(C.StopBatch(actor="test"), origin="test")
        await wait_stopped(sl, 30)
        await settle(sl, 40)
        gtin = line.batch.gtin
        good = sorted(s for s, st in _states(sl.db, lot).items() if st == "commissioned")
        x, z, carrier_x, carrier_z = good[:4]
        # what the station records when a duplicate of x (then of z) is read on the units printed for carrier_x/_z
        await line.store.append(
            UnitDecommissioned(gtin=gtin, serial=carrier_x, lot=lot, reason=RejectReason.DUPLICATE, seq=90, station="pv1",
                               detail=f"serial {x} was already printed on another unit", read_serial=x),
            UnitDecommissioned(gtin=gtin, serial=carrier_z, lot=lot, reason=RejectReason.DUPLICATE, seq=91, station="pv1",
                               detail=f"serial {z} was already printed on another unit", read_gtin=gtin, read_serial=z),
        )
        assert [c.carrier_serial for c in line.store.rejected_copies(gtin, x)] == [carrier_x]
        await line.store.mark_fate_unknown([(gtin, s, lot, "pv1", "plc1", 1, n, "test: PLC restarted") for n, s in ((5, x), (6, z))])
        for copies in (None, 1):
            with pytest.raises(C.CommandRejected) as exc:
                await line.execute(C.ReconcileUnits(serials=[x], outcome="in_bin", copies=copies, actor="qa.jones", reason="reject bin checked"), origin="test")
            assert exc.value.code == "ambiguous_copies" and x in exc.value.reason and "copies" in exc.value.reason
        assert _states(sl.db, lot)[x] == "commissioned" and await _fates(sl, lot) == {x, z}
        # two packs with x's code in the bin: one is the copy, the other the unit
        await line.execute(C.ReconcileUnits(serials=[x], outcome="in_bin", copies=2, actor="qa.jones", reason="reject bin checked"), origin="test")
        assert _states(sl.db, lot)[x] == "decommissioned"
        # one pack with z's code in the bin: the copy; the unit went downstream
        await line.execute(C.ReconcileUnits(serials=[z], outcome="passed", actor="qa.jones", reason="reject bin checked"), origin="test")
        assert _states(sl.db, lot)[z] == "commissioned" and await _fates(sl, lot) == set()
