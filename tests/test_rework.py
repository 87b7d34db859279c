"""Rework operations: exact events with the actor, refusals that change nothing, invariants under random sequences."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import wait_for
from test_aggregation_support import CP, FAST, GTIN, LOT, commission, config, new_batch, open_store, unit_code

from linectl import cli, gs1
from linectl.engine import rework as R
from linectl.events import ChildRef, ContainerCommissioned, Packed
from linectl.store.trace import trace, unit_facts


async def make_case(store: Any, serials: list[str], lot: str = LOT, gtin: str = GTIN, ext: int = 0) -> str:
    (ref,) = await store.next_sscc_refs(CP, ext, 1)
    sscc = gs1.make_sscc(ext, CP, ref)
    await store.append(ContainerCommissioned(sscc=sscc, level="case", gtin=gtin, lot=lot),
                       Packed(parent=sscc, children=[ChildRef(gtin=gtin, serial=s) for s in serials], lot=lot))
    return sscc


async def make_pallet(store: Any, cases: list[str], lot: str = LOT) -> str:
    (ref,) = await store.next_sscc_refs(CP, 1, 1)
    sscc = gs1.make_sscc(1, CP, ref)
    await store.append(ContainerCommissioned(sscc=sscc, level="pallet", gtin=GTIN, lot=lot),
                       Packed(parent=sscc, children=[ChildRef(sscc=c) for c in cases], lot=lot))
    return sscc


def new_rows(store: Any, after: int) -> list[Any]:
    return store.outbox(after, 10000, only_unforwarded=False)


def hri(serial: str, lot: str = LOT, gtin: str = GTIN) -> str:
    return unit_code(serial, lot, gtin).hri


async def test_each_operation_is_one_transaction_with_the_actor(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "r.db")
    try:
        await new_batch(store)
        u = await commission(store, 8)
        c1 = await make_case(store, u[0:3])
        c2 = await make_case(store, u[3:5])
        pal = await make_pallet(store, [c1, c2])
        last = store.last_seq()

        res = await R.remove_unit(store, hri(u[0]), "cli:alice")
        assert res == {"op": "remove", "gtin": GTIN, "serial": u[0], "parent": c1, "events": ["unpacked"]}
        (row,) = new_rows(store, last)
        assert (row.event.parent, row.event.children, row.event.actor) == (c1, [ChildRef(gtin=GTIN, serial=u[0])], "cli:alice")
        last = row.seq

        res = await R.replace_unit(store, hri(u[1]), hri(u[5]), "cli:bob", decommission_old=True, detail="torn")
        rows = new_rows(store, last)
        assert [r.kind for r in rows] == ["unpacked", "packed", "unit_decommissioned"] == res["events"]
        assert rows[2].event.destroyed and rows[2].event.reason.value == "damaged" and rows[2].event.detail == "torn"
        assert {r.event.actor for r in rows} == {"cli:bob"}
        assert unit_facts(store, [(GTIN, u[5])])[(GTIN, u[5])].parent == c1
        last = rows[-1].seq

        res = await R.add_unit(store, c1, hri(u[0]), "cli:alice")
        assert res["events"] == ["packed"] and unit_facts(store, [(GTIN, u[0])])[(GTIN, u[0])].parent == c1

        res = await R.decommission_unit(store, hri(u[3]), "cli:carol")
        assert res["events"] == ["unpacked", "unit_decommissioned"] and res["parent"] == c2
        t = trace(store, hri(u[3]))
        assert t["status"] == "decommissioned" and t["parent"] is None

        last = store.last_seq()
        res = await R.dissolve(store, "(00)" + c2, "cli:dave")
        rows = new_rows(store, last)
        assert [r.kind for r in rows] == ["unpacked", "unpacked", "container_decommissioned"]
        assert rows[0].event.parent == pal and rows[0].event.children == [ChildRef(sscc=c2)]
        assert rows[1].event.parent == c2 and rows[1].event.children == [ChildRef(gtin=GTIN, serial=u[4])]
        assert rows[2].event.commissioned and rows[2].event.reason == "dissolved"
        assert store.container(c2).state == "decommissioned"

        res = await R.reprint_label(store, c1, "cli:erin")
        assert res["confirmed"] is None
        audit = store.audit_log(0, 100000)
        assert audit[-1].action == R.REPRINT_ACTION and audit[-1].actor == "cli:erin" and audit[-1].detail["sscc"] == c1
        # every rework event is in the audit trail with who did it
        actors = [a.actor for a in audit if a.action in ("unpacked", "packed", "unit_decommissioned", "container_decommissioned")]
        assert actors == ["cli:alice", "cli:bob", "cli:bob", "cli:bob", "cli:alice", "cli:carol", "cli:carol", "cli:dave", "cli:dave", "cli:dave"]
        assert store.verify_audit().ok
        assert R.check_hierarchy(store) == []
    finally:
        await store.close()


async def test_refusals_name_the_reason_and_change_nothing(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "r.db")
    try:
        await new_batch(store)
        await new_batch(store, "LOTB")
        u = await commission(store, 6)
        (b,) = await commission(store, 1, lot="LOTB")
        c1 = await make_case(store, u[0:2])
        c2 = await make_case(store, u[2:4])
        pal = await make_pallet(store, [c1])
        await R.decommission_unit(store, hri(u[5]), "cli:x")
        last = store.last_seq()
        attempts = [
            (R.remove_unit(store, hri(u[4]), "cli:x"), "not_packed"),
            (R.remove_unit(store, "(00)" + c1, "cli:x"), "not_a_unit"),
            (R.remove_unit(store, hri("NOPE"), "cli:x"), "unknown"),
            (R.add_unit(store, c1, hri(u[2]), "cli:x"), "already_packed"),
            (R.add_unit(store, c1, hri(b, "LOTB"), "cli:x"), "other_batch"),
            (R.add_unit(store, c1, hri(u[5]), "cli:x"), "not_commissioned"),
            (R.add_unit(store, pal, hri(u[4]), "cli:x"), "wrong_level"),
            (R.replace_unit(store, hri(u[0]), hri(u[2]), "cli:x"), "already_packed"),
            (R.replace_unit(store, hri(u[0]), hri(u[0]), "cli:x"), "same_unit"),
            (R.replace_unit(store, hri(u[4]), hri(u[0]), "cli:x"), "not_packed"),
            (R.decommission_unit(store, hri(u[5]), "cli:x"), "not_commissioned"),
            (R.dissolve(store, hri(u[0]), "cli:x"), "not_a_container"),
            (R.dissolve(store, gs1.make_sscc(0, CP, 99), "cli:x"), "unknown"),
            (R.reprint_label(store, gs1.make_sscc(0, CP, 99), "cli:x"), "unknown"),
        ]
        for coro, code in attempts:
            with pytest.raises(R.ReworkError) as ei:
                await coro
            assert ei.value.code == code, (code, ei.value.message)
        assert store.last_seq() == last
        await R.dissolve(store, c2, "cli:x")
        with pytest.raises(R.ReworkError) as ei:
            await R.reprint_label(store, c2, "cli:x")
        assert ei.value.code == "not_commissioned"
        assert R.check_hierarchy(store) == []
    finally:
        await store.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_rework_sequences_keep_the_invariants(tmp_path: Path, seed: int) -> None:
    """Property: whatever an operator does, in any order, the hierarchy stays consistent after every step."""
    rng = random.Random(seed)
    store = await open_store(tmp_path / f"p{seed}.db")
    try:
        await new_batch(store)
        await new_batch(store, "LOTB")
        units = await commission(store, 30)
        other = await commission(store, 4, lot="LOTB")
        cases = [await make_case(store, units[i : i + 4]) for i in range(0, 16, 4)]
        pallets = [await make_pallet(store, cases[0:2])]
        codes = [hri(s) for s in units] + [hri(s, "LOTB") for s in other] + [hri("GHOST1")]
        done: dict[str, int] = {}
        for step in range(120):
            op = rng.choice(["remove", "add", "replace", "dissolve", "decommission", "reprint"])
            c = rng.choice(cases + pallets)
            try:
                if op == "remove":
                    await R.remove_unit(store, rng.choice(codes), "cli:p")
                elif op == "add":
                    await R.add_unit(store, c, rng.choice(codes), "cli:p")
                elif op == "replace":
                    await R.replace_unit(store, rng.choice(codes), rng.choice(codes), "cli:p", decommission_old=rng.random() < 0.3)
                elif op == "dissolve":
                    await R.dissolve(store, c, "cli:p", void_sscc=rng.random() < 0.5)
                elif op == "decommission":
                    await R.decommission_unit(store, rng.choice(codes), "cli:p")
                else:
                    await R.reprint_label(store, c, "cli:p")
                done[op] = done.get(op, 0) + 1
            except R.ReworkError:
                done["refused"] = done.get("refused", 0) + 1
            if rng.random() < 0.1:  # the line keeps packing new cases from free units in between
                free = [s for s in units if (f := unit_facts(store, [(GTIN, s)])[(GTIN, s)]).state == "commissioned" and f.parent is None]
                if len(free) >= 2:
                    cases.append(await make_case(store, rng.sample(free, 2)))
            assert R.check_hierarchy(store) == [], (step, op)
        assert done.get("refused", 0) > 0 and sum(v for k, v in done.items() if k != "refused") > 20
        assert store.verify_audit().ok
    finally:
        await store.close()


async def test_rework_station_driven_by_scanner(tmp_path: Path) -> None:
    from linectl.daemon import build_drivers
    from linectl.engine.line import Line
    from linectl.simulators.printer import ZplPrinterSim
    from linectl.simulators.scanner import ScannerSim

    zpl = ZplPrinterSim(port=0, print_time_s=0.01)
    scan = ScannerSim(port=0)
    await zpl.start()
    await scan.start()
    cfg = config(
        {"bench_scanner": {"driver": "scanner", "host": "127.0.0.1", "port": scan.port, **FAST},
         "bench_printer": {"driver": "zpl", "host": "127.0.0.1", "port": zpl.port, "status_interval_s": 0.05, "settle_s": 0.1,
                           "text_fields": ["product", "count"], **FAST}},
        [{"type": "rework", "name": "rework1", "scanner": "bench_scanner", "printer": "bench_printer"}],
    )
    store = await open_store(tmp_path / "r.db", cfg)
    drivers = build_drivers(cfg)
    line = Line(cfg, store, drivers)
    (rt,) = line.stations
    tasks = []
    try:
        await new_batch(store)
        u = await commission(store, 4)
        c1 = await make_case(store, u[0:2])
        for d in drivers.values():
            await d.start()
            assert await d.wait_connected(5)
        tasks = [asyncio.create_task(f()) for f in rt.tasks().values()]

        async def do(data: str, sym: str = "]d2") -> dict[str, Any]:
            n = len(rt.results)
            scan.scan(data, sym)
            await wait_for(lambda: len(rt.results) > n, 10, f"result of {data}")
            return rt.results[-1]

        assert (await do("LINECTL:OPERATOR=jdoe", "]Q1"))["operator"] == "jdoe"
        inspected = await do(unit_code(u[0]).element_string)
        assert inspected["op"] == "inspect" and inspected["verdict"] == "genuine"
        assert (await do("LINECTL:MODE=remove", "]Q1"))["mode"] == "remove"
        res = await do(unit_code(u[0]).element_string)
        assert res["ok"] and res["parent"] == c1 and res["actor"] == "jdoe"
        assert (await do(unit_code(u[0]).element_string))["code"] == "not_packed"
        await do("LINECTL:MODE=replace", "]Q1")
        step = await do(unit_code(u[1]).element_string)
        assert step["step"] == "old_scanned"
        res = await do(unit_code(u[2]).element_string)
        assert res["ok"] and res["events"] == ["unpacked", "packed"]
        await do("LINECTL:MODE=reprint", "]Q1")
        res = await do("00" + c1, "]C1")
        assert res["ok"] and res["confirmed"] is True
        assert zpl.printed[-1].dm == ("]d2", "00" + c1)
        assert zpl.printed[-1].texts == [f"(00){c1}", "Aspirin 100 mg x 20", "1"]  # same SSCC, content as it is now
        rows = [r for r in store.outbox(0, 10000, only_unforwarded=False) if r.kind in ("unpacked", "packed", "unit_inspected")]
        assert [(r.kind, r.event.actor, r.event.station) for r in rows[-4:]] == [
            ("unit_inspected", "jdoe", "rework1"), ("unpacked", "jdoe", "rework1"), ("unpacked", "jdoe", "rework1"), ("packed", "jdoe", "rework1")]
        reprint = [a for a in store.audit_log(0, 10000) if a.action == R.REPRINT_ACTION][-1]
        assert reprint.actor == "jdoe" and reprint.origin == "station:rework1" and reprint.detail["confirmed"] is True
        assert rt.snapshot()["counts"]["remove_ok"] == 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for d in drivers.values():
            await d.stop()
        await zpl.stop()
        await scan.stop()
        await store.close()


def test_cli_rework_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "r.db"

    async def setup() -> tuple[list[str], str]:
        store = await open_store(db)
        await new_batch(store)
        u = await commission(store, 4)
        c = await make_case(store, u[0:2])
        await store.close()
        return u, c

    u, c = asyncio.run(setup())
    assert cli.main(["rework", "remove", hri(u[0]), "--db", str(db), "--actor", "alice"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["parent"] == c
    assert cli.main(["rework", "remove", hri(u[0]), "--db", str(db), "--actor", "alice"]) == 1
    assert json.loads(capsys.readouterr().out)["code"] == "not_packed"
    assert cli.main(["rework", "replace", hri(u[1]), hri(u[2]), "--decommission-old", "--db", str(db), "--actor", "bob"]) == 0
    assert json.loads(capsys.readouterr().out)["events"] == ["unpacked", "packed", "unit_decommissioned"]
    assert cli.main(["rework", "add", c, hri(u[3]), "--db", str(db), "--actor", "bob"]) == 0
    assert cli.main(["rework", "decommission", hri(u[0]), "--detail", "crushed", "--db", str(db), "--actor", "carol"]) == 0
    assert cli.main(["rework", "reprint", c, "--db", str(db), "--actor", "dan"]) == 0
    assert cli.main(["rework", "dissolve", c, "--db", str(db), "--actor", "erin"]) == 0
    capsys.readouterr()
    assert cli.main(["rework", "check", "--db", str(db)]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "problems": []}
    assert cli.main(["rework", "remove", "garbage", "--db", str(db), "--actor", "x"]) == 1
    assert cli.main(["rework", "remove", hri(u[0]), "--db", str(db), "--actor", " "]) == 2
    assert cli.main(["rework", "remove", hri(u[0]), "--db", str(tmp_path / "missing.db"), "--actor", "x"]) == 3

    async def audit() -> list[str]:
        from linectl.store import Store

        store = await Store.open(db, readonly=True)
        try:
            return [a.actor for a in store.audit_log(0, 1000) if a.actor.startswith("cli:")]
        finally:
            await store.close()

    actors = asyncio.run(audit())
    assert {"cli:alice", "cli:bob", "cli:carol", "cli:dan", "cli:erin"} <= set(actors)
