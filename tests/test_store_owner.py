"""One store, one owner (issue 9, items 3, 4 and 6).

- the daemon holds an exclusive lock on `<db>.lock` for its lifetime: a second `linectl run` exits 3 naming
  the holder's PID and touches nothing (no crash recovery of the first one's in-flight serials); kill -9 of
  the holder releases it;
- read-only commands open SQLite read-only: they work while the store is held, change nothing, create no
  file, and refuse (rather than migrate) an old store;
- only `linectl init` creates a store; every other command refuses a missing one (exit 3); a store records
  its line's identity, another line's config is refused, a store from before identities adopts it (audited);
- `linectl batch close|stop` work offline on a store no daemon holds, audited like the daemon's;
- Ctrl-C (SIGINT) or kill -9 of `linectl demo` mid-batch leaves a store the offline close repairs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import LINECTL, REPO, TEST_PASSWORDS, db_query, lot_events_from_db, password_env, spawn, stop_proc

from linectl.events import UnitDecommissioned
from linectl.store import Store

GTIN = "09501101530003"

CONFIG = """\
line:
  enterprise: acme
  site: lyon
  area: packaging
  name: {name}
  gln: "{gln}"
  company_prefix_length: 7
products:
  - gtin: "{gtin}"
    name: Paracetamol 500 mg
    company_prefix_length: 7
    serials:
      scheme: pool
store:
  path: {db}
"""


def write_config(tmp: Path, db: Path, name: str = "line1", gln: str = "5412345000013") -> Path:
    p = tmp / f"{name}.yaml"
    p.write_text(CONFIG.format(name=name, gln=gln, gtin=GTIN, db=db))
    return p


def cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LINECTL, "--log-level", "error", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env={**os.environ, **(env or {})})


#: the demo's store has the default users (their passwords from the environment): qa closes and stops offline
QA = {"LINECTL_PASSWORD": TEST_PASSWORDS["qa"]}


def files_of(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


def fingerprint(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns


HOLDER = r"""
import asyncio, sys
from linectl.logging import setup_logging
from linectl.store import Store

setup_logging("warning")

async def main():
    s = await Store.open(sys.argv[1], create=False, lock="linectl run")
    await s.audit("system", "test", "holder_started", {})
    print("held", flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def hold(db: Path) -> subprocess.Popen[str]:
    """A process that owns the store (lock + writer), like a running daemon, until killed."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(db)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    assert p.stdout is not None
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.strip() == "held":
            return p
    raise AssertionError(f"the store holder exited: {''.join(seen)[-2000:]}")


def audit_actions(db: Path) -> list[tuple[str, str, str]]:
    return [(a, o, act) for (a, o, act) in db_query(db, "SELECT actor, origin, action FROM audit ORDER BY seq")]


# --------------------------------------------------------------------------- init / missing store / identity


def test_only_init_creates_a_store_and_missing_stores_are_refused(tmp_path: Path):
    db = tmp_path / "line.db"
    cfg = write_config(tmp_path, db)
    typo = tmp_path / "typo.db"
    f = tmp_path / "s.txt"
    f.write_text("A1\nA2\n")
    before = files_of(tmp_path)
    for args in (
        ["run", "-c", str(cfg), "--db", str(typo)],
        ["serials", "import", str(f), "--gtin", GTIN, "--db", str(typo)],
        ["serials", "import", str(f), "--gtin", GTIN, "-c", str(cfg)],
        ["report", "--db", str(typo), "--batch", "L1"],
        ["audit", "verify", "--db", str(typo)],
        ["export", "epcis", "--db", str(typo), "-c", str(cfg)],
        ["rework", "check", "--db", str(typo)],
        ["batch", "close", "-c", str(cfg), "--db", str(typo), "--lot", "L1"],
    ):
        r = cli(*args)
        assert r.returncode == 3, (args, r.returncode, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and "linectl init" in r.stderr, (args, r.stderr)
    assert files_of(tmp_path) == before, "a refused command created a file (store, WAL or lock)"

    r = cli("init", "-c", str(cfg))
    assert r.returncode == 0 and db.exists(), r.stderr
    assert "acme/lyon/packaging/line1" in r.stdout
    r = cli("init", "-c", str(cfg))  # never over an existing store
    assert r.returncode == 3 and "already exists" in r.stderr
    r = cli("serials", "import", str(f), "--gtin", GTIN, "-c", str(cfg))
    assert r.returncode == 0 and "accepted 2" in r.stdout, r.stderr
    actions = [a[2] for a in audit_actions(db)]
    assert actions[:2] == ["store_created", "line_identity_recorded"] and "store_initialised" in actions
    r = cli("audit", "verify", "--db", str(db))
    assert r.returncode == 0, r.stdout


def test_directory_and_unreadable_paths_are_refused_cleanly(tmp_path: Path):
    d = tmp_path / "adir.db"
    d.mkdir()
    cfg = write_config(tmp_path, d)
    for args in (["run", "-c", str(cfg)], ["report", "--db", str(d), "--batch", "L1"], ["init", "-c", str(cfg)],
                 ["serials", "status", "--db", str(d)]):
        r = cli(*args)
        assert r.returncode == 3 and "Traceback" not in r.stderr, (args, r.stderr)
    r = cli("init", "-c", str(write_config(tmp_path, tmp_path / "no" / "such" / "dir.db", name="line2")))
    assert r.returncode == 3 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_store_of_another_line_is_refused_and_old_stores_adopt_an_identity(tmp_path: Path):
    db = tmp_path / "line.db"
    mine = write_config(tmp_path, db, name="line1")
    other = write_config(tmp_path, db, name="line7", gln="5412345000020")
    assert cli("init", "-c", str(mine)).returncode == 0
    digest = fingerprint(db)
    f = tmp_path / "s.txt"
    f.write_text("B1\n")
    for args in (["run", "-c", str(other)], ["serials", "import", str(f), "--gtin", GTIN, "-c", str(other)],
                 ["serials", "status", "-c", str(other)], ["export", "epcis", "--db", str(db), "-c", str(other)],
                 ["batch", "close", "-c", str(other), "--lot", "L1"]):
        r = cli(*args)
        assert r.returncode == 3, (args, r.stdout, r.stderr)
        assert "line acme/lyon/packaging/line1 (GLN 5412345000013)" in r.stderr, r.stderr
        assert "line acme/lyon/packaging/line7 (GLN 5412345000020)" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert fingerprint(db)[0] == digest[0], "a refused command changed the store"

    # a store made before stores recorded their line (library-created, like a v2 store of an older linectl)
    old = tmp_path / "old.db"

    async def make() -> None:
        s = await Store.open(old)
        await s.close()

    asyncio.run(make())
    oldcfg = write_config(tmp_path, old, name="line3")
    r = cli("serials", "status", "-c", str(oldcfg))  # read-only: checks, never records
    assert r.returncode == 0, r.stderr
    assert "line_identity_recorded" not in [a[2] for a in audit_actions(old)]
    r = cli("serials", "import", str(f), "--gtin", GTIN, "-c", str(oldcfg), "--actor", "cli:qa")
    assert r.returncode == 0, r.stderr
    recorded = [a for a in audit_actions(old) if a[2] == "line_identity_recorded"]
    assert recorded == [("cli:qa", "cli", "line_identity_recorded")]
    r = cli("serials", "import", str(f), "--gtin", GTIN, "-c", str(write_config(tmp_path, old, name="line9")))
    assert r.returncode == 3 and "line acme/lyon/packaging/line3" in r.stderr, r.stderr


# --------------------------------------------------------------------------- lock + read-only commands


def test_held_store_refuses_writers_and_serves_readers_without_changing_a_byte(tmp_path: Path):
    db = tmp_path / "line.db"
    cfg = write_config(tmp_path, db)
    assert cli("init", "-c", str(cfg)).returncode == 0
    f = tmp_path / "s.txt"
    f.write_text("C1\nC2\n")
    assert cli("serials", "import", str(f), "--gtin", GTIN, "-c", str(cfg)).returncode == 0
    holder = hold(db)
    try:
        # writers: refused, naming the holder
        for args in (["run", "-c", str(cfg)], ["serials", "import", str(f), "--gtin", GTIN, "-c", str(cfg)],
                     ["rework", "decommission", f"(01){GTIN}(21)C1", "--db", str(db), "--actor", "x"],
                     ["recall", "--batch", "NOPE", "--db", str(db), "--mark", "--actor", "qa"]):
            r = cli(*args)
            assert r.returncode == 3, (args, r.stdout, r.stderr)
            assert f"PID {holder.pid}" in r.stderr and "Traceback" not in r.stderr, r.stderr
        wal = Path(f"{db}-wal")
        before_db, before_wal, before_files = fingerprint(db), fingerprint(wal), files_of(tmp_path)
        # readers: work beside the owner
        r = cli("serials", "status", "--db", str(db), "--json")
        assert r.returncode == 0 and json.loads(r.stdout)[GTIN]["available"] == 2, r.stderr
        assert cli("audit", "verify", "--db", str(db)).returncode == 0
        assert cli("trace", f"(01){GTIN}(21)C1", "--db", str(db)).returncode == 0
        assert cli("verify", f"(01){GTIN}(21)C1", "--db", str(db)).returncode == 1  # provisioned, not genuine
        assert cli("export", "epcis", "--db", str(db), "-c", str(cfg), "--out", str(tmp_path / "x.json")).returncode == 0
        r = cli("report", "--db", str(db), "--batch", "NOPE")
        assert r.returncode == 2 and "no batch NOPE" in r.stderr and "Traceback" not in r.stderr
        assert fingerprint(db) == before_db and fingerprint(wal) == before_wal
        assert files_of(tmp_path) == before_files | {"x.json"}
        # SIGKILL the owner: the kernel drops its lock; the stale lock file is no lock
        holder.kill()
        holder.wait(10)
        assert Path(f"{db}.lock").exists()
        r = cli("serials", "import", str(f), "--gtin", GTIN, "-c", str(cfg))
        assert r.returncode == 1 and "duplicates 2" in r.stdout, (r.stdout, r.stderr)  # ran (nothing new to accept)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def test_readonly_commands_create_nothing_and_never_migrate(tmp_path: Path):
    from test_store_open import build_v1

    db = tmp_path / "line.db"
    cfg = write_config(tmp_path, db)
    assert cli("init", "-c", str(cfg)).returncode == 0
    before, files = fingerprint(db), files_of(tmp_path)
    assert "line.db-wal" not in files
    for args in (["serials", "status", "--db", str(db)], ["audit", "verify", "--db", str(db)],
                 ["report", "--db", str(db), "--batch", "NOPE"], ["trace", f"(01){GTIN}(21)Q", "--db", str(db)]):
        r = cli(*args)
        assert r.returncode in (0, 1, 2) and "Traceback" not in r.stderr, (args, r.stderr)
    assert fingerprint(db) == before and files_of(tmp_path) == files, "a read-only command wrote or created a file"

    old = tmp_path / "v1.db"
    build_v1(old)
    digest, files = fingerprint(old), files_of(tmp_path)
    for args in (["serials", "status", "--db", str(old)], ["report", "--db", str(old), "--batch", "X"], ["audit", "verify", "--db", str(old)]):
        r = cli(*args)
        assert r.returncode == 3 and "needs migrating" in r.stderr, (args, r.stderr)
    assert fingerprint(old) == digest and files_of(tmp_path) == files


# --------------------------------------------------------------------------- two daemons on one store (real line)


@pytest.mark.slow
async def test_second_daemon_is_refused_and_touches_nothing(tmp_path: Path):
    from test_daemon import LineProcesses, _expiry

    lp = LineProcesses(tmp_path)
    try:
        lot = f"TWO{os.getpid()}"
        lp.start_sim()
        lp.start_daemon()
        lp.batch_ok("create", "--lot", lot, "--gtin", GTIN, "--expiry", _expiry(), "--qty", "5000", "--no-challenge")
        lp.batch_ok("start")
        await lp.wait(lambda: lp.counts(lot).get("commissioned", 0) >= 40, 60, "40 units commissioned")
        lp.batch_ok("pause")  # the printer keeps its queued codes: serials stay 'sent' while paused
        await lp.wait(lambda: lp.batch_state(lot) == "paused", 10, "paused")
        await lp.belt_empty()
        in_flight = {s for (s,) in lp.q("SELECT serial FROM serials WHERE lot=? AND state='sent'", lot)}
        assert in_flight, "no serial in flight: the test would prove nothing"
        seq = lp.q("SELECT max(seq) FROM outbox")[0][0]

        second = subprocess.run([*LINECTL, "run", "-c", str(lp.cfg)], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert second.returncode == 3, (second.returncode, second.stderr[-2000:])
        assert f"PID {lp.daemon.pid}" in second.stderr and "linectl run" in second.stderr, second.stderr[-2000:]
        assert "Traceback" not in second.stderr
        assert {s for (s,) in lp.q("SELECT serial FROM serials WHERE lot=? AND state='sent'", lot)} == in_flight
        assert not lp.q("SELECT 1 FROM audit WHERE action='crash_recovery'")
        assert not lp.q("SELECT 1 FROM outbox WHERE seq > ? AND kind='unit_decommissioned'", seq)
        assert lp.batch_state(lot) == "paused"
        # the first daemon still owns and runs the line
        lp.batch_ok("resume")
        good = lp.counts(lot).get("commissioned", 0)
        await lp.wait(lambda: lp.counts(lot).get("commissioned", 0) >= good + 20, 60, "production continues")

        # kill -9 of the owner frees the store: the next daemon takes it and does the crash recovery itself
        lp.daemon.send_signal(signal.SIGKILL)
        lp.daemon.wait(10)
        lp.start_daemon()
        await lp.wait(lambda: lp.batch_state(lot) == "stopped", 30, "batch stopped after restart")
        assert lp.q("SELECT 1 FROM audit WHERE action='crash_recovery'")
        holder = json.loads(Path(f"{lp.db}.lock").read_text())
        assert holder["pid"] == lp.daemon.pid and holder["command"] == "linectl run"
    finally:
        lp.close()


# --------------------------------------------------------------------------- offline close after an interrupted demo


def _demo(db: Path, log: Path, units: int = 3000) -> subprocess.Popen[bytes]:
    return spawn([*LINECTL, "--log-level", "warning", "demo", "--db", str(db), "--units", str(units), "--rate", "600"], log, env=password_env())


def _wait_commissioned(db: Path, p: subprocess.Popen[bytes], log: Path, n: int, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while True:
        assert p.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            rows = db_query(db, "SELECT lot, count(*) FROM serials WHERE state='commissioned' AND lot IS NOT NULL GROUP BY lot")
        except sqlite3.Error:
            rows = []
        if rows and rows[0][1] >= n:
            return str(rows[0][0])
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)


def _close_offline_and_report(tmp_path: Path, db: Path, lot: str) -> dict[str, Any]:
    demo_cfg = str(REPO / "config" / "demo-line.yaml")
    r = cli("batch", "close", "-c", demo_cfg, "--db", str(db), "--unused", "void", "--actor", "qa1", "--user", "qa", env=QA)
    assert r.returncode == 2 and "--actor 'qa1' is not --user 'qa'" in r.stderr  # with access control the actor is the user
    r = cli("batch", "close", "-c", demo_cfg, "--db", str(db), "--unused", "void", "--user", "operator", env={"LINECTL_PASSWORD": TEST_PASSWORDS["operator"]})
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["code"] == "forbidden", r.stdout  # operators do not close batches
    r = cli("batch", "close", "-c", demo_cfg, "--db", str(db), "--unused", "void", "--user", "qa", env={"LINECTL_PASSWORD": "wrong"})
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["code"] == "wrong_password", r.stdout
    r = cli("batch", "close", "-c", demo_cfg, "--db", str(db), "--unused", "void", "--user", "qa", env=QA)
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["code"] == "signature_required", r.stdout  # a close is signed
    r = cli("batch", "close", "-c", demo_cfg, "--db", str(db), "--unused", "void", "--user", "qa", "--sign", env=QA)
    assert r.returncode == 0, (r.stdout, r.stderr)
    reply = json.loads(r.stdout)
    assert reply["ok"] and reply["result"]["offline"] and reply["result"]["lot"] == lot
    assert reply["result"]["state"] == "closed"
    assert db_query(db, "SELECT state FROM batches WHERE lot=?", (lot,))[0][0] == "closed"
    assert not db_query(db, "SELECT 1 FROM serials WHERE lot=? AND state IN ('sent', 'allocated')", (lot,))
    r = cli("report", "--db", str(db), "--batch", lot, "--json")
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr
    report = json.loads(r.stdout)
    assert report["lot"] == lot and report["state"] == "closed", report
    r = cli("audit", "verify", "--db", str(db))
    assert r.returncode == 0, r.stdout
    closes = [a for a in audit_actions(db) if a[2] == "close_batch"]
    assert closes == [("qa", "cli:offline", "close_batch")], closes
    signed = db_query(db, "SELECT s.signer, s.meaning, a.action FROM signatures s JOIN audit a ON s.record_ref = 'audit:' || a.seq "
                      "AND s.record_digest = a.hash WHERE a.action = 'close_batch'")
    assert signed == [("qa", "approved", "close_batch")]
    # a closed batch stays closed: a second offline close is refused, not applied twice
    r = cli("batch", "close", "-c", demo_cfg, "--db", str(db), "--lot", lot, "--user", "qa", "--sign", env=QA)
    assert r.returncode == 1 and "already closed" in r.stderr and "Traceback" not in r.stderr
    return reply


@pytest.mark.slow
def test_sigint_of_the_demo_leaves_a_store_the_offline_close_repairs(tmp_path: Path):
    db, log = tmp_path / "demo.db", tmp_path / "demo.log"
    p = _demo(db, log)
    try:
        lot = _wait_commissioned(db, p, log, 150)
        p.send_signal(signal.SIGINT)  # Ctrl-C
        rc = p.wait(60)
    finally:
        stop_proc(p, signal.SIGKILL, 10)
    out = log.read_text(errors="replace")
    assert "Traceback" not in out, out[-3000:]
    assert rc == 130 and "batch close" in out, (rc, out[-2000:])
    state = db_query(db, "SELECT state FROM batches WHERE lot=?", (lot,))[0][0]
    assert state != "closed"
    # a rerun on the same store refuses cleanly (no traceback), naming the open batch
    r = subprocess.run([*LINECTL, "demo", "--db", str(db), "--units", "10"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 3 and lot in r.stderr and "batch close" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    reply = _close_offline_and_report(tmp_path, db, lot)
    assert reply["result"]["report"]["lot"] == lot


@pytest.mark.slow
def test_kill9_of_the_demo_then_offline_stop_and_close(tmp_path: Path):
    db, log = tmp_path / "demo.db", tmp_path / "demo.log"
    p = _demo(db, log)
    try:
        lot = _wait_commissioned(db, p, log, 100)
        os.killpg(p.pid, signal.SIGKILL)  # the demo and its simulator/broker children
        p.wait(10)
    finally:
        stop_proc(p, signal.SIGKILL, 10)
    assert db_query(db, "SELECT state FROM batches WHERE lot=?", (lot,))[0][0] == "running"
    sent = {s for (s,) in db_query(db, "SELECT serial FROM serials WHERE lot=? AND state='sent'", (lot,))}
    demo_cfg = str(REPO / "config" / "demo-line.yaml")
    r = cli("batch", "stop", "-c", demo_cfg, "--db", str(db), "--user", "qa", "--reason", "demo killed", env=QA)
    assert r.returncode == 0 and json.loads(r.stdout)["result"] == {"lot": lot, "state": "stopped", "previous": "running", "offline": True}, r.stderr
    assert db_query(db, "SELECT state FROM batches WHERE lot=?", (lot,))[0][0] == "stopped"
    r = cli("batch", "stop", "-c", demo_cfg, "--db", str(db))
    assert r.returncode == 2 and "give --user" in r.stderr  # no anonymous command on a line with access control
    r = cli("batch", "stop", "-c", demo_cfg, "--db", str(db), "--user", "qa", env=QA)
    assert r.returncode == 1 and "only a running" in r.stderr
    reply = _close_offline_and_report(tmp_path, db, lot)
    decommissioned = {e.serial for e in lot_events_from_db(db, lot) if isinstance(e, UnitDecommissioned) and e.reason.value == "line_stopped"}
    assert sent <= decommissioned and reply["result"]["decommissioned_in_flight"] == len(sent)
    assert [a for a in audit_actions(db) if a[2] == "stop_batch"] == [("qa", "cli:offline", "stop_batch")]


# --------------------------------------------------------------------------- the store operations themselves (in-process)


async def test_owner_lock_and_close_batch_operation(tmp_path: Path):
    from linectl.config import RandomSerials
    from linectl.events import BatchState, BatchStateChanged
    from linectl.store import StoreError
    from linectl.store.lock import StoreLocked

    db = tmp_path / "s.db"
    s = await Store.open(db, lock="linectl run")
    try:
        with pytest.raises(StoreLocked, match=f"PID {os.getpid()} \\(linectl run"):
            await Store.open(db, create=False, lock="linectl serials import")
        await s.create_batch("L1", GTIN, "291231", 100, actor="t")
        await s.append(BatchStateChanged(lot="L1", gtin=GTIN, state=BatchState.RUNNING, previous=BatchState.CREATED, actor="t"))
        serials = await s.allocate(GTIN, "L1", 10, RandomSerials(scheme="random"))
        await s.mark_sent(GTIN, "L1", serials[:3])
        seq = s.last_seq()
        with pytest.raises(StoreError, match="running; stop it before closing"):
            await s.close_batch("L1", "void", "t@daemon")
        assert s.last_seq() == seq and s.batch("L1").state == "running"  # refused as a whole, nothing written
        res = await s.close_batch("L1", "return", "qa@cli:offline", stop_reason="crashed")
        assert res == {"lot": "L1", "gtin": GTIN, "previous": "running", "policy": "return", "unused": 7, "decommissioned": 3}
        assert {k: v for k, v in s.lot_counts("L1").items() if v} == {"decommissioned": 3}  # returned ones left the lot
        assert [r.kind for r in s.outbox(seq, only_unforwarded=False)] == ["batch_state", "serials_returned"] + ["unit_decommissioned"] * 3 + ["batch_state"]
        with pytest.raises(StoreError, match="already closed"):
            await s.close_batch("L1", "void", "t")
        assert s.verify_audit().ok
    finally:
        await s.close()
    s2 = await Store.open(db, create=False, lock="linectl run")  # released by close()
    await s2.close()
