"""End-to-end: the demo line with its reject gate PLC on OPC UA (asyncua server in the simulator), judged by ground truth.

The same batch as the Modbus demo line's: defects of every kind at speed, every bad unit rejected by the gate the
simulator runs on the verdicts linectl wrote over OPC UA, every reject confirmed from the reject ring (subscription),
nothing missed, the batch balanced.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from engine_helpers import (
    DEFAULT_CONFIG,
    check_report,
    close_batch,
    gate_units,
    lot_events,
    serial_states,
    settle,
    sim,
    simulated_line,
    station,
    unit_ledger,
)
from ruamel.yaml import YAML

from linectl.events import UnitDecommissioned
from linectl.simulators.plc import DEFAULT_OPCUA_TAGS, free_tcp_port
from linectl.yamlsource import load_yaml, to_plain

pytestmark = pytest.mark.slow


def opcua_line(tmp_path: Path) -> Path:
    raw = to_plain(load_yaml(DEFAULT_CONFIG))
    raw["devices"]["plc1"] = {
        "driver": "opcua",
        "url": f"opc.tcp://127.0.0.1:{free_tcp_port()}",
        "tags": DEFAULT_OPCUA_TAGS,
    }
    path = tmp_path / "opcua-line.yaml"
    with open(path, "w", encoding="utf-8") as fh:
        YAML(typ="safe").dump(raw, fh)
    return path


async def test_batch_with_defects_on_an_opcua_gate(tmp_path):
    planned = 150
    base = opcua_line(tmp_path)
    async with simulated_line(tmp_path, base=base, rate=900, defect_rate=0.06, seed=11,
                              simulation={"gate_distance": 30}) as sl:
        lot = await sl.create_batch(planned, challenge=True)
        await sl.start_batch()
        assert sl.line.challenge_passed is True
        await asyncio.wait_for(sl.line.completed.wait(), 120)
        report = await close_batch(sl)
        await settle(sl)
        truth = await sim(sl, cmd="truth")
        status = await sim(sl, cmd="status")
        units = await gate_units(sl)
        events = lot_events(sl.daemon.store, lot)
        states = serial_states(sl.db, lot)
        st = station(sl)
        failsafe = st.counters.failsafe_rejects
        confirmed = st.counters.reject_confirmed

    plc = status["devices"]["plc1"]
    assert plc["listening"].startswith("opcua opc.tcp://"), plc
    # ground truth: the gate (run on what linectl wrote over OPC UA) missed no bad unit
    assert truth["missed_rejects"] == 0, truth["missed"]
    assert sum(truth["defects"].values()) > 3, f"seed gave too few defects to prove anything: {truth}"
    assert truth["passed"] == planned, truth
    false = [u["seq"] for u in units if u["outcome"] == "rejected" and not u["defect"] and not u["challenge"]]
    late = {e.seq for e in events if isinstance(e, UnitDecommissioned) and e.reason.value == "plc_failsafe"}
    assert set(false) <= late and failsafe >= len(false)
    # every reject the gate made came back to linectl through the reject ring: as the confirm of a reject it ordered,
    # or (a verdict too late for its unit) as a fail-safe reject
    rejected = [u for u in units if u["outcome"] == "rejected"]
    assert plc["reject_total"] == len(rejected) == confirmed + failsafe, (plc["reject_total"], len(rejected), confirmed, failsafe)
    check_report(report, planned=planned)
    led = unit_ledger(units, events, states)
    led.assert_ok()
    assert len(led.passed) == planned
