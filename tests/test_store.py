"""Store core: events applied with the outbox in one transaction, group commit isolation, reads, retention.

Real SQLite files in tmp_path, no mocks.
"""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from linectl import events as ev
from linectl.config import PoolSerials, RandomSerials
from linectl.store import Store, StoreError

GTIN = "09501101530003"
CP = "9501101"


def sscc(ref: int, ext: int = 0, cp: str = CP) -> str:
    body = f"{ext}{cp}{ref:0{16 - len(cp)}d}"
    total = sum(int(c) * (3 if i % 2 == 0 else 1) for i, c in enumerate(reversed(body)))
    return body + str((10 - total % 10) % 10)


async def sent_serials(store: Store, n: int, lot: str = "LOT1") -> list[str]:
    if store.batch(lot) is None:
        await store.create_batch(lot, GTIN, "271231", 1_000_000, actor="cli:test")
    got = await store.allocate(GTIN, lot, n, RandomSerials(scheme="random"))
    await store.mark_sent(GTIN, lot, got)
    return got


def raw(store: Store) -> sqlite3.Connection:
    return sqlite3.connect(store.path)


async def test_commission_applies_registry_and_outbox_together(store):
    s = await sent_serials(store, 3)
    seqs = await store.append(*(ev.UnitCommissioned(gtin=GTIN, serial=x, lot="LOT1") for x in s))
    assert seqs == sorted(seqs) and len(seqs) == 3
    assert all(store.serial(GTIN, x).state == "commissioned" for x in s)
    rows = store.outbox(0, 10)
    assert [r.seq for r in rows] == seqs
    assert isinstance(rows[0].event, ev.UnitCommissioned) and rows[0].event.serial == s[0]
    assert store.backlog() == 3
    hist = store.serial_history(GTIN, s[1])
    assert [h.kind for h in hist] == ["unit_commissioned"]


async def test_commission_requires_sent(store):
    await store.create_batch("LOT1", GTIN, "271231", 100, actor="t")
    s = await store.allocate(GTIN, "LOT1", 2, RandomSerials(scheme="random"))
    with pytest.raises(StoreError, match="it is allocated, must be sent"):
        await store.append(ev.UnitCommissioned(gtin=GTIN, serial=s[0], lot="LOT1"))
    with pytest.raises(StoreError, match="unknown serial"):
        await store.append(ev.UnitCommissioned(gtin=GTIN, serial="NOPE", lot="LOT1"))
    assert store.backlog() == 0  # nothing of a refused append is stored


async def test_commission_twice_is_refused(store):
    s = await sent_serials(store, 1)
    await store.append(ev.UnitCommissioned(gtin=GTIN, serial=s[0]))
    with pytest.raises(StoreError, match="it is commissioned"):
        await store.append(ev.UnitCommissioned(gtin=GTIN, serial=s[0]))


async def test_commission_checks_lot(store):
    s = await sent_serials(store, 1)
    await store.create_batch("LOT2", GTIN, "271231", 10, actor="t")
    with pytest.raises(StoreError, match="belongs to lot LOT1"):
        await store.append(ev.UnitCommissioned(gtin=GTIN, serial=s[0], lot="LOT2"))


async def test_append_is_atomic(store):
    s = await sent_serials(store, 2)
    with pytest.raises(StoreError):
        await store.append(
            ev.UnitCommissioned(gtin=GTIN, serial=s[0]),
            ev.UnitCommissioned(gtin=GTIN, serial="UNKNOWN1"),
        )
    assert store.serial(GTIN, s[0]).state == "sent"
    assert store.backlog() == 0


async def test_one_bad_op_in_a_group_fails_alone(tmp_path):
    # A big queue and concurrent producers: the writer groups them; the bad one must fail alone.
    store = await Store.open(tmp_path / "g.db", group_commit_max=500)
    try:
        s = await sent_serials(store, 200)
        evs = [ev.UnitCommissioned(gtin=GTIN, serial=x) for x in s]
        bad_at = {17, 99, 150}
        for i in bad_at:
            evs[i] = ev.UnitCommissioned(gtin=GTIN, serial=f"BAD{i}")
        before = store.stats()["writer"]["groups"]
        results = await asyncio.gather(*(store.append(e) for e in evs), return_exceptions=True)
        groups = store.stats()["writer"]["groups"] - before
        assert groups < len(evs) / 4, "expected group commit"
        for i, r in enumerate(results):
            if i in bad_at:
                assert isinstance(r, StoreError) and "unknown serial" in str(r)
            else:
                assert isinstance(r, list) and len(r) == 1
        seqs = [r[0] for r in results if isinstance(r, list)]
        assert len(set(seqs)) == len(seqs) == 197
        assert store.serial_counts(GTIN)[GTIN]["commissioned"] == 197
        assert [r.seq for r in store.outbox(0, 1000)] == sorted(seqs)
        with raw(store) as c:  # seqs are dense: the refused ops left no holes, nothing half-written
            assert c.execute("SELECT count(*), min(seq), max(seq) FROM outbox").fetchone() == (197, 1, 197)
    finally:
        await store.close()


async def test_duplicate_event_id_refused(store):
    s = await sent_serials(store, 2)
    e1 = ev.UnitCommissioned(gtin=GTIN, serial=s[0])
    await store.append(e1)
    dup = ev.UnitCommissioned(gtin=GTIN, serial=s[1], event_id=e1.event_id)
    with pytest.raises(StoreError, match="constraint"):
        await store.append(dup)
    assert store.serial(GTIN, s[1]).state == "sent"


async def test_decommission_void_return(store):
    s = await sent_serials(store, 3)
    await store.append(ev.UnitCommissioned(gtin=GTIN, serial=s[0]))
    await store.append(ev.UnitDecommissioned(gtin=GTIN, serial=s[0], reason=ev.RejectReason.DAMAGED, actor="op:anna"))
    await store.append(ev.UnitDecommissioned(gtin=GTIN, serial=s[1], reason=ev.RejectReason.NO_READ))
    assert store.serial(GTIN, s[0]).state == "decommissioned"
    assert store.serial(GTIN, s[1]).state == "decommissioned"
    with pytest.raises(StoreError, match="it is decommissioned"):
        await store.append(ev.UnitDecommissioned(gtin=GTIN, serial=s[1], reason=ev.RejectReason.NO_READ))
    assert store.audit_log()[-1].action == "unit_decommissioned"  # an operator action is audited

    more = await store.allocate(GTIN, "LOT1", 4, RandomSerials(scheme="random"))
    await store.append(ev.SerialsVoided(gtin=GTIN, serials=more[:2], lot="LOT1"))
    assert {store.serial(GTIN, x).state for x in more[:2]} == {"voided"}
    await store.append(ev.SerialsReturned(gtin=GTIN, serials=more[2:], lot="LOT1"))
    r = store.serial(GTIN, more[2])
    assert r.state == "provisioned" and r.lot is None
    # a serial that was ever sent can never be returned or voided
    with pytest.raises(StoreError, match="it is sent"):
        await store.append(ev.SerialsReturned(gtin=GTIN, serials=[s[2]], lot="LOT1"))
    with pytest.raises(StoreError, match="it is sent"):
        await store.append(ev.SerialsVoided(gtin=GTIN, serials=[s[2]], lot="LOT1"))
    assert [h.kind for h in store.serial_history(GTIN, more[0])] == ["serials_voided"]
    assert store.in_flight("LOT1") == [(GTIN, s[2], "LOT1")]
    assert store.in_flight() == [(GTIN, s[2], "LOT1")]


async def test_mark_sent_checks_state_and_lot(store):
    await store.create_batch("LOT1", GTIN, "271231", 100, actor="t")
    await store.create_batch("LOT2", GTIN, "271231", 100, actor="t")
    s = await store.allocate(GTIN, "LOT1", 3, RandomSerials(scheme="random"))
    with pytest.raises(StoreError, match="belongs to lot LOT1"):
        await store.mark_sent(GTIN, "LOT2", s)
    with pytest.raises(StoreError, match="repeats"):
        await store.mark_sent(GTIN, "LOT1", [s[0], s[0]])
    await store.mark_sent(GTIN, "LOT1", s[:2])
    with pytest.raises(StoreError, match="it is sent"):
        await store.mark_sent(GTIN, "LOT1", s)  # all or nothing
    assert store.serial(GTIN, s[2]).state == "allocated"
    assert store.serial(GTIN, s[0]).sent_at is not None


async def test_batches_and_state_changes_are_audited(store):
    b = await store.create_batch("L-7", GTIN, "271200", 5000, actor="cli:bob")
    assert b.state == "created" and b.created_by == "cli:bob"
    with pytest.raises(StoreError, match="already exists"):
        await store.create_batch("L-7", GTIN, "271200", 5000, actor="cli:bob")
    with pytest.raises(StoreError, match="YYMMDD"):
        await store.create_batch("L-8", GTIN, "2712", 5000, actor="cli:bob")
    await store.append(ev.BatchStateChanged(gtin=GTIN, lot="L-7", state=ev.BatchState.RUNNING, previous=ev.BatchState.CREATED, actor="mqtt:hmi1"))
    await store.append(ev.ChallengeResult(lot="L-7", challenge="no_code", rejected=True, reason_seen="no_read"))
    with pytest.raises(StoreError, match="is running, but the event says it was created"):
        await store.append(ev.BatchStateChanged(gtin=GTIN, lot="L-7", state=ev.BatchState.STOPPED, previous=ev.BatchState.CREATED))
    await store.append(ev.BatchStateChanged(gtin=GTIN, lot="L-7", state=ev.BatchState.CLOSED, actor="cli:bob"))
    with pytest.raises(StoreError, match="closed"):
        await store.append(ev.BatchStateChanged(gtin=GTIN, lot="L-7", state=ev.BatchState.RUNNING))
    with pytest.raises(StoreError, match="closed"):
        await store.allocate(GTIN, "L-7", 1, RandomSerials(scheme="random"))
    b = store.batch("L-7")
    assert b.state == "closed" and b.started_at and b.closed_at
    assert b.challenge[0]["challenge"] == "no_code" and b.challenge[0]["rejected"] is True
    log = store.audit_log()
    acts = [(a.action, a.actor, a.origin) for a in log]
    assert ("batch_created", "cli:bob", "cli") in acts
    assert ("batch_state", "mqtt:hmi1", "mqtt") in acts
    assert ("challenge_result", "system", "line") in acts
    assert store.verify_audit().ok
    assert [x.lot for x in store.batches()] == ["L-7"]


async def test_alarms_are_audited(store):
    await store.append(ev.AlarmRaised(code="consecutive_rejects", severity=ev.Severity.CRITICAL, message="5 rejects", station="pv1"))
    await store.append(ev.AlarmAcknowledged(alarm_id="abc", actor="op:anna"))
    acts = [(a.action, a.actor, a.origin) for a in store.audit_log()]
    assert ("alarm", "system", "station:pv1") in acts and ("alarm_ack", "op:anna", "op") in acts


async def test_aggregation_consistency(store):
    units = await sent_serials(store, 4)
    await store.append(*(ev.UnitCommissioned(gtin=GTIN, serial=x) for x in units[:3]))
    case1, case2, pallet = sscc(1), sscc(2), sscc(1, ext=1)
    U = lambda s: ev.ChildRef(gtin=GTIN, serial=s)  # noqa: E731
    # parent must be commissioned first (may be in the same append)
    with pytest.raises(StoreError, match="commission it first"):
        await store.append(ev.Packed(parent=case1, children=[U(units[0])]))
    await store.append(ev.ContainerCommissioned(sscc=case1, level="case", gtin=GTIN), ev.Packed(parent=case1, children=[U(units[0]), U(units[1])]))
    await store.append(ev.ContainerCommissioned(sscc=case2, level="case"))
    with pytest.raises(StoreError, match="already packed in " + case1):
        await store.append(ev.Packed(parent=case2, children=[U(units[0])]))
    with pytest.raises(StoreError, match="only commissioned units"):
        await store.append(ev.Packed(parent=case2, children=[U(units[3])]))  # sent, not commissioned
    with pytest.raises(StoreError, match="listed twice"):
        await store.append(ev.Packed(parent=case2, children=[U(units[2]), U(units[2])]))
    with pytest.raises(StoreError, match="packed in"):
        await store.append(ev.UnitDecommissioned(gtin=GTIN, serial=units[0], reason=ev.RejectReason.DAMAGED))
    with pytest.raises(StoreError, match="already used"):
        await store.append(ev.ContainerCommissioned(sscc=case1, level="case"))
    with pytest.raises(StoreError, match="check digit"):
        await store.append(ev.ContainerCommissioned(sscc=case1[:-1] + str((int(case1[-1]) + 1) % 10), level="case"))
    await store.append(ev.ContainerCommissioned(sscc=pallet, level="pallet"), ev.Packed(parent=pallet, children=[ev.ChildRef(sscc=case1)]))
    with pytest.raises(StoreError, match="only holds lower levels"):
        await store.append(ev.Packed(parent=case2, children=[ev.ChildRef(sscc=pallet)]))
    assert store.parent_of(GTIN, units[0]) == case1 and store.parent_of(sscc=case1) == pallet
    assert [c["serial"] for c in store.children(case1)] == units[:2]
    # rework: take a unit out, destroy it, in one append
    await store.append(
        ev.Unpacked(parent=case1, children=[U(units[0])], actor="op:anna"),
        ev.UnitDecommissioned(gtin=GTIN, serial=units[0], reason=ev.RejectReason.DAMAGED, destroyed=True, actor="op:anna"),
    )
    assert store.parent_of(GTIN, units[0]) is None
    with pytest.raises(StoreError, match="not packed anywhere"):
        await store.append(ev.Unpacked(parent=case1, children=[U(units[0])]))
    with pytest.raises(StoreError, match="still holds"):
        await store.append(ev.ContainerDecommissioned(sscc=case1, reason="relabel", commissioned=True))
    # dissolve the pallet, then the case, then decommission the case
    await store.append(ev.Unpacked(parent=pallet, children=[]), ev.Unpacked(parent=case1, children=[]))
    await store.append(ev.ContainerDecommissioned(sscc=case1, reason="relabel", commissioned=True, actor="op:anna"))
    assert store.container(case1).state == "decommissioned"
    assert store.children(case1) == []
    # a label printed but never commissioned (crash) is recorded so the SSCC is never reused
    ghost = sscc(9)
    await store.append(ev.ContainerDecommissioned(sscc=ghost, reason="crash_recovery"))
    with pytest.raises(StoreError, match="already used"):
        await store.append(ev.ContainerCommissioned(sscc=ghost, level="case"))
    kinds = [h.kind for h in store.serial_history(GTIN, units[0])]
    assert kinds == ["unit_commissioned", "packed", "unpacked", "unit_decommissioned"]
    assert [h.kind for h in store.container_history(case1)][:2] == ["container_commissioned", "packed"]


async def test_sscc_refs_are_unique_and_bounded(store):
    a = await store.next_sscc_refs(CP, 0, 3)
    b = await store.next_sscc_refs(CP, 0, 2)
    c = await store.next_sscc_refs(CP, 1, 2)
    assert a == [1, 2, 3] and b == [4, 5] and c == [1, 2]
    long_cp = "950110153000"  # 12 digits -> 4-digit serial reference
    await store.next_sscc_refs(long_cp, 0, 9998)
    assert await store.next_sscc_refs(long_cp, 0, 1) == [9999]
    with pytest.raises(StoreError, match="exhausted"):
        await store.next_sscc_refs(long_cp, 0, 1)


async def test_forwarding_and_purge_keep_registry_and_audit(store):
    s = await sent_serials(store, 10)
    seqs = await store.append(*(ev.UnitCommissioned(gtin=GTIN, serial=x) for x in s))
    assert store.outbox(0, 100, only_unforwarded=False)[0].seq == seqs[0]  # nothing stored before these rows
    assert await store.advance_cursor("mqtt", seqs[5]) == 6  # the only sink has delivered 6 rows: forwarded
    assert await store.advance_cursor("mqtt", seqs[5]) == 0  # idempotent
    assert await store.advance_cursor("mqtt", seqs[2]) == 0 and store.cursor("mqtt") == seqs[5]  # never moves back
    assert store.backlog() == 4
    assert [r.seq for r in store.outbox(0, 100)] == seqs[6:]
    assert len(store.outbox(0, 100, only_unforwarded=False)) == 10
    audit_before = store.verify_audit().checked
    assert await store.purge_forwarded(1.0) == 0  # forwarded just now: inside retention
    with raw(store) as c:  # age the forwarded rows by hand
        c.execute("UPDATE outbox SET forwarded_at='2000-01-01T00:00:00.000000+00:00' WHERE forwarded_at IS NOT NULL")
    assert await store.purge_forwarded(1.0) == 6
    assert [r.seq for r in store.outbox(0, 100, only_unforwarded=False)] == seqs[6:]
    assert store.serial_counts(GTIN)[GTIN]["commissioned"] == 10  # the registry is never purged
    chk = store.verify_audit()
    assert chk.ok and chk.checked == audit_before + 1 and store.audit_log()[-1].action == "outbox_purged"
    # seqs are never reused after a purge
    t = await sent_serials(store, 1)
    (n,) = await store.append(ev.UnitCommissioned(gtin=GTIN, serial=t[0]))
    assert n == seqs[-1] + 1
    with raw(store) as c, pytest.raises(sqlite3.IntegrityError, match="never deleted"):
        c.execute("DELETE FROM serials")


async def test_bounded_queue_makes_producers_wait(tmp_path):
    store = await Store.open(tmp_path / "q.db", group_commit_max=10, queue_max=20)
    try:
        tasks = [asyncio.create_task(store.audit("t", "test", "tick", {"i": i})) for i in range(200)]
        await asyncio.sleep(0)  # let them all try to enqueue
        assert store.stats()["writer"]["queue_depth"] <= 20
        await asyncio.gather(*tasks)
        assert store.verify_audit().checked == 201
    finally:
        await store.close()


async def test_close_flushes_and_refuses_later_writes(tmp_path):
    store = await Store.open(tmp_path / "c.db")
    pending = [asyncio.create_task(store.audit("t", "test", "x", {"i": i})) for i in range(50)]
    await asyncio.sleep(0)
    await store.close()
    await asyncio.gather(*pending)
    with pytest.raises(StoreError, match="closed"):
        await store.audit("t", "test", "late", {})
    store = await Store.open(tmp_path / "c.db")
    assert store.verify_audit().checked == 51
    await store.close()


async def test_readers_do_not_block_the_writer(store):
    s = await sent_serials(store, 50)
    snap = store._reader.snapshot()
    c = snap.__enter__()  # a reader holding a long read transaction
    try:
        c.exec_driver_sql("SELECT count(*) FROM outbox").fetchall()
        await asyncio.wait_for(store.append(*(ev.UnitCommissioned(gtin=GTIN, serial=x) for x in s)), 5)
        # the old snapshot still sees the old state; a new read sees the new one
        assert c.exec_driver_sql("SELECT count(*) FROM outbox").fetchone()[0] == 0
    finally:
        snap.__exit__(None, None, None)
    assert store.backlog() == 50


async def test_readonly_store_refuses_writes(tmp_path):
    s = await Store.open(tmp_path / "r.db")
    await s.close()
    ro = await Store.open(tmp_path / "r.db", readonly=True)
    try:
        assert ro.verify_audit().ok
        with pytest.raises(StoreError, match="read-only"):
            await ro.audit("t", "x", "y", {})
    finally:
        await ro.close()


async def test_products_upsert_audits_changes(store):
    from linectl.config import Product

    p = Product(gtin=GTIN, name="Aspirin 100", company_prefix_length=7, serials=PoolSerials(scheme="pool"))
    assert await store.upsert_products([p]) == 1
    assert await store.upsert_products([p]) == 0
    p2 = p.model_copy(update={"name": "Aspirin 100mg"})
    assert await store.upsert_products([p2], actor="cli:qa") == 1
    acts = [(a.action, a.actor) for a in store.audit_log()]
    assert acts[-2:] == [("product_registered", "system"), ("product_changed", "cli:qa")]
    assert store.audit_log()[-1].detail["previous"]["name"] == "Aspirin 100"


async def test_bulk_commission_path_same_rules(store):
    # runs of >= 8 UnitCommissioned go through the bulk path: same checks, same effects, same atomicity
    s = await sent_serials(store, 40)
    evs = [ev.UnitCommissioned(gtin=GTIN, serial=x, lot="LOT1") for x in s[:20]]
    bad = list(evs)
    bad[13] = ev.UnitCommissioned(gtin=GTIN, serial="NOSUCH", lot="LOT1")
    with pytest.raises(StoreError, match="NOSUCH"):
        await store.append(*bad)
    twice = evs[:10] + [ev.UnitCommissioned(gtin=GTIN, serial=s[0], lot="LOT1")]
    with pytest.raises(StoreError, match="twice"):
        await store.append(*twice)
    await store.create_batch("LOT9", GTIN, "271231", 10, actor="t")
    wrong_lot = evs[:9] + [ev.UnitCommissioned(gtin=GTIN, serial=s[25], lot="LOT9")]
    with pytest.raises(StoreError, match="belongs to lot LOT1"):
        await store.append(*wrong_lot)
    assert store.backlog() == 0 and store.serial_counts(GTIN)[GTIN]["sent"] == 40
    seqs = await store.append(*evs, ev.AlarmRaised(code="x", severity=ev.Severity.INFO, message="m"), *(
        ev.UnitCommissioned(gtin=GTIN, serial=x, lot="LOT1") for x in s[20:]))
    assert seqs == list(range(1, 42))
    assert store.serial_counts(GTIN)[GTIN]["commissioned"] == 40
    assert [h.seq for h in store.serial_history(GTIN, s[30])] == [32]
    assert store.tally_mismatches() == []


async def test_tally_matches_a_full_count_after_every_kind_of_change(store):
    from linectl.config import SequentialSerials

    await store.provision(GTIN, [f"P{i}" for i in range(50)], "l3")
    await store.create_batch("LOT2", GTIN, "271231", 100, actor="t")
    pool = await store.allocate(GTIN, "LOT2", 30, PoolSerials(scheme="pool", low_water=0))
    rnd = await sent_serials(store, 20)
    seq = await store.allocate(GTIN, "LOT2", 5, SequentialSerials(scheme="sequential", width=8))
    await store.mark_sent(GTIN, "LOT2", pool[:10])
    await store.append(*(ev.UnitCommissioned(gtin=GTIN, serial=x) for x in pool[:8]))
    await store.append(ev.UnitDecommissioned(gtin=GTIN, serial=pool[8], reason=ev.RejectReason.LINE_STOPPED))
    await store.append(ev.UnitDecommissioned(gtin=GTIN, serial=pool[0], reason=ev.RejectReason.DAMAGED))
    await store.append(ev.SerialsVoided(gtin=GTIN, serials=pool[10:15] + seq[:2] + ["P49"], lot="LOT2"))
    await store.append(ev.SerialsReturned(gtin=GTIN, serials=pool[15:30], lot="LOT2"))
    await store.append(*(ev.UnitCommissioned(gtin=GTIN, serial=x, lot="LOT1") for x in rnd))
    assert store.tally_mismatches() == []
    c = store.serial_counts(GTIN)[GTIN]
    assert c == {"provisioned": 34, "allocated": 3, "sent": 1, "commissioned": 27, "decommissioned": 2, "voided": 8}
    assert store.available(GTIN) == 34
    assert store.lot_counts("LOT2") == {"provisioned": 0, "allocated": 3, "sent": 1, "commissioned": 7,
                                        "decommissioned": 2, "voided": 7}
    assert store.allocated("LOT2") == [(GTIN, x) for x in seq[2:]]
    assert store.in_flight("LOT2") == [(GTIN, pool[9], "LOT2")]


async def test_purge_runs_in_small_transactions_and_keeps_unforwarded(store, monkeypatch):
    import linectl.store.store as store_mod

    monkeypatch.setattr(store_mod, "PURGE_CHUNK", 7)  # many chunks from a few rows
    seqs = await store.append(*(ev.AlarmRaised(code="x", severity=ev.Severity.INFO, message=str(i)) for i in range(40)))
    await store.advance_cursor("mqtt", seqs[32])
    with raw(store) as c:
        c.execute("UPDATE outbox SET forwarded_at='2000-01-01T00:00:00.000000+00:00' WHERE forwarded_at IS NOT NULL")
    groups = store.stats()["writer"]["groups"]
    assert await store.purge_forwarded(30) == 33
    assert store.stats()["writer"]["groups"] - groups >= 5
    assert [r.seq for r in store.outbox(0, 100, only_unforwarded=False)] == seqs[33:]
    assert store.verify_audit().ok


async def test_two_sinks_have_independent_cursors_and_purge_waits_for_the_slowest(store):
    """One cursor per upstream sink: a row is forwarded (forwarded_at, backlog) and purgeable only once every
    enabled sink has it; a sink missing from the enabled set no longer holds rows back."""
    store.set_sinks(["mqtt", "file"])
    seqs = await store.append(*(ev.AlarmRaised(code="x", severity=ev.Severity.INFO, message=str(i)) for i in range(10)))
    assert await store.open_cursor("file") == (0, None)
    assert await store.advance_cursor("mqtt", seqs[9]) == 0  # file has nothing yet: nothing is forwarded
    assert store.backlog() == 10 and store.sink_backlog("mqtt") == 0 and store.sink_backlog("file") == 10
    assert await store.advance_cursor("file", seqs[3]) == 4  # the slowest sink decides
    assert store.backlog() == 6 and store.sink_backlog("file") == 6
    with raw(store) as c:
        c.execute("UPDATE outbox SET forwarded_at='2000-01-01T00:00:00.000000+00:00' WHERE forwarded_at IS NOT NULL")
    assert await store.purge_forwarded(1.0) == 4
    assert [r.seq for r in store.outbox(0, 100, only_unforwarded=False)] == seqs[4:]
    # a row stamped forwarded is still never purged past a sink's cursor (a sink enabled after it was stamped)
    with raw(store) as c:
        c.execute("UPDATE outbox SET forwarded_at='2000-01-01T00:00:00.000000+00:00'")
    assert await store.purge_forwarded(1.0) == 0
    with raw(store) as c:
        c.execute("UPDATE outbox SET forwarded_at=NULL WHERE seq > ?", (seqs[3],))
    # pending delivery: recorded before, cleared by the advance that covers it
    await store.set_cursor_pending("file", seqs[6])
    assert store.cursors()["file"]["pending"] == seqs[6]
    assert await store.advance_cursor("file", seqs[6]) == 3
    assert store.cursors()["file"] == {**store.cursors()["file"], "seq": seqs[6], "pending": None}
    # the file sink is switched off in the config: only mqtt counts from now on
    store.set_sinks(["mqtt"])
    assert await store.advance_cursor("mqtt", seqs[9]) == 3 and store.backlog() == 0
