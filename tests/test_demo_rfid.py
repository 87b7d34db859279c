"""`linectl demo --config config/demo-rfid.yaml`: cases read by an RFID tunnel, and a record like a DataMatrix line's.

Both demos run through the public interface (simulator process, broker, daemon) for the same small batch;
`linectl export epcis` of each must hold the same events: the same types, actions, business steps,
dispositions, read points and the same number of SGTINs and SSCCs in each, event for event. Only the
identifiers differ. The RFID line's tunnel truth (cases the simulator put in the reader's field) is compared
with what the case station read.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from linectl.epcis import validate_document

ROOT = Path(__file__).resolve().parent.parent
UNITS = 30
pytestmark = pytest.mark.timeout(600)


def linectl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "linectl", "--log-level", "warning", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def run_demo(config: str, tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    db = tmp / "line.db"
    res = linectl("demo", "--config", str(ROOT / "config" / config), "--units", str(UNITS), "--defect-rate", "0", "--seed", "5", "--json", "--db", str(db))
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    out = tmp / "batch.json"
    exp = linectl("export", "epcis", "--db", str(db), "-c", str(ROOT / "config" / config), "--batch", summary["batch"], "--out", str(out),
                  "--validate", "all")
    assert exp.returncode == 0, exp.stderr[-2000:]
    doc = json.loads(out.read_text())
    validate_document(doc)
    return summary, doc


def kind(epc: str) -> str:
    m = re.match(r"urn:epc:(?:id|class):([a-z0-9-]+):", epc)
    return m.group(1) if m else epc


def shape(e: dict[str, Any]) -> tuple[Any, ...]:
    """An event without its identifiers and times: what it says, about how many of which kind of thing."""
    return (
        e["type"], e.get("action"), e.get("bizStep"), e.get("disposition"),
        (e.get("readPoint") or {}).get("id", "").rsplit(".", 1)[-1],
        tuple(sorted(Counter(kind(x) for x in e.get("epcList", [])).items())),
        tuple(sorted(Counter(kind(x) for x in e.get("childEPCs", [])).items())),
        kind(e["parentID"]) if "parentID" in e else None,
    )


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    return {
        "rfid": run_demo("demo-rfid.yaml", tmp_path_factory.mktemp("rfid")),
        "datamatrix": run_demo("demo-aggregation.yaml", tmp_path_factory.mktemp("dm")),
    }


def test_rfid_demo_packs_every_unit_through_the_tunnel(demos: dict[str, Any]) -> None:
    s, _ = demos["rfid"]
    agg = s["aggregation"]
    assert s["commissioned"] == UNITS and s["balanced"] and s["missed_rejects"] == 0
    cases = -(-UNITS // 12)
    assert (agg["cases"], agg["units_aggregated"], agg["hierarchy_violations"]) == (cases, UNITS, [])
    assert agg["casepacker"]["recorded"] == cases and agg["casepacker"]["rejected_total"] == 0
    # every case the simulator passed through the tunnel was read in a window of its own
    assert agg["packer"]["tunnel"]["cases"] == cases
    rfid = agg["rfid"]
    assert rfid["counters"]["windows"] == cases and rfid["counters"]["no_window"] == 0 and rfid["counters"]["read_failed"] == 0
    assert rfid["counters"]["tags"] >= UNITS
    assert rfid["counters"]["strays"] == agg["packer"]["tunnel"]["faults"]["stray"]
    assert (agg["packer"]["plc_cases_passed"], agg["packer"]["plc_cases_diverted"]) == (cases, 0)


def test_rfid_line_exports_the_same_events_as_a_datamatrix_line(demos: dict[str, Any]) -> None:
    rfid = [shape(e) for e in demos["rfid"][1]["epcisBody"]["eventList"]]
    dm = [shape(e) for e in demos["datamatrix"][1]["epcisBody"]["eventList"]]
    assert Counter(rfid) == Counter(dm)
    aggs = [x for x in rfid if x[0] == "AggregationEvent"]
    assert len(aggs) == -(-UNITS // 12) + 1 and all(x[7] == "sscc" for x in aggs)
