"""Audit trail hash chain: any altered, deleted or truncated record is found and named."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from linectl.store import Store
from linectl.store.audit import row_hash


async def make(path, n: int = 10) -> None:
    s = await Store.open(path)
    for i in range(n):
        await s.audit(f"cli:user{i % 3}", "cli", "config_changed", {"i": i, "what": "min_grade", "to": 1.5 + i / 10})
    await s.close()


def tamper(path, *sql: str, params: tuple = ()) -> None:
    with sqlite3.connect(path) as c:
        # a tamperer with the file can drop the guard triggers; the chain must still tell
        c.execute("DROP TRIGGER IF EXISTS audit_never_updated")
        c.execute("DROP TRIGGER IF EXISTS audit_never_deleted")
        for q in sql:
            c.execute(q, params if "?" in q else ())


async def check(path):
    s = await Store.open(path, readonly=True)
    try:
        return s.verify_audit()
    finally:
        await s.close()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "linectl", *args], capture_output=True, text=True, timeout=60)


async def test_intact_chain_verifies(tmp_path):
    p = tmp_path / "a.db"
    await make(p)
    chk = await check(p)
    assert chk.ok and chk.checked == 11 and chk.first_bad_seq is None
    s = await Store.open(p, readonly=True)
    recs = s.audit_log()
    await s.close()
    assert recs[0].prev_hash == "0" * 64 and all(b.prev_hash == a.hash for a, b in zip(recs, recs[1:]))
    assert recs[5].detail["i"] == 4 and recs[5].actor == "cli:user1"


async def test_altered_record_is_named(tmp_path):
    p = tmp_path / "b.db"
    await make(p)
    tamper(p, "UPDATE audit SET detail = replace(detail, '\"to\":1.9', '\"to\":9.9') WHERE seq = 6")
    chk = await check(p)
    assert not chk.ok and chk.first_bad_seq == 6 and "altered" in chk.reason and chk.checked == 5


async def test_altered_actor_with_recomputed_hash_breaks_the_next_link(tmp_path):
    p = tmp_path / "c.db"
    await make(p)
    with sqlite3.connect(p) as c:
        seq, ts, _actor, origin, action, detail, prev, _h = c.execute("SELECT * FROM audit WHERE seq=4").fetchone()
    forged = row_hash(seq, ts, "cli:someone_else", origin, action, detail, prev)
    tamper(p, "UPDATE audit SET actor='cli:someone_else', hash=? WHERE seq=4", params=(forged,))
    chk = await check(p)
    assert not chk.ok and chk.first_bad_seq == 5 and "prev_hash" in chk.reason


async def test_deleted_middle_record_is_named(tmp_path):
    p = tmp_path / "d.db"
    await make(p)
    tamper(p, "DELETE FROM audit WHERE seq = 7")
    chk = await check(p)
    assert not chk.ok and chk.first_bad_seq == 7 and "missing" in chk.reason


async def test_truncated_tail_is_detected(tmp_path):
    p = tmp_path / "e.db"
    await make(p)
    tamper(p, "DELETE FROM audit WHERE seq >= 9")
    chk = await check(p)
    assert not chk.ok and chk.first_bad_seq == 9 and "truncated" in chk.reason and chk.checked == 8


async def test_rows_appended_outside_linectl_are_detected(tmp_path):
    p = tmp_path / "f.db"
    await make(p, 3)
    with sqlite3.connect(p) as c:
        head = c.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()[0]
        h = row_hash(5, "2030-01-01T00:00:00.000000+00:00", "x", "y", "z", "{}", head)
        c.execute("INSERT INTO audit VALUES (5, '2030-01-01T00:00:00.000000+00:00', 'x', 'y', 'z', '{}', ?, ?)", (head, h))
    chk = await check(p)
    assert not chk.ok and chk.first_bad_seq == 5 and "outside linectl" in chk.reason


async def test_guard_triggers_refuse_casual_edits(tmp_path):
    p = tmp_path / "g.db"
    await make(p, 1)
    with sqlite3.connect(p) as c:
        with pytest.raises(sqlite3.IntegrityError, match="never changed"):
            c.execute("UPDATE audit SET actor='x'")
        with pytest.raises(sqlite3.IntegrityError, match="never deleted"):
            c.execute("DELETE FROM audit")


async def test_cli_audit_verify(tmp_path):
    p = tmp_path / "h.db"
    await make(p)
    r = cli("audit", "verify", "--db", str(p))
    assert r.returncode == 0 and r.stdout.strip() == "audit trail OK: 11 records"
    tamper(p, "DELETE FROM audit WHERE seq = 3")
    r = cli("audit", "verify", "--db", str(p))
    assert r.returncode == 1
    assert "record 3" in r.stdout and "missing" in r.stdout


async def test_audit_detail_is_canonical_json(tmp_path):
    p = tmp_path / "i.db"
    s = await Store.open(p)
    await s.audit("cli:x", "cli", "weird", {"b": 1, "a": {"z": [1, 2]}, "obj": object.__name__, "t": (1, 2)})
    await s.close()
    with sqlite3.connect(p) as c:
        d = c.execute("SELECT detail FROM audit WHERE action='weird'").fetchone()[0]
    assert d == json.dumps(json.loads(d), sort_keys=True, separators=(",", ":"))
    assert (await check(p)).ok
