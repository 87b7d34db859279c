"""The batch report reads only what retention never purges.

Retention deletes forwarded outbox rows after `store.retention_days`; a batch report printed a year later for an
inspector must say exactly what it said the day the batch closed: reject reasons, returned serials, state history
and challenge results included. Real store files, the real purge.
"""

from __future__ import annotations

import sqlite3

from linectl import events as ev
from linectl.report import batch_report, format_report
from linectl.store import Store

GTIN = "09501101530003"


class _Pool:
    scheme = "pool"
    low_water = 0


async def _closed_batch(s: Store, lot: str) -> None:
    """Challenge, 6 units printed (2 rejected for different reasons), 4 serials unused and returned at close."""
    await s.create_batch(lot, GTIN, "291231", 10, actor="cli:qa")
    await s.provision(GTIN, [f"{lot}S{i}" for i in range(10)], "test")
    serials = await s.allocate(GTIN, lot, 10, _Pool())
    used, unused = serials[:6], serials[6:]
    run = ev.BatchState.RUNNING
    await s.append(
        ev.BatchStateChanged(lot=lot, gtin=GTIN, state=ev.BatchState.CHALLENGE, previous=ev.BatchState.CREATED, actor="cli:qa"),
        ev.ChallengeResult(lot=lot, station="pv1", challenge="no_code", rejected=True, reason_seen="no_read", seq=1),
        ev.ChallengeResult(lot=lot, station="pv1", challenge="wrong_code", rejected=True, reason_seen="wrong_content", seq=2),
        ev.BatchStateChanged(lot=lot, gtin=GTIN, state=run, previous=ev.BatchState.CHALLENGE, actor="cli:qa", reason="challenge passed"),
    )
    await s.mark_sent(GTIN, lot, used)
    await s.append(*[ev.UnitCommissioned(gtin=GTIN, serial=x, lot=lot, seq=i + 3) for i, x in enumerate(used[:4])])
    await s.append(
        ev.UnitDecommissioned(gtin=GTIN, serial=used[4], lot=lot, reason=ev.RejectReason.NO_READ),
        ev.UnitDecommissioned(gtin=GTIN, serial=used[5], lot=lot, reason=ev.RejectReason.LOW_GRADE),
        ev.BatchStateChanged(lot=lot, gtin=GTIN, state=ev.BatchState.STOPPED, previous=run, actor="op:anna", reason="end of shift"),
    )
    res = await s.close_batch(lot, "return", "op:anna")
    assert res["unused"] == len(unused)


async def test_report_after_retention_purge_is_identical(tmp_path):
    s = await Store.open(tmp_path / "r.db")
    try:
        await _closed_batch(s, "LOTR")
        before = batch_report(s, "LOTR")
        # the facts the purge would take with it, if the report still read them from the outbox
        assert before["rejects_by_reason"] == {"low_grade": 1, "no_read": 1} and before["returned"] == 4
        assert [h["state"] for h in before["history"]] == ["challenge", "running", "stopped", "closed"]
        assert [c["challenge"] for c in before["challenge"]] == ["no_code", "wrong_code"] and before["balanced"]
        rows = s.outbox(0, 1000)
        s.set_sinks(["mqtt"])  # the one upstream sink has delivered every row
        await s.open_cursor("mqtt")
        assert await s.advance_cursor("mqtt", rows[-1].seq) == len(rows) > 0
        with sqlite3.connect(s.path) as c:  # forwarded long ago: past any retention
            c.execute("UPDATE outbox SET forwarded_at='2000-01-01T00:00:00.000000+00:00'")
        assert await s.purge_forwarded(1.0) == len(rows)
        assert s.events_of_lot("LOTR") == []
        after = batch_report(s, "LOTR")
        assert after == before
        assert format_report(after) == format_report(before)
    finally:
        await s.close()


async def test_batch_created_before_the_tallies_reads_them_from_the_outbox(tmp_path):
    """A batch an earlier linectl created has no tallies: its reasons still come from the outbox rows retention kept."""
    s = await Store.open(tmp_path / "old.db")
    try:
        await _closed_batch(s, "LOTO")
        kept = batch_report(s, "LOTO")
        with sqlite3.connect(s.path) as c:  # what an earlier version left: no tallies for this batch
            assert c.execute("DELETE FROM counters WHERE name LIKE '%:LOTO'").rowcount >= 4
        assert s.lot_tallies("LOTO") is None
        assert batch_report(s, "LOTO") == kept
    finally:
        await s.close()
