"""`linectl export epcis --format jsonld|xml|xml-1.2` on a demo store with aggregation: each document valid by the
official schema of its format (JSON schema; XSD 1.2 / 2.0, loaded here with lxml), and the three carry the same
events (eventIDs, EPCs, times, bizSteps, actions), compared by parsing each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from test_epcis_xml import demo_events  # noqa: F401  (module fixture: a demo store with aggregation)
from test_epcis_xml_sink import xsd

from linectl.epcis import validate_document

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)


def export(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "linectl", "export", "epcis", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def from_xml(body: bytes, version: str) -> list[tuple[Any, ...]]:
    root = etree.fromstring(body)
    out = []
    for e in root.find("EPCISBody/EventList"):
        eid = e.findtext("baseExtension/eventID" if version == "1.2" else "eventID")
        epcs = tuple(x.text for x in e.iterfind("epcList/epc")) + tuple(x.text for x in e.iterfind("childEPCs/epc"))
        step = e.findtext("bizStep").removeprefix("urn:epcglobal:cbv:bizstep:")
        out.append((e.tag, eid, e.findtext("eventTime"), step, e.findtext("action"), e.findtext("parentID"), epcs))
    return out


def from_json(doc: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [(e["type"], e["eventID"], e["eventTime"], e["bizStep"], e["action"], e.get("parentID"), tuple(e.get("epcList", []) + e.get("childEPCs", [])))
            for e in doc["epcisBody"]["eventList"]]


def test_three_formats_valid_and_carry_the_same_events(demo_events, tmp_path):  # noqa: F811
    db, events = demo_events
    got = {}
    for fmt, version in (("jsonld", None), ("xml", "2.0"), ("xml-1.2", "1.2")):
        out = tmp_path / f"export.{fmt}"
        r = export("--db", str(db), "--format", fmt, "--validate", "all", "--out", str(out))
        assert r.returncode == 0, r.stderr
        assert f"exported {len(events)} EPCIS event(s)" in r.stderr
        body = out.read_bytes()
        if version is None:
            doc = json.loads(body)
            validate_document(doc)
            got[fmt] = from_json(doc)
        else:
            schema = xsd(version)
            assert schema.validate(etree.fromstring(body)), schema.error_log
            got[fmt] = from_xml(body, version)
    assert got["jsonld"] == got["xml"] == got["xml-1.2"]
    assert len(got["jsonld"]) == len(events) and {t[3] for t in got["jsonld"]} == {"commissioning", "packing"}
    # jsonld is the default and unchanged: the same bytes as without --format
    r = export("--db", str(db), "--out", str(tmp_path / "default.json"))
    def event_list(p: Path) -> bytes:  # what follows the head (whose creationDate is the export's time)
        return p.read_bytes().split(b'"eventList":[', 1)[1]

    assert r.returncode == 0 and event_list(tmp_path / "default.json") == event_list(tmp_path / "export.jsonld")


def test_xml_to_stdout_streams_the_same_document(demo_events, tmp_path):  # noqa: F811
    db, events = demo_events
    r = export("--db", str(db), "--format", "xml-1.2", "--validate", "none")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('<?xml version="1.0" encoding="UTF-8"?>') and len(from_xml(r.stdout.encode(), "1.2")) == len(events)


def test_out_is_replaced_atomically_and_a_bad_format_is_refused(demo_events, tmp_path):  # noqa: F811
    db, _events = demo_events
    out = tmp_path / "o.xml"
    out.write_text("old")
    ino = out.stat().st_ino
    r = export("--db", str(db), "--format", "xml", "--out", str(out))
    assert r.returncode == 0 and out.stat().st_ino != ino and out.read_bytes().startswith(b"<?xml")
    assert sorted(os.listdir(tmp_path)) == ["o.xml"]  # no temporary file left behind
    r = export("--db", str(db), "--format", "xml-2.0", "--out", str(out))
    assert r.returncode == 2 and "invalid choice: 'xml-2.0'" in r.stderr and "Traceback" not in r.stderr
