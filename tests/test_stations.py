"""Stations as plug-ins: the registry covers every config `type:`, an unbuilt type is refused at load, and the
`verify` station checks each read against the store (a real scanner simulator on TCP, a real store)."""

from __future__ import annotations

import asyncio
import typing
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import wait_for
from test_aggregation_support import (
    FAST,
    GTIN,
    GTIN2,
    LOT,
    commission,
    config,
    new_batch,
    open_store,
    unit_code,
)

from linectl import control as C
from linectl.config import StationConfig, load_config, parse_config
from linectl.daemon import build_drivers
from linectl.engine import station as S
from linectl.engine.line import Line
from linectl.engine.verify_station import VerifyRuntime
from linectl.epcis import EpcisMapper
from linectl.events import ReadRejected, UnitDecommissioned, UnitInspected
from linectl.simulators.scanner import ScannerSim
from linectl.yamlsource import ConfigFileError

ROOT = Path(__file__).resolve().parent.parent


def config_types() -> set[str]:
    union = typing.get_args(typing.get_args(StationConfig)[0])
    return {typing.get_args(cls.model_fields["type"].annotation)[0] for cls in union}


def test_registry_builds_every_config_type() -> None:
    """A station model without a runtime (or a runtime without a model) is caught here, not on a line."""
    assert set(S.STATIONS) == config_types()
    for kind in S.STATIONS:
        assert callable(S.builder(kind))


def verify_doc(**station: Any) -> dict[str, Any]:
    cfg = config()
    doc: dict[str, Any] = {
        "line": cfg.line.model_dump(exclude_none=True, exclude={"timezone_offset"}),
        "products": [p.model_dump(exclude_none=True) for p in cfg.products],
        "mqtt": {"enabled": False},
        "devices": {"scan1": {"driver": "scanner", "host": "127.0.0.1", "port": 9999}},
        "stations": [{"type": "verify", "name": "check1", "reader": "scan1", **station}],
    }
    return doc


def test_unbuilt_station_type_fails_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    parse_config(verify_doc())  # built: accepted
    monkeypatch.delitem(S.STATIONS, "verify")
    with pytest.raises(ConfigFileError) as ei:
        parse_config(verify_doc())
    [p] = ei.value.problems
    assert p.path == "stations.0.type" and "'verify' is not built by this linectl" in p.message


def test_unknown_station_type_fails_in_check_config(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    doc = verify_doc()
    doc["stations"][0]["type"] = "labeller"
    p = tmp_path / "line.yaml"
    p.write_text(json.dumps(doc))  # (JSON is YAML)
    r = subprocess.run([sys.executable, "-m", "linectl", "check-config", str(p)], capture_output=True, text=True, cwd=ROOT, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "stations.0" in r.stdout and "labeller" in r.stdout and "Traceback" not in r.stdout + r.stderr


@pytest.mark.parametrize(
    "station, needle",
    [
        ({"rules": {"link_grace_s": 1.0}}, "a verify station prints nothing"),
        ({"rules": {"reject_confirm_timeout_s": 1.0}}, "need a reject gate"),
        ({"plc": "scan1"}, "is a reader, not a plc"),
    ],
)
def test_verify_station_refuses_what_it_cannot_apply(station: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigFileError) as ei:
        parse_config(verify_doc(**station))
    assert any(needle in p.message for p in ei.value.problems), ei.value.problems


def test_verify_gate_plc_needs_its_rings() -> None:
    doc = verify_doc(plc="plc1")
    doc["devices"]["plc1"] = {"driver": "modbus_tcp", "host": "127.0.0.1", "port": 5020, "heartbeat": False,
                              "tags": {"line_mode": {"table": "holding", "address": 0, "type": "uint16"}}}
    with pytest.raises(ConfigFileError) as ei:
        parse_config(doc)
    assert any("no verdict_ring / reject_ring tag" in p.message for p in ei.value.problems), ei.value.problems


def test_verify_gate_needs_a_reader_that_reports_the_unit_sequence() -> None:
    doc = verify_doc(plc="plc1")
    doc["devices"]["plc1"] = {"driver": "modbus_tcp", "host": "127.0.0.1", "port": 5020, "heartbeat": False, "tags": {
        "verdict_ring": {"table": "holding", "address": 100, "type": "uint32", "count": 8},
        "reject_ring": {"table": "holding", "address": 200, "type": "uint32", "count": 4}}}
    with pytest.raises(ConfigFileError) as ei:
        parse_config(doc)  # scan1 is a scanner: no seq
    assert any("reports no unit sequence" in p.message for p in ei.value.problems), ei.value.problems
    doc["devices"]["scan1"] = {"driver": "reader", "host": "127.0.0.1", "port": 9999, "line_format": "{seq};{sym}{data};{grade}"}
    parse_config(doc)


def test_example_verify_line_builds_one_list_of_stations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINECTL_MQTT_PASSWORD", "x")
    cfg = load_config(ROOT / "config" / "verify-line.yaml")
    line = Line(cfg, None, build_drivers(cfg))
    assert [(s.name, type(s).__name__) for s in line.stations] == [(st.name, {
        "print_verify": "PrintVerifyRuntime", "verify": "VerifyRuntime"}[st.type]) for st in cfg.stations]
    assert {p.name for p in line.plcs} == {st.plc for st in cfg.stations}  # the verify gate's PLC follows line_mode too


# --------------------------------------------------------------------------- the verify station on a real scanner


async def test_verify_station_checks_reads_against_the_store(tmp_path: Path) -> None:
    scan = ScannerSim(port=0, no_read="NOREAD")
    await scan.start()
    cfg = config(
        {"scan1": {"driver": "scanner", "host": "127.0.0.1", "port": scan.port, "no_read": "NOREAD", **FAST}},
        [{"type": "verify", "name": "check1", "reader": "scan1", "rules": {"check_grade": False, "consecutive_reject_limit": 50}}],
    )
    store = await open_store(tmp_path / "v.db", cfg)
    store.set_epcis_mapper(EpcisMapper.from_config(cfg))
    drivers = build_drivers(cfg)
    line = Line(cfg, store, drivers)
    (st,) = line.stations
    assert isinstance(st, VerifyRuntime)
    tasks: list[asyncio.Task[None]] = []
    try:
        await new_batch(store)
        await new_batch(store, lot="LOTB2", gtin=GTIN2)
        other = await commission(store, 1, lot="LOTB2", gtin=GTIN2)
        await store.close_batch("LOTB2", "return", "test")
        await line.load_open_batch()
        assert line.batch is not None and line.batch.lot == LOT
        u = await commission(store, 4)
        await store.append(UnitDecommissioned(gtin=GTIN, serial=u[3], lot=LOT, reason="damaged"))
        [sent] = await store.allocate(GTIN, LOT, 1, cfg.product(GTIN).serials)
        await store.mark_sent(GTIN, LOT, [sent])
        for d in drivers.values():
            await d.start()
            assert await d.wait_connected(5)
        tasks = [asyncio.create_task(f()) for f in st.tasks().values()]
        after = store.last_seq()

        async def read(data: str, sym: str | None = "]d2") -> Any:
            n = sum(st.unit_tally())
            scan.scan(data, sym)
            await wait_for(lambda: sum(st.unit_tally()) > n, 10, f"verdict on {data!r}")
            return st.recent[-1]

        assert (await read(unit_code(u[0]).element_string)) == {"seq": 1, "good": True, "reason": None, "serial": u[0]}
        assert (await read(unit_code(u[1]).element_string))["good"]
        expected = [
            (unit_code(u[0]).element_string, "]d2", "duplicate", u[0]),  # a second unit carrying u[0]'s code
            (unit_code("NEVERSEEN01").element_string, "]d2", "wrong_content", "NEVERSEEN01"),
            (unit_code(u[3]).element_string, "]d2", "decommissioned", u[3]),
            (unit_code(sent).element_string, "]d2", "not_commissioned", sent),
            (unit_code(other[0], lot="LOTB2", gtin=GTIN2).element_string, "]d2", "data_mismatch", other[0]),
            (unit_code(u[2], lot="WRONGLOT").element_string, "]d2", "data_mismatch", u[2]),
            (unit_code(u[2]).element_string, "]d1", "not_gs1", None),
        ]
        for data, sym, reason, serial in expected:
            got = await read(data, sym)
            assert (got["good"], got["reason"], got["serial"]) == (False, reason, serial), data
        scan.scan("NOREAD", None)
        await wait_for(lambda: st.counters.rejected.get("no_read") == 1, 10, "the no-read")
        await wait_for(lambda: sum(1 for a in line.alarms.values() if a.code == "verify_rejected") == len(expected) + 1, 10, "its alarm")

        rows = store.outbox(after, 1000, only_unforwarded=False)
        inspected = [r for r in rows if isinstance(r.event, UnitInspected)]
        rejected = [r for r in rows if isinstance(r.event, ReadRejected)]
        assert [(r.event.serial, r.event.station, r.event.lot) for r in inspected] == [(u[0], "check1", LOT), (u[1], "check1", LOT)]
        assert all(r.epcis and '"OBSERVE"' in r.epcis for r in inspected)  # an EPCIS observation of a commissioned unit
        assert [r.event.reason.value for r in rejected] == [e[2] for e in expected] + ["no_read"]
        assert all(r.epcis is None for r in rejected), "a rejected read is a record, never an EPCIS event"
        assert rejected[1].event.serial == "NEVERSEEN01" and store.serial(GTIN, "NEVERSEEN01") is None
        assert st.unit_tally() == (2, len(expected) + 1)
        snap = line.snapshot()["stations"]["check1"]
        assert snap["type"] == "verify" and snap["counters"]["good"] == 2 and snap["counters"]["no_reads"] == 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for d in drivers.values():
            await d.stop()
        await scan.stop()
        await store.close()


async def test_verify_station_stop_rules_stop_the_running_line(tmp_path: Path) -> None:
    scan = ScannerSim(port=0, no_read="NOREAD")
    await scan.start()
    cfg = config(
        {"scan1": {"driver": "scanner", "host": "127.0.0.1", "port": scan.port, "no_read": "NOREAD", **FAST}},
        [{"type": "verify", "name": "check1", "reader": "scan1", "rules": {"check_grade": False, "no_read_limit": 3}}],
    )
    store = await open_store(tmp_path / "v.db", cfg)
    drivers = build_drivers(cfg)
    line = Line(cfg, store, drivers)
    (st,) = line.stations
    tasks: list[asyncio.Task[None]] = []
    try:
        for d in drivers.values():
            await d.start()
            assert await d.wait_connected(5)
        tasks = [asyncio.create_task(f()) for f in st.tasks().values()]
        await line.execute(C.CreateBatch(actor="t", lot=LOT, gtin=GTIN, expiry="281231", planned_qty=100, challenge=False), "test")
        await line.execute(C.StartBatch(actor="t"), "test")
        assert st.mode == "production"
        for _ in range(2):
            scan.scan("NOREAD", None)
        await wait_for(lambda: st.counters.rejected.get("no_read") == 2, 10, "two no-reads")
        assert line.fault is None
        scan.scan("NOREAD", None)
        await wait_for(lambda: line.fault == "no_read_limit", 10, "the no-read rule")
        await wait_for(lambda: line.batch is not None and line.batch.state.value == "stopped", 10, "the batch stopped")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for d in drivers.values():
            await d.stop()
        await scan.stop()
        await store.close()
