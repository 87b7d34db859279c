"""A product whose code_template prints the production date (11), on the simulated line end to end.

The simulator's ground truth is what the printer physically put on each pack: every printed code carries
(11) with the batch's production date, every good unit is commissioned with it in the record and the EPCIS
ILMD, and a pack printed with a wrong (11) (the simulator's data_mismatch defect, which damages each
per-batch AI of the template in turn) is rejected for data_mismatch naming the production date.
"""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import pytest
from engine_helpers import (
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

from linectl import control as C
from linectl import epcis, gs1
from linectl.demo import DEFAULT_CONFIG
from linectl.events import UnitCommissioned, UnitDecommissioned
from linectl.yamlsource import load_yaml, to_plain

TEMPLATE = ["01", "11", "17", "10", "21"]


def _base(tmp_path: Path) -> Path:
    raw = to_plain(load_yaml(DEFAULT_CONFIG))
    raw["products"][0]["code_template"] = TEMPLATE
    raw["products"][0]["shelf_life_days"] = 1100
    path = tmp_path / "tpl-base.yaml"
    with open(path, "w", encoding="utf-8") as fh:
        YAML(typ="safe").dump(raw, fh)
    return path


async def test_production_date_printed_verified_and_reported(tmp_path):
    rules = {"consecutive_reject_limit": 10_000, "no_read_limit": 10_000}
    produced = date.today() - timedelta(days=3)
    prod = produced.strftime("%y%m%d")
    expiry = (produced + timedelta(days=1000)).strftime("%y%m%d")
    async with simulated_line(tmp_path, rate=1200, seed=5, rules=rules, simulation={"variation_rate": 0.0}, base=_base(tmp_path)) as sl:
        product = sl.cfg.products[0]
        assert product.template.ais == tuple(TEMPLATE)
        # a template that prints (11) refuses a batch without its production date: nothing is ever printed empty
        with pytest.raises(C.CommandRejected) as ei:
            await sl.line.execute(C.CreateBatch(lot="NOPROD", gtin=product.gtin, expiry=expiry, planned_qty=10, challenge=False, actor="t"), origin="test")
        assert ei.value.code == "missing_dates" and "production_date" in ei.value.reason and "(11)" in ei.value.reason, ei.value.reason
        assert sl.daemon.store.batch("NOPROD") is None
        lot = "TPL11"
        await sl.line.execute(
            C.CreateBatch(lot=lot, gtin=product.gtin, expiry=expiry, production_date=prod, planned_qty=400, challenge=False, actor="t"),
            origin="test",
        )
        await sim(sl, cmd="set", defect_rate=0.25, defect_mix={"data_mismatch": 1})
        await sl.start_batch()
        await wait_for(lambda: station(sl).counters.production_units >= 120, 60, "120 units")
        await sl.line.execute(C.StopBatch(actor="test", reason="test done"), origin="test")
        await wait_stopped(sl)
        await settle(sl)
        report = await close_batch(sl)
        units = await gate_units(sl)
        events = lot_events(sl.daemon.store, lot)
        states = serial_states(sl.db, lot)
        rendered = [r.epcis for r in sl.daemon.store.events_of_lot(lot, 0, 10000) if r.kind == "unit_commissioned"]

    check_report(report)
    assert report["dates"] == {"production_date": prod}, report  # the batch record names the date it printed
    unit_ledger(units, events, states).assert_ok()
    printed = [u for u in units if u["content"] and not u.get("challenge")]
    assert len(printed) >= 100, len(printed)
    decom = {e.seq: e for e in events if isinstance(e, UnitDecommissioned) and e.seq is not None}
    wrong_11 = 0
    for u in printed:
        code = gs1.parse(u["content"])
        assert code.get("11") is not None, f"printed without (11): {u['content']!r}"
        if u["defect"] == "data_mismatch":
            ai = u["wrong_ai"]
            assert ai in ("10", "11", "17") and code.get(ai) is not None, u
            assert u["outcome"] == "rejected", u
            ev = decom[u["seq"]]
            assert ev.reason.value == "data_mismatch", (u, ev)
            assert gs1.AI_NAMES[ai] in ev.detail and f"({ai})" in ev.detail, ev.detail
            if ai == "11":
                wrong_11 += 1
                assert code.get("11") != prod and f"expected '{prod}'" in ev.detail, ev.detail
        elif u["outcome"] == "passed":
            assert code.get("11") == prod and code.get("17") == expiry and code.get("10") == lot, u["content"]
    assert wrong_11 >= 3, f"too few packs with a wrong (11) to prove the check: {wrong_11}"
    good = [e for e in events if isinstance(e, UnitCommissioned)]
    assert good and all(e.dates == {"production_date": prod} for e in good)
    # the stored EPCIS rendering of each commissioning carries the production date in its ILMD, schema-valid
    assert len(rendered) == len(good) and all(rendered)
    rows = [json.loads(r) for r in rendered]
    assert all(r["ilmd"]["gs1:productionDate"] == produced.isoformat() for r in rows)
    assert all(r["ilmd"]["cbvmda:lotNumber"] == lot and r["ilmd"]["cbvmda:itemExpirationDate"] for r in rows)
    assert epcis.default_validator().problems(epcis.build_document(rows)) == []
