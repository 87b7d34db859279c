"""The provisioner with the real OPEN-SCS source against the OPEN-SCS L3 simulator (its own process, real OPC UA):
the keyed protocol's guarantees end to end, with the simulator's ground truth (what it handed out, what came back).

- a request interrupted between send and answer (linectl stopped while the L3 works on it) is sent again at the next
  start with the SAME request token: the L3 answers the numbers it allocated for it, nothing is lost or imported twice;
- at batch close, the batch's voided serials go back to the L3 through SNReturnAllocated (return_unused_at_close).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from test_openscs import GTIN, Control, Sim
from test_provisioner import Alarms

from linectl.config import Product
from linectl.sources.provisioner import Provisioner, build_source
from linectl.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def product(endpoint: str, **pool: Any) -> Product:
    serials = {"scheme": "pool", "low_water": 50, "request_count": 60, "check_interval_s": 0.2, "retry_max_s": 0.5,
               "source": {"type": "openscs", "endpoint": endpoint, "timeout_s": 20}}
    serials.update(pool)
    return Product.model_validate({"gtin": GTIN, "name": "Test", "company_prefix_length": 7, "serials": serials})


def pool_serials(db: Path) -> dict[str, str]:
    with sqlite3.connect(db) as c:
        return dict(c.execute("SELECT serial, source FROM serials WHERE gtin=?", (GTIN,)).fetchall())


async def until(pred: Any, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Any:
    s = Sim(tmp_path_factory.mktemp("openscs-prov"), "--page-size", "25", "--max-requestable", "1000", "--gtin", GTIN, "--seed", "3").start()
    yield s
    s.stop()


async def test_interrupted_request_is_resent_with_its_token_and_unused_serials_go_back(tmp_path, sim):
    ctl = Control(sim)
    await ctl.inject("clear")
    db = tmp_path / "line.db"
    store = await Store.open(db)
    alarms = Alarms()
    prod = product(sim.endpoint, return_unused_at_close=True)
    try:
        # 1. the L3 takes 3 s over the first request; linectl stops meanwhile (the task cancelled, as at a shutdown)
        await ctl.inject("delay", 1, "3")
        prov = Provisioner(prod, build_source(prod), store, alarms)
        task = asyncio.create_task(prov.run())
        await until(lambda: [r.state for r in store.requests()] == ["pending"], 30, "the request recorded before it is sent")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await prov.aclose()
        (pending,) = store.requests()
        assert pending.state == "pending" and store.available(GTIN) == 0
        await asyncio.sleep(3.5)  # the L3 finishes its allocation for that token; the answer reaches nobody

        # 2. the next start sends the same token again: the L3 answers what it allocated for it, nothing is lost
        prov2 = Provisioner(prod, build_source(prod), store, alarms)
        try:
            await prov2.recover()
            rows = store.requests(kind="request")
            assert rows[0].id == pending.id and rows[0].key == pending.key and rows[0].state == "imported", rows
            assert "serial_request_lost" not in alarms.codes()
            truth = await ctl.truth()
            handed = truth["handed_out"][GTIN]
            imported = pool_serials(db)

            assert set(imported) == set(handed) and len(imported) == 60  # each handed-out number imported exactly once
            # the re-sent page and the pages after it, all under the interrupted request's token
            ids = {r.id for r in rows if r.key == pending.key}
            assert [r.page for r in rows] == [0, 1, 2] and len(ids) == 3 and {r.state for r in rows} == {"imported"}
            assert {int(src.rsplit(" ", 1)[1]) for src in imported.values()} == ids

            # 3. batch close: the batch's voided serials go back to the L3 (SNReturnAllocated)
            await store.create_batch("L1", GTIN, "301231", 10, actor="t")
            used = await store.allocate(GTIN, "L1", 10, prov2.pool)
            await store.close_batch("L1", "void", "t")
            res = await prov2.batch_closed("L1")
            assert res is not None and res["count"] == 10
            await prov2._returns()  # noqa: SLF001 - the provisioner's return step, run once here
            (ret,) = store.requests(kind="return")
            assert ret.state == "returned", ret
            truth = await ctl.truth()
            assert sorted(truth["returned"][GTIN]) == sorted(used)
        finally:
            await prov2.aclose()
    finally:
        await store.close()


async def test_a_stored_first_page_is_imported_at_start_and_its_later_pages_fetched(tmp_path, sim):
    """linectl stopped after storing page 1 of a paged answer, before importing it: the next start imports it from the
    stored answer and fetches the pages the L3 still holds for that token."""
    from linectl.sources.base import SerialRequest

    ctl = Control(sim)
    await ctl.inject("clear")
    db = tmp_path / "line.db"
    store = await Store.open(db)
    prod = product(sim.endpoint)
    src = build_source(prod)
    try:
        before = len((await ctl.truth())["handed_out"].get(GTIN, []))  # handed_out: in order, repeats kept
        rid = await store.request_new("request", src.name, GTIN, 60, "stored-first-page", page=0, lot=None, continuation=None)
        pg = await src.request(SerialRequest(request_id=rid, gtin=GTIN, size=60, key="stored-first-page"))
        assert pg.more and pg.continuation and len(pg.serials) == 25
        await store.request_answered(rid, pg.raw, {"serials": pg.serials, "foreign": [], "more": pg.more, "continuation": pg.continuation})
        await src.aclose()
        prov = Provisioner(prod, build_source(prod), store, Alarms())
        try:
            await prov.recover()
            rows = store.requests(kind="request")
            assert [(r.page, r.state) for r in rows] == [(0, "imported"), (1, "imported"), (2, "imported")]
            handed = (await ctl.truth())["handed_out"][GTIN][before:]  # (serials returned earlier are handed out first)
            assert sorted(pool_serials(db)) == sorted(handed) and len(handed) == 60
        finally:
            await prov.aclose()
    finally:
        await store.close()
