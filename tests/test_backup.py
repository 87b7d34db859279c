"""`linectl backup` / `linectl restore`: a copy of the live store while the daemon produces, put back with checks.

The daemon is the real one (tests/engine_helpers.simulated_line: simulators,
drivers, store writer, broker), producing while `linectl backup` runs as a
separate process beside it. What the copy must hold is read back from the
source store afterwards: every event and audit record up to the copy's last
seq, byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import simulated_line, wait_for

from linectl.store import SCHEMA_VERSION, Store

ROOT = Path(__file__).resolve().parent.parent
LINECTL = [sys.executable, "-m", "linectl", "--log-level", "warning"]
#: outbox columns fixed when an event is stored (forwarded_at changes when the forwarder publishes it)
OUTBOX_COLS = "seq, event_id, kind, lot, gtin, serial, serial_id, created_at, body, epcis"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LINECTL, *args], check=False, capture_output=True, text=True, timeout=120)


async def acli(*args: str) -> tuple[int, str, str]:
    """The CLI as its own process, awaited, so the daemon's event loop in this process keeps producing meanwhile."""
    proc = await asyncio.create_subprocess_exec(*LINECTL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def rows(db: Path, sql: str, *params: object) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def last_seq(db: Path) -> int:
    return rows(db, "SELECT seq FROM sqlite_sequence WHERE name = 'outbox'")[0][0]


async def test_backup_of_the_live_store_while_producing_then_restore(tmp_path: Path):
    bak = tmp_path / "line-backup.db"
    async with simulated_line(tmp_path, rate=1200, defect_rate=0.05, seed=3) as sl:
        db = sl.db
        line = sl.line
        await sl.create_batch(300)
        await sl.start_batch()
        await wait_for(lambda: line.batch.good_total() >= 40, 60, "production under way")
        before = line.batch.good_total()
        rc, out, err = await acli("backup", "--db", str(db), "--out", str(bak), "--json")
        assert rc == 0, err
        summary = json.loads(out.strip().splitlines()[-1])
        # the backup ran beside the daemon: it took no owner lock, and the line kept producing through it
        assert sl.daemon.store.lock is not None and sl.daemon.store.lock.held
        await wait_for(lambda: line.batch.good_total() >= before + 20, 60, "production after the backup")
        assert summary["schema_version"] == SCHEMA_VERSION and summary["batches"] == 1 and summary["open_batches"]
        assert summary["last_seq"] > 0 and summary["bytes"] == bak.stat().st_size
        assert not Path(f"{bak}-wal").exists(), "a backup is one self-contained file"

        # restoring onto the store the daemon owns is refused, naming the owner, and changes nothing
        rc, out, err = await acli("restore", "--from", str(bak), "--db", str(db))
        assert rc == 3 and f"PID {os.getpid()}" in err and "Traceback" not in err, err
        assert not list(tmp_path.glob("line.db.replaced-*"))

        await wait_for(lambda: line.batch.good_total() >= 120, 90, "more production")
    # the daemon is gone (store closed); the source now has records beyond the backup point
    src_last = last_seq(db)
    assert src_last > summary["last_seq"]

    # the copy is sound and holds exactly the source's records up to its last seq
    assert cli("audit", "verify", "--db", str(bak)).returncode == 0
    upto = summary["last_seq"]
    assert rows(bak, f"SELECT {OUTBOX_COLS} FROM outbox ORDER BY seq") == rows(db, f"SELECT {OUTBOX_COLS} FROM outbox WHERE seq <= ? ORDER BY seq", upto)
    n_audit = summary["audit_records"]
    assert rows(bak, "SELECT * FROM audit ORDER BY seq") == rows(db, "SELECT * FROM audit WHERE seq <= ? ORDER BY seq", n_audit)

    # restore into a new path: opens read-write, audit verifies, same records
    new = tmp_path / "restored" / "line.db"
    new.parent.mkdir()
    r = cli("restore", "--from", str(bak), "--db", str(new), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["last_seq"] == upto and res["replaced"] is None and res["forced"] is False
    store = await Store.open(new, create=False, lock="test")
    try:
        check = store.verify_audit()
        assert check.ok and check.checked == n_audit
        assert store.last_seq() == upto
        assert [b.lot for b in store.batches()] == [line.batch.lot]
    finally:
        await store.close()
    assert rows(new, f"SELECT {OUTBOX_COLS} FROM outbox ORDER BY seq") == rows(db, f"SELECT {OUTBOX_COLS} FROM outbox WHERE seq <= ? ORDER BY seq", upto)

    # restoring the older backup over the source would lose records: refused, saying how many, nothing changed
    r = cli("restore", "--from", str(bak), "--db", str(db))
    assert r.returncode == 1 and f"{src_last - upto} event record(s) the backup lacks" in r.stderr, r.stderr
    assert last_seq(db) == src_last and not list(tmp_path.glob("line.db.replaced-*"))
    # forced: the backup is in place and the replaced store is kept aside, whole
    r = cli("restore", "--from", str(bak), "--db", str(db), "--force")
    assert r.returncode == 0, r.stderr
    (aside,) = tmp_path.glob("line.db.replaced-*[0-9TZ]")
    assert last_seq(db) == upto and last_seq(aside) == src_last
    assert cli("audit", "verify", "--db", str(db)).returncode == 0
    assert cli("audit", "verify", "--db", str(aside)).returncode == 0


# --------------------------------------------------------------------------- refusals


LINE_A = {"enterprise": "acme", "site": "lyon", "area": "packaging", "line": "l1", "gln": "5412345000013"}
LINE_B = {**LINE_A, "line": "l2"}


async def _store(path: Path, actions: int = 3, identity: dict[str, str] | None = None) -> Path:
    s = await Store.open(path, identity=identity)
    try:
        for i in range(actions):
            await s.audit("cli:test", "cli", "test_action", {"i": i})
    finally:
        await s.close()
    return path


def test_backup_refuses_to_overwrite_without_force_and_a_missing_store(tmp_path: Path):
    db = asyncio.run(_store(tmp_path / "a.db"))
    out = tmp_path / "a.bak"
    assert cli("backup", "--db", str(db), "--out", str(out)).returncode == 0
    first = out.read_bytes()
    asyncio.run(_store_more(db))
    r = cli("backup", "--db", str(db), "--out", str(out))
    assert r.returncode == 2 and "exists" in r.stderr and out.read_bytes() == first
    r = cli("backup", "--db", str(db), "--out", str(out), "--force")
    assert r.returncode == 0 and out.read_bytes() != first, r.stderr
    r = cli("backup", "--db", str(tmp_path / "nope.db"), "--out", str(tmp_path / "n.bak"))
    assert r.returncode == 3 and "no such file" in r.stderr and not (tmp_path / "n.bak").exists()
    r = cli("backup", "--db", str(db), "--out", str(tmp_path / "no-dir" / "x.bak"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


async def _store_more(path: Path) -> None:
    s = await Store.open(path, create=False)
    try:
        await s.audit("cli:test", "cli", "later_action", {})
    finally:
        await s.close()


def test_restore_refuses_what_is_not_a_sound_linectl_store(tmp_path: Path):
    target = tmp_path / "t.db"
    text = tmp_path / "notes.txt"
    text.write_text("not a store\n")
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as c:
        c.execute("CREATE TABLE t(x)")
    good = asyncio.run(_store(tmp_path / "good.db"))
    newer = tmp_path / "newer.db"
    shutil.copy(good, newer)
    with sqlite3.connect(newer) as c:
        c.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    tampered = tmp_path / "tampered.db"
    shutil.copy(good, tampered)
    with sqlite3.connect(tampered) as c:
        for (name,) in c.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit'").fetchall():
            c.execute(f"DROP TRIGGER {name}")
        c.execute("UPDATE audit SET actor = 'cli:someone-else' WHERE seq = 2")
    cases = [
        (text, 3, "no SQLite header"),
        (foreign, 3, "not a linectl store (no meta table)"),
        (newer, 3, f"schema version {SCHEMA_VERSION + 1} is newer than this linectl supports"),
        (tampered, 1, "audit trail BROKEN at record 2"),
        (tmp_path / "missing.db", 3, "no such file"),
    ]
    for src, rc, msg in cases:
        r = cli("restore", "--from", str(src), "--db", str(target))
        assert r.returncode == rc and msg in r.stderr and "Traceback" not in r.stderr, (src.name, r.returncode, r.stderr)
        assert not target.exists()
    # a store whose audit chain is broken gives no backup file (the copy fails its checks), and says so
    out = tmp_path / "tampered.bak"
    r = cli("backup", "--db", str(tampered), "--out", str(out))
    assert r.returncode == 1 and "audit trail BROKEN at record 2" in r.stderr and not out.exists(), r.stderr
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    # a sound backup goes in
    r = cli("restore", "--from", str(good), "--db", str(target))
    assert r.returncode == 0, r.stderr


def test_restore_refuses_to_replace_a_store_with_another_history(tmp_path: Path):
    a = asyncio.run(_store(tmp_path / "a.db"))
    b = asyncio.run(_store(tmp_path / "b.db"))  # another store: same shape, its own audit chain
    a_bytes = a.read_bytes()
    r = cli("restore", "--from", str(b), "--db", str(a))
    assert r.returncode == 1 and "different histories" in r.stderr, r.stderr
    assert a.read_bytes() == a_bytes and not list(tmp_path.glob("a.db.replaced-*"))
    # a backup of the same store at the same point replaces it without complaint (nothing lost), old one kept
    bak = tmp_path / "a.bak"
    assert cli("backup", "--db", str(a), "--out", str(bak)).returncode == 0
    a.chmod(0o640)
    as_root = os.geteuid() == 0
    if as_root:  # a restore run as root must leave the store to its owner (the service user), or the daemon cannot open it
        os.chown(a, 4242, 4242)
    r = cli("restore", "--from", str(bak), "--db", str(a))
    assert r.returncode == 0, r.stderr
    (aside,) = tmp_path.glob("a.db.replaced-*")
    assert aside.read_bytes() == a_bytes
    st = a.stat()
    assert st.st_mode & 0o777 == 0o640
    if as_root:
        assert (st.st_uid, st.st_gid) == (4242, 4242)
        assert (Path(f"{a}.lock").stat().st_uid, Path(f"{a}.lock").stat().st_gid) == (4242, 4242)


def test_restore_refuses_another_lines_store(tmp_path: Path):
    a = asyncio.run(_store(tmp_path / "a.db", identity=LINE_A))
    b = asyncio.run(_store(tmp_path / "b.db", identity=LINE_B))
    a_bytes = a.read_bytes()
    r = cli("restore", "--from", str(b), "--db", str(a))
    assert r.returncode == 1 and "belongs to another line" in r.stderr and "'line': 'l2'" in r.stderr, r.stderr
    assert a.read_bytes() == a_bytes
    # with the line's config: a backup of another line is refused even into an empty place
    cfg = tmp_path / "line.yaml"
    src = (ROOT / "config" / "demo-line.yaml").read_text(encoding="utf-8")
    assert "path: linectl-demo.db" in src
    cfg.write_text(src.replace("path: linectl-demo.db", f"path: {tmp_path / 'new.db'}"))
    r = cli("restore", "--from", str(b), "-c", str(cfg))
    assert r.returncode == 1 and "another line's store" in r.stderr and not (tmp_path / "new.db").exists(), r.stderr


def test_restore_refuses_a_wal_left_without_its_store(tmp_path: Path):
    good = asyncio.run(_store(tmp_path / "good.db"))
    target = tmp_path / "t.db"
    Path(f"{target}-wal").write_bytes(b"\0" * 32)
    r = cli("restore", "--from", str(good), "--db", str(target))
    assert r.returncode == 3 and "without their store" in r.stderr and not target.exists()


@pytest.mark.parametrize("cmd", [["backup", "--out", "x.bak"], ["restore", "--from", "x.bak"]])
def test_backup_and_restore_need_a_store_path(cmd: list[str], tmp_path: Path):
    r = subprocess.run([*LINECTL, *cmd], check=False, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "--db PATH" in r.stderr and "Traceback" not in r.stderr
