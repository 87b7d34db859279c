"""The epcis_xml sink against a REAL QU4RTET (tests/l4/harness.py: its own venv, a subprocess, its own database):
a demo store with aggregation goes through the sink as EPCIS 1.2 XML into QU4RTET's capture, and is read back
through QU4RTET's query API (events, entries, events by EPC) and compared with the store's JSON-LD export.

The crash case is QU4RTET's real behaviour: it does not detect duplicate eventIDs, and it fails a whole message
(HTTP 500 naming the EPC, nothing of the message kept) that commissions an EPC it already has. A sink killed
after QU4RTET took a document but before its cursor moved re-sends that document on restart: without
`already_captured` it is wedged on that 500 for ever; with it the document counts as delivered, and QU4RTET ends
with every event exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from test_epcis_xml_sink import xml_cfg
from test_upstream_file import running, until

from linectl.upstream.epcis_xml import EpcisXmlSink
from linectl.upstream.sink import enabled_names
from tests.l4.harness import Qu4rtet, fresh_qu4rtet  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
#: QU4RTET's answers to a re-sent document it holds: a commissioning, or a packing of children already packed
QU4RTET_ALREADY = r"has already been commissioned|already in another aggregation"
CBV = "urn:epcglobal:cbv:bizstep:"


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict[str, Any]]]:
    """A demo store with aggregation (units, cases, pallets, rejects), its line config, and its JSON-LD events."""
    d = tmp_path_factory.mktemp("q4demo")
    db = d / "line.db"
    cfg = ROOT / "config" / "demo-aggregation.yaml"
    r = subprocess.run([sys.executable, "-m", "linectl", "--log-level", "warning", "demo", "--config", str(cfg), "--units", "60",
                        "--defect-rate", "0.05", "--seed", "11", "--json", "--db", str(db)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "linectl", "export", "epcis", "--db", str(db), "--out", str(d / "e.json")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    events = json.loads((d / "e.json").read_text())["epcisBody"]["eventList"]
    assert {e["type"] for e in events} == {"ObjectEvent", "AggregationEvent"}
    return db, cfg, events


def sink_cfg(tmp_path: Path, q: Qu4rtet, **extra: Any) -> Any:
    cfg = xml_cfg(tmp_path, {"name": "qu4rtet", "url": q.capture_url, "auth": "bearer", "token_scheme": "Token", "secret_env": "QU4RTET_TOKEN_X",
                             "max_events": 20, "max_age_s": 0.1, "timeout_s": 60, "success_codes": [201], **extra})
    return cfg


async def copy_store(src: Path, dst: Path) -> Any:
    """The demo store, copied so each test's sink starts with a fresh cursor."""
    import shutil

    from linectl.store import Store

    shutil.copy(src, dst)
    return await Store.open(dst)


def _instant(t: str) -> datetime:
    return datetime.fromisoformat(t.replace("Z", "+00:00"))


def assert_qu4rtet_holds_exactly(q: Qu4rtet, events: list[dict[str, Any]]) -> None:
    """QU4RTET's query API gives back every one of the store's events, each exactly once: its eventID, type, action,
    bizStep, disposition, readPoint, eventTime and EPCs (ILMD lot and expiry of a commissioned unit), read through
    QU4RTET's events-by-EPC query (one query per EPC an event is keyed by: its first EPC, or its parent)."""
    held = q.events()
    assert len(held) == len(events), f"QU4RTET holds {len(held)} events, the store has {len(events)}"
    by_epc: dict[str, dict[str, dict[str, Any]]] = {}
    seen: set[str] = set()
    for j in events:
        key = j["epcList"][0] if j["type"] == "ObjectEvent" else j["parentID"]
        if key not in by_epc:  # every event QU4RTET has for this EPC, by eventID (an eventID held twice fails here)
            got = [next(iter(x.values())) for x in q.events_by_epc(key)]
            ids = [x["eventID"] for x in got]
            assert len(ids) == len(set(ids)), f"{key}: an event held twice: {ids}"
            by_epc[key] = {x["eventID"]: x for x in got}
        x = by_epc[key].get(j["eventID"])
        assert x is not None, f"{j['eventID']} ({j['type']} {j.get('bizStep')} of {key}) is not in QU4RTET"
        seen.add(j["eventID"])
        want = (CBV + j["bizStep"], j["action"], j["readPoint"]["id"], _instant(j["eventTime"]))
        assert (x["bizStep"], x["action"], x["readPoint"], _instant(x["eventTime"])) == want, (j, x)
        if "disposition" in j:
            assert x["disposition"] == "urn:epcglobal:cbv:disp:" + j["disposition"], (j, x)
        if j["type"] == "AggregationEvent":
            assert (x["parentID"], sorted(x["childEPCs"])) == (j["parentID"], sorted(j["childEPCs"])), (j, x)
        else:
            assert sorted(x["epcList"]) == sorted(j["epcList"]), (j, x)
            if "ilmd" in j:  # units carry their lot and expiry; containers (SSCC) none
                assert (x["ilmd"]["lotNumber"], x["ilmd"]["itemExpirationDate"]) == (j["ilmd"]["cbvmda:lotNumber"], j["ilmd"]["cbvmda:itemExpirationDate"])
    assert len(seen) == len(events) == len(held)  # every store event found, and QU4RTET holds no other
    assert {e.get("bizStep") for e in events} >= {"commissioning", "packing"}  # units, SSCCs and their packing
    entries = {x["identifier"]: x for x in q.entries()}
    packed = {e["parentID"]: e["childEPCs"] for e in events if e["type"] == "AggregationEvent"}
    for parent, children in packed.items():  # the hierarchy QU4RTET built from the packing events
        assert all(entries[c]["parent_id"] is not None for c in children), parent


async def test_a_demo_store_through_the_sink_into_qu4rtet_and_back(tmp_path, fresh_qu4rtet, demo_store, monkeypatch):
    q = fresh_qu4rtet
    db, _cfg, events = demo_store
    monkeypatch.setenv("QU4RTET_TOKEN_X", q.token)
    cfg = sink_cfg(tmp_path, q)
    store = await copy_store(db, tmp_path / "line.db")
    store.set_sinks(enabled_names(cfg))
    (sink,) = EpcisXmlSink.from_config(cfg, store)
    async with running(sink):
        await until(lambda: store.sink_backlog("epcis_xml:qu4rtet") == 0, 240, what="the store's events captured by QU4RTET")
    st = sink.status()
    assert st["last_error"] is None and st["connected"] is True and st["last_status"] == 201 and st["events_written"] == len(events)
    assert_qu4rtet_holds_exactly(q, events)
    await store.close()


async def test_crash_after_capture_resend_neither_doubles_nor_wedges(tmp_path, fresh_qu4rtet, demo_store, monkeypatch):
    q = fresh_qu4rtet
    db, _cfg, events = demo_store
    monkeypatch.setenv("QU4RTET_TOKEN_X", q.token)
    store = await copy_store(db, tmp_path / "line.db")
    plain = sink_cfg(tmp_path, q)
    store.set_sinks(enabled_names(plain))
    (sink,) = EpcisXmlSink.from_config(plain, store)
    crashed = asyncio.Event()
    real_advance = sink.reader.advance

    async def die_before_the_cursor(seq: int) -> None:
        if sink.documents_sent == 2:  # QU4RTET answered 201 to the second document: the process dies here
            crashed.set()
            await asyncio.sleep(3600)
        await real_advance(seq)

    monkeypatch.setattr(sink.reader, "advance", die_before_the_cursor)
    task = asyncio.create_task(sink.run())
    await asyncio.wait_for(crashed.wait(), 240)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    held_before = len(q.events())
    assert held_before >= 40 and store.cursors()["epcis_xml:qu4rtet"]["pending"] is not None

    # restarted WITHOUT already_captured: QU4RTET refuses the re-sent document for ever, and keeps nothing of it
    (wedged,) = EpcisXmlSink.from_config(plain, store, backoff_initial_s=0.1, backoff_max_s=0.3)
    async with running(wedged):
        await until(lambda: wedged.last_error is not None and "already been commissioned" in wedged.last_error, 120, what="the 500")
        await asyncio.sleep(1.0)
    assert store.sink_backlog("epcis_xml:qu4rtet") > 0 and len(q.events()) == held_before
    assert wedged.last_error.startswith("HTTP 500") and not wedged.status()["parked"]

    # restarted WITH it: the re-sent document counts as delivered, the rest goes on, nothing twice
    cfg = sink_cfg(tmp_path, q, already_captured={"status": [500], "body_regex": QU4RTET_ALREADY, "split": False})
    (sink2,) = EpcisXmlSink.from_config(cfg, store)
    async with running(sink2):
        await until(lambda: store.sink_backlog("epcis_xml:qu4rtet") == 0, 240, what="the rest after the crash")
    assert sink2.status()["already_captured"] == 1 and sink2.status()["last_error"] is None
    assert_qu4rtet_holds_exactly(q, events)
    await store.close()
