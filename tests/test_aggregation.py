"""Case and pallet stations through real components.

CameraSim renders one frame with every unit code of the open case -> frame
folder -> camera driver (zxing-cpp) -> case runtime -> store; the case label
goes to a ZPL printer simulator over TCP through the ZPL driver and, where a
label reader is configured, is read back by a scanner driver. Each rejection
is checked in the store: the reason alarm, the voided SSCC, and the units
left free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from engine_helpers import wait_for
from test_aggregation_support import CP, EXPIRY, GTIN, LOT, Rig, commission, new_batch, sim_unit, unit_code

from linectl import gs1
from linectl.engine.rework import check_hierarchy, decommission_unit
from linectl.events import ChildRef, ContainerCommissioned, Packed
from linectl.store.trace import unit_facts


def outbox(store: Any, kind: str | None = None) -> list[Any]:
    rows = store.outbox(0, 100000, only_unforwarded=False)
    return [r for r in rows if kind is None or r.kind == kind]


def alarms(store: Any, code: str = "case_rejected") -> list[str]:
    return [r.event.message for r in outbox(store, "alarm") if r.event.code == code]


def free(store: Any, serials: list[str], gtin: str = GTIN) -> bool:
    facts = unit_facts(store, [(gtin, s) for s in serials])
    return all(f.state == "commissioned" and f.parent is None for f in facts.values())


async def test_case_of_120_units_from_one_camera_frame(tmp_path: Path) -> None:
    rig = await Rig(tmp_path, per_case=120, label_reader=True).start()
    try:
        await rig.create_batch()
        serials = await commission(rig.store, 120)
        res = await rig.frame([sim_unit(i, s) for i, s in enumerate(serials, 1)])
        assert res.ok and res.count == 120 and res.reason is None
        sscc = gs1.make_sscc(0, CP, 1)
        assert res.sscc == sscc
        # the label: SSCC as GS1 DataMatrix and GS1-128, plus product, GTIN, lot, expiry, count as text
        label = rig.zpl_sim.printed[-1]
        assert label.dm == ("]d2", "00" + sscc)
        assert label.gs1_128 == "00" + sscc
        assert label.texts == [f"(00){sscc}", "Aspirin 100 mg x 20", GTIN, LOT, EXPIRY, "120"]
        assert rig.label_scans == ["00" + sscc]
        # one transaction: ContainerCommissioned and Packed are consecutive outbox rows
        cc, pk = outbox(rig.store, "container_commissioned"), outbox(rig.store, "packed")
        assert len(cc) == 1 and len(pk) == 1 and pk[0].seq == cc[0].seq + 1
        assert cc[0].event == ContainerCommissioned(
            event_id=cc[0].event.event_id, event_time=cc[0].event.event_time, sscc=sscc, level="case", gtin=GTIN, lot=LOT, station="casepacker"
        )
        assert pk[0].event.parent == sscc
        assert sorted(pk[0].event.children, key=lambda c: c.serial or "") == [ChildRef(gtin=GTIN, serial=s) for s in sorted(serials)]
        assert rig.store.container(sscc).state == "commissioned"
        assert all(f.parent == sscc for f in unit_facts(rig.store, [(GTIN, s) for s in serials]).values())
        assert rig.rt.snapshot()["counters"]["recorded"] == 1
        assert check_hierarchy(rig.store) == []
    finally:
        await rig.stop()


async def test_case_failures_reject_the_whole_case_and_leave_units_free(tmp_path: Path) -> None:
    rig = await Rig(tmp_path, per_case=4).start()  # no label reader: the printer's confirmation proves the label
    try:
        await rig.create_batch()
        s = await commission(rig.store, 40)
        await new_batch(rig.store, "LOTB")
        foreign = await commission(rig.store, 1, lot="LOTB")
        await decommission_unit(rig.store, unit_code(s[39]).hri, "cli:qa", detail="crushed")
        seq = iter(range(1, 1000))

        def units(serials: list[str], **kw: Any) -> list[Any]:
            return [sim_unit(next(seq), x, **kw) for x in serials]

        ok = await rig.frame(units(s[0:4]))
        assert ok.ok and ok.sscc == gs1.make_sscc(0, CP, 1)
        cases: list[tuple[str, list[Any], str]] = [
            ("already_packed", units([s[0]] + s[4:7]), "in " + ok.sscc),  # the same unit in a second case
            ("other_batch", units(s[7:10]) + units(foreign, lot="LOTB"), "lot LOTB"),
            ("decommissioned", units(s[10:13] + [s[39]]), s[39]),
            ("count_short", units(s[13:16]), "3 read, case holds 4"),  # missing unit
            ("count_over", units(s[16:21]), "5 read, case holds 4"),  # extra unit
            ("duplicate", units([s[21], s[21], s[22], s[23]]), s[21]),
            ("count_short", units(s[24:27]) + [sim_unit(next(seq), s[27], extras={"damage": "partial"})], "3 read"),  # unreadable code
            ("unreadable", units(s[28:31]) + [sim_unit(next(seq), s[31], symbology="]d1")], "not GS1 DataMatrix: symbology ]d1"),  # plain DataMatrix
            ("unknown", units(s[32:35]) + units(["NEVERISSUED1"]), "NEVERISSUED1"),
        ]
        for reason, frame, detail in cases:
            res = await rig.frame(frame)
            assert (res.ok, res.reason) == (False, reason), res
            assert detail in res.detail, res
            assert res.sscc is None  # rejected on content: no SSCC was spent
        assert [f"case rejected ({r})" in m for (r, _, _), m in zip(cases, alarms(rig.store))] == [True] * len(cases)
        assert free(rig.store, s[4:39])
        assert rig.store.container(ok.sscc).state == "commissioned"
        assert len(outbox(rig.store, "container_commissioned")) == 1 and len(rig.zpl_sim.printed) == 1
        # after all that the station still packs a good case (s[4] was only in a rejected case)
        again = await rig.frame(units(s[4:8]))
        assert again.ok and again.sscc == gs1.make_sscc(0, CP, 2)
        assert check_hierarchy(rig.store) == []
        snap = rig.rt.snapshot()["counters"]
        assert snap["recorded"] == 2 and snap["rejected_total"] == len(cases)
    finally:
        await rig.stop()


async def test_bad_and_unreadable_labels_void_the_sscc(tmp_path: Path) -> None:
    rig = await Rig(tmp_path, per_case=3, label_reader=True, label_timeout_s=2.0).start()
    try:
        await rig.create_batch()
        s = await commission(rig.store, 9)
        other = gs1.make_sscc(0, CP, 999)
        rig.label_override = lambda label: "00" + other  # label camera reads a different SSCC (wrong label applied)
        bad = await rig.frame([sim_unit(i, x) for i, x in enumerate(s[0:3], 1)])
        assert (bad.ok, bad.reason) == (False, "label_mismatch") and other in bad.detail
        rig.label_override = lambda label: "NOREAD"
        unread = await rig.frame([sim_unit(i, x) for i, x in enumerate(s[3:6], 10)])
        assert (unread.ok, unread.reason) == (False, "label_unreadable")
        rig.label_override = None
        good = await rig.frame([sim_unit(i, x) for i, x in enumerate(s[6:9], 20)])
        assert good.ok
        for res in (bad, unread):
            c = rig.store.container(res.sscc)
            assert c is not None and c.state == "decommissioned"  # voided, never reused
        assert [bad.sscc, unread.sscc, good.sscc] == [gs1.make_sscc(0, CP, n) for n in (1, 2, 3)]
        voids = outbox(rig.store, "container_decommissioned")
        assert [v.event.sscc for v in voids] == [bad.sscc, unread.sscc]
        assert all(not v.event.commissioned and "label_" in v.event.reason for v in voids)
        assert free(rig.store, s[0:6])
        assert len(alarms(rig.store)) == 2
    finally:
        await rig.stop()


async def test_printer_fault_mid_label_rejects_and_voids(tmp_path: Path) -> None:
    rig = await Rig(tmp_path, per_case=2, print_time_s=0.4, label_timeout_s=1.5).start()
    try:
        await rig.create_batch()
        s = await commission(rig.store, 4)
        # the head opens while the label is being printed
        rig.cam_sim.present_many([sim_unit(1, s[0]), sim_unit(2, s[1])])
        await wait_for(lambda: rig.zpl_sim.current is not None, 10, "label printing")
        rig.zpl_sim.inject("head_open")
        await wait_for(lambda: rig.rt.recent, 10, "decision")
        res = rig.rt.recent[-1]
        assert not res.ok and res.reason in ("label_print_failed", "label_unconfirmed"), res
        assert rig.store.container(res.sscc).state == "decommissioned"
        assert free(rig.store, s[0:2])
        rig.zpl_sim.inject("clear_fault")
        await wait_for(lambda: rig.drivers["labeler"].health.state.value == "connected", 5, "printer back")
        good = await rig.frame([sim_unit(3, s[2]), sim_unit(4, s[3])])
        assert good.ok and good.sscc != res.sscc
    finally:
        await rig.stop()


async def test_partial_case_at_batch_end_on_command(tmp_path: Path) -> None:
    rig = await Rig(tmp_path, per_case=4).start()
    try:
        await rig.create_batch()
        s = await commission(rig.store, 3)
        short = await rig.frame([sim_unit(i, x) for i, x in enumerate(s, 1)])
        assert short.reason == "count_short"
        assert await rig.rt.close_partial() == {"armed": True}
        res = await rig.frame([sim_unit(i, x) for i, x in enumerate(s, 10)])
        assert res.ok and res.partial and res.count == 3
        assert rig.zpl_sim.printed[-1].texts[-1] == "3"
        assert rig.rt.snapshot()["counters"]["partial"] == 1
    finally:
        await rig.stop()


async def test_scanner_mode_case_complete_at_count_noread_and_partial(tmp_path: Path) -> None:
    rig = await Rig(tmp_path, per_case=3, reader="scanner").start()
    try:
        assert rig.rt.mode == "scan"
        await rig.create_batch()
        s = await commission(rig.store, 8)
        codes = [unit_code(x).element_string for x in s]
        res = await rig.scan(codes[0:3])
        assert res.ok and res.count == 3
        res = await rig.scan([codes[3], "NOREAD"])
        assert (res.ok, res.reason) == (False, "unreadable")
        await rig.scan(codes[4:6], expect_decision=False)
        assert rig.rt.snapshot()["open"] == 2
        res = await rig.rt.close_partial()
        assert res["ok"] and res["partial"] and res["count"] == 2
        assert free(rig.store, [s[3], s[6], s[7]])
    finally:
        await rig.stop()


async def _cases(store: Any, n: int, per_case: int = 2, lot: str = LOT) -> list[str]:
    serials = await commission(store, n * per_case, lot=lot)
    refs = await store.next_sscc_refs(CP, 0, n)
    out = []
    for i, ref in enumerate(refs):
        sscc = gs1.make_sscc(0, CP, ref)
        kids = [ChildRef(gtin=GTIN, serial=x) for x in serials[i * per_case : (i + 1) * per_case]]
        await store.append(ContainerCommissioned(sscc=sscc, level="case", gtin=GTIN, lot=lot), Packed(parent=sscc, children=kids, lot=lot))
        out.append(sscc)
    return out


async def test_pallet_station_scans_case_labels(tmp_path: Path) -> None:
    rig = await Rig(tmp_path, per_case=3, reader="scanner", pallet=True, label_reader=True).start()
    try:
        await rig.create_batch()
        cases = await _cases(rig.store, 8)
        await new_batch(rig.store, "LOTB")
        (foreign,) = await _cases(rig.store, 1, lot="LOTB")
        label = {c: "00" + c for c in cases + [foreign]}
        res = await rig.scan([label[c] for c in cases[0:3]])
        assert res.ok and res.sscc == gs1.make_sscc(1, CP, 1)
        assert rig.zpl_sim.printed[-1].dm == ("]d2", "00" + res.sscc)
        (pk,) = [r for r in outbox(rig.store, "packed") if r.event.parent == res.sscc]
        assert pk.event.children == [ChildRef(sscc=c) for c in cases[0:3]]
        for codes, reason in (
            ([label[cases[3]], label[cases[4]], label[foreign]], "other_batch"),
            ([label[cases[0]], label[cases[5]], label[cases[6]]], "already_packed"),
            (["00" + res.sscc, label[cases[5]], label[cases[6]]], "wrong_level"),  # a pallet label on a pallet
            ([unit_code("X1").element_string, label[cases[5]], label[cases[6]]], "unreadable"),  # a unit, not an SSCC
        ):
            bad = await rig.scan(codes)
            assert (bad.ok, bad.reason) == (False, reason), bad
        assert alarms(rig.store, "pallet_rejected") and check_hierarchy(rig.store) == []
        again = await rig.scan([label[c] for c in cases[3:6]])
        assert again.ok
    finally:
        await rig.stop()


async def test_no_batch_means_no_aggregation(tmp_path: Path) -> None:
    rig = await Rig(tmp_path, per_case=2).start()
    try:
        res = await rig.frame([sim_unit(1, "A1"), sim_unit(2, "A2")])
        assert (res.ok, res.reason) == (False, "no_batch")
    finally:
        await rig.stop()


@pytest.mark.parametrize("level", ["case"])
async def test_station_snapshot_shape(tmp_path: Path, level: str) -> None:
    rig = await Rig(tmp_path, per_case=2).start()
    try:
        snap = rig.rt.snapshot()
        assert snap["type"] == level and snap["mode"] == "frame" and snap["target"] == 2
        assert set(rig.rt.tasks()) == {"casepacker.reads", "casepacker.label_confirms"}
    finally:
        await rig.stop()
