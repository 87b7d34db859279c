"""Done-when of the upstream issue: a subscriber receives, for a demo batch, schema-valid EPCIS documents covering
every commissioned serial and every decommissioned serial that had been commissioned, exactly as the store has them;
`linectl export epcis --db` alone (no config) gives byte for byte the events that were published, and GS1's event
hash generator hashes every event the same in both. Real simulators, real Mosquitto."""

from __future__ import annotations

import asyncio
import json
import uuid

import aiomqtt
import pytest

from linectl import control as C
from linectl import gs1
from linectl.demo import SimulatedLine
from linectl.epcis import DOCUMENT_TAIL, EpcisMapper, build_document, validate_document
from linectl.yamlsource import load_yaml, to_plain

pytestmark = pytest.mark.timeout(240)


async def test_subscriber_gets_every_serial_of_a_demo_batch_as_valid_epcis(tmp_path, capsys) -> None:
    root = f"test/{uuid.uuid4().hex[:10]}/pkg/demo"
    enterprise, site, area, name = root.split("/")
    overrides = {"line": {"enterprise": enterprise, "site": site, "area": area, "name": name}, "mqtt": {"protocol": "5"}}
    docs: list[dict] = []
    payloads: list[str] = []
    ready = asyncio.Event()

    async def subscriber() -> None:
        async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"sub-{uuid.uuid4().hex[:8]}") as client:
            await client.subscribe(f"{root}/events", qos=1)
            ready.set()
            async for msg in client.messages:
                payloads.append(msg.payload.decode())
                docs.append(json.loads(msg.payload))

    sub = asyncio.create_task(subscriber())
    await asyncio.wait_for(ready.wait(), 10)
    db = tmp_path / "demo.db"
    sl = SimulatedLine(rate=1200, defect_rate=0.08, seed=11, broker="127.0.0.1:1883", overrides=overrides, db=db)
    async with sl:
        lot = await sl.create_batch(150)
        await sl.start_batch()
        await asyncio.wait_for(sl.line.completed.wait(), 120)
        await sl.line.execute(C.CloseBatch(actor="test"), origin="test")
        for _ in range(200):
            if sl.daemon.store.backlog() == 0:
                break
            await asyncio.sleep(0.1)
        assert sl.daemon.store.backlog() == 0
        store = sl.daemon.store
        gtin = sl.cfg.products[0].gtin
        cp_len = sl.cfg.products[0].company_prefix_length
        counts = store.lot_counts(lot)
        expected: dict[str, set[str]] = {"commissioned": set(), "decommissioned": set(), "decommissioned_commissioned": set()}
        after = 0
        while True:
            rows = store.events_of_lot(lot, after, 10000)
            if not rows:
                break
            for r in rows:
                ev = r.event
                if r.kind == "unit_commissioned":
                    expected["commissioned"].add(gs1.sgtin_urn(ev.gtin, ev.serial, cp_len))
                elif r.kind == "unit_decommissioned":
                    epc = gs1.sgtin_urn(ev.gtin, ev.serial, cp_len)
                    expected["decommissioned"].add(epc)
                    if epc in expected["commissioned"]:
                        expected["decommissioned_commissioned"].add(epc)
            after = rows[-1].seq
        # what the registry says agrees with the events
        assert len(expected["commissioned"] - expected["decommissioned"]) == counts.get("commissioned", 0) == 150
        assert len(expected["decommissioned"]) == counts.get("decommissioned", 0) > 0
    await asyncio.sleep(1.0)
    sub.cancel()
    got = {"commissioning": set(), "decommissioning": set()}
    for d in docs:
        validate_document(d)  # the official EPCIS 2.0 JSON Schema, offline
        for e in d["epcisBody"]["eventList"]:
            step = e.get("bizStep", "").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
            for key in got:
                if step == key:
                    got[key].update(e.get("epcList", []))
                    if key == "commissioning":
                        assert e["ilmd"]["cbvmda:lotNumber"] == lot and e["action"] == "ADD"
    assert got["commissioning"] == expected["commissioned"]
    # epcis.rejected_serials: omit (default): a serial rejected before it was commissioned is no EPCIS event
    # (it went to <root>/records with its reason); only commissioned serials are decommissioned upstream
    assert got["decommissioning"] == expected["decommissioned_commissioned"]
    assert expected["decommissioned"] - expected["decommissioned_commissioned"], "the run must have rejected packs"
    published = [e for d in docs for e in d["epcisBody"]["eventList"]]
    assert_no_state_change_before_commissioning(published)

    # export --db, no config: byte for byte the events that were published, in the same order
    published_text = ",".join(event_list_text(p) for p in payloads)
    rc, out, err = await asyncio.to_thread(export_cli, capsys, "--db", str(db), "--validate", "all")
    assert rc == 0, err
    assert event_list_text(out) == published_text
    # ... also when the line's config has changed since (time zone, station and line SGLN extension)
    changed = tmp_path / "changed.yaml"
    raw = json.loads(json.dumps(to_plain(load_yaml(sl.run_cfg_path))))
    raw["line"].pop("timezone_offset", None)
    raw["line"].update(timezone="Asia/Tokyo", gln_extension="42")
    for st in raw["stations"]:
        st["gln_extension"] = f"X{st['name']}"[:20]
    changed.write_text(json.dumps(raw))
    rc, out2, err = await asyncio.to_thread(export_cli, capsys, "--db", str(db), "-c", str(changed))
    assert rc == 0, err
    assert out2.split('"epcisBody"', 1)[1] == out.split('"epcisBody"', 1)[1]

    # GS1's event hash: every event hashes, and the published and the exported rendering hash the same
    exported = json.loads(out)
    h_pub = event_hashes(docs)
    h_exp = event_hashes([exported])
    assert len(h_pub) == len(published) and all(h.startswith("ni:///sha-256;") for h in h_pub.values())
    assert h_exp == h_pub
    # the check can fail: rendered anew from the changed config, the same event would hash differently
    from linectl.config import load_config

    fresh = EpcisMapper.from_config(load_config(changed)).map(event_by_id(store_path=db, event_id=published[0]["eventID"]))
    doc = build_document(fresh)
    assert event_hashes([json.loads(json.dumps(doc))])[published[0]["eventID"]] != h_pub[published[0]["eventID"]]
    assert all(epc.startswith(f"urn:epc:id:sgtin:{gtin[1:1 + cp_len]}.") for epc in got["commissioning"])


def event_list_text(document: str) -> str:
    """The raw text of a document's eventList: its events' bytes exactly as sent."""
    _head, sep, rest = document.strip().partition('"eventList":[')
    assert sep and rest.endswith(DOCUMENT_TAIL)
    return rest[: -len(DOCUMENT_TAIL)]


def export_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from linectl.cli import build_parser

    capsys.readouterr()
    ns = build_parser().parse_args(["export", "epcis", *args])
    rc = ns.func(ns)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_no_state_change_before_commissioning(events: list[dict]) -> None:
    """Every EPC that an event deletes, observes or aggregates was commissioned by an earlier event."""
    commissioned: set[str] = set()
    for e in events:
        epcs = e.get("epcList", []) + e.get("childEPCs", []) + ([e["parentID"]] if "parentID" in e else [])
        if e.get("bizStep") == "commissioning" and e["action"] == "ADD":
            commissioned.update(epcs)
            continue
        missing = [x for x in epcs if x not in commissioned]
        assert not missing, f"{e['bizStep']} of never-commissioned {missing[:3]} (eventID {e['eventID']})"


def event_hashes(documents: list[dict]) -> dict[str, str]:
    """eventID -> CBV 2.0 event hash (ni:///sha-256;...) by GS1's reference implementation."""
    from epcis_event_hash_generator.hash_generator import epcis_hashes_from_events
    from epcis_event_hash_generator.json_to_py import event_list_from_epcis_document_json

    out: dict[str, str] = {}
    for d in documents:
        ids = [e["eventID"] for e in d["epcisBody"]["eventList"]]
        events = event_list_from_epcis_document_json(json.loads(json.dumps(d)))
        hashes = epcis_hashes_from_events(events)
        assert len(hashes) == len(ids) and all(hashes)
        out.update(zip(ids, hashes))
    return out


def event_by_id(*, store_path, event_id: str):
    import sqlite3

    from linectl.events import event_from_json

    with sqlite3.connect(store_path) as c:
        (body,) = c.execute("SELECT body FROM outbox WHERE event_id=?", (event_id,)).fetchone()
    return event_from_json(body)


def test_cli_demo_with_commission_then_decommission_never_decommissions_the_uncommissioned(tmp_path) -> None:
    """`linectl demo --defect-rate 0.05 --db …`, then `linectl export epcis --db …` (no config): every EPC an event
    deletes was commissioned before; a pack rejected before commissioning is a commissioning + decommissioning pair
    (epcis.rejected_serials: commission_then_decommission), a serial never printed is no event at all."""
    import sqlite3
    import subprocess
    import sys

    from mqtt_fixtures import REPO

    from linectl.epcis import NOT_PRINTED
    from linectl.events import event_from_json

    raw = to_plain(load_yaml(REPO / "config" / "demo-line.yaml"))
    raw["epcis"] = {"rejected_serials": "commission_then_decommission"}
    raw["line"]["name"] = f"demo{uuid.uuid4().hex[:8]}"
    cfg = tmp_path / "line.yaml"
    cfg.write_text(json.dumps(raw))
    db = tmp_path / "demo.db"
    r = subprocess.run(
        [sys.executable, "-m", "linectl", "--log-level", "error", "demo", "--config", str(cfg), "--units", "150", "--rate", "1200",
         "--defect-rate", "0.05", "--seed", "5", "--broker", "127.0.0.1:1883", "--db", str(db), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=200,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "export.json"
    r = subprocess.run([sys.executable, "-m", "linectl", "export", "epcis", "--db", str(db), "--out", str(out), "--validate", "all"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    events = json.loads(out.read_text())["epcisBody"]["eventList"]
    assert_no_state_change_before_commissioning(events)
    assert len(event_hashes([json.loads(out.read_text())])) == len(events)

    with sqlite3.connect(db) as c:
        rows = [event_from_json(b) for (b,) in c.execute("SELECT body FROM outbox WHERE kind LIKE 'unit_%' ORDER BY seq")]
    commissioned: set[str] = set()
    want_pairs, want_plain, want_none = set(), set(), set()
    for e in rows:
        if e.kind == "unit_commissioned":
            commissioned.add(e.serial)
        elif e.kind == "unit_decommissioned":
            if e.serial in commissioned:
                want_plain.add(e.event_id)
            elif e.reason in NOT_PRINTED:
                want_none.add(e.event_id)
            else:
                want_pairs.add(e.event_id)
    by_id = {e["eventID"]: i for i, e in enumerate(events)}
    assert want_pairs, "the run must reject packs before commissioning"
    for eid in want_pairs:
        i = by_id[eid]
        assert (events[i - 1]["bizStep"], events[i]["bizStep"]) == ("commissioning", "decommissioning")
        assert events[i - 1]["epcList"] == events[i]["epcList"]
    assert want_plain <= set(by_id) and not (want_none & set(by_id))


async def test_file_sink_beside_mqtt_in_the_daemon_has_its_own_cursor(tmp_path) -> None:
    """`upstream.file` in a real line: the daemon runs the file sink beside the MQTT forwarder, each with its own
    cursor. While the transfer directory is missing, MQTT delivers everything and the file sink waits (rows are
    not forwarded, retention purges nothing); once the directory is there, the files carry the same stored event
    bytes as MQTT did, in schema-valid documents, and only then is every row forwarded."""
    root = f"test/{uuid.uuid4().hex[:10]}/pkg/demo"
    enterprise, site, area, name = root.split("/")
    out = tmp_path / "transfer"  # missing at start
    overrides = {
        "line": {"enterprise": enterprise, "site": site, "area": area, "name": name},
        "mqtt": {"protocol": "5"},
        "upstream": {"file": {"dir": str(out), "max_events": 50, "max_age_s": 0.5}},
    }
    payloads: list[str] = []
    ready = asyncio.Event()

    async def subscriber() -> None:
        async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"sub-{uuid.uuid4().hex[:8]}") as client:
            await client.subscribe(f"{root}/events", qos=1)
            ready.set()
            async for msg in client.messages:
                payloads.append(msg.payload.decode())

    sub = asyncio.create_task(subscriber())
    await asyncio.wait_for(ready.wait(), 10)
    sl = SimulatedLine(rate=1200, defect_rate=0.05, seed=7, broker="127.0.0.1:1883", overrides=overrides, db=tmp_path / "demo.db")
    try:
        async with sl:
            store = sl.daemon.store
            assert store.enabled_sinks() == frozenset({"mqtt", "file"})
            await sl.create_batch(60)
            await sl.start_batch()
            await asyncio.wait_for(sl.line.completed.wait(), 120)
            await sl.line.execute(C.CloseBatch(actor="test"), origin="test")
            last = store.last_seq()
            await _wait(lambda: store.cursor("mqtt") == store.last_seq(), 30, "MQTT delivered every row")
            first_epcis = min(r.seq for r in store.outbox(0, 100_000, only_unforwarded=False) if r.epcis)
            # the file sink passed only the rows before the first EPCIS event (nothing to write for them)
            assert store.cursor("file") < first_epcis and store.last_seq() >= last
            assert store.backlog() == store.last_seq() - store.cursor("file")  # the slowest sink decides
            behind = [r.seq for r in store.outbox(0, 100_000, only_unforwarded=False) if r.seq <= store.cursor("file")]
            assert await store.purge_forwarded(0.0) == len(behind)  # retention: only what both sinks have delivered
            assert store.outbox(0, 1, only_unforwarded=False)[0].seq == store.cursor("file") + 1
            file_status = next(s for s in sl.daemon.upstream if getattr(s, "name", None) == "file").status()
            assert "No such file or directory" in file_status["last_error"]
            # one operator alarm for the outage, not one per retry
            assert [a.code for a in sl.line.alarms.values()].count("upstream_file_failed") == 1
            out.mkdir()
            await _wait(lambda: store.backlog() == 0, 30, "the file sink caught up: every row forwarded")
            assert store.cursor("file") == store.cursor("mqtt") == store.last_seq()
            bridge = sl.daemon.upstream[0]
            assert set(bridge.state_payload()["upstream_sinks"]) == {"mqtt", "file"}
            # a daemon restart: both sinks resume from their durable cursors; no file is rewritten
            before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in out.iterdir()}
            cursor_before = store.cursor("file")
            await sl.daemon.shutdown("test: daemon restart")
            sl.daemon = None
            await sl.start_daemon()
            store = sl.daemon.store
            assert store.cursor("file") == cursor_before
            await sl.create_batch(20)
            await sl.start_batch()
            await asyncio.wait_for(sl.line.completed.wait(), 120)
            await sl.line.execute(C.CloseBatch(actor="test"), origin="test")
            await _wait(lambda: store.backlog() == 0 and store.cursor("file") == store.last_seq(), 30, "second batch in both sinks")
            after = {p.name: (p.stat().st_ino, p.read_bytes()) for p in out.iterdir()}
            assert {k: after[k] for k in before} == before and len(after) > len(before)
            stored = [x for r in store.outbox(0, 100_000, only_unforwarded=False) if r.epcis for x in r.epcis.split("\n")]
    finally:
        sub.cancel()
    files = sorted(p for p in out.iterdir())
    assert files and all(p.suffix == ".json" and not p.name.startswith(".") for p in files)
    file_text = []
    for p in files:
        text = p.read_text()
        validate_document(json.loads(text))  # the official EPCIS 2.0 JSON Schema, offline
        file_text.append(event_list_text(text))
    assert ",".join(file_text) == ",".join(stored)  # the stored renderings, byte for byte, in seq order
    assert ",".join(event_list_text(p) for p in payloads) == ",".join(stored)  # MQTT carried the same bytes


async def _wait(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.1)):
        if pred():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out: {what}")
