"""RFID readers at stations: what the config accepts and refuses, and the verify station on a tag stream.

The verify station runs against the LLRP reader simulator over TCP in `trigger: continuous`; each tag's
verdict is compared with what the test put in the field and with the store.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import wait_for
from rfid_support import CASE_TRIGGER_SPEC, LLRP_FAST, unit_epc
from test_aggregation_support import CP, GTIN, commission, config, new_batch, open_store, unit_code

from linectl import epc, gs1
from linectl.engine.rework import decommission_unit
from linectl.simulators.llrp_reader import LlrpReaderSim
from linectl.simulators.plc import DEFAULT_MODBUS_TAGS
from linectl.yamlsource import ConfigFileError

pytestmark = pytest.mark.timeout(60)

LLRP = {"driver": "llrp", "host": "127.0.0.1", "port": 5084}
PLC = {"driver": "modbus_tcp", "host": "127.0.0.1", "port": 5020, "tags": {**DEFAULT_MODBUS_TAGS, "case_trigger": CASE_TRIGGER_SPEC}}
LABELER = {"driver": "zpl", "host": "127.0.0.1", "port": 9100}
CAM = {"driver": "camera", "source": "/tmp/nowhere", "max_codes": 16}


def problems(devices: dict[str, Any], station: dict[str, Any]) -> list[tuple[str, str]]:
    try:
        config(devices, [station])
    except ConfigFileError as exc:
        return [(p.path, p.message) for p in exc.problems]
    return []


def case(**kw: Any) -> dict[str, Any]:
    return {"type": "case", "name": "cp", "reader": "tunnel", "printer": "labeler", "plc": "plc", "units_per_case": 6, **kw}


def test_tunnel_config_accepted() -> None:
    cfg = config({"tunnel": LLRP, "labeler": LABELER, "plc": PLC}, [case(window_ms=250, rfid_min_rssi=-60)])
    st = cfg.stations[0]
    assert (st.window_ms, st.rfid_min_rssi) == (250, -60)


def test_tunnel_config_refusals() -> None:
    base = {"tunnel": LLRP, "labeler": LABELER, "plc": PLC}
    no_trigger = {**PLC, "tags": dict(DEFAULT_MODBUS_TAGS)}
    cases: list[tuple[dict[str, Any], dict[str, Any], str, str]] = [
        (base, {**case(), "plc": None}, "stations.0.plc", "needs the PLC that counts cases into it (tag case_trigger)"),
        ({**base, "plc": no_trigger}, case(), "stations.0.plc", "has no case_trigger tag"),
        ({**base, "tunnel": {**LLRP, "trigger": "continuous"}}, case(), "stations.0.reader", "must run trigger: window"),
        ({**base, "cam": CAM}, case(reader="cam", window_ms=200), "stations.0.window_ms", "applies to an RFID reader"),
        ({**base, "cam": CAM}, case(reader="cam", rfid_min_rssi=-60), "stations.0.rfid_min_rssi", "applies to an RFID reader"),
        ({**base, "scan": {"driver": "scanner", "host": "127.0.0.1", "port": 9}},
         {"type": "pallet", "name": "pal", "reader": "tunnel", "printer": "labeler", "cases_per_pallet": 4},
         "stations.0.reader", "device 'tunnel' is a rfid_reader, not a reader"),
        ({**base, "plc": {**PLC, "tags": {**PLC["tags"], "case_trigger": {"table": "holding", "address": 18, "type": "float32"}}}}, case(),
         "devices.plc", "tag case_trigger must be a single integer"),
    ]
    for devices, station, loc, msg in cases:
        got = problems(devices, station)
        assert any(loc in where and msg in text for where, text in got), (loc, msg, got)


def test_verify_with_rfid_config() -> None:
    st = {"type": "verify", "name": "v1", "reader": "gate", "rfid_min_rssi": -60}
    assert config({"gate": {**LLRP, "trigger": "continuous"}}, [st]).stations[0].rfid_min_rssi == -60
    got = problems({"gate": LLRP}, st)
    assert any("must run trigger: continuous" in m for _, m in got), got
    got = problems({"gate": {**LLRP, "trigger": "continuous"}, "plc": PLC}, {**st, "plc": "plc"})
    assert any(w == "stations.0.plc" and "set no plc" in m for w, m in got), got


async def test_verify_station_checks_each_tag_of_a_continuous_stream(tmp_path: Path) -> None:
    from linectl.daemon import build_drivers
    from linectl.engine.line import Line

    sim = LlrpReaderSim(seed=5)
    await sim.start()
    dev = {**LLRP, **LLRP_FAST, "port": sim.port, "trigger": "continuous", "session": 0}
    cfg = config({"gate": dev}, [{"type": "verify", "name": "v1", "reader": "gate", "rfid_min_rssi": -65}], db=str(tmp_path / "l.db"))
    store = await open_store(tmp_path / "l.db", cfg)
    drivers = build_drivers(cfg)
    line = Line(cfg, store, drivers)
    (rt,) = line.stations
    tasks: list[asyncio.Task[Any]] = []
    try:
        await line.execute({"name": "create_batch", "lot": "LOTA1", "gtin": GTIN, "expiry": "281231", "planned_qty": 1000, "actor": "qa"}, "t")
        good = await commission(store, 3)
        gone = await commission(store, 1)
        await decommission_unit(store, unit_code(gone[0]).hri, "cli:qa", detail="crushed")
        await new_batch(store, "LOTB")
        other = await commission(store, 1, lot="LOTB")
        await drivers["gate"].start()
        assert await drivers["gate"].wait_connected(5)
        for name, factory in rt.tasks().items():
            tasks.append(asyncio.create_task(factory(), name=name))
        sscc_tag = epc.make_epc("sscc-96", sscc=gs1.make_sscc(0, CP, 7), company_prefix_length=7, filter_value=2).epc_hex
        field = {
            **{unit_epc(s): "good" for s in good},
            unit_epc(gone[0]): "decommissioned",
            unit_epc(other[0]): "data_mismatch",
            unit_epc("424242"): "wrong_content",  # never issued
            "33" + "0" * 22: "wrong_content",  # GRAI-96: no unit identity
            sscc_tag: "wrong_content",  # a case label
            unit_epc(good[0], filter_value=0): "duplicate",  # a second tag naming a unit already seen
        }
        for e in field:
            sim.field_enter(e)
        sim.field_enter(unit_epc("555555"), rssi=-80)  # outside the read zone: never verified
        await wait_for(lambda: rt.counters.read == len(field), 10, "every tag verified")
        await wait_for(lambda: rt.counters.rfid_repeats > 10, 10, "session 0: tags reported again and again")
        rows = store.outbox(0, 1000, only_unforwarded=False)
        inspected = {(r.event.gtin, r.event.serial) for r in rows if r.kind == "unit_inspected"}
        rejected = [(r.event.serial, r.event.reason.value) for r in rows if r.kind == "read_rejected"]
        assert inspected == {(GTIN, s) for s in good}
        assert {(s, r) for s, r in rejected if s} == {(gone[0], "decommissioned"), (other[0], "data_mismatch"), ("424242", "wrong_content"),
                                                      (good[0], "duplicate")}
        assert sum(1 for s, r in rejected if s is None and r == "wrong_content") == 2
        assert rt.counters.read == len(field) and rt.counters.good == 3
        assert rt.counters.rfid_strays > 0 and rt.snapshot()["counters"]["rfid_strays"] == rt.counters.rfid_strays
        msgs = [r.event.message for r in rows if r.kind == "alarm" and r.event.code == "verify_rejected"]
        assert any("header 33 (grai-96)" in m for m in msgs) and any("an SSCC (a case label)" in m for m in msgs)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for d in drivers.values():
            await d.stop()
        await sim.stop()
        await store.close()
