"""RFID in print_verify: each unit's label tag encoded by an RFID ZPL printer and verified, end to end.

The simulated line (simulator subprocess: a ZPL printer over TCP that encodes a simulated Gen 2 tag per label,
Modbus PLC with its reject gate, smart reader; the daemon in-process; a real broker) runs products whose carrier
is rfid or both. What the simulator says physically happened to each unit (the EPC its tag answers, VOID, the
injected fault) is compared with what linectl recorded: every unit whose tag is not its serial's EPC is rejected and
its serial decommissioned with the RFID reason, none of them is commissioned, the good ones are.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import (
    alarm_codes,
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
    wait_for,
    wait_stopped,
)
from ruamel.yaml import YAML

from linectl.config import parse_config
from linectl.demo import DEFAULT_CONFIG
from linectl.epc import decode_epc, make_epc
from linectl.epcis import EpcisMapper
from linectl.events import UnitCommissioned, UnitDecommissioned
from linectl.packaged import example_config
from linectl.yamlsource import ConfigFileError, load_yaml, to_plain

pytestmark = pytest.mark.slow

RFID_REASONS = {"rfid_void", "rfid_mismatch", "rfid_no_answer"}
#: a numeric serial scheme SGTIN-96 holds (no 0: no leading zero; 11 digits < 274877906943)
NUMERIC_SERIALS = {"scheme": "random", "alphabet": "123456789", "length": 11, "planned_volume": 1_000_000}


RFID_EXAMPLE = example_config("rfid-line")
NO_RFID_FAULTS = {"rfid_void_rate": 0.0, "rfid_wrong_epc_rate": 0.0, "rfid_no_answer_rate": 0.0}


def rfid_raw(*, carrier: str = "both", rfid: dict[str, Any] | None = None, serials: dict[str, Any] | None = None,
             reader: bool = True, printer_rfid: dict[str, Any] | None = None) -> dict[str, Any]:
    """The shipped RFID example line (config/rfid-line.yaml: an RFID ZPL label printer, a reader, a Modbus PLC),
    its product's carrier / rfid / serials and the printer's rfid block changed."""
    raw: dict[str, Any] = to_plain(load_yaml(RFID_EXAMPLE))
    raw["devices"]["label1"]["rfid"].update(printer_rfid or {})
    product = raw["products"][0]
    product["carrier"] = carrier
    if carrier == "datamatrix":
        del product["rfid"]
        del raw["stations"][0]["rules"]["rfid_void_limit"]
    if rfid is not None:
        product["rfid"] = rfid
    if serials is not None:
        product["serials"] = serials
    st = raw["stations"][0]
    if not reader:
        del st["reader"]
        st["rules"] = {k: v for k, v in st["rules"].items() if k not in ("no_read_limit", "read_timeout_s")}
    return raw


def write_base(tmp_path: Path, raw: dict[str, Any], name: str = "rfid-line.yaml") -> Path:
    path = tmp_path / name
    with open(path, "w", encoding="utf-8") as fh:
        YAML(typ="safe").dump(raw, fh)
    return path


def refused(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigFileError) as exc:
        parse_config(raw)
    return str(exc.value)


def serial_epc(gtin: str, serial: str, cp_len: int) -> str:
    """The EPC hex a tag must carry for this serial (scheme auto, filter 1), from linectl.epc."""
    scheme = "sgtin-96" if serial.isdigit() and serial[0] != "0" and int(serial) <= 274877906943 else "sgtin-198"
    return make_epc(scheme, gtin=gtin, serial=serial, company_prefix_length=cp_len, filter_value=1).epc_hex


def check_units_against_truth(units: list[dict[str, Any]], events: list[Any], states: dict[str, str], gtin: str, cp_len: int) -> dict[str, list[int]]:
    """Per unit: a tag that is not its serial's EPC (VOID, wrong EPC, unverified) is rejected and its serial
    decommissioned with the RFID reason, never commissioned; a passed unit's tag carries its commissioned serial."""
    commissioned = {e.seq: e for e in events if isinstance(e, UnitCommissioned)}
    decom = {e.seq: e for e in events if isinstance(e, UnitDecommissioned) and e.seq is not None}
    seen: dict[str, list[int]] = {}
    for u in units:
        if u["challenge"] or u["rfid_epc_sent"] is None:
            continue  # (a challenge pack, or a pack the printer had no label for)
        fault = u["rfid_fault"]
        seen.setdefault(fault or "clean", []).append(u["seq"])
        ev = decom.get(u["seq"])
        if u["rfid_void"] or (fault == "wrong_epc" and u["rfid_epc"] != u["rfid_epc_sent"]):
            assert u["outcome"] == "rejected", f"MISSED REJECT: unit {u['seq']} with a bad tag passed: {u}"
            assert ev is not None, f"unit {u['seq']} ({fault}) has no decommissioned serial"
            want = "rfid_void" if u["rfid_void"] else "rfid_mismatch"
            assert ev.reason.value == want, (u, ev.reason.value, ev.detail)
            assert states[ev.serial] == "decommissioned"
            assert u["seq"] not in commissioned or states[commissioned[u["seq"]].serial] != "commissioned"
            if want == "rfid_mismatch":
                # the EPC the tag answers with, as read back by the printer (as many words as it wrote: a shorter EPC
                # comes with zero words after it when it does not decode)
                read = ev.read_epc or ""
                assert read[: len(u["rfid_epc"])] == u["rfid_epc"] and not read[len(u["rfid_epc"]) :].strip("0"), (read, u)
        elif fault == "no_answer":
            # the tag is right, but nobody verified it: never commissioned
            assert u["outcome"] == "rejected", u
            assert ev is not None and ev.reason.value in ("rfid_no_answer", "plc_failsafe"), (u, ev)
        elif u["outcome"] == "passed":
            c = commissioned.get(u["seq"])
            assert c is not None and states[c.serial] == "commissioned", u
            assert u["rfid_epc"] == serial_epc(gtin, c.serial, cp_len), (u, c.serial)
            assert decode_epc(u["rfid_epc"]).serial == c.serial
    return seen


# --------------------------------------------------------------------------- end to end


async def test_carrier_both_rejects_every_bad_tag_with_its_reason(tmp_path):
    """Carrier both, 300 upm, seeded VOIDs, wrong EPCs and lost verifications (and DataMatrix defects): compared with
    the simulator's truth, every bad tag rejected and decommissioned with its reason, 0 missed rejects, the rest
    commissioned; the batch balances and the EPCIS URI of each commissioned unit is linectl.epc's pure identity."""
    planned = 150
    base = write_base(tmp_path, rfid_raw(carrier="both"))
    sim_cfg = {"variation_rate": 0.0, "rfid_void_rate": 0.04, "rfid_wrong_epc_rate": 0.04, "rfid_no_answer_rate": 0.03}
    rules = {"consecutive_reject_limit": 50, "no_read_limit": 50}
    async with simulated_line(tmp_path, rate=300, defect_rate=0.03, seed=5, rules=rules, simulation=sim_cfg, base=base) as sl:
        lot = await sl.create_batch(planned, challenge=True)
        await sl.start_batch()
        assert sl.line.challenge_passed is True  # the DataMatrix challenge still runs with carrier both
        await asyncio.wait_for(sl.line.completed.wait(), 150)
        report = await close_batch(sl)
        await settle(sl)
        truth = await sim(sl, cmd="truth")
        units = await gate_units(sl)
        events = lot_events(sl.daemon.store, lot)
        states = serial_states(sl.db, lot)
        tags = dict(station(sl).counters.tags)
        mapper = EpcisMapper.from_config(sl.cfg)
        product = sl.cfg.products[0]

    assert truth["missed_rejects"] == 0, truth["missed"]
    check_report(report, planned=planned)
    unit_ledger([u for u in units if u["rfid_fault"] != "no_answer"], events, states).assert_ok()
    seen = check_units_against_truth(units, events, states, product.gtin, product.company_prefix_length)
    for fault in ("void", "wrong_epc", "no_answer"):
        assert len(seen.get(fault, [])) >= 2, f"seed gave too few {fault} labels to prove anything: {seen}"
    assert tags.get("void", 0) >= 2 and tags.get("mismatch", 0) >= 2 and tags.get("ok", 0) >= planned, tags
    reasons = report["rejects_by_reason"]
    assert reasons.get("rfid_void", 0) >= 2 and reasons.get("rfid_mismatch", 0) >= 2 and reasons.get("rfid_no_answer", 0) >= 1, reasons
    # EPCIS: the same EPC URI linectl.epc gives the tag's identity (urn:epc:id:sgtin:...)
    for e in events:
        if isinstance(e, UnitCommissioned):
            doc = mapper.map(e)[0]
            assert doc["epcList"] == [product.epc(e.gtin, e.serial).pure_uri], (doc["epcList"], e.serial)


async def test_carrier_rfid_without_reader_decides_by_the_tag(tmp_path):
    """Carrier rfid, no reader on the station: the printer's read-back decides each unit (SGTIN-96 numeric serials);
    bad tags rejected with their reason, good ones commissioned, 0 missed rejects."""
    planned = 120
    raw = rfid_raw(carrier="rfid", reader=False, rfid={"scheme": "sgtin-96", "filter_value": 1}, serials=NUMERIC_SERIALS)
    raw["products"][0]["market"] = "US"
    base = write_base(tmp_path, raw)
    sim_cfg = {"variation_rate": 0.0, "rfid_void_rate": 0.04, "rfid_wrong_epc_rate": 0.04, "rfid_no_answer_rate": 0.03}
    async with simulated_line(tmp_path, rate=300, defect_rate=0.0, seed=9, rules={"consecutive_reject_limit": 50}, simulation=sim_cfg, base=base) as sl:
        assert f"{station(sl).name}.reads" not in station(sl).tasks()
        lot = await sl.create_batch(planned, challenge=False)
        await sl.start_batch()
        await asyncio.wait_for(sl.line.completed.wait(), 120)
        report = await close_batch(sl)
        await settle(sl)
        truth = await sim(sl, cmd="truth")
        units = await gate_units(sl)
        events = lot_events(sl.daemon.store, lot)
        states = serial_states(sl.db, lot)
        product = sl.cfg.products[0]

    assert truth["missed_rejects"] == 0, truth["missed"]
    check_report(report, planned=planned)
    seen = check_units_against_truth(units, events, states, product.gtin, product.company_prefix_length)
    assert len(seen.get("void", [])) >= 2 and len(seen.get("wrong_epc", [])) >= 2, seen
    passed = [u for u in units if u["outcome"] == "passed"]
    assert len(passed) == planned
    for u in passed:
        assert decode_epc(u["rfid_epc"]).scheme == "sgtin-96"


async def test_void_run_stops_the_line_by_rfid_void_limit(tmp_path):
    """Three VOID labels in a row (rules.rfid_void_limit 3) stop the line with rfid_void_run; the VOID units are
    rejected and decommissioned rfid_void, none commissioned; the rest of the batch record balances."""
    base = write_base(tmp_path, rfid_raw(carrier="both"))
    rules = {"consecutive_reject_limit": 50, "no_read_limit": 50, "rfid_void_limit": 3}
    async with simulated_line(tmp_path, rate=300, defect_rate=0.0, seed=3, rules=rules, simulation={"variation_rate": 0.0, **NO_RFID_FAULTS}, base=base) as sl:
        lot = await sl.create_batch(200, challenge=False)
        await sl.start_batch()
        await wait_for(lambda: sl.line.batch.good_total() >= 10, 30, "10 good units")
        await sim(sl, cmd="inject", device="label1", fault="void_run", count=3)
        await wait_stopped(sl, 30)
        alarms = alarm_codes(sl)
        first_out = sl.line.first_out
        await settle(sl)
        report = await close_batch(sl)
        units = await gate_units(sl)
        events = lot_events(sl.daemon.store, lot)
        states = serial_states(sl.db, lot)
        product = sl.cfg.products[0]

    assert "rfid_void_run" in alarms, alarms
    assert first_out is not None and first_out.code == "rfid_void_run", first_out
    voids = [u for u in units if u["rfid_void"]]
    assert len(voids) == 3, voids
    assert [u["seq"] for u in voids] == list(range(voids[0]["seq"], voids[0]["seq"] + 3))
    check_units_against_truth(units, events, states, product.gtin, product.company_prefix_length)
    check_report(report)
    assert report["rejects_by_reason"].get("rfid_void") == 3, report["rejects_by_reason"]


# --------------------------------------------------------------------------- config refusals


def test_config_accepts_the_rfid_line_and_defaults():
    cfg = parse_config(rfid_raw(carrier="both"))
    p = cfg.products[0]
    assert p.carrier == "both" and p.rfid.scheme == "auto" and p.rfid.filter_value == 1
    assert p.epc(p.gtin, "ABC123").scheme == "sgtin-198"
    assert parse_config(to_plain(load_yaml(DEFAULT_CONFIG))).products[0].carrier == "datamatrix"
    cfg = parse_config(rfid_raw(carrier="rfid", reader=False))
    assert cfg.stations[0].reader is None


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"rfid": {"scheme": "sgtin-96"}}, "may hold non-digits"),  # the demo alphabet has letters
        ({"rfid": {"scheme": "sgtin-96"}, "serials": {**NUMERIC_SERIALS, "alphabet": "0123456789"}}, "leading zero"),
        ({"rfid": {"scheme": "sgtin-96"}, "serials": {**NUMERIC_SERIALS, "length": 12}}, "274877906943"),
        ({"rfid": {"scheme": "sgtin-96"}, "serials": {"scheme": "pool"}}, "pool serials"),
        ({"rfid": {"scheme": "sgtin-96"}, "serials": {"scheme": "sequential", "width": 8}, "market": "US"}, "leading zero"),
        ({"rfid": {"filter_value": 8}}, "filter_value"),
        ({"rfid": {"scheme": "sscc-96"}}, "scheme"),
        ({"carrier": "datamatrix", "rfid": {"scheme": "auto"}}, "applies to carrier rfid or both"),
        ({"company_prefix_length": 5}, "6 to 12 digits"),
    ],
)
def test_product_rfid_refusals(change, words):
    raw = rfid_raw(carrier="both")
    raw["products"][0].update(change)
    assert words in refused(raw)


def test_station_refusals():
    # carrier rfid on a printer that cannot encode tags
    raw = to_plain(load_yaml(DEFAULT_CONFIG))
    raw["products"][0]["carrier"] = "rfid"
    assert "not a ZPL printer with rfid.enabled" in refused(raw)
    raw = rfid_raw(carrier="both", printer_rfid={"enabled": False})
    assert "not a ZPL printer with rfid.enabled" in refused(raw)
    # the DataMatrix must be read: no reader
    assert "has no reader" in refused(rfid_raw(carrier="both", reader=False))
    # a DataMatrix-only product on a printer that refuses jobs without an EPC
    assert "require_epc" in refused(rfid_raw(carrier="datamatrix"))
    assert parse_config(rfid_raw(carrier="datamatrix", printer_rfid={"require_epc": False}))
    # one label per job and unit, VOID and go on
    assert "labels_per_format" in refused(rfid_raw(printer_rfid={"labels_per_format": 2}))
    assert "error_handling E" in refused(rfid_raw(printer_rfid={"error_handling": "E"}))
    # labels are numbered from the PLC's trigger count (a ZPL printer counts no products)
    raw = rfid_raw()
    del raw["devices"]["plc1"]["tags"]["trigger_count"]
    assert "trigger_count" in refused(raw)
    # rules that cannot apply
    raw = rfid_raw(carrier="rfid", reader=False)
    raw["stations"][0]["rules"]["no_read_limit"] = 3
    assert "no reader" in refused(raw)
    raw = to_plain(load_yaml(DEFAULT_CONFIG))
    raw["stations"][0]["rules"]["rfid_void_limit"] = 3
    assert "no product of this line has an RFID carrier" in refused(raw)


def test_epc_uri_equals_the_epcis_uri():
    """The pure identity URI linectl.epc gives a tag is the EPC URI the EPCIS mapper puts in commissioning events."""
    cfg = parse_config(rfid_raw(carrier="both"))
    mapper = EpcisMapper.from_config(cfg)
    p = cfg.products[0]
    for serial in ("1", "274877906943", "ABC123", "A/B%C&D<E>F?G\"", "0123", "Z" * 20):
        assert p.epc(p.gtin, serial).pure_uri == mapper.sgtin(p.gtin, serial), serial
    assert decode_epc(p.epc(p.gtin, "123").epc_hex).pure_uri == mapper.sgtin(p.gtin, "123")

