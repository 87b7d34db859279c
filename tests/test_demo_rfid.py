"""`linectl demo --config config/demo-rfid.yaml`: cases read by an RFID tunnel, and a record like a DataMatrix line's.

Both demos run through the public interface (simulator process, broker, daemon) for the same small batch;
`linectl export epcis` of each must hold the same events: the same types, actions, business steps,
dispositions, read points and the same number of SGTINs and SSCCs in each, event for event. Only the
identifiers differ. The RFID line's tunnel truth (cases the simulator put in the reader's field) is compared
with what the case station read, and the tags in the field with the EPCs the unit printer was told to encode
(the product's `rfid:` settings). The simulated tunnel takes each unit's tag from what the ZPL printer simulator
physically encoded on its label (driver and simulator over TCP), with the product's EPC only for a unit without
an RFID label.

Both demos run with `--defect-rate 0` and demo-rfid.yaml's RFID fault rates are 0, so every unit passes and the
two exports are compared event for event; RFID rejects (VOID, wrong tag, lost verification) are covered by
tests/test_rfid_print_verify.py.
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
from engine_helpers import wait_for
from epcpy.epc_schemes.sgtin import SGTIN, SGTINFilterValue

from linectl import epc, gs1
from linectl.config import load_config
from linectl.drivers.base import PrintJob
from linectl.drivers.zpl import ZplConfig, ZplPrinter
from linectl.epcis import validate_document
from linectl.simulators.line import LineSim
from linectl.simulators.model import SimUnit
from linectl.simulators.printer import ZplPrinterSim

ROOT = Path(__file__).resolve().parent.parent
UNITS = 30
SEED = 9  # the tunnel's seeded draws put a stray unit (the next case's first) in the field of both full cases
pytestmark = pytest.mark.timeout(600)


def linectl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "linectl", "--log-level", "warning", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def run_demo(config: str, tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    db = tmp / "line.db"
    res = linectl("demo", "--config", str(ROOT / "config" / config), "--units", str(UNITS), "--defect-rate", "0", "--seed", str(SEED),
                  "--json", "--db", str(db))
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
    assert agg["packer"]["tunnel"]["faults"]["stray"] >= 1, "no stray in the field: the stray exclusion went untested"
    assert rfid["counters"]["strays"] == agg["packer"]["tunnel"]["faults"]["stray"]
    assert (agg["packer"]["plc_cases_passed"], agg["packer"]["plc_cases_diverted"]) == (cases, 0)


def test_rfid_line_exports_the_same_events_as_a_datamatrix_line(demos: dict[str, Any]) -> None:
    rfid = [shape(e) for e in demos["rfid"][1]["epcisBody"]["eventList"]]
    dm = [shape(e) for e in demos["datamatrix"][1]["epcisBody"]["eventList"]]
    assert Counter(rfid) == Counter(dm)
    aggs = [x for x in rfid if x[0] == "AggregationEvent"]
    assert len(aggs) == -(-UNITS // 12) + 1 and all(x[7] == "sscc" for x in aggs)


def commissioned_uris(doc: dict[str, Any]) -> set[str]:
    return {x for e in doc["epcisBody"]["eventList"] if e.get("bizStep") == "commissioning" for x in e.get("epcList", [])}


def test_the_tunnel_read_the_tags_the_label_printer_encoded(demos: dict[str, Any]) -> None:
    """Every tag the simulator put in the tunnel's field is the product's EPC (carrier both, scheme auto: SGTIN-198
    for these alphanumeric serials, filter 1) of a unit this line commissioned, one per unit, none untagged."""
    s, doc = demos["rfid"]
    cases = s["aggregation"]["packer"]["tunnel"]["last"]
    assert len(cases) == -(-UNITS // 12)
    assert all(c["untagged"] == [] and c["missing"] == [] and c["dead"] == [] for c in cases)
    # a stray is the next case's unit at the edge of the field: in its own case's field later, never in two cases
    assert all(set(c["stray"]) <= set(nxt["in_case"]) for c, nxt in zip(cases, cases[1:]))
    tags = [epc.decode_epc(h) for c in cases for h in c["in_case"]]
    assert len(tags) == UNITS
    assert {(t.scheme, t.filter_value) for t in tags} == {("sgtin-198", 1)}
    assert {t.pure_uri for t in tags} == {x for x in commissioned_uris(doc) if x.startswith("urn:epc:id:sgtin:")}


async def test_the_simulated_tunnel_takes_the_tag_on_the_unit(tmp_path: Path) -> None:
    """LineSim.unit_epc, what the tunnel puts in the reader's field for a unit: the tag the ZPL printer simulator
    encoded on its label (driver over TCP), none for a VOID label, the other EPC a wrong-EPC tag kept; for a unit
    without an RFID label the product's rfid settings (here SGTIN-198, filter 4, against epcpy)."""
    raw = (ROOT / "config" / "demo-rfid.yaml").read_text()
    raw, n = re.subn(r"(rfid:\n\s+scheme: )auto(.*\n\s+filter_value: )1", r"\g<1>sgtin-198\g<2>4", raw)
    assert n == 1
    (tmp_path / "line.yaml").write_text(raw)
    cfg = load_config(tmp_path / "line.yaml")
    product = cfg.products[0]
    assert product.rfid is not None and (product.rfid.scheme, product.rfid.filter_value) == ("sgtin-198", 4)
    sim_line = LineSim(cfg)
    gtin = product.gtin

    def job(i: int, serial: str) -> PrintJob:
        code = gs1.compose_unit(gtin, serial, lot="L1", expiry="301231")
        return PrintJob(i, code.element_string, code.hri, {}, epc_hex=product.epc(gtin, serial).epc_hex)

    printer = ZplPrinterSim(port=0, print_time_s=10.0)  # labels wait for the product trigger (print-and-apply)
    await printer.start()
    drv = ZplPrinter("label1", ZplConfig(driver="zpl", host="127.0.0.1", port=printer.port, status_interval_s=0.05, settle_s=0.1,
                                         rfid={"enabled": True, "verify_timeout_s": 0.5}, backoff_initial_s=0.05, backoff_max_s=0.2))
    try:
        await drv.start()
        assert await drv.wait_connected(3)
        other = product.epc(gtin, "ZZZZ00000001").epc_hex
        printer.inject("void")
        printer.inject("wrong_epc", epc=other)
        jobs = [job(1, "AB12CD34EF56"), job(2, "AB12CD34EF57"), job(3, "AB12CD34EF58")]
        for j in jobs:
            await drv.send(j)
        await wait_for(lambda: len(printer.buffer) + (printer.current is not None) == 3, 3, "three formats on the printer")
        units = [SimUnit(seq=k) for k in (1, 2, 3)]
        for u in units:
            printer.on_trigger(u)
    finally:
        await drv.stop()
        await printer.stop()
    void, wrong, ok = units
    assert void.rfid_void and sim_line.unit_epc(void) is None
    assert wrong.content == jobs[1].element_string and wrong.defect == "rfid_wrong_epc"
    assert sim_line.unit_epc(wrong) == other != jobs[1].epc_hex  # not the EPC its printed code names
    assert sim_line.unit_epc(ok) == jobs[2].epc_hex == ok.rfid_epc
    # no RFID label: the tag its product's settings would encode for the printed serial
    plain = SimUnit(seq=4, content=gs1.compose_unit(gtin, "12345", lot="L1", expiry="301231").element_string)
    expected = SGTIN("urn:epc:id:sgtin:9501101.053000.12345").hex(
        binary_coding_scheme=SGTIN.BinaryCodingScheme.SGTIN_198, filter_value=SGTINFilterValue.INNER_PACK
    )
    assert sim_line.unit_epc(plain) == expected.upper().ljust(52, "0")
    assert sim_line.unit_epc(SimUnit(seq=5)) is None  # nothing printed: no identity
