"""Serial allocation (random / sequential / pool), provisioning validation, never-reuse, pool-low alarm."""

from __future__ import annotations

import collections

import pytest

from linectl import events as ev
from linectl.config import PoolSerials, RandomSerials, SequentialSerials
from linectl.store import Store, StoreError
from linectl.store.serials import GS1_SET82, random_serials, serial_problem

GTIN = "09501101530003"
GTIN2 = "04012345000016"


@pytest.fixture
async def store(tmp_path):
    s = await Store.open(tmp_path / "serials.db")
    await s.create_batch("LOT1", GTIN, "271231", 1_000_000, actor="t")
    await s.create_batch("LOT2", GTIN2, "271231", 1_000_000, actor="t")
    yield s
    await s.close()


def test_random_serials_shape_and_uniformity():
    alphabet = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"
    s = random_serials(20_000, alphabet, 12)
    assert len(s) == 20_000 and all(len(x) == 12 and set(x) <= set(alphabet) for x in s)
    assert len(set(s)) == len(s)
    counts = collections.Counter("".join(s))
    expected = 20_000 * 12 / len(alphabet)
    # unbiased: no character far from its share (bytes >= 238 are dropped, not folded)
    assert all(abs(counts[c] - expected) < 0.06 * expected for c in alphabet)
    with pytest.raises(ValueError):
        random_serials(1, "AB C", 4)
    with pytest.raises(ValueError):
        random_serials(1, "AB", 21)


def test_serial_validation_set82():
    assert serial_problem("ABC-123/x_%") is None
    assert serial_problem("") == "empty"
    assert "at most 20" in serial_problem("A" * 21)
    assert "U+00E9" in serial_problem("café")
    assert "U+0020" in serial_problem("A B")
    assert "U+001D" in serial_problem("A\x1dB")  # a GS separator smuggled into a serial
    assert serial_problem("#") is not None and "#" not in GS1_SET82
    assert len(GS1_SET82) == 82


async def test_random_allocation_unique_and_never_reused(store):
    scheme = RandomSerials(scheme="random", alphabet="0123456789ABCDEFGHJKLMNPQRSTUVWXYZ", length=10)
    a = await store.allocate(GTIN, "LOT1", 5000, scheme)
    b = await store.allocate(GTIN, "LOT1", 5000, scheme)
    assert len(a) == len(b) == 5000 and not set(a) & set(b) and len(set(a)) == 5000
    r = store.serial(GTIN, a[0])
    assert r.state == "allocated" and r.lot == "LOT1" and r.source == "random"


async def test_random_allocation_tops_up_on_collision(store):
    # a tiny space (2^13 = 8192): blocks collide with earlier serials and within themselves, yet every
    # returned serial is new and the requested count is met until the space is used up
    # (the config would refuse such a space for EU FMD; construct it unvalidated to exercise collisions)
    scheme = RandomSerials.model_construct(scheme="random", alphabet="01", length=13, planned_volume=1, low_water=0)
    seen: set[str] = set()
    for _ in range(7):
        got = await store.allocate(GTIN, "LOT1", 1000, scheme)
        assert len(got) == 1000 and not seen & set(got) and len(set(got)) == 1000
        seen |= set(got)
    assert store.serial_counts(GTIN)[GTIN]["allocated"] == 7000
    with pytest.raises(StoreError, match="exhausted"):
        await store.allocate(GTIN, "LOT1", 2000, scheme)
    assert store.serial_counts(GTIN)[GTIN]["allocated"] == 7000  # the failed allocation left nothing


async def test_sequential_allocation_counts_and_skips_known(store):
    await store.provision(GTIN2, ["0000000003", "0000000004"], "legacy")  # already used numbers are skipped
    sch = SequentialSerials(scheme="sequential", start=1, step=1, width=10)
    a = await store.allocate(GTIN2, "LOT2", 5, sch)
    assert a == ["0000000001", "0000000002", "0000000005", "0000000006", "0000000007"]
    b = await store.allocate(GTIN2, "LOT2", 2, sch)
    assert b == ["0000000008", "0000000009"]
    sch2 = SequentialSerials(scheme="sequential", start=100, step=10)
    c = await store.allocate(GTIN2, "LOT2", 3, sch2)
    assert c == ["100", "110", "120"]  # a raised start is honoured; the counter never goes back


async def test_pool_allocation_fifo_and_state(store):
    await store.provision(GTIN, [f"P{i:03d}" for i in range(10)], "l3")
    got = await store.allocate(GTIN, "LOT1", 4, PoolSerials(scheme="pool", low_water=0))
    assert got == ["P000", "P001", "P002", "P003"]
    assert store.available(GTIN) == 6
    assert store.serial(GTIN, "P000").state == "allocated"
    got2 = await store.allocate(GTIN, "LOT1", 6, PoolSerials(scheme="pool", low_water=0))
    assert not set(got) & set(got2)
    with pytest.raises(StoreError, match="no such batch"):
        await store.allocate(GTIN, "NOLOT", 1, PoolSerials(scheme="pool"))
    with pytest.raises(StoreError, match="is for GTIN"):
        await store.allocate(GTIN2, "LOT1", 1, PoolSerials(scheme="pool"))


async def test_returned_serial_is_reallocated_but_sent_never(store):
    await store.provision(GTIN, ["R1", "R2"], "l3")
    pool = PoolSerials(scheme="pool", low_water=0)
    got = await store.allocate(GTIN, "LOT1", 2, pool)
    await store.mark_sent(GTIN, "LOT1", ["R1"])
    await store.append(ev.SerialsReturned(gtin=GTIN, serials=["R2"], lot="LOT1"))
    again = await store.allocate(GTIN, "LOT1", 1, pool)
    assert again == ["R2"] and got == ["R1", "R2"]
    with pytest.raises(StoreError):
        await store.allocate(GTIN, "LOT1", 1, pool)  # R1 was sent: gone for ever


async def test_provision_counts_and_reasons(store):
    items = ["A1", "A2", "A1", "bad one", "X" * 21, "", "ü1", "A3"]
    res = await store.provision(GTIN, items, "file.csv", actor="cli:qa")
    assert (res.accepted, res.duplicates, res.invalid) == (3, 1, 4)
    reasons = {i: why for i, _s, why in res.rejected}
    assert "repeated in the input" in reasons[2]
    assert "U+0020" in reasons[3] and "at most 20" in reasons[4] and reasons[5] == "invalid: empty" and "U+00FC" in reasons[6]
    assert len(res.problems) == 5
    res2 = await store.provision(GTIN, ["A1", "A4"], "file2.csv")
    assert (res2.accepted, res2.duplicates, res2.invalid) == (1, 1, 0)
    assert "already known" in res2.problems[0]
    # the same serial is fine for another GTIN: uniqueness is per GTIN
    assert (await store.provision(GTIN2, ["A1"], "x")).accepted == 1
    # a random serial already generated counts as known too
    gen = await store.allocate(GTIN, "LOT1", 1, RandomSerials(scheme="random"))
    assert (await store.provision(GTIN, gen, "x")).duplicates == 1
    last = store.audit_log()[-1]
    assert last.action == "serials_provisioned" and last.detail["duplicates"] == 1
    assert any(a.actor == "cli:qa" and a.detail["invalid"] == 4 for a in store.audit_log())
    with pytest.raises(StoreError, match="check digit"):
        await store.provision("09501101530004", ["Z"], "x")


def _pool_alarms(store: Store) -> list[ev.AlarmRaised]:
    return [r.event for r in store.outbox(0, 10_000) if r.kind == "alarm" and r.event.code == "pool_low"]


async def test_pool_low_alarm_once_per_crossing(store):
    pool = PoolSerials(scheme="pool", low_water=10)
    await store.provision(GTIN, [f"A{i}" for i in range(30)], "l3")
    await store.allocate(GTIN, "LOT1", 15, pool)  # 15 left
    assert _pool_alarms(store) == []
    await store.allocate(GTIN, "LOT1", 6, pool)  # 9 left: crossed
    alarms = _pool_alarms(store)
    assert len(alarms) == 1 and alarms[0].severity == ev.Severity.WARNING and "9 available" in alarms[0].message
    await store.allocate(GTIN, "LOT1", 3, pool)  # still low: no repeat
    await store.allocate(GTIN, "LOT1", 3, pool)
    assert len(_pool_alarms(store)) == 1
    await store.provision(GTIN, [f"B{i}" for i in range(20)], "l3")  # 23 available: re-armed
    await store.allocate(GTIN, "LOT1", 5, pool)  # 18
    assert len(_pool_alarms(store)) == 1
    await store.allocate(GTIN, "LOT1", 10, pool)  # 8: second crossing
    assert len(_pool_alarms(store)) == 2
    assert store.audit_log()[-1].action == "alarm"


async def test_pool_low_alarm_when_already_low_at_first_use(store):
    pool = PoolSerials(scheme="pool", low_water=100)
    await store.provision(GTIN, [f"A{i}" for i in range(30)], "l3")
    await store.allocate(GTIN, "LOT1", 1, pool)
    await store.allocate(GTIN, "LOT1", 1, pool)
    assert len(_pool_alarms(store)) == 1
