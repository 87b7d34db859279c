"""Store v3 (PLC epochs, units of unknown fate, batch PLC counters): migration of a v2 file, the records, the report."""

from __future__ import annotations

import sqlite3

import pytest

from linectl import events as ev
from linectl.report import batch_report, format_report
from linectl.store import SCHEMA_VERSION, Store, StoreError

GTIN = "09501101530003"


async def _v2_file(path) -> None:
    """A store as linectl with schema 2 left it: no plc_epochs / unit_fates / plc_counters, meta at 2."""
    s = await Store.open(path)
    await s.create_batch("LOT2", GTIN, "291231", 10, actor="t")
    await s.provision(GTIN, ["A1", "A2", "A3"], "test")
    await s.close()
    with sqlite3.connect(path) as c:
        for t in ("plc_epochs", "unit_fates", "plc_counters"):
            c.execute(f"DROP TABLE {t}")
        c.execute("UPDATE meta SET value='2' WHERE key='schema_version'")


async def test_migrates_a_v2_file_with_plc_tables(tmp_path):
    p = tmp_path / "v2.db"
    await _v2_file(p)
    s = await Store.open(p)
    try:
        assert s.opened_from_version == 2 and s.stats()["schema_version"] == SCHEMA_VERSION
        assert s.batch("LOT2") is not None and s.available(GTIN) == 3
        assert s.plc_state("plc1") is None and s.unit_fates() == [] and s.plc_counters("LOT2") == []
        assert [a.detail for a in s.audit_log() if a.action == "schema_migrated"][0] == {"from": 2, "to": 3}
        assert s.verify_audit().ok
    finally:
        await s.close()
    with sqlite3.connect(p) as c:
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"plc_epochs", "unit_fates", "plc_counters"} <= tables
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def _batch_with_units(s: Store, lot: str, n: int) -> list[str]:
    await s.create_batch(lot, GTIN, "291231", n, actor="t")
    await s.provision(GTIN, [f"{lot}S{i}" for i in range(n)], "test")
    serials = await s.allocate(GTIN, lot, n, _Pool())
    await s.mark_sent(GTIN, lot, serials)
    await s.append(*[ev.UnitCommissioned(gtin=GTIN, serial=x, lot=lot, seq=i + 1) for i, x in enumerate(serials)])
    return serials


class _Pool:
    scheme = "pool"
    low_water = 0


async def test_fate_unknown_keeps_the_report_open_until_reconciled(tmp_path):
    s = await Store.open(tmp_path / "f.db")
    try:
        serials = await _batch_with_units(s, "LOTF", 4)
        n = await s.mark_fate_unknown([(GTIN, x, "LOTF", "pv1", "plc1", 1, i + 3, "PLC plc1 restarted") for i, x in enumerate(serials[2:])])
        assert n == 2
        # a serial never commissioned cannot be in doubt (it never had a good verdict)
        assert await s.mark_fate_unknown([(GTIN, "nope", "LOTF", "pv1", "plc1", 1, 9, "x")]) == 0
        r = batch_report(s, "LOTF")
        assert not r["balanced"] and r["fate_unknown"] == 2 and r["fate_unknown_serials"] == serials[2:]
        assert "unknown fate" in format_report(r)
        assert s.unit_fate(GTIN, serials[2]).state == "fate_unknown"
        with pytest.raises(StoreError, match="no open fate_unknown"):
            await s.resolve_fates(GTIN, [serials[0]], "passed", "qa", "test")
        await s.resolve_fates(GTIN, [serials[2]], "passed", "qa", "test")
        await s.append(ev.UnitDecommissioned(gtin=GTIN, serial=serials[3], lot="LOTF", reason=ev.RejectReason.PLC_FAILSAFE))
        await s.resolve_fates(GTIN, [serials[3]], "in_bin", "qa", "test")
        r = batch_report(s, "LOTF")
        assert r["fate_unknown"] == 0 and [f["outcome"] for f in r["fates_reconciled"]] == ["passed", "in_bin"]
        assert r["fates_reconciled"][0]["by"] == "qa@test"
        assert any(a.action == "units_reconciled" for a in s.audit_log())
    finally:
        await s.close()


async def test_packs_reconcile_against_plc_counters(tmp_path):
    s = await Store.open(tmp_path / "p.db")
    try:
        serials = await _batch_with_units(s, "LOTP", 6)
        # 6 commissioned and passed; 2 printed and rejected (no_read); 1 blank pack; 1 challenge unit rejected
        await s.create_batch("LOTX", GTIN, "291231", 1, actor="t")
        await s.append(ev.UnitDecommissioned(gtin=GTIN, serial=serials[4], lot="LOTP", reason=ev.RejectReason.NO_READ, seq=5))
        await s.append(ev.ChallengeResult(lot="LOTP", station="pv1", challenge="no_code", rejected=True, reason_seen="no_read", seq=1))
        await s.count_packs("LOTP", "blank")
        await s.save_plc_counters("LOTP", "plc1", 1, "start", {"trigger_count": 100, "pass_total": 90, "reject_total": 10, "gate_reject_total": 10})
        await s.save_plc_counters("LOTP", "plc1", 1, "stop", {"trigger_count": 108, "pass_total": 95, "reject_total": 13, "gate_reject_total": 13})
        # (the batch must be stopped for the pack balance to be judged)
        await s.append(ev.BatchStateChanged(lot="LOTP", gtin=GTIN, state=ev.BatchState.STOPPED, actor="t", reason="t"))
        r = batch_report(s, "LOTP")
        p = r["packs"]
        assert (p["triggered"], p["passed"], p["rejected"], p["reject_confirmed"]) == (8, 5, 3, 3)
        assert p["blank_packs"] == 1 and p["challenge_units"] == 1 and p["decommissioned_on_pack"] == 1
        assert p["passed_expected"] == 5 and p["rejected_expected"] == 3
        assert p["balanced"] and r["balanced_packs"], p
        # one pack more through the gate than serials commissioned: named, not balanced
        await s.save_plc_counters("LOTP", "plc1", 1, "start", {"trigger_count": 108, "pass_total": 95, "reject_total": 13, "gate_reject_total": 13})
        await s.save_plc_counters("LOTP", "plc1", 1, "stop", {"trigger_count": 109, "pass_total": 96, "reject_total": 13, "gate_reject_total": 13})
        p = batch_report(s, "LOTP")["packs"]
        assert not p["balanced"] and any("6 passed the gate but 5 expected" in x for x in p["problems"]), p["problems"]
        assert "packs problem" in format_report(batch_report(s, "LOTP"))
    finally:
        await s.close()


async def test_fate_unknown_visible_in_serials_status_trace_and_report_cli(tmp_path):
    import json
    import subprocess
    import sys

    db = tmp_path / "c.db"
    s = await Store.open(db)
    try:
        serials = await _batch_with_units(s, "LOTC", 3)
        await s.mark_fate_unknown([(GTIN, serials[1], "LOTC", "pv1", "plc1", 1, 2, "PLC plc1 restarted")])
    finally:
        await s.close()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "linectl", *args], capture_output=True, text=True, timeout=60)

    st = cli("serials", "status", "--db", str(db), "--json")
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)[GTIN]["fate_unknown"] == 1
    tr = cli("trace", f"01{GTIN}21{serials[1]}", "--db", str(db))
    assert tr.returncode == 0, tr.stderr
    t = json.loads(tr.stdout)
    assert t["status"] == "commissioned (fate_unknown)" and t["fate"]["cause"] == "PLC plc1 restarted"
    rep = cli("report", "--db", str(db), "--batch", "LOTC")
    assert rep.returncode == 1 and "fate unknown    1" in rep.stdout and serials[1] in rep.stdout, rep.stdout


async def test_units_of_an_earlier_epoch_are_never_matched_to_todays_reject_ring(tmp_path):
    """Found by the fault campaign (seed 41): after a PLC restart, production of the new epoch, then a kill -9,
    the restarted daemon matched reject-ring seqs of the new epoch to units of the old epoch with the same seq
    and decommissioned 5 packs that had passed the gate. A seq names a unit only within one epoch."""
    from types import SimpleNamespace

    from linectl.config import PoolSerials
    from linectl.engine.print_verify import PrintVerifyRuntime

    s = await Store.open(tmp_path / "line.db")
    try:
        await s.create_batch("LOTE", GTIN, "291231", 100, actor="t")
        serials = ["OLD83", "OLD84", "OLD85", "NEW1", "NEW2", "NEW84"]
        await s.provision(GTIN, serials, "test")
        await s.allocate(GTIN, "LOTE", len(serials), PoolSerials(scheme="pool"))
        await s.mark_sent(GTIN, "LOTE", serials)
        await s.append(
            *[ev.UnitCommissioned(gtin=GTIN, serial=f"OLD{n}", lot="LOTE", seq=n, station="pv1") for n in (83, 84, 85)],
            ev.AlarmRaised(code="plc_restarted", severity=ev.Severity.CRITICAL, message="PLC plc1 restarted", station="pv1", lot="LOTE"),
            *[ev.UnitCommissioned(gtin=GTIN, serial=f"NEW{n}", lot="LOTE", seq=n, station="pv1") for n in (1, 2, 84)],
            ev.AlarmRaised(code="plc_restarted", severity=ev.Severity.CRITICAL, message="PLC plc9 restarted", station="other", lot="LOTE"),
        )
        rt = object.__new__(PrintVerifyRuntime)  # only what the look-back reads: the station, its ring and the line
        rt.name, rt.ring_slots = "pv1", 64
        rt.line = SimpleNamespace(batch=SimpleNamespace(lot="LOTE"), store=s)  # type: ignore[assignment]
        got = rt._commissioned_before_start()
        assert got == {1: (GTIN, "NEW1", "LOTE"), 2: (GTIN, "NEW2", "LOTE"), 84: (GTIN, "NEW84", "LOTE")}
    finally:
        await s.close()
