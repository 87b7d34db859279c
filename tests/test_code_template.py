"""gs1.CodeTemplate: one template for printing, verification, the EPCIS ILMD and the simulators' data defects.

Every AI a template may carry is rendered, read back by an independent decoder (zxing-cpp) and checked by the
GS1 Barcode Syntax Dictionary rules; a batch that cannot fill its template is refused at creation; the
batch's dates survive a daemon restart; the ILMD validates against the official EPCIS 2.0 schema.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pytest
import zxingcpp

from linectl import control as C
from linectl import epcis, gs1, gs1_dictionary
from linectl import events as ev
from linectl.config import parse_config
from linectl.demo import DEFAULT_CONFIG
from linectl.drivers.base import Decoded
from linectl.engine.line import Line
from linectl.engine.verdict import Expected, verify_unit
from linectl.events import RejectReason
from linectl.gs1_dictionary import lint_yymmd0
from linectl.simulators.model import SimUnit
from linectl.simulators.printer import apply_print
from linectl.store import Store
from linectl.yamlsource import ConfigFileError, load_yaml, to_plain

GTIN = "09501101530003"
ALL_DATES = {"lot": "L0T;1", "expiry": "281231", "production_date": "260115", "packaging_date": "260200",
             "best_before": "280600", "sell_by": "280531"}
FULL = ["01", "11", "13", "15", "16", "17", "10", "21"]


def _decode(img: np.ndarray) -> zxingcpp.Barcode:
    found = zxingcpp.read_barcodes(img, formats=zxingcpp.BarcodeFormat.DataMatrix, text_mode=zxingcpp.TextMode.Plain)
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("ai", ["10", "11", "13", "15", "16", "17"])
def test_each_batch_ai_rendered_and_read_back(ai):
    tpl = gs1.CodeTemplate.build(["01", ai, "21"], {"714": "1234567"})
    code = tpl.compose(GTIN, "SER(1)", ALL_DATES)
    value = ALL_DATES[gs1.BATCH_SOURCES[ai]]
    assert code.get(ai) == value and code.get("714") == "1234567"
    entry = gs1_dictionary.load().entries[ai]
    if ai in gs1.DATE_AIS:
        assert "yymmd0" in entry.components[0].linters  # the dictionary's rule is the one applied
        lint_yymmd0(value)
    # FNC1 only after variable-length AIs; a date (predefined length) is placed before them without GS
    es = code.element_string
    assert es.startswith("01" + GTIN + (ai + value if ai in gs1.DATE_AIS else ""))
    assert es.count(gs1.GS) == (2 if ai == "10" else 1)  # after each variable-length AI but the last
    read = _decode(gs1.render_datamatrix(code))
    assert read.symbology_identifier == "]d2" and read.text == es
    assert gs1.parse(read.symbology_identifier + read.text, require_gs1=True).ais == code.ais
    # what verification expects is every AI but the key and serial, with the value printed
    assert dict(tpl.expected(code)) == {ai: value, "714": "1234567"}


def test_all_dates_on_one_code_in_template_order_and_ilmd_names():
    tpl = gs1.CodeTemplate.build(FULL)
    code = tpl.compose(GTIN, "S1", ALL_DATES)
    assert code.hri == "(01)09501101530003(11)260115(13)260200(15)280600(16)280531(17)281231(10)L0T;1(21)S1"
    assert tpl.batch_fields == ("production_date", "packaging_date", "best_before", "sell_by", "expiry", "lot")
    assert tpl.data_ais == ("10", "11", "13", "15", "16", "17")
    assert tpl.ilmd(ALL_DATES) == {
        "gs1:productionDate": "2026-01-15", "gs1:packagingDate": "2026-02-01", "cbvmda:bestBeforeDate": "2028-06-30",
        "cbvmda:sellByDate": "2028-05-31", "cbvmda:itemExpirationDate": "2028-12-31", "cbvmda:lotNumber": "L0T;1",
    }
    # the ILMD prefixes are the official EPCIS 2.0 context's
    ctx = json.loads((epcis.Path(epcis.__file__).parent / "standards" / "epcis" / "epcis-context.jsonld").read_text())["@context"]
    assert {k.split(":")[0] for k in gs1.ILMD_KEYS.values()} <= set(ctx)


@pytest.mark.parametrize(
    "template, extra, needle",
    [
        (["01", "17", "10"], {}, "AI 21"),
        (["01", "21", "99"], {}, "no source"),
        (["01", "21", "714"], {}, "no source"),
        (["01", "21", "10", "10"], {}, "twice"),
        (["01", "21", "7"], {}, "not an AI"),
        (["01", "21"], {"21": "X"}, "cannot be a constant"),
        (["01", "21"], {"11": "250101"}, "production_date"),
        (["01", "21"], {"714": "1" * 21}, "maximum is 20"),
        (["01", "21"], {"422": "999"}, "AI (422)"),  # not an ISO 3166 country: the dictionary's linter
        (["01", "21"], {"235": "X"}, "cannot be a constant"),
    ],
)
def test_bad_templates_refused(template, extra, needle):
    with pytest.raises(gs1.GS1Error) as ei:
        gs1.CodeTemplate.build(template, extra)
    assert needle in ei.value.reason, ei.value.reason


def _raw(**product):
    raw = to_plain(load_yaml(DEFAULT_CONFIG))
    raw["products"][0].update(product)
    return raw


def test_config_refuses_template_and_low_water_by_name():
    with pytest.raises(ConfigFileError) as ei:
        parse_config(_raw(code_template=["01", "21", "714"]))
    assert any(p.path.startswith("products.0") and "no source" in p.message for p in ei.value.problems), ei.value.problems
    for scheme in ({"scheme": "random", "length": 12, "planned_volume": 1000, "low_water": 10},
                   {"scheme": "sequential", "low_water": 10}):
        raw = _raw(serials=scheme, market="US-DSCSA")
        with pytest.raises(ConfigFileError) as ei:
            parse_config(raw)
        assert len(ei.value.problems) == 1 and "low_water applies to scheme pool only" in ei.value.problems[0].message, ei.value.problems
        assert ei.value.problems[0].path.startswith("products.0.serials"), ei.value.problems
    ok = parse_config(_raw(code_template=["01", "11", "21", "714"], extra_ais={"714": "1234567"}))
    assert ok.products[0].template == gs1.CodeTemplate(("01", "11", "21", "714"), (("714", "1234567"),))


def test_verification_checks_every_template_ai():
    tpl = gs1.CodeTemplate.build(FULL, {"714": "1234567"})
    sent = tpl.compose(GTIN, "S1", ALL_DATES)
    exp = Expected(GTIN, "S1", sent.lot, sent.expiry_raw, sent.element_string, tpl.expected(sent))
    good = Decoded(data="]d2" + sent.element_string, symbology="]d2", grade=3.5)
    assert verify_unit(exp, (good,), min_grade=1.5).good
    for ai in tpl.data_ais + ("714",):
        pairs = [(a, gs1.wrong_value(a, v) if a == ai else v) for a, v in sent.ais]
        bad = gs1.compose(pairs)
        v = verify_unit(exp, (Decoded(data="]d2" + bad.element_string, symbology="]d2", grade=3.5),), min_grade=1.5)
        assert v.reason == RejectReason.DATA_MISMATCH and f"({ai})" in v.detail and v.detail.count("expected") == 1, (ai, v)
    # a code without the (11) the template prints is a mismatch too, not a pass
    missing = gs1.compose([p for p in sent.ais if p[0] != "11"])
    v = verify_unit(exp, (Decoded(data="]d2" + missing.element_string, symbology="]d2", grade=3.5),), min_grade=1.5)
    assert v.reason == RejectReason.DATA_MISMATCH and "production date (11) missing" in v.detail, v


def test_simulator_data_defect_follows_the_template():
    tpl = gs1.CodeTemplate.build(["01", "11", "17", "10", "21"])
    content = tpl.compose(GTIN, "S1", ALL_DATES).element_string
    import random

    seen = {}
    for seq in range(1, 4):
        u = SimUnit(seq=seq)
        apply_print(u, content, "]d2", "data_mismatch", random.Random(1), previous=None)
        ai = u.extras["wrong_ai"]
        printed, sent = gs1.parse(u.content), gs1.parse(content)
        assert u.defect == "data_mismatch" and printed.serial == "S1"
        assert [a for a, _ in printed.ais if printed.get(a) != sent.get(a)] == [ai]
        seen[seq] = ai
    assert seen == {1: "10", 2: "11", 3: "17"}


def _line_cfg(**product):
    raw = _raw(**product)
    raw["stations"] = []
    raw["mqtt"]["enabled"] = False
    return parse_config(raw)


async def test_batch_dates_refused_checked_and_kept_across_restart(tmp_path):
    cfg = _line_cfg(code_template=["01", "11", "17", "10", "21"], shelf_life_days=730)
    store = await Store.open(tmp_path / "line.db")
    try:
        await store.upsert_products(cfg.products)
        line = Line(cfg, store, {})
        today = date.today()
        prod = (today - timedelta(days=10)).strftime("%y%m%d")
        exp = (today + timedelta(days=700)).strftime("%y%m%d")
        with pytest.raises(C.CommandRejected) as ei:
            await line.execute(C.CreateBatch(lot="B1", gtin=GTIN, expiry=exp, planned_qty=10), "test")
        assert ei.value.code == "missing_dates" and "production_date" in ei.value.reason
        with pytest.raises(C.CommandRejected) as ei:  # a date the template does not print is not taken
            await line.execute(C.CreateBatch(lot="B1", gtin=GTIN, expiry=exp, production_date=prod, sell_by=exp, planned_qty=10), "test")
        assert ei.value.code == "invalid_dates" and "sell_by" in ei.value.reason and "(16)" in ei.value.reason
        # shelf life runs from the production date: 730 days after it, not after today
        late = (today - timedelta(days=10) + timedelta(days=731)).strftime("%y%m%d")
        with pytest.raises(C.CommandRejected) as ei:
            await line.execute(C.CreateBatch(lot="B1", gtin=GTIN, expiry=late, production_date=prod, planned_qty=10), "test")
        assert ei.value.code == "invalid_expiry" and f"from production_date {prod}" in ei.value.reason, ei.value.reason
        # expiry before the production date: the dictionary's message rule, at create
        future = (today + timedelta(days=800)).strftime("%y%m%d")
        with pytest.raises(C.CommandRejected) as ei:
            await line.execute(C.CreateBatch(lot="B1", gtin=GTIN, expiry=exp, production_date=future, planned_qty=10), "test")
        assert ei.value.code == "invalid_dates" and "earlier than" in ei.value.reason, ei.value.reason
        assert store.batch("B1") is None
        await line.execute(C.CreateBatch(lot="B1", gtin=GTIN, expiry=exp, production_date=prod, planned_qty=10), "test")
        assert store.batch_dates("B1") == {"production_date": prod}
        audit = [r for r in store.audit_log() if r.action == "batch_created"]
        assert audit[-1].detail["production_date"] == prod
        # a new daemon picks the open batch up with its dates: the code it prints is the same
        again = Line(cfg, store, {})
        await again.load_open_batch()
        assert again.batch is not None and again.batch.dates == {"production_date": prod}
        code = cfg.products[0].template.compose(GTIN, "S1", again.batch.code_values())
        assert code.get("11") == prod and code.get("17") == exp
        await again.execute(C.CloseBatch(actor="t"), "test")
        # a batch created before its product's template gained (13) has no packaging date: it is never started
        await again.execute(C.CreateBatch(lot="B2", gtin=GTIN, expiry=exp, production_date=prod, planned_qty=10, challenge=False), "test")
        changed = _line_cfg(code_template=["01", "11", "13", "17", "10", "21"], shelf_life_days=730)
        later = Line(changed, store, {})
        await later.load_open_batch()
        with pytest.raises(C.CommandRejected) as ei:
            await later.execute(C.StartBatch(actor="t"), "test")
        assert ei.value.code == "missing_dates" and "packaging_date" in ei.value.reason, ei.value.reason
    finally:
        await store.close()


def test_shelf_life_without_production_date_is_counted_from_today():
    product = _line_cfg(shelf_life_days=30).products[0]
    today = date(2026, 3, 1)
    Line._check_expiry("260331", product, today)
    with pytest.raises(C.CommandRejected) as ei:
        Line._check_expiry("260401", product, today)
    assert "30 days from today" in ei.value.reason


def test_ilmd_of_every_date_validates_against_the_official_schema():
    t0 = datetime(2026, 3, 1, 8, 30, tzinfo=UTC)
    dates = {k: v for k, v in ALL_DATES.items() if k in C.BATCH_DATES}
    e = ev.UnitCommissioned(gtin=GTIN, serial="S1", lot="L0T;1", expiry="281231", dates=dates, event_time=t0)
    m = epcis.EpcisMapper(read_point="urn:epc:id:sgln:9501101.00000.0", biz_location="urn:epc:id:sgln:9501101.00000.0",
                          cp_lengths={GTIN: 7})
    (mapped,) = m.map(e)
    tpl = gs1.CodeTemplate.build(FULL)
    assert mapped["ilmd"] == tpl.ilmd(ALL_DATES)
    # the fast path the line uses renders the same bytes
    assert json.loads(m.render_commissioned(e)) == mapped
    assert epcis.default_validator().problems(epcis.build_document([mapped])) == []
    bad = ev.UnitCommissioned(gtin=GTIN, serial="S1", dates={"harvest_date": "260101"}, event_time=t0)
    assert m.render(bad).startswith(epcis.RENDER_FAILED)


def test_cli_date_options(tmp_path):
    import argparse

    from linectl.commands import batch

    parser = argparse.ArgumentParser()
    batch.register(parser.add_subparsers())
    args = parser.parse_args(["batch", "create", "-c", "x.yaml", "--lot", "L1", "--gtin", GTIN, "--expiry", "281231", "--qty", "5",
                              "--production-date", "260115", "--best-before", "280600"])
    body = batch.build_command(args)
    assert (body["production_date"], body["best_before"]) == ("260115", "280600")
    args = parser.parse_args(["batch", "create", "-c", "x.yaml", "--lot", "L1", "--gtin", GTIN, "--expiry", "281231", "--qty", "5",
                              "--production-date", "261301"])
    with pytest.raises(ValueError, match="production_date"):
        batch.build_command(args)
    args = parser.parse_args(["batch", "start", "-c", "x.yaml", "--sell-by", "280101"])
    with pytest.raises(ValueError, match="--sell-by"):
        batch.build_command(args)


async def test_field_verify_compares_the_dates_on_the_pack_with_the_record(tmp_path):
    """`linectl verify` of a pack: a production date differing from the batch record is suspicious, like a lot."""
    from linectl.config import PoolSerials
    from linectl.store.trace import verify_code

    store = await Store.open(tmp_path / "t.db")
    try:
        await store.create_batch("LT1", GTIN, "281231", 10, actor="t", dates={"production_date": "260115"})
        await store.provision(GTIN, ["S1"], source="test")
        await store.allocate(GTIN, "LT1", 1, PoolSerials(scheme="pool", low_water=0))
        await store.mark_sent(GTIN, "LT1", ["S1"])
        await store.append(ev.UnitCommissioned(gtin=GTIN, serial="S1", lot="LT1", expiry="281231", dates={"production_date": "260115"}))
        tpl = gs1.CodeTemplate.build(["01", "11", "17", "10", "21"])
        batch = {"lot": "LT1", "expiry": "281231", "production_date": "260115"}
        assert verify_code(store, tpl.compose(GTIN, "S1", batch).scan_string)["verdict"] == "genuine"
        r = verify_code(store, tpl.compose(GTIN, "S1", {**batch, "production_date": "260116"}).scan_string)
        assert r["verdict"] == "suspicious" and "production_date on the pack 260116 differs from the record 260115" in r["reason"], r
    finally:
        await store.close()


def test_demo_and_campaign_batches_give_the_dates_their_template_prints():
    from linectl.demo import demo_batch_dates

    tpl = gs1.CodeTemplate.build(FULL)
    dates = demo_batch_dates(tpl, "281231", today=date(2026, 1, 15))
    assert dates == {"production_date": "260115", "packaging_date": "260115", "best_before": "281231", "sell_by": "281231"}
    tpl.check_batch(GTIN, {"lot": "L1", "expiry": "281231", **dates})
    assert demo_batch_dates(gs1.CodeTemplate.build(["01", "17", "10", "21"]), "281231") == {}
