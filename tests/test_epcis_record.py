"""EPCIS as a record that never changes: each event is rendered once, when it is stored, with the context in
force then (station readPoint, time zone offset at that instant, EPC form), and every later rendering (the
forwarder's, `export epcis --db`) is those stored bytes. No EPCIS event decommissions a serial that was never
commissioned. Stores of schema 2 (no stored rendering) migrate, and their export refuses or says it reconstructs."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from mqtt_fixtures import GTIN, line_yaml

from linectl import epcis
from linectl import events as ev
from linectl.config import parse_config
from linectl.store import SCHEMA_VERSION
from linectl.yamlsource import ConfigFileError

WINTER = datetime(2026, 1, 15, 10, 0, 0, tzinfo=UTC)
SUMMER = datetime(2026, 7, 15, 10, 0, 0, tzinfo=UTC)
# the night summer time starts in Berlin: 01:00 UTC = 03:00 CEST
JUST_BEFORE = datetime(2026, 3, 29, 0, 59, 59, 999000, tzinfo=UTC)
JUST_AFTER = datetime(2026, 3, 29, 1, 0, 0, tzinfo=UTC)


def raw_config(tmp_path: Path, **line: Any) -> dict[str, Any]:
    doc = json.loads(line_yaml(tmp_path / "line.yaml").read_text())
    doc["line"].pop("timezone_offset")
    doc["line"].update(line)
    doc["devices"] = {"reader1": {"driver": "reader", "host": "127.0.0.1", "port": 9101}}
    doc["stations"] = [
        {"type": "verify", "name": "pv1", "reader": "reader1"},
        {"type": "verify", "name": "checker", "reader": "reader1", "gln_extension": "17"},
    ]
    return doc


def cfg_of(tmp_path: Path, **line: Any) -> Any:
    return parse_config(raw_config(tmp_path, **line))


# --------------------------------------------------------------------------- context: station readPoint, time zone


def test_berlin_offset_follows_summer_time_and_each_station_has_its_readpoint(tmp_path):
    cfg = cfg_of(tmp_path, timezone="Europe/Berlin", gln_extension="L1")
    m = epcis.EpcisMapper.from_config(cfg)
    evs = [
        ev.UnitCommissioned(gtin=GTIN, serial="W1", lot="L", expiry="271200", event_time=WINTER, station="pv1"),
        ev.UnitCommissioned(gtin=GTIN, serial="S1", lot="L", expiry="271200", event_time=SUMMER, station="pv1"),
        ev.UnitInspected(gtin=GTIN, serial="S1", event_time=JUST_BEFORE, station="checker"),
        ev.UnitInspected(gtin=GTIN, serial="S1", event_time=JUST_AFTER, station="checker"),
        ev.UnitDecommissioned(gtin=GTIN, serial="S1", reason=ev.RejectReason.DAMAGED, destroyed=True, event_time=SUMMER),
    ]
    out = [m.map(e)[0] for e in evs]
    assert [o["eventTimeZoneOffset"] for o in out] == ["+01:00", "+02:00", "+01:00", "+02:00", "+02:00"]
    assert [o["readPoint"]["id"] for o in out] == [
        "urn:epc:id:sgln:4012345.00000.pv1",  # default extension: the station name
        "urn:epc:id:sgln:4012345.00000.pv1",
        "urn:epc:id:sgln:4012345.00000.17",  # the station's gln_extension
        "urn:epc:id:sgln:4012345.00000.17",
        "urn:epc:id:sgln:4012345.00000.L1",  # no station (an operator in rework): the line's SGLN
    ]
    assert {o["bizLocation"]["id"] for o in out} == {"urn:epc:id:sgln:4012345.00000.L1"}
    assert epcis.default_validator().problems(epcis.build_document(out)) == []


def test_fixed_offset_and_the_older_timezone_offset_key(tmp_path):
    assert epcis.EpcisMapper.from_config(cfg_of(tmp_path, timezone="-05:00")).map(
        ev.UnitInspected(gtin=GTIN, serial="X", event_time=SUMMER))[0]["eventTimeZoneOffset"] == "-05:00"
    old = cfg_of(tmp_path, timezone_offset="+03:00")
    assert old.line.zone == "+03:00"
    assert epcis.EpcisMapper.from_config(old).map(ev.UnitInspected(gtin=GTIN, serial="X", event_time=WINTER))[0]["eventTimeZoneOffset"] == "+03:00"
    assert epcis.EpcisMapper.from_config(cfg_of(tmp_path)).offset_at(SUMMER) == "+00:00"  # neither: UTC


@pytest.mark.parametrize(
    "line, stations, needle",
    [
        ({"timezone": "Europe/Berlinn"}, None, "neither an IANA time zone"),
        ({"timezone": "+25:00"}, None, "neither an IANA time zone"),
        ({"timezone": "Europe/Berlin", "timezone_offset": "+01:00"}, None, "not both"),
        ({"timezone_offset": "CET"}, None, "timezone_offset"),
        ({}, [{"type": "verify", "name": "v" * 21, "reader": "reader1"}], "longer than 20"),
        ({}, [{"type": "verify", "name": "a", "reader": "reader1", "gln_extension": "x"},
              {"type": "verify", "name": "x", "reader": "reader1"}], "own EPCIS readPoint"),
        ({}, [{"type": "verify", "name": "a", "reader": "reader1", "gln_extension": "bad ext"}], "gln_extension"),
    ],
)
def test_bad_epcis_context_config_is_refused(tmp_path, line, stations, needle):
    doc = raw_config(tmp_path, **line)
    if stations is not None:
        doc["stations"] = stations
    with pytest.raises(ConfigFileError) as exc:
        parse_config(doc)
    assert needle in str(exc.value), str(exc.value)


def test_unknown_epcis_key_is_refused(tmp_path):
    doc = raw_config(tmp_path)
    doc["epcis"] = {"rejected_serial": "omit"}
    with pytest.raises(ConfigFileError):
        parse_config(doc)


# --------------------------------------------------------------------------- never a bare decommissioning


def test_rejected_serial_never_commissioned_follows_the_policy(tmp_path):
    cfg = cfg_of(tmp_path, timezone="Europe/Berlin")
    omit = epcis.EpcisMapper.from_config(cfg)
    pair = epcis.EpcisMapper.from_config(cfg.model_copy(update={"epcis": cfg.epcis.model_copy(update={"rejected_serials": "commission_then_decommission"})}))
    rejected = ev.UnitDecommissioned(gtin=GTIN, serial="R1", lot="L7", reason=ev.RejectReason.LOW_GRADE, event_time=SUMMER, station="pv1")
    not_printed = [
        ev.UnitDecommissioned(gtin=GTIN, serial="R2", lot="L7", reason=r, event_time=SUMMER, station="pv1")
        for r in (ev.RejectReason.LINE_STOPPED, ev.RejectReason.PRINT_FAILED)
    ]
    assert omit.map(rejected, commissioned=False) == []
    out = pair.map(rejected, commissioned=False)
    assert [(o["action"], o["bizStep"], o["disposition"]) for o in out] == [
        ("ADD", "commissioning", "active"), ("DELETE", "decommissioning", "inactive")]
    assert out[0]["epcList"] == out[1]["epcList"] == ["urn:epc:id:sgtin:4012345.000001.R1"]
    assert out[0]["ilmd"] == {"cbvmda:lotNumber": "L7"}
    assert out[1]["eventID"] == rejected.event_id and out[0]["eventID"] != rejected.event_id
    assert pair.map(rejected, commissioned=False)[0]["eventID"] == out[0]["eventID"]  # derived deterministically
    assert epcis.default_validator().problems(epcis.build_document(out)) == []
    for e in not_printed:  # sent to the printer, never on a pack: no EPCIS object at all
        assert omit.map(e, commissioned=False) == [] and pair.map(e, commissioned=False) == []
    # a commissioned serial is decommissioned as before, whatever the policy
    assert [o["bizStep"] for o in omit.map(rejected)] == ["decommissioning"]
    assert [o["bizStep"] for o in pair.map(rejected)] == ["decommissioning"]


# --------------------------------------------------------------------------- stored rendering


async def _prepare(store: Any, lot: str, serials: list[str]) -> None:
    from linectl.config import PoolSerials

    if store.batch(lot) is None:
        await store.create_batch(lot, GTIN, "271200", 1000, actor="test")
    await store.provision(GTIN, serials, source="test")
    got = await store.allocate(GTIN, lot, len(serials), PoolSerials(scheme="pool", low_water=0))
    assert sorted(got) == sorted(serials)
    await store.mark_sent(GTIN, lot, serials)


def line_events() -> list[ev.Event]:
    return [
        ev.UnitCommissioned(gtin=GTIN, serial="C1", lot="L1", expiry="271200", event_time=WINTER, station="pv1"),
        ev.UnitCommissioned(gtin=GTIN, serial="C2", lot="L1", expiry="271200", event_time=SUMMER, station="pv1"),
        ev.UnitDecommissioned(gtin=GTIN, serial="C2", lot="L1", reason=ev.RejectReason.DAMAGED, destroyed=True, event_time=SUMMER),
        ev.UnitDecommissioned(gtin=GTIN, serial="R1", lot="L1", reason=ev.RejectReason.NO_READ, event_time=SUMMER, station="pv1"),
        ev.UnitDecommissioned(gtin=GTIN, serial="R2", lot="L1", reason=ev.RejectReason.LINE_STOPPED, event_time=SUMMER, station="pv1"),
        ev.UnitInspected(gtin=GTIN, serial="C1", event_time=SUMMER, station="checker"),
    ]


async def _store_with(db: Path, mapper: Any, events: list[ev.Event]) -> list[Any]:
    from linectl.store import Store

    store = await Store.open(db)
    try:
        if mapper is not None:
            store.set_epcis_mapper(mapper)
        await _prepare(store, "L1", ["C1", "C2", "R1", "R2"])
        await store.append(*events)
        return store.outbox(0, 1000, only_unforwarded=False)
    finally:
        await store.close()


def export(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from linectl.cli import build_parser

    capsys.readouterr()
    ns = build_parser().parse_args(["export", "epcis", *args])
    rc = ns.func(ns)
    out, err = capsys.readouterr()
    return rc, out, err


def event_list_text(document: str) -> str:
    """The raw text of a document's eventList: the bytes of its events, exactly as written."""
    head, sep, rest = document.strip().partition('"eventList":[')
    assert sep and rest.endswith(epcis.DOCUMENT_TAIL), document[:200]
    return rest[: -len(epcis.DOCUMENT_TAIL)]


@pytest.mark.parametrize("policy", ["omit", "commission_then_decommission"])
def test_rendering_is_stored_with_the_event_and_export_needs_no_config(tmp_path, capsys, policy):
    doc = raw_config(tmp_path, timezone="Europe/Berlin")
    doc["epcis"] = {"rejected_serials": policy}
    cfg = parse_config(doc)
    mapper = epcis.EpcisMapper.from_config(cfg)
    db = tmp_path / "line.db"
    evs = line_events()
    rows = asyncio.run(_store_with(db, mapper, evs))
    stored = {r.event_id: r.epcis for r in rows}
    assert all(r.epcis is not None for r in rows if r.event.epcis)  # every EPCIS-kind row carries its rendering
    c1, c2, c2_destroyed, r1, r2, inspected = (stored[e.event_id] for e in evs)
    assert json.loads(c1)["eventTimeZoneOffset"] == "+01:00" and json.loads(c2)["eventTimeZoneOffset"] == "+02:00"
    assert json.loads(c2_destroyed)["bizStep"] == "destroying"  # C2 was commissioned: a plain DELETE
    assert r2 == ""  # sent, never printed: nothing, whatever the policy
    if policy == "omit":
        assert r1 == ""
    else:
        assert [json.loads(x)["bizStep"] for x in r1.split("\n")] == ["commissioning", "decommissioning"]
    assert json.loads(inspected)["readPoint"] == {"id": "urn:epc:id:sgln:4012345.00000.17"}

    rc, out, err = export(capsys, "--db", str(db), "--validate", "all")  # no -c
    assert rc == 0, err
    want = ",".join(x for r in rows if r.epcis for x in r.epcis.split("\n"))
    assert event_list_text(out) == want  # byte for byte the stored renderings, in store order
    assert "RECONSTRUCTED" not in err

    # a config changed since (other zone, other station extensions, Digital Link): the record does not move
    doc2 = raw_config(tmp_path, timezone="America/New_York", gln_extension="9")
    doc2["stations"][0]["gln_extension"] = "99"
    doc2["mqtt"]["epc_format"] = "digital_link"
    cfg2_path = tmp_path / "changed.yaml"
    cfg2_path.write_text(json.dumps(doc2))
    rc, out2, err = export(capsys, "--db", str(db), "-c", str(cfg2_path))
    assert rc == 0, err
    assert event_list_text(out2) == want

    # GS1's event hash: every event hashes, the same before and after the config change; a fresh rendering
    # from the changed config would not (so this comparison can fail)
    h1, h2 = event_hashes(json.loads(out)), event_hashes(json.loads(out2))
    assert h1 == h2 and len(h1) == out.count('"eventID"') and all(h.startswith("ni:///sha-256;") for h in h1.values())
    fresh = epcis.EpcisMapper.from_config(parse_config(doc2)).map(evs[0])
    assert event_hashes(epcis.build_document(fresh))[evs[0].event_id] != h1[evs[0].event_id]


def event_hashes(document: dict[str, Any]) -> dict[str, str]:
    """eventID -> CBV 2.0 event hash by GS1's reference implementation (epcis-event-hash-generator)."""
    from epcis_event_hash_generator.hash_generator import epcis_hashes_from_events
    from epcis_event_hash_generator.json_to_py import event_list_from_epcis_document_json

    ids = [e["eventID"] for e in document["epcisBody"]["eventList"]]
    hashes = epcis_hashes_from_events(event_list_from_epcis_document_json(json.loads(json.dumps(document))))
    assert len(hashes) == len(ids)  # the generator skips (logs) an event it cannot parse
    return dict(zip(ids, hashes))


# --------------------------------------------------------------------------- a store of schema 2


def make_v2_store(db: Path) -> list[Any]:
    """A genuine schema-2 file: what schema 2 wrote is the schema-3 file without outbox.epcis."""
    rows = asyncio.run(_store_with(db, None, line_events()))
    con = sqlite3.connect(db)
    try:
        con.execute("ALTER TABLE outbox DROP COLUMN epcis")
        con.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
        con.commit()
    finally:
        con.close()
    return rows


def test_v2_store_migrates_and_its_export_refuses_or_says_it_reconstructs(tmp_path, capsys):
    from linectl.store import Store

    cfg_path = tmp_path / "line.yaml"
    cfg_path.write_text(json.dumps(raw_config(tmp_path, timezone="Europe/Berlin")))
    db = tmp_path / "old.db"
    rows = make_v2_store(db)
    cols = [r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(outbox)")]
    assert "epcis" not in cols

    rc, _out, err = export(capsys, "--db", str(db))  # read-only open of an unmigrated file
    assert rc == 3 and "needs migrating" in err

    async def migrate() -> int:
        s = await Store.open(db)
        try:
            return s.opened_from_version
        finally:
            await s.close()

    assert asyncio.run(migrate()) == 2
    con = sqlite3.connect(db)
    assert "epcis" in [r[1] for r in con.execute("PRAGMA table_info(outbox)")]
    assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    assert con.execute("SELECT count(*) FROM outbox WHERE epcis IS NOT NULL").fetchone()[0] == 0  # nothing invented
    con.close()
    assert list(tmp_path.glob("old.db.v2*.bak"))

    rc, out, err = export(capsys, "--db", str(db))
    assert rc == 2 and out == ""
    assert "older linectl" in err and "-c CONFIG" in err and "6 EPCIS event(s)" in err

    rc, out, err = export(capsys, "--db", str(db), "-c", str(cfg_path), "--validate", "all")
    assert rc == 0, err
    assert "RECONSTRUCTED" in err and str(cfg_path) in err
    got = json.loads(out)["epcisBody"]["eventList"]
    ids = {r.event_id: r.event for r in rows}
    steps = [(ids[e["eventID"]].__dict__.get("serial"), e["bizStep"]) for e in got]
    # C2 was commissioned: decommissioned (destroying); R1 never was: no bare decommissioning (policy omit)
    assert steps == [("C1", "commissioning"), ("C2", "commissioning"), ("C2", "destroying"), ("C1", "inspecting")]
    assert [e["eventTimeZoneOffset"] for e in got] == ["+01:00", "+02:00", "+02:00", "+02:00"]


# --------------------------------------------------------------------------- published == exported, real broker


async def test_published_events_are_the_stored_bytes_and_export_reproduces_them(tmp_path, capsys):
    """A real forwarder publishes to the real Mosquitto; a subscriber keeps the raw payloads. `export epcis --db`
    (no config) then gives exactly the published events, byte for byte, and after the config changed too."""
    from mqtt_fixtures import SHARED_PORT, Collector, unique_root

    from linectl.forwarder import Forwarder
    from linectl.store import Store

    root = unique_root()
    doc = raw_config(tmp_path, timezone="Europe/Berlin")
    doc["mqtt"].update(topic_root=root, max_events_per_message=3)  # several documents
    doc["epcis"] = {"rejected_serials": "commission_then_decommission"}
    cfg = parse_config(doc)
    db = tmp_path / "line.db"
    store = await Store.open(db)
    try:
        store.set_epcis_mapper(epcis.EpcisMapper.from_config(cfg))
        await _prepare(store, "L1", ["C1", "C2", "R1", "R2"])
        await store.append(*line_events())
        col = await Collector(SHARED_PORT, root).start()
        fwd = Forwarder(cfg, store)
        task = asyncio.create_task(fwd.run())
        try:
            for _ in range(200):
                if store.backlog() == 0:
                    break
                await asyncio.sleep(0.05)
            assert store.backlog() == 0
            await col.wait_for(lambda: len(col.messages) >= 3)
        finally:
            await fwd.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.3)
        await col.stop()
    finally:
        await store.close()
    published = [p.decode() for _t, p, _pr, _ts in col.on("events")]
    assert len(published) >= 2
    published_text = ",".join(event_list_text(p) for p in published)
    events = [e for p in published for e in json.loads(p)["epcisBody"]["eventList"]]
    assert [(e["bizStep"], e["epcList"][0].rsplit(".", 1)[1]) for e in events] == [
        ("commissioning", "C1"), ("commissioning", "C2"), ("destroying", "C2"),
        ("commissioning", "R1"), ("decommissioning", "R1"),  # the pair: R1 was printed on a rejected pack
        ("inspecting", "C1"),
    ]  # R2 (never printed) is no EPCIS event
    records = [json.loads(p) for _t, p, _pr, _ts in col.on("records")]
    assert [(r["kind"], r["serial"], r["reason"]) for r in records if r["kind"] == "unit_decommissioned"] == [
        ("unit_decommissioned", "R2", "line_stopped")]

    rc, out, err = await asyncio.to_thread(export, capsys, "--db", str(db), "--validate", "all")
    assert rc == 0, err
    assert event_list_text(out) == published_text
    hp = {}
    for p in published:
        hp.update(event_hashes(json.loads(p)))
    assert event_hashes(json.loads(out)) == hp and len(hp) == len(events)

    doc["line"]["timezone"] = "+05:30"
    doc["stations"][0]["gln_extension"] = "NEW"
    changed = tmp_path / "changed.yaml"
    changed.write_text(json.dumps(doc))
    rc, out2, err = await asyncio.to_thread(export, capsys, "--db", str(db), "-c", str(changed))
    assert rc == 0, err
    assert event_list_text(out2) == published_text and event_hashes(json.loads(out2)) == hp


def test_fast_commissioning_rendering_is_byte_identical_to_the_generic_one(tmp_path):
    """Store.append renders UnitCommissioned without a dict (it is most of a line's events): same bytes, always."""
    import random

    from mqtt_fixtures import GTIN2

    rnd = random.Random(7)
    set82 = "!\"%&'()*+,-./0123456789:;<=>?ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
    cfg = cfg_of(tmp_path, timezone="Europe/Berlin")
    mappers = [
        epcis.EpcisMapper.from_config(cfg),
        epcis.EpcisMapper.from_config(cfg.model_copy(update={"mqtt": cfg.mqtt.model_copy(update={"epc_format": "digital_link"})})),
        epcis.EpcisMapper(read_point="urn:epc:id:sgln:4012345.00000.0", biz_location="urn:epc:id:sgln:4012345.00000.0", timezone="-03:30"),
    ]
    checked = failed = 0
    for i in range(600):
        serial = "".join(rnd.choice(set82) for _ in range(rnd.randint(1, 20))) if i % 3 else f"S{i}"
        e = ev.UnitCommissioned(
            gtin=rnd.choice([GTIN, GTIN2, "04012345000017"]),  # the last has a bad check digit
            serial=serial,
            lot=rnd.choice([None, "L1", 'L"2', "A/B%C"]),
            expiry=rnd.choice([None, "271200", "280229", "271301"]),  # 271301 is no date
            station=rnd.choice([None, "pv1", "checker", "elsewhere"]),
            event_time=datetime(2026, rnd.randint(1, 12), rnd.randint(1, 28), rnd.randint(0, 23), rnd.randint(0, 59),
                                rnd.randint(0, 59), rnd.randint(0, 999) * 1000, tzinfo=UTC),
        )
        for m in mappers:
            fast, generic = m.render_commissioned(e), m.render(e)
            assert fast == generic, (e, fast, generic)
            checked += 1
            failed += fast.startswith(epcis.RENDER_FAILED)
    assert checked == 1800 and 0 < failed < checked  # both the good and the refused paths were compared
