"""The provisioner end to end: a real line (simulator, broker, daemon) whose pool product asks the L3 simulator
(linectl.simulators.l3_serials, serialbox REST over real HTTP) for serials, and a real `linectl run` process killed
between sending a request and storing its answer.

Ground truth is the L3 simulator's: every number it handed out (`handed_out`), whether its answer arrived or not.
The store must hold each delivered number imported once or refused with its reason, nothing the L3 did not hand
out, and no serial used twice; numbers allocated for an answer that never arrived are in requests recorded `lost`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import (
    LINECTL,
    REPO,
    create_and_start,
    db_query,
    simulated_line,
    spawn,
    stop_proc,
    variant_raw,
    wait_for,
    wait_good,
    wait_stopped,
)
from ruamel.yaml import YAML

from linectl import control as C
from linectl.demo import _rewrite_ports
from linectl.simulators.l3_serials import L3SerialsSim

pytestmark = pytest.mark.slow

GTIN = "09501101530003"


def pool_products(url: str, **pool: Any) -> list[dict[str, Any]]:
    products: list[dict[str, Any]] = variant_raw()["products"]
    products[0]["serials"] = {"scheme": "pool", "source": {"type": "serialbox", "url": url, "page_size": 200, "timeout_s": 5},
                              **pool}
    return products


def imported_by_request(db: Path) -> dict[str, str]:
    return dict(db_query(db, "SELECT serial, source FROM serials WHERE gtin=? AND source LIKE 'serialbox:%'", (GTIN,)))


def refused(db: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for (problems,) in db_query(db, "SELECT problems FROM serial_requests WHERE problems IS NOT NULL"):
        for s, why in json.loads(problems):
            out.setdefault(s, why)
    return out


def check_truth(db: Path, sim: L3SerialsSim) -> None:
    handed = sim.handed_out(GTIN)
    assert len(handed) == len(set(handed)), "the L3 itself handed a number out twice"
    imported = imported_by_request(db)
    ref = refused(db)
    assert set(imported) <= set(handed), "a serial the L3 never handed out is in the pool"
    lost = sum(r[0] for r in db_query(db, "SELECT size FROM serial_requests WHERE state='lost'"))
    missing = [s for s in handed if s not in imported and s not in ref]
    assert len(missing) <= lost, f"{len(missing)} numbers handed out are neither imported, refused nor in a lost request"
    used = db_query(db, "SELECT serial, count(*) FROM serials WHERE gtin=? GROUP BY serial HAVING count(*) > 1", (GTIN,))
    assert used == []


async def test_pool_refilled_from_l3_while_the_line_runs(tmp_path):
    """The batch drains the pool below low water: the line nudges the provisioner, which asks the L3 in pages (one of
    them short, one carrying duplicates) while units are printed; the run never stops for want of serials."""
    sim = L3SerialsSim(seed=3)
    sim.add_pool(GTIN, "random", minimum=10**8, maximum=10**9 - 1)
    await sim.start()
    try:
        over = {"products": pool_products(sim.url, low_water=900, request_count=400, check_interval_s=60)}
        async with simulated_line(tmp_path, overrides=over, rate=1500) as sl:
            db = sl.db
            prov = sl.daemon.provisioners[GTIN]
            # at start the pool is empty: the first look asks for request_count at once
            await wait_for(lambda: sl.line.store.available(GTIN) >= 400, 30, "the first 400 serials")
            sim.inject("short", 1, GTIN)
            sim.inject("duplicates", 1, GTIN, n=5)
            lot = await create_and_start(sl, 400)  # the pool is the L3's only (create_batch makes none up for a source)
            await wait_good(sl, 400, 120)
            await wait_stopped(sl)
            rows = db_query(db, "SELECT lot, state, size FROM serial_requests WHERE kind='request' ORDER BY id")
            assert any(r[0] == lot for r in rows), f"no request while batch {lot} ran: {rows}"
            assert all(r[1] == "imported" for r in rows), rows
            ref = refused(db)
            assert sum(1 for w in ref.values() if w.startswith("duplicate: already known")) == 5
            st = prov.status()
            assert st["pending"] == 0 and st["parked"] == [] and st["available"] == sl.line.store.available(GTIN)
            assert sl.daemon.upstream[0].state_payload()["serial_sources"][GTIN]["source"] == prov.name
            check_truth(db, sim)
            res = await sl.line.execute(C.CloseBatch(actor="test", unused_serials="void"), origin="test")
            voided = db_query(db, "SELECT count(*) FROM serials WHERE lot=? AND state='voided' AND source LIKE 'serialbox:%'", (lot,))[0][0]
            reported = res["unused_serials"].get("source")
            assert (reported or {}).get("count", 0) == voided  # the close reply names what the L3 gave and was never printed
            if voided:
                assert reported["state"] == "reported"  # serialbox has no return
    finally:
        await sim.stop()


async def test_l3_refusal_parks_with_alarm_and_the_retry_command_sends_it_again(tmp_path):
    sim = L3SerialsSim(seed=4)
    sim.add_pool(GTIN, "random", minimum=10**8, maximum=10**9 - 1)
    sim.inject("soap_fault", 1, GTIN)  # serialbox: 400 + JSON detail, the L3 says no
    await sim.start()
    try:
        over = {"products": pool_products(sim.url, low_water=100, request_count=300, check_interval_s=0.5)}
        async with simulated_line(tmp_path, overrides=over) as sl:
            prov = sl.daemon.provisioners[GTIN]
            await wait_for(lambda: prov.state == "parked", 30, "parked")
            assert "serial_request_parked" in [a.code for a in sl.line.alarms.values()]
            n = sim.requests
            await asyncio.sleep(1.5)  # three check intervals: nothing asked while parked
            assert sim.requests == n
            with pytest.raises(C.CommandRejected):
                await sl.line.execute({"name": "serials_retry", "gtin": "09501101530010"}, origin="test")
            # the operator's retry, as the CLI sends it: serials_retry over MQTT to the running daemon
            proc = await asyncio.create_subprocess_exec(
                *LINECTL, "upstream", "retry", "-c", str(sl.run_cfg_path), "--gtin", GTIN, "--actor", "qa", cwd=REPO,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()
            res = json.loads(out)["result"]
            assert len(res["retried"]) == 1
            # the parked request itself goes out again (same key; a refused request allocated nothing): 200 serials,
            # above low water, so nothing more is asked
            await wait_for(lambda: sl.line.store.available(GTIN) >= 200, 30, "serials after the retry")
            rows = db_query(sl.db, "SELECT id, state, attempts, size FROM serial_requests ORDER BY id")
            assert rows == [(res["retried"][0], "imported", 2, 200)]
            audit = [(r.action, r.origin) for r in sl.line.store.audit_log(limit=100_000)]
            origins = {o for a, o in audit if a == "serials_retry"}
            assert len(origins) == 1 and next(iter(origins)).startswith("mqtt:")
            assert ("serial_requests_retried", next(iter(origins))) in audit
            check_truth(sl.db, sim)
    finally:
        await sim.stop()


async def test_l3_down_while_the_line_runs(tmp_path):
    """The L3 goes away mid-batch: the line keeps printing from its pool, one alarm says the source is down below low
    water, the request waits (retried with backoff) and is answered once the L3 is back; nothing lost."""
    sim = L3SerialsSim(seed=5)
    sim.add_pool(GTIN, "random", minimum=10**8, maximum=10**9 - 1)
    await sim.start()
    port = sim.port
    try:
        # check_interval_s long: after the first round at start only the line's nudges (allocations) ask again, so
        # no request is in flight when the L3 goes away (a dropped answer would rightly be recorded lost)
        # request_count 500: the first round holds the whole batch (300 units and their rejects), so the line finishes
        # on its pool while the L3 is away
        over = {"products": pool_products(sim.url, low_water=1000, request_count=500, check_interval_s=600, retry_max_s=0.5)}
        async with simulated_line(tmp_path, overrides=over, rate=1500) as sl:
            prov = sl.daemon.provisioners[GTIN]
            await wait_for(lambda: sl.line.store.available(GTIN) >= 500 and prov.state == "idle", 30, "the first serials")
            await sim.stop()
            lot = await create_and_start(sl, 300)
            await wait_for(lambda: prov.state == "failing", 30, "the source seen failing")
            await wait_good(sl, 300, 120)
            await wait_stopped(sl)
            assert sl.line.batch.good_total() == 300 and sl.line.fault is None
            codes = [a.code for a in sl.line.alarms.values()]
            assert codes.count("serial_source_down") == 1, codes
            sim2 = L3SerialsSim(port=port, seed=6)
            sim2.pools = sim.pools
            sim2.allocations = sim.allocations
            await sim2.start()
            try:
                await wait_for(lambda: prov.state != "failing", 30, "the source back")
                # an answer is stored ('answered') before its import ('imported'): wait for both steps
                await wait_for(lambda: db_query(sl.db, "SELECT count(*) FROM serial_requests WHERE state IN ('pending', 'answered')")[0][0] == 0,
                               30, "answered and imported")
                states = [r[0] for r in db_query(sl.db, "SELECT state FROM serial_requests WHERE kind='request'")]
                assert "lost" not in states and set(states) == {"imported"}  # connection refused: nothing allocated
                check_truth(sl.db, sim2)
            finally:
                await sim2.stop()
            await sl.line.execute(C.CloseBatch(actor="test", lot=lot), origin="test")
    finally:
        await sim.stop()


def write_config(tmp: Path, url: str, **pool: Any) -> Path:
    raw = _rewrite_ports(variant_raw(), tmp)
    raw["products"] = pool_products(url, **pool)
    raw["mqtt"]["enabled"] = False
    raw["store"]["path"] = str(tmp / "line.db")
    path = tmp / "line.yaml"
    with open(path, "w", encoding="utf-8") as fh:
        YAML(typ="safe").dump(raw, fh)
    return path


async def test_killed_between_sending_a_request_and_storing_its_answer(tmp_path):
    """`linectl run` (its own process) asks the L3; the L3 allocates and holds the answer; the daemon is killed -9.
    Restarted, it records that request lost with its size (serialbox has no key: its numbers are never used), asks
    again, and imports the new answer; `linectl upstream status` shows it."""
    sim = L3SerialsSim(seed=7)
    sim.add_pool(GTIN, "random", minimum=10**8, maximum=10**9 - 1)
    sim.inject("hold", 1, GTIN)
    await sim.start()
    cfg = write_config(tmp_path, sim.url, low_water=100, request_count=150, check_interval_s=1)
    db = tmp_path / "line.db"
    subprocess.run([*LINECTL, "init", "-c", str(cfg)], check=True, capture_output=True, cwd=REPO, timeout=60)
    daemon = spawn([*LINECTL, "--log-level", "info", "run", "-c", str(cfg)], tmp_path / "daemon1.log")
    try:
        await wait_for(lambda: sim.held == 1, 60, "the L3 holding an allocated answer")
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait(10)
        assert db_query(db, "SELECT state, size FROM serial_requests") == [("pending", 150)]
        held = list(sim.handed_out(GTIN))
        assert len(held) == 150
        sim.release()  # the answer goes to a dead socket
        daemon = spawn([*LINECTL, "--log-level", "info", "run", "-c", str(cfg)], tmp_path / "daemon2.log")
        await wait_for(lambda: db_query(db, "SELECT count(*) FROM serial_requests WHERE state='imported'")[0][0] >= 1, 60, "a new answer imported")
        rows = db_query(db, "SELECT state, size, error FROM serial_requests ORDER BY id")
        assert rows[0][:2] == ("lost", 150) and "never used" in rows[0][2]
        imported = imported_by_request(db)
        assert len(imported) == 150 and not set(imported) & set(held)  # the held numbers are never used
        check_truth(db, sim)
        out = subprocess.run([*LINECTL, "upstream", "status", "--db", str(db), "--json"], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert out.returncode == 0, out.stderr
        st = json.loads(out.stdout)
        src = st["sources"][f"serialbox:{sim.url}"]
        assert src["requests"]["lost"] == 1 and src["serials_lost"] == 150 and st["available"][GTIN] == 150
        text = subprocess.run([*LINECTL, "upstream", "status", "--db", str(db)], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert "lost 1 (150 serials)" in text.stdout
    finally:
        stop_proc(daemon)
        await sim.stop()
