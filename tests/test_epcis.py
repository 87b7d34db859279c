"""EPCIS 2.0 mapping: every domain event kind maps as the GUIDE table says and validates against the
official JSON schema (offline); `linectl export epcis` writes a valid, filtered document."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from mqtt_fixtures import GTIN, GTIN2, REPO, line_yaml, load_line

from linectl import epcis, gs1
from linectl import events as ev

SSCC_CASE = gs1.make_sscc(0, "4012345", 1)
SSCC_PALLET = gs1.make_sscc(1, "4012345", 2)
T0 = datetime(2026, 3, 1, 8, 30, 0, 123000, tzinfo=UTC)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory):
    return load_line(line_yaml(tmp_path_factory.mktemp("cfg") / "line.yaml"))


@pytest.fixture(scope="module")
def mapper(cfg):
    return epcis.EpcisMapper.from_config(cfg)


@pytest.fixture(scope="module")
def validator():
    return epcis.default_validator()


def one_of_each() -> list[ev.Event]:
    return [
        ev.UnitCommissioned(gtin=GTIN, serial="A1B2C3", lot="LOT42", expiry="271200", event_time=T0),
        ev.UnitDecommissioned(gtin=GTIN, serial="A1B2C4", reason=ev.RejectReason.NO_READ, event_time=T0, lot="LOT42"),
        ev.UnitDecommissioned(gtin=GTIN, serial="A1B2C3", reason=ev.RejectReason.DAMAGED, destroyed=True, event_time=T0, lot="LOT42"),
        ev.UnitInspected(gtin=GTIN, serial="A1B2C3", biz_step="sampling", event_time=T0),
        ev.UnitInspected(gtin=GTIN, serial="A1B2C3", event_time=T0),
        ev.ContainerCommissioned(sscc=SSCC_CASE, level="case", gtin=GTIN, event_time=T0),
        ev.ContainerDecommissioned(sscc=SSCC_CASE, reason="relabel", commissioned=True, event_time=T0),
        ev.Packed(parent=SSCC_CASE, children=[ev.ChildRef(gtin=GTIN, serial="A1B2C3"), ev.ChildRef(gtin=GTIN, serial="A1B2C5")], event_time=T0),
        ev.Packed(parent=SSCC_PALLET, children=[ev.ChildRef(sscc=SSCC_CASE)], event_time=T0),
        ev.Unpacked(parent=SSCC_CASE, children=[ev.ChildRef(gtin=GTIN, serial="A1B2C5")], event_time=T0),
        ev.Unpacked(parent=SSCC_PALLET, children=[], event_time=T0),
    ]


def test_every_kind_maps_per_guide_table_and_validates(mapper, validator):
    mapped = {}
    for e in one_of_each():
        out = mapper.map(e)
        assert len(out) == 1, e
        mapped.setdefault(e.kind, []).append(out[0])
        assert out[0]["eventID"] == e.event_id
        assert out[0]["eventTime"] == "2026-03-01T08:30:00.123Z"
        assert out[0]["eventTimeZoneOffset"] == "+01:00"
        assert out[0]["readPoint"] == {"id": "urn:epc:id:sgln:4012345.00000.0"}
        assert out[0]["bizLocation"] == {"id": "urn:epc:id:sgln:4012345.00000.0"}
    doc = epcis.build_document([x for v in mapped.values() for x in v])
    assert validator.problems(doc) == []

    c = mapped["unit_commissioned"][0]
    assert (c["type"], c["action"], c["bizStep"], c["disposition"]) == ("ObjectEvent", "ADD", "commissioning", "active")
    assert c["epcList"] == ["urn:epc:id:sgtin:4012345.000001.A1B2C3"]
    assert c["ilmd"] == {"cbvmda:lotNumber": "LOT42", "cbvmda:itemExpirationDate": "2027-12-31"}

    rej, destroyed = mapped["unit_decommissioned"]
    assert (rej["action"], rej["bizStep"], rej["disposition"]) == ("DELETE", "decommissioning", "inactive")
    assert (destroyed["action"], destroyed["bizStep"], destroyed["disposition"]) == ("DELETE", "destroying", "destroyed")

    s, i = mapped["unit_inspected"]
    assert (s["action"], s["bizStep"], i["bizStep"]) == ("OBSERVE", "sampling", "inspecting")
    assert "disposition" not in s

    cc = mapped["container_commissioned"][0]
    assert cc["epcList"] == [f"urn:epc:id:sscc:4012345.0{SSCC_CASE[8:17]}"]
    assert (cc["action"], cc["bizStep"], cc["disposition"]) == ("ADD", "commissioning", "active")
    cd = mapped["container_decommissioned"][0]
    assert (cd["action"], cd["bizStep"], cd["disposition"]) == ("DELETE", "decommissioning", "inactive")

    p_case, p_pallet = mapped["packed"]
    assert (p_case["type"], p_case["action"], p_case["bizStep"], p_case["disposition"]) == ("AggregationEvent", "ADD", "packing", "in_progress")
    assert p_case["parentID"] == cc["epcList"][0]
    assert p_case["childEPCs"] == ["urn:epc:id:sgtin:4012345.000001.A1B2C3", "urn:epc:id:sgtin:4012345.000001.A1B2C5"]
    assert p_pallet["childEPCs"] == cc["epcList"]
    u, dissolve = mapped["unpacked"]
    assert (u["action"], u["bizStep"]) == ("DELETE", "unpacking")
    assert "childEPCs" not in dissolve  # DELETE without children = the whole content


def test_non_epcis_events_map_to_nothing(mapper):
    for e in [
        ev.BatchStateChanged(gtin=GTIN, state=ev.BatchState.RUNNING, lot="L"),
        ev.ChallengeResult(challenge="no_code", rejected=True),
        ev.AlarmRaised(code="x", severity=ev.Severity.WARNING, message="m"),
        ev.AlarmAcknowledged(alarm_id="a", actor="op"),
        ev.SerialsReturned(gtin=GTIN, serials=["R1"]),
        ev.ContainerDecommissioned(sscc=SSCC_CASE, reason="label bad", commissioned=False),
        # never printed, never commissioned: no object upstream knows, so no EPCIS event (it travels as a record)
        ev.SerialsVoided(gtin=GTIN, serials=["V1", "V2", "V3"], event_time=T0, lot="LOT42"),
    ]:
        assert mapper.map(e) == [], e


def test_digital_link_format_validates(cfg, validator):
    m = epcis.EpcisMapper.from_config(cfg.model_copy(update={"mqtt": cfg.mqtt.model_copy(update={"epc_format": "digital_link"})}))
    out = [x for e in one_of_each() for x in m.map(e)]
    assert out[0]["epcList"] == [f"https://id.gs1.org/01/{GTIN}/21/A1B2C3"]
    pk = next(x for x in out if x["type"] == "AggregationEvent")
    assert pk["parentID"] == f"https://id.gs1.org/00/{SSCC_CASE}"
    assert validator.problems(epcis.build_document(out)) == []


def test_fast_epc_path_equals_gs1_functions(mapper):
    for serial in ["A1B2C3", "0000001", "x" * 20, "a/b%c", "Z-9_1", "!\"%&'()*+,-./:;<=>?"]:
        assert mapper.sgtin(GTIN, serial) == gs1.sgtin_urn(GTIN, serial, 7)
    for serial in ["A1", "a/b%c", "1?2"]:
        dl = epcis.EpcisMapper(read_point="urn:x:y", biz_location="urn:x:y", epc_format="digital_link")
        assert dl.sgtin(GTIN, serial) == gs1.digital_link(GTIN, serial)


def test_unknown_prefix_length_falls_back_to_digital_link():
    m = epcis.EpcisMapper(read_point="urn:epc:id:sgln:4012345.00000.0", biz_location="urn:epc:id:sgln:4012345.00000.0")
    assert m.sgtin(GTIN2, "S1") == f"https://id.gs1.org/01/{GTIN2}/21/S1"
    assert m.sscc(SSCC_CASE) == f"https://id.gs1.org/00/{SSCC_CASE}"


def test_bad_identifiers_raise_mapping_error(mapper):
    with pytest.raises(epcis.EpcisMappingError):
        mapper.map(ev.UnitCommissioned(gtin="04012345000017", serial="S"))  # bad check digit
    with pytest.raises(epcis.EpcisMappingError):
        mapper.map(ev.ContainerCommissioned(sscc="12345", level="case"))
    with pytest.raises(epcis.EpcisMappingError):
        mapper.map(ev.UnitCommissioned(gtin=GTIN, serial="S", expiry="271301"))


@pytest.mark.parametrize(
    "yymmdd, ref, expected",
    [
        ("271200", date(2026, 1, 1), "2027-12-31"),
        ("280200", date(2026, 1, 1), "2028-02-29"),  # leap year
        ("270200", date(2026, 1, 1), "2027-02-28"),
        ("270415", date(2026, 1, 1), "2027-04-15"),
        ("990101", date(2026, 1, 1), "1999-01-01"),  # 73 years ahead -> previous century (GS1 7.12)
        ("750101", date(2026, 1, 1), "2075-01-01"),  # 49 years ahead -> this century
        ("050101", date(2096, 1, 1), "2105-01-01"),  # 91 years back -> next century
    ],
)
def test_expiry_dates(yymmdd, ref, expected):
    assert epcis.expiry_to_date(yymmdd, ref) == expected


def test_big_pack_is_split_with_stable_ids(mapper, validator):
    e = ev.Packed(parent=SSCC_PALLET, children=[ev.ChildRef(gtin=GTIN, serial=f"S{i}") for i in range(2500)], event_time=T0)
    out = mapper.map(e)
    assert [len(x["childEPCs"]) for x in out] == [1000, 1000, 500]
    assert out[0]["eventID"] == e.event_id
    assert len({x["eventID"] for x in out}) == 3
    assert [x["eventID"] for x in mapper.map(e)] == [x["eventID"] for x in out]  # same ids every time
    assert validator.problems(epcis.build_document(out)) == []


def test_schema_catches_what_it_should(mapper, validator):
    good = mapper.map(one_of_each()[0])[0]
    cases = {
        "bizStep": dict(good, bizStep="urn:epcglobal:cbv:bizstep:commissioning"),
        "disposition": dict(good, disposition="sold_out"),
        "eventTime": dict(good, eventTime="2026-03-01 08:30"),
        "eventTimeZoneOffset": dict(good, eventTimeZoneOffset="+1:00"),
        "epcList": dict(good, epcList=["not a uri"]),
        "action": dict(good, action="UPDATE"),
    }
    for field, bad in cases.items():
        problems = validator.problems(epcis.build_document([bad]))
        assert any(field in p for p in problems), (field, problems)
    assert validator.problems({"type": "EPCISDocument"})  # missing @context etc.


def test_document_bytes_equals_build_document(mapper, validator):
    events = [x for e in one_of_each() for x in mapper.map(e)]
    raw = epcis.document_bytes(map(epcis.encode_event, events), creation_date=T0)
    doc = json.loads(raw)
    assert doc == epcis.build_document(events, creation_date=T0)
    assert doc["@context"] == [epcis.EPCIS_CONTEXT_URL]
    assert (doc["type"], doc["schemaVersion"]) == ("EPCISDocument", "2.0")
    epcis.validate_document(doc)


def test_validator_is_offline(validator):
    from referencing.exceptions import Unresolvable

    with pytest.raises(Unresolvable):
        validator.registry.resolver().lookup("https://example.com/not-registered.json")
    # the local contexts are registered under their published URLs
    assert validator.registry.contents(epcis.EPCIS_CONTEXT_URL)["@context"]["ObjectEvent"] == "epcis:ObjectEvent"


# --------------------------------------------------------------------------- export command


async def _fill_store(db: Path, *, render: bool = True) -> list[ev.Event]:
    """A store as the daemon writes it (render=True: EPCIS rendered when stored) or as schema 2 did (no rendering)."""
    from linectl.store import Store

    store = await Store.open(db)
    try:
        cfg = load_line(db.parent / "line.yaml")
        if render:
            store.set_epcis_mapper(epcis.EpcisMapper.from_config(cfg))
        await store.upsert_products(cfg.products)
        old = T0 - timedelta(days=2)
        evs: list[ev.Event] = [
            ev.BatchStateChanged(gtin=GTIN, state=ev.BatchState.RUNNING, lot="LOTA", event_time=old),
            *[ev.UnitCommissioned(gtin=GTIN, serial=f"A{i}", lot="LOTA", expiry="271200", event_time=old) for i in range(5)],
            ev.ContainerCommissioned(sscc=SSCC_CASE, level="case", gtin=GTIN, lot="LOTA", event_time=old),
            ev.Packed(parent=SSCC_CASE, children=[ev.ChildRef(gtin=GTIN, serial=f"A{i}") for i in range(5)], lot="LOTA", event_time=old),
            *[ev.UnitCommissioned(gtin=GTIN, serial=f"B{i}", lot="LOTB", expiry="280100", event_time=T0) for i in range(4)],
            ev.UnitDecommissioned(gtin=GTIN, serial="B9", lot="LOTB", reason=ev.RejectReason.NO_READ, event_time=T0),
            ev.AlarmRaised(code="x", severity=ev.Severity.WARNING, message="m", event_time=T0),
        ]
        await _append_valid(store, evs)
        return evs
    finally:
        await store.close()


async def _append_valid(store, evs: list[ev.Event]) -> None:
    """Put the events in the store the way the engine would (serials provisioned/allocated/sent first)."""
    serials: dict[tuple[str, str], list[str]] = {}
    for e in evs:
        if isinstance(e, (ev.UnitCommissioned, ev.UnitDecommissioned)):
            serials.setdefault((e.gtin, e.lot or ""), []).append(e.serial)
    for (gtin, lot), ss in serials.items():
        if store.batch(lot) is None:
            await store.create_batch(lot, gtin, "271200", 1000, actor="test")
        await store.provision(gtin, ss, source="test")
        got = await store.allocate(gtin, lot, len(ss), _pool_scheme())
        assert sorted(got) == sorted(ss)
        await store.mark_sent(gtin, lot, ss)
    await store.append(*evs)


def _pool_scheme():
    from linectl.config import PoolSerials

    return PoolSerials(scheme="pool", low_water=0)


def _export_subprocess(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "linectl", "export", "epcis", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def _export(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The CLI in-process (argument parsing included): a subprocess per call costs a second of imports."""
    from linectl.cli import build_parser

    capsys.readouterr()
    ns = build_parser().parse_args(["export", "epcis", *args])
    rc = ns.func(ns)
    out, err = capsys.readouterr()
    return rc, out, err


def test_export_writes_valid_filtered_documents(tmp_path, validator, capsys):
    cfg_path = line_yaml(tmp_path / "line.yaml")
    db = tmp_path / "line.db"
    evs = asyncio.run(_fill_store(db))

    out_all = tmp_path / "all.json"
    r = _export_subprocess("--db", str(db), "-c", str(cfg_path), "--out", str(out_all))  # the real command line once
    assert r.returncode == 0, r.stderr
    doc = json.loads(out_all.read_text())
    assert validator.problems(doc) == []
    ids = [e["eventID"] for e in doc["epcisBody"]["eventList"]]
    # in store order, non-EPCIS rows left out, and B9 (rejected, never commissioned) is no EPCIS event (policy omit)
    assert ids == [e.event_id for e in evs if e.epcis and getattr(e, "serial", None) != "B9"]
    assert len(ids) == 11

    out_b = tmp_path / "b.json"
    assert _export(capsys, "--db", str(db), "-c", str(cfg_path), "--batch", "LOTB", "--out", str(out_b))[0] == 0
    doc_b = json.loads(out_b.read_text())
    assert validator.problems(doc_b) == []
    assert [e["eventID"] for e in doc_b["epcisBody"]["eventList"]] == [
        e.event_id for e in evs if e.epcis and e.lot == "LOTB" and getattr(e, "serial", None) != "B9"
    ]

    since = (T0 - timedelta(hours=1)).isoformat()
    rc, out, err = _export(capsys, "--db", str(db), "-c", str(cfg_path), "--since", since, "--validate", "all")  # to stdout
    assert rc == 0, err
    doc_s = json.loads(out)
    assert [e["eventID"] for e in doc_s["epcisBody"]["eventList"]] == [
        e.event_id for e in evs if e.epcis and e.event_time >= T0 - timedelta(hours=1) and getattr(e, "serial", None) != "B9"
    ]

    rc, _out, _err = _export(capsys, "--db", str(db), "-c", str(cfg_path), "--batch", "NOPE", "--out", str(tmp_path / "none.json"))
    assert rc == 0
    assert validator.problems(json.loads((tmp_path / "none.json").read_text())) == []


def test_export_refuses_bad_input(tmp_path, capsys):
    cfg_path = line_yaml(tmp_path / "line.yaml")
    rc, _o, err = _export(capsys, "--db", str(tmp_path / "missing.db"), "-c", str(cfg_path))
    assert rc == 3 and "missing.db" in err and "linectl init" in err  # a missing store is refused like any store error
    assert not (tmp_path / "missing.db").exists()
    rc, _o, err = _export(capsys, "--db", str(tmp_path / "missing.db"))  # no config needed any more
    assert rc == 3 and "missing.db" in err and "linectl init" in err
    assert not (tmp_path / "missing.db").exists()
    rc, _o, err = _export(capsys, "--db", str(tmp_path / "missing.db"), "-c", str(cfg_path), "--since", "last tuesday")
    assert rc == 2 and "--since" in err
    (tmp_path / "garbage.db").write_bytes(b"not a database" * 100)
    rc, _o, err = _export(capsys, "--db", str(tmp_path / "garbage.db"), "-c", str(cfg_path))
    assert rc == 3 and "garbage.db" in err
