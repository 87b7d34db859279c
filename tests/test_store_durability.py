"""Durability under kill -9, full disk (page cap and a real tmpfs), and two writer processes on one file."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from linectl import events as ev
from linectl.config import PoolSerials
from linectl.store import PoolExhausted, Store, StoreError

GTIN = "09501101530003"
PY = sys.executable


def integrity(path) -> str:
    with sqlite3.connect(path) as c:
        return c.execute("PRAGMA integrity_check").fetchone()[0]


# --------------------------------------------------------------------------- kill -9

APPENDER = textwrap.dedent(
    """
    import asyncio, sys
    from linectl import events as ev
    from linectl.logging import setup_logging
    from linectl.store import Store

    setup_logging("warning")  # logs to stderr; stdout carries the acknowledged seqs

    async def producer(store, k):
        i = 0
        while True:
            i += 1
            evs = [ev.AlarmRaised(code="tick", severity=ev.Severity.INFO, message=f"p{k} #{i}.{j}") for j in range(1 + i % 3)]
            seqs = await store.append(*evs)
            sys.stdout.write(" ".join(map(str, seqs)) + "\\n")
            sys.stdout.flush()

    async def main():
        store = await Store.open(sys.argv[1])
        print("READY", flush=True)
        await asyncio.gather(*(producer(store, k) for k in range(8)))

    asyncio.run(main())
    """
)


def test_kill_9_loses_no_acknowledged_event(tmp_path):
    db = tmp_path / "kill.db"
    script = tmp_path / "appender.py"
    script.write_text(APPENDER)
    proc = subprocess.Popen([PY, str(script), str(db)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    acked: list[int] = []
    try:
        assert proc.stdout.readline().strip() == "READY"
        deadline = time.monotonic() + 20
        while len(acked) < 3000 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked.extend(int(x) for x in line.split())
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream: appends in flight, a group possibly mid-commit
        proc.wait()
    assert len(acked) >= 1000, "the child did not produce enough events"
    print("acknowledged before kill:", len(acked))
    assert integrity(db) == "ok"
    with sqlite3.connect(db) as c:
        stored = {r[0] for r in c.execute("SELECT seq FROM outbox")}
    missing = set(acked) - stored
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:5]}"

    async def reopen():
        s = await Store.open(db, integrity="full")
        try:
            chk = s.verify_audit()  # alarms write audit rows: the chain and its head survived too
            assert chk.ok, chk.reason
            assert chk.checked >= len(stored)
            (nxt,) = await s.append(ev.AlarmRaised(code="after", severity=ev.Severity.INFO, message="after restart"))
            assert nxt > max(stored)
        finally:
            await s.close()

    asyncio.run(reopen())


# --------------------------------------------------------------------------- full disk via max_page_count


def payload(n: int, size: int = 900) -> list[ev.AlarmRaised]:
    return [ev.AlarmRaised(code="fill", severity=ev.Severity.INFO, message="x" * size) for _ in range(n)]


async def test_full_database_fails_the_group_and_recovers(tmp_path):
    db = tmp_path / "full.db"
    store = await Store.open(db)
    try:
        kept = await store.append(*payload(50))
        pages = await store.set_max_db_bytes(os.path.getsize(db) + 64 * 1024)
        assert pages > 0
        # fill until the cap bites; each failing append must leave nothing behind
        err = None
        for _ in range(200):
            before = store.last_seq()
            try:
                await store.append(*payload(40))
            except StoreError as exc:
                err = exc
                assert store.last_seq() == before  # rolled back, nothing half-written
                break
        assert err is not None and "database or disk is full" in str(err) and str(db) in str(err)
        # a whole group of concurrent operations fails together, the writer keeps running
        results = await asyncio.gather(*(store.append(*payload(40)) for _ in range(10)), return_exceptions=True)
        assert any(isinstance(r, StoreError) and "full" in str(r) for r in results)
        assert store._writer.is_alive()
        assert store.stats()["writer"]["groups_failed"] >= 1
        # earlier data intact
        assert [r.seq for r in store.outbox(0, 50)] == kept
        assert store.integrity_check() == ["ok"]
        assert store.verify_audit().ok
        # space returns: writes succeed again
        await store.set_max_db_bytes(None)
        seqs = await store.append(*payload(200))
        assert len(seqs) == 200
        assert store.verify_audit().ok
    finally:
        await store.close()
    assert integrity(db) == "ok"


# --------------------------------------------------------------------------- full disk on a real tmpfs


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


async def test_real_full_disk_on_tmpfs(small_tmpfs):
    db = small_tmpfs / "line.db"
    filler = small_tmpfs / "filler"
    store = await Store.open(db)
    try:
        kept = await store.append(*payload(20))
        # take most of the space away, leaving room for a few groups
        free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
        filler.write_bytes(b"\0" * max(0, free - 400 * 1024))
        err = None
        for _ in range(300):
            before = store.last_seq()
            try:
                await store.append(*payload(40))
            except StoreError as exc:
                err = exc
                assert store.last_seq() == before
                break
        assert err is not None, "the disk never filled"
        assert "full" in str(err) or "I/O" in str(err), str(err)
        print("tmpfs error:", err)
        assert store._writer.is_alive()
        assert [r.seq for r in store.outbox(0, 20)] == kept
        filler.unlink()  # space returns
        seqs = await store.append(*payload(40))
        assert len(seqs) == 40
        assert store.integrity_check() == ["ok"] and store.verify_audit().ok
    finally:
        await store.close()


# --------------------------------------------------------------------------- two processes, one pool

ALLOCATOR = textwrap.dedent(
    """
    import asyncio, json, sys
    from linectl.config import PoolSerials, SequentialSerials
    from linectl.logging import setup_logging
    from linectl.store import PoolExhausted, Store

    setup_logging("warning")

    async def main():
        store = await Store.open(sys.argv[1])
        print("READY", flush=True)
        sys.stdin.readline()  # both start together: real contention for the write lock
        pool, seq = [], []
        try:
            for _ in range(40):
                seq += await store.allocate("09501101530003", "LOTS", 25, SequentialSerials(scheme="sequential", width=10))
            print("SEQDONE", flush=True)
            sys.stdin.readline()  # second barrier: neither can drain the pool before the other starts
            pool += await store.allocate("09501101530003", "LOTP", 5, PoolSerials(scheme="pool", low_water=0))
            print("ONE", flush=True)
            sys.stdin.readline()  # third barrier: each holds a block, then both drain the rest at once
            while True:
                try:
                    pool += await store.allocate("09501101530003", "LOTP", 5, PoolSerials(scheme="pool", low_water=0))
                except PoolExhausted as exc:
                    if exc.available:
                        pool += await store.allocate("09501101530003", "LOTP", exc.available, PoolSerials(scheme="pool", low_water=0))
                    else:
                        break
        finally:
            await store.close()
        print(json.dumps({"pool": pool, "seq": seq}))

    asyncio.run(main())
    """
)


async def test_two_processes_never_share_a_serial(tmp_path):
    db = tmp_path / "shared.db"
    n = 4_000
    store = await Store.open(db)
    await store.create_batch("LOTP", GTIN, "271231", n, actor="t")
    await store.create_batch("LOTS", GTIN, "271231", n, actor="t")
    res = await store.provision(GTIN, [f"P{i:07d}" for i in range(n)], "test")
    assert res.accepted == n
    await store.close()
    script = tmp_path / "alloc.py"
    script.write_text(ALLOCATOR)
    procs = [
        await asyncio.create_subprocess_exec(PY, str(script), str(db), stdin=asyncio.subprocess.PIPE,
                                             stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        for _ in range(2)
    ]
    for p in procs:
        assert (await asyncio.wait_for(p.stdout.readline(), 30)).strip() == b"READY"
    for p in procs:
        p.stdin.write(b"go\n")
        await p.stdin.drain()
    for p in procs:
        assert (await asyncio.wait_for(p.stdout.readline(), 60)).strip() == b"SEQDONE"
    for p in procs:
        p.stdin.write(b"go\n")
        await p.stdin.drain()
    for p in procs:  # a loaded scheduler can no longer let one process drain the pool before the other woke
        assert (await asyncio.wait_for(p.stdout.readline(), 60)).strip() == b"ONE"
    outs = await asyncio.wait_for(asyncio.gather(*(p.communicate(b"go\n") for p in procs)), 60)
    got = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err.decode()[-2000:]
        got.append(json.loads(out))
    a, b = got
    print("pool split:", len(a["pool"]), len(b["pool"]))
    assert a["pool"] and b["pool"], "both processes must have allocated (real contention)"
    assert not set(a["pool"]) & set(b["pool"])
    assert sorted(a["pool"] + b["pool"]) == [f"P{i:07d}" for i in range(n)]
    assert not set(a["seq"]) & set(b["seq"]) and len(set(a["seq"] + b["seq"])) == 2000
    assert integrity(db) == "ok"
    s = await Store.open(db, readonly=True)
    assert s.serial_counts(GTIN)[GTIN]["allocated"] == n + 2000
    assert s.tally_mismatches() == []  # counts kept by two writers stay exact
    assert s.verify_audit().ok
    await s.close()


async def test_pool_exhausted_allocates_nothing(tmp_path):
    store = await Store.open(tmp_path / "ex.db")
    try:
        await store.create_batch("L", GTIN, "271231", 10, actor="t")
        await store.provision(GTIN, ["A", "B", "C"], "t")
        with pytest.raises(PoolExhausted) as ei:
            await store.allocate(GTIN, "L", 5, PoolSerials(scheme="pool", low_water=0))
        assert ei.value.available == 3 and store.available(GTIN) == 3
    finally:
        await store.close()
