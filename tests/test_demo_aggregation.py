"""`linectl demo --config config/demo-aggregation.yaml`: units into cases into pallets on the simulators, end to end.

Everything goes through the public interface: the demo command (simulator
process, broker, daemon), then `linectl trace` and `linectl export epcis` on
the store it leaves. The packer's ground truth (what it physically put in
front of each reader) is compared with what linectl recorded.
"""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from linectl.epcis import validate_document

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "demo-aggregation.yaml"
PER_CASE, PER_PALLET = 12, 4


def linectl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "linectl", "--log-level", "warning", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    db = tmp_path_factory.mktemp("aggdemo") / "line.db"
    # 64 units: 5 full cases and a partial case of 4 closed on command; pallets of 4 + 2 (partial) cases
    res = linectl("demo", "--config", str(CONFIG), "--units", "64", "--defect-rate", "0.05", "--seed", "7", "--json", "--db", str(db), timeout=240)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1]), db


def test_demo_packs_every_commissioned_unit_into_cases_and_pallets(demo):
    s, db = demo
    agg = s["aggregation"]
    n = s["commissioned"]
    assert n == 64 and s["missed_rejects"] == 0 and s["balanced"]
    assert sum(s["rejected"].values()) > 0, "defects were injected: the print_verify station must have rejected some"
    cases, pallets = math.ceil(n / PER_CASE), math.ceil(math.ceil(n / PER_CASE) / PER_PALLET)
    assert (agg["cases"], agg["pallets"], agg["units_aggregated"]) == (cases, pallets, n)
    assert agg["casepacker"]["recorded"] == cases and agg["casepacker"]["partial"] == 1 and agg["casepacker"]["rejected_total"] == 0
    assert agg["palletizer"]["recorded"] == pallets and agg["palletizer"]["partial"] == 1 and agg["palletizer"]["rejected_total"] == 0
    assert agg["hierarchy_violations"] == []
    # ground truth: every good unit reached the packer, every labelled case reached the palletizer
    p = agg["packer"]
    assert p["units_in"] == n and p["cases_presented"] == cases and p["case_labels"] == cases
    assert p["cases_to_pallet"] == cases and p["pallet_labels"] == pallets
    # the case station told the PLC's reject pusher about every case, over Modbus: all recorded, none diverted
    assert (p["plc_cases_passed"], p["plc_cases_diverted"]) == (cases, 0)

    con = sqlite3.connect(db)
    try:
        units = con.execute("SELECT gtin, serial FROM serials WHERE lot = ? AND state = 'commissioned'", (s["batch"],)).fetchall()
        packed = con.execute("SELECT child_gtin, child_serial, parent FROM aggregation WHERE child_kind = 'unit' AND removed_seq IS NULL").fetchall()
        case_sizes = [r[0] for r in con.execute(
            "SELECT count(*) FROM aggregation a JOIN containers c ON c.sscc = a.parent WHERE c.level = 'case' AND a.removed_seq IS NULL GROUP BY a.parent")]
    finally:
        con.close()
    assert {(g, sn) for g, sn, _ in packed} == set(units) and len(packed) == len(units)  # each unit once
    assert sorted(case_sizes) == sorted([PER_CASE] * (n // PER_CASE) + ([n % PER_CASE] if n % PER_CASE else []))


def test_trace_walks_from_a_unit_up_to_its_pallet_and_down_the_pallet_tree(demo):
    s, db = demo
    con = sqlite3.connect(db)
    try:
        g, sn, case = con.execute("SELECT child_gtin, child_serial, parent FROM aggregation WHERE child_kind = 'unit' LIMIT 1").fetchone()
        pallet = con.execute("SELECT parent FROM aggregation WHERE child_kind = 'container' AND child_key = ?", (case,)).fetchone()[0]
    finally:
        con.close()
    res = linectl("trace", "--db", str(db), f"(01){g}(21){sn}")
    assert res.returncode == 0, res.stderr
    t = json.loads(res.stdout)
    assert t["status"] == "commissioned" and t["lot"] == s["batch"]
    assert [(x["sscc"], x["level"]) for x in t["parents"]] == [(case, "case"), (pallet, "pallet")]
    assert [e["kind"] for e in t["events"]][:2] == ["unit_commissioned", "packed"]

    res = linectl("trace", "--db", str(db), f"(00){pallet}")
    assert res.returncode == 0, res.stderr
    t = json.loads(res.stdout)
    assert (t["kind"], t["status"], t["lot"]) == ("pallet", "commissioned", s["batch"])
    con = sqlite3.connect(db)
    try:
        want = {c: {(g2, s2) for g2, s2 in con.execute(
            "SELECT child_gtin, child_serial FROM aggregation WHERE parent = ? AND removed_seq IS NULL", (c,))}
            for (c,) in con.execute("SELECT child_key FROM aggregation WHERE parent = ? AND removed_seq IS NULL", (pallet,))}
    finally:
        con.close()
    got = {c["sscc"]: {(u["gtin"], u["serial"]) for u in c["children"]} for c in t["tree"]}
    assert all(c["kind"] == "case" for c in t["tree"]) and case in got
    assert got == want and t["contents"] == {"cases": len(want), "units": sum(map(len, want.values()))}


def test_epcis_export_has_schema_valid_aggregation_events_matching_the_store(demo, tmp_path):
    s, db = demo
    out = tmp_path / "batch.json"
    res = linectl("export", "epcis", "--db", str(db), "-c", str(CONFIG), "--batch", s["batch"], "--out", str(out), "--validate", "all", timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(out.read_text())
    validate_document(doc)  # the official EPCIS 2.0 JSON Schema, independently of the exporter's own check
    events = doc["epcisBody"]["eventList"]
    aggs = [e for e in events if e["type"] == "AggregationEvent" and e["action"] == "ADD"]
    assert all(e["bizStep"].endswith("packing") for e in aggs)
    cases = [e for e in aggs if all(c.startswith("urn:epc:id:sgtin:") for c in e["childEPCs"])]
    pallets = [e for e in aggs if all(c.startswith("urn:epc:id:sscc:") for c in e["childEPCs"])]
    assert len(cases) == s["aggregation"]["cases"] and len(pallets) == s["aggregation"]["pallets"]
    assert len(cases) + len(pallets) == len(aggs)
    assert all(e["parentID"].startswith("urn:epc:id:sscc:") for e in aggs)
    # every commissioned unit is packed once; every case is on a pallet once
    commissioned = [epc for e in events if e["type"] == "ObjectEvent" and e["action"] == "ADD" and e.get("bizStep", "").endswith("commissioning")
                    for epc in e.get("epcList", [])]
    unit_epcs = [c for e in cases for c in e["childEPCs"]]
    assert sorted(unit_epcs) == sorted(x for x in commissioned if x.startswith("urn:epc:id:sgtin:"))
    case_ids = sorted(e["parentID"] for e in cases)
    assert sorted(c for e in pallets for c in e["childEPCs"]) == case_ids
    # each SSCC is commissioned as an object before it is used as a parent
    sscc_commissioned = {x for x in commissioned if x.startswith("urn:epc:id:sscc:")}
    assert set(case_ids) | {e["parentID"] for e in pallets} <= sscc_commissioned
