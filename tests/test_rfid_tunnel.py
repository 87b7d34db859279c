"""RFID tunnel at the case station, against the LLRP reader simulator over real TCP (tests/rfid_support.py).

Every decision is compared with the simulator's ground truth (`LlrpReaderSim.windows`: what was physically
in the field during each window, which tags were dead or stray) and with the store and the PLC's reject
pusher (`PlcSim.case_decisions`, over Modbus TCP).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from engine_helpers import wait_for
from rfid_support import TunnelRig, unit_epc
from test_aggregation_support import CP, GTIN, new_batch, sim_unit

from linectl import epc, gs1
from linectl.drivers.plc_tags import CASE_ACCEPT, CASE_REJECT
from linectl.engine.rework import check_hierarchy
from linectl.simulators.llrp_reader import FieldTag
from linectl.store.trace import unit_facts

pytestmark = pytest.mark.timeout(120)


def alarms(store: Any, code: str) -> list[str]:
    rows = store.outbox(0, 100000, only_unforwarded=False)
    return [r.event.message for r in rows if r.kind == "alarm" and r.event.code == code]


def packed(store: Any, sscc: str) -> set[tuple[str, str]]:
    rows = store.outbox(0, 100000, only_unforwarded=False)
    (pk,) = [r.event for r in rows if r.kind == "packed" and r.event.parent == sscc]
    return {(c.gtin, c.serial) for c in pk.children}


def free(store: Any, serials: list[str]) -> bool:
    facts = unit_facts(store, [(GTIN, s) for s in serials])
    return len(facts) == len(serials) and all(f.state == "commissioned" and f.parent is None for f in facts.values())


def last_window(rig: TunnelRig) -> Any:
    return rig.reader_sim.windows[-1]


@pytest.fixture
async def rig(tmp_path: Path) -> Any:
    r = await TunnelRig(tmp_path).start()
    try:
        await r.create_batch()
        yield r
    finally:
        await r.stop()


async def test_complete_case_is_packed_from_one_window(rig: TunnelRig) -> None:
    serials = await rig.commission(6)
    res = await rig.case([unit_epc(s) for s in serials])
    assert res.ok and res.count == 6 and res.strays == [], res
    assert res.sscc == gs1.make_sscc(0, CP, 1)
    assert packed(rig.store, res.sscc) == {(GTIN, s) for s in serials}
    # one ROSpec run for the case, and it saw exactly the case's tags
    (truth,) = rig.reader_sim.windows
    assert truth.reported == truth.readable == {unit_epc(s).lower() for s in serials}
    # the PLC's reject pusher was told over Modbus: accept
    await wait_for(lambda: len(rig.plc_sim.case_decisions) == 1, 5, "pusher decision")
    assert rig.plc_sim.case_decisions[-1][1] == CASE_ACCEPT
    snap = rig.rt.snapshot()
    assert snap["rfid"]["counters"]["windows"] == 1 and snap["rfid"]["decision_ms"]["count"] == 1
    assert check_hierarchy(rig.store) == []


async def test_stray_tags_are_excluded_and_reported_not_a_reason(rig: TunnelRig) -> None:
    serials = await rig.commission(8)
    case, neighbour = serials[:6], serials[6]
    tags: list[FieldTag | str] = [unit_epc(s) for s in case]
    tags.append(FieldTag(unit_epc(neighbour), rssi=-72, stray=True))  # the next case's unit at the edge of the field
    tags.append(FieldTag("33" + "4" * 22, rssi=-75, stray=True))  # a returnable asset's GRAI-96 tag, far away: no unit, not our case
    res = await rig.case(tags)
    truth = last_window(rig)
    assert truth.where(stray=True) == {unit_epc(neighbour).lower(), "33" + "4" * 22}
    assert truth.reported >= truth.where(stray=True), "the reader did report the strays: the station excluded them"
    assert res.ok and res.count == 6, res
    assert len(res.strays) == 2 and all("weaker than rfid_min_rssi -65" in s for s in res.strays)
    assert packed(rig.store, res.sscc) == {(GTIN, s) for s in case}
    assert free(rig.store, [neighbour])
    (msg,) = alarms(rig.store, "rfid_stray_tags")
    assert res.sscc in msg and "2 stray tag(s)" in msg
    # the case's record names its strays: the durable label intent written before the label
    (intent,) = [a for a in rig.store.audit_log() if a.action == "sscc_label_printing"]
    assert intent.detail["sscc"] == res.sscc and intent.detail["strays"] == res.strays


async def test_missing_tag_rejects_the_case_never_packed_short(rig: TunnelRig) -> None:
    serials = await rig.commission(12)
    # a dead tag: the unit is in the case, its tag does not answer
    tags: list[FieldTag | str] = [unit_epc(s) for s in serials[:5]] + [FieldTag(unit_epc(serials[5]), dead=True)]
    res = await rig.case(tags)
    assert rig.reader_sim.windows[-1].where(dead=True) == {unit_epc(serials[5]).lower()}
    assert (res.ok, res.reason, res.sscc) == (False, "count_short", None), res
    assert "5 read, case holds 6" in res.detail
    # a unit missing from the case: five tags in the field
    res2 = await rig.case([unit_epc(s) for s in serials[6:11]])
    assert (res2.ok, res2.reason) == (False, "count_short")
    assert free(rig.store, serials)
    assert len(alarms(rig.store, "case_rejected")) == 2
    await wait_for(lambda: len(rig.plc_sim.case_decisions) == 2, 5, "pusher decisions")
    assert [r for _, r in rig.plc_sim.case_decisions] == [CASE_REJECT, CASE_REJECT]
    assert rig.rt.snapshot()["counters"]["recorded"] == 0


async def test_previous_case_tag_lingering_into_the_next_window(rig: TunnelRig) -> None:
    s = await rig.commission(23)
    a = await rig.case([unit_epc(x) for x in s[:6]], leave=False)
    assert a.ok
    # case A leaves the tunnel, except one tag that stays in the field for one more window
    for x in s[:6]:
        rig.reader_sim.field_leave(unit_epc(x), after_windows=1 if x == s[0] else 0)
    b = await rig.case([unit_epc(x) for x in s[6:12]])
    truth = last_window(rig)
    assert unit_epc(s[0]).lower() in truth.reported, "the lingering tag was seen in case B's window"
    assert b.ok and b.count == 6, b
    assert b.strays == [f"(01){GTIN}(21){s[0]}: packed in the previous case {a.sscc}, still in the field"]
    assert packed(rig.store, b.sscc) == {(GTIN, x) for x in s[6:12]}
    # after a rejected case its lingering unit is free in the store, but it was a unit of the previous window: a
    # stray, never counted (counting it would pack a unit that is physically in the rejected case)
    c = await rig.case([unit_epc(x) for x in s[12:17]], leave=False)  # 5 of 6 tags: rejected
    assert c.reason == "count_short"
    for x in s[12:17]:
        rig.reader_sim.field_leave(unit_epc(x), after_windows=1 if x == s[12] else 0)
    d = await rig.case([unit_epc(x) for x in s[18:23]])  # this case holds five units; s[12] lingers
    assert unit_epc(s[12]).lower() in last_window(rig).reported
    assert (d.ok, d.reason) == (False, "count_short") and "5 read, case holds 6" in d.detail, d
    assert d.strays == [f"(01){GTIN}(21){s[12]}: a unit of the previous case's window, still in the field"]
    assert free(rig.store, s[12:23])


async def test_foreign_and_duplicate_tags_reject_the_case(rig: TunnelRig) -> None:
    s = await rig.commission(12)
    grai = "33" + "0" * 22  # GRAI-96 header: a returnable asset's tag inside the field, no unit of this line
    res = await rig.case([unit_epc(x) for x in s[:6]] + [grai])
    assert (res.ok, res.reason) == (False, "foreign_tag") and grai in res.detail and "GRAI" in res.detail.upper(), res
    # two tags naming one unit (same GTIN + serial, filter 1 and filter 0)
    two = unit_epc(s[6], filter_value=0)
    assert epc.decode_epc(two).serial == s[6] and two != unit_epc(s[6])
    res2 = await rig.case([unit_epc(x) for x in s[6:12]] + [two])
    assert (res2.ok, res2.reason) == (False, "duplicate") and s[6] in res2.detail, res2
    assert free(rig.store, s)


async def test_store_checks_apply_to_tags_as_to_camera_reads(rig: TunnelRig) -> None:
    s = await rig.commission(27)
    await new_batch(rig.store, "LOTB")
    other = await rig.commission(1, lot="LOTB")
    res = await rig.case([unit_epc(x) for x in s[:5]] + [unit_epc(other[0])])
    assert (res.ok, res.reason) == (False, "other_batch") and "LOTB" in res.detail
    never = unit_epc("999999")  # a well-formed SGTIN of our GTIN that this line never issued
    res2 = await rig.case([unit_epc(x) for x in s[5:10]] + [never])
    assert (res2.ok, res2.reason) == (False, "unknown") and "999999" in res2.detail
    ok1 = await rig.case([unit_epc(x) for x in s[10:16]])
    ok2 = await rig.case([unit_epc(x) for x in s[16:22]])
    assert ok1.ok and ok2.ok
    # a unit packed two cases ago is not a tag lingering from the previous case: the case is refused
    res3 = await rig.case([unit_epc(s[10])] + [unit_epc(x) for x in s[22:27]])
    assert (res3.ok, res3.reason) == (False, "already_packed") and ok1.sscc in res3.detail, res3
    assert free(rig.store, s[:10] + s[22:27])


async def test_reader_dropping_mid_window_rejects_the_case(rig: TunnelRig) -> None:
    s = await rig.commission(12)
    n = len(rig.rt.recent)
    rig.enter([unit_epc(x) for x in s[:6]])
    rig.count_case()
    await wait_for(lambda: any(sp.state == "Active" for sp in rig.reader_sim.rospecs.values()), 5, "window open on the reader")
    rig.reader_sim.inject("drop")
    await wait_for(lambda: len(rig.rt.recent) > n, 10, "decision")
    res = rig.rt.recent[-1]
    rig.reader_sim.set_field([])
    assert (res.ok, res.reason, res.sscc) == (False, "rfid_read_failed", None), res
    assert "connection lost during the window" in res.detail
    assert free(rig.store, s[:6])
    # the reader comes back; the next case is read and packed
    assert await rig.drivers["tunnel"].wait_connected(5)
    ok = await rig.case([unit_epc(x) for x in s[6:]])
    assert ok.ok, ok
    assert rig.rt.snapshot()["rfid"]["counters"]["read_failed"] == 1


async def test_malformed_llrp_mid_window_rejects_the_case(rig: TunnelRig) -> None:
    s = await rig.commission(6)
    n = len(rig.rt.recent)
    rig.enter([unit_epc(x) for x in s])
    rig.count_case()
    await wait_for(lambda: any(sp.state == "Active" for sp in rig.reader_sim.rospecs.values()), 5, "window open on the reader")
    rig.reader_sim.inject("malformed", variant="unknown_type")
    await wait_for(lambda: len(rig.rt.recent) > n, 10, "decision")
    res = rig.rt.recent[-1]
    assert (res.ok, res.reason) == (False, "rfid_read_failed"), res
    assert "malformed LLRP" in res.detail and "unknown message type 999" in res.detail
    (msg,) = alarms(rig.store, "case_rejected")
    assert "rfid_read_failed" in msg and "malformed" in msg
    assert free(rig.store, s)


async def test_cases_counted_during_a_window_get_no_window_and_are_rejected(rig: TunnelRig) -> None:
    s = await rig.commission(6)
    n = len(rig.rt.recent)
    rig.enter([unit_epc(x) for x in s])
    rig.count_case(3)  # three cases counted between two polls: only the last can have been read
    await wait_for(lambda: len(rig.rt.recent) >= n + 3, 10, "three decisions")
    res = list(rig.rt.recent)[-3:]
    assert [(r.ok, r.reason) for r in res] == [(False, "no_window"), (False, "no_window"), (True, None)]
    # all three reached the PLC in order (result, then case_seq + 1 each); the three writes land within one PLC
    # scan, so the simulated pusher program acts on the last change only (README: a pusher that counts cases
    # must compare case_seq with its own count)
    await wait_for(lambda: rig.plc_sim.get("case_seq") == 3, 5, "case_seq 3 in the PLC")
    assert rig.plc_sim.get("case_result") == CASE_ACCEPT
    assert rig.rt.snapshot()["counters"]["plc_signalled"] == 3
    assert len(rig.reader_sim.windows) == 1


async def test_partial_case_on_command(rig: TunnelRig) -> None:
    s = await rig.commission(4)
    await rig.rt.close_partial()
    res = await rig.case([unit_epc(x) for x in s])
    assert res.ok and res.partial and res.count == 4
    assert packed(rig.store, res.sscc) == {(GTIN, x) for x in s}


async def test_decisions_match_the_tunnel_ground_truth(rig: TunnelRig) -> None:
    """The line simulator's tunnel (simulators/tunnel.py) with every fault on at random: each decision against what
    was physically in the case."""
    from linectl.simulators.config import RfidTunnelSim
    from linectl.simulators.tunnel import RfidTunnel

    n_cases = 16
    serials = await rig.commission(6 * n_cases + 1)
    units = [sim_unit(i, s) for i, s in enumerate(serials, 1)]
    knobs = RfidTunnelSim(stray_rate=0.4, dead_tag_rate=0.2, missing_unit_rate=0.2, linger_rate=0.4)
    tunnel = RfidTunnel(rig.reader_sim, rig.plc_sim, knobs, lambda u: unit_epc(gs1.parse(u.content or "").serial or ""),
                        antennas=[1, 2, 3, 4], seed=11)
    rig.trigger = int(rig.plc_sim.get("case_trigger"))
    results = []
    for k in range(n_cases):
        tunnel.pass_case(units[6 * k : 6 * k + 6], units[6 * k + 6])
        await wait_for(lambda k=k: rig.rt.counters.reads > k, 10, "case decision")
        results.append(rig.rt.recent[-1])
    truth = list(tunnel.cases)
    assert all(tunnel.faults[f] > 0 for f in ("stray", "dead", "missing", "linger")), tunnel.faults
    for k, (tc, res) in enumerate(zip(truth, results)):
        lingered = set(truth[k - 1].linger) - set(truth[k - 1].dead) if k else set()
        whole = not tc.missing and not tc.dead
        assert res.ok == whole, (k, tc, res)
        assert len(res.strays) == len(tc.stray) + len(lingered), (k, tc, res)
        if whole:
            assert packed(rig.store, res.sscc) == {(GTIN, serials[seq - 1]) for seq in tc.in_case.values()}
        else:
            assert res.reason == "count_short" and f"{6 - len(tc.missing) - len(tc.dead)} read, case holds 6" in res.detail, (k, tc, res)
    await wait_for(lambda: rig.plc_sim.get("case_seq") == n_cases, 5, "every decision in the PLC")
