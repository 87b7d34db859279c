"""The provisioner against an L3 over real HTTP (tests/provisioner_l3.py), with a real store: every fault of the brief.

Ground truth is what the L3 handed out (`L3.handed`); the store must hold each of those serials imported exactly
once or refused with its reason, never both, never twice, and nothing the L3 did not hand out.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from provisioner_l3 import L3, HttpSource

from linectl.config import Product
from linectl.events import Severity
from linectl.sources.provisioner import Provisioner
from linectl.store import Store
from linectl.store.schema import SCHEMA_VERSION

GTIN = "09506000134352"


def product(**pool: Any) -> Product:
    serials = {"scheme": "pool", "low_water": 100, "request_count": 300,
               "source": {"type": "serialbox", "url": "http://127.0.0.1:9", "page_size": 100}, "check_interval_s": 0.2,
               "retry_max_s": 0.3}
    serials.update(pool)
    return Product.model_validate({"gtin": GTIN, "name": "Test", "company_prefix_length": 7, "serials": serials})


class Alarms:
    """The line's alarm port, as the provisioner sees it."""

    def __init__(self) -> None:
        self.raised: list[tuple[str, str]] = []
        self.batch: Any = None

    async def alarm(self, code: str, message: str, severity: Severity, station: str | None = None) -> None:
        self.raised.append((code, message))

    def codes(self) -> list[str]:
        return [c for c, _ in self.raised]


async def until(pred: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def pool_rows(db: Path) -> dict[str, str]:
    with sqlite3.connect(db) as c:
        return dict(c.execute("SELECT serial, source FROM serials WHERE gtin=?", (GTIN,)).fetchall())


def refused_serials(store: Store) -> dict[str, str]:
    out: dict[str, str] = {}
    for r in store.requests(kind="request"):
        for s, why in store.request_answer(r.id)[2]:
            out.setdefault(s, why)
    return out


def check_ground_truth(store: Store, db: Path, l3: L3) -> None:
    """Every serial the L3 handed out is imported once or refused with a reason, or belongs to a request recorded lost
    (at most as many as those requests' sizes); nothing else is in the pool."""
    imported = pool_rows(db)
    refused = refused_serials(store)
    assert set(imported) <= set(l3.handed), "a serial the L3 never handed out is in the pool"
    assert not set(imported) & {s for s, why in refused.items() if not why.startswith("duplicate:")}
    missing = [s for s in set(l3.handed) if s not in imported and s not in refused]
    lost = store.requests_summary().get("testl3", {}).get("serials_lost", 0)
    assert len(missing) <= lost, f"{len(missing)} serials handed out but neither imported, refused nor in a lost request ({lost})"
    for src in imported.values():
        assert src.startswith("testl3 request "), src


@pytest.fixture
async def l3() -> Any:
    srv = await L3(GTIN).start()
    yield srv
    await srv.stop()


async def make(tmp_path: Path, l3: L3, *, idempotent: bool = False, **pool: Any) -> tuple[Store, Provisioner, Alarms, HttpSource]:
    store = await Store.open(tmp_path / "line.db")
    src = HttpSource(l3.url, idempotent=idempotent)
    alarms = Alarms()
    return store, Provisioner(product(**pool), src, store, alarms), alarms, src


async def test_store_migrates_v8_file(tmp_path):
    p = tmp_path / "v8.db"
    s = await Store.open(p)
    await s.provision(GTIN, ["A1", "A2"], source="import")
    await s.close()
    with sqlite3.connect(p) as c:  # the file as linectl with schema v8 left it
        c.execute("DROP TABLE serial_requests")
        c.execute("UPDATE meta SET value='8' WHERE key='schema_version'")
    s = await Store.open(p)
    try:
        assert s.opened_from_version == 8 and s.stats()["schema_version"] == SCHEMA_VERSION == 10
        assert s.available(GTIN) == 2 and s.requests() == []
        rid = await s.request_new("request", "src", GTIN, 5, "k1")
        assert [r.state for r in s.requests()] == ["pending"] and rid == s.requests()[0].id
        assert s.verify_audit().ok
    finally:
        await s.close()


async def test_an_answer_is_imported_once_with_refusals_named(store):
    rid = await store.request_new("request", "src", GTIN, 5, "k1")
    with pytest.raises(Exception, match="not pending|answered"):
        await store.request_import(rid, "src request 1")  # nothing to import before the answer is stored
    await store.request_answered(rid, "<raw answer>", {"serials": ["S1", "S2", "S2", "Ä", "S3"], "foreign": [["F1", "another GTIN"]]})
    await store.provision(GTIN, ["S3"], source="import")  # known before: a duplicate
    res = await store.request_import(rid, f"src request {rid}")
    assert (res.accepted, res.duplicates, res.invalid, res.foreign, res.already) == (2, 2, 1, 1, False)
    again = await store.request_import(rid, f"src request {rid}")
    assert again.already and again.accepted == 2 and store.available(GTIN) == 3
    raw, answer, refused = store.request_answer(rid)
    assert raw == "<raw answer>" and answer is not None and answer["serials"][0] == "S1"
    reasons = dict(refused)
    assert reasons["S2"].startswith("duplicate: repeated") and reasons["S3"].startswith("duplicate: already known")
    assert reasons["Ä"].startswith("invalid:") and reasons["F1"] == "foreign: another GTIN"
    assert store.requests()[0].state == "imported"


async def test_pages_until_request_count_and_refuses_bad_serials(tmp_path, l3):
    l3.faults = ["ok", "dup", "bad", "foreign"]
    store, prov, alarms, src = await make(tmp_path, l3)
    try:
        got = await prov.replenish()
        rows = store.requests(kind="request")
        # 100 + 98 (2 duplicates) + 98 (2 invalid) + 3 (the last page, 4 asked, 1 of them another GTIN's: short, stop)
        assert got == 299 == store.available(GTIN) and [r.size for r in rows] == [100, 100, 100, 4]
        assert all(r.state == "imported" for r in rows) and all(r.size <= 100 for r in rows)
        refused = refused_serials(store)
        assert any(w.startswith("duplicate: already known") for w in refused.values())
        assert any(w.startswith("duplicate: repeated") for w in refused.values())
        assert any(w.startswith("invalid:") for w in refused.values())
        assert any(w.startswith("foreign:") for w in refused.values())
        check_ground_truth(store, tmp_path / "line.db", l3)
    finally:
        await prov.aclose()
        await store.close()


async def test_short_page_stops_the_round(tmp_path, l3):
    l3.faults = ["short"]
    store, prov, alarms, src = await make(tmp_path, l3)
    try:
        assert await prov.replenish() == 50
        assert l3.requests == 1 and store.available(GTIN) == 50
        check_ground_truth(store, tmp_path / "line.db", l3)
    finally:
        await prov.aclose()
        await store.close()


@pytest.mark.parametrize("fault", ["500", "hang", "drop"])
async def test_transient_faults_are_retried_and_maybe_allocated_requests_are_lost_not_reused(tmp_path, l3, fault):
    """HTTP 500 with an HTML body, a timeout, a connection dropped mid-answer: retried with backoff. serialbox-like (no key):
    the failed request may hold numbers at the L3, so it is recorded lost with its size and a new request goes out."""
    l3.faults = [fault]
    store, prov, alarms, src = await make(tmp_path, l3, request_count=100)
    try:
        assert await prov.replenish() == 100
        rows = store.requests(kind="request")
        assert [r.state for r in rows] == ["lost", "imported"]
        assert rows[0].size == 100 and rows[0].error
        assert store.requests_summary()["testl3"]["serials_lost"] == 100
        check_ground_truth(store, tmp_path / "line.db", l3)
        lost_at_l3 = set(l3.handed) - set(pool_rows(tmp_path / "line.db"))
        if fault == "drop":
            assert len(lost_at_l3) == 100  # handed out, the answer never arrived: never in the pool
    finally:
        await prov.aclose()
        await store.close()


async def test_idempotent_source_resends_the_same_key(tmp_path, l3):
    l3.idempotent = True
    l3.faults = ["drop"]
    store, prov, alarms, src = await make(tmp_path, l3, idempotent=True, request_count=100)
    try:
        assert await prov.replenish() == 100
        rows = store.requests(kind="request")
        assert [r.state for r in rows] == ["imported"] and rows[0].attempts == 2
        assert len(l3.handed) == 100  # the same numbers answered again: nothing allocated twice
        check_ground_truth(store, tmp_path / "line.db", l3)
    finally:
        await prov.aclose()
        await store.close()


async def test_refusal_parks_with_alarm_until_retry(tmp_path, l3):
    l3.faults = ["400"]
    store, prov, alarms, src = await make(tmp_path, l3, request_count=100)
    task = asyncio.create_task(prov.run())
    try:
        await until(lambda: prov.state == "parked", what="parked")
        assert alarms.codes() == ["serial_request_parked"] and "HTTP 400" in alarms.raised[0][1]
        parked = store.requests(states=("parked",))
        assert len(parked) == 1 and "HTTP 400" in (parked[0].error or "")
        n = l3.requests
        await asyncio.sleep(0.6)  # three check intervals: a parked source is not asked again
        assert l3.requests == n and prov.status()["parked"][0]["request"] == parked[0].id
        res = await prov.retry("op", "cli:test")
        assert res["retried"] == [parked[0].id]
        await until(lambda: store.available(GTIN) >= 100, what="serials after retry")
        assert store.requests(kind="request")[0].state == "imported"
        audit = [r.action for r in store.audit_log()]
        assert "serial_request_parked" in audit and "serial_requests_retried" in audit
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await prov.aclose()
        await store.close()


async def test_l3_down_while_running_requests_wait_nothing_lost(tmp_path, l3):
    """L3 down (connection refused: nothing can be allocated): one alarm below low water, retried with backoff, filled
    once it is back; no request is lost."""
    store, prov, alarms, src = await make(tmp_path, l3, request_count=200, request_alarm_s=0.5)
    port = l3.port
    await l3.stop()
    task = asyncio.create_task(prov.run())
    try:
        await until(lambda: prov.state == "failing", what="failing")
        await until(lambda: store.requests(kind="request") and store.requests(kind="request")[0].attempts >= 3, what="retries")
        await until(lambda: "serial_request_stale" in alarms.codes(), what="the backlog-age alarm")
        assert alarms.codes() == ["serial_source_down", "serial_request_stale"]
        assert prov.status()["pending"] == 1 and prov.status()["last_error"]
        assert prov.status()["oldest_open_request_age_s"] >= 0.5
        await l3.start(port)
        await until(lambda: store.available(GTIN) >= 200, what="pool filled after the outage")
        assert [r.state for r in store.requests(kind="request")] == ["imported", "imported"]
        assert alarms.codes() == ["serial_source_down", "serial_request_stale"]  # once each
        check_ground_truth(store, tmp_path / "line.db", l3)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await prov.aclose()
        await store.close()


@pytest.mark.parametrize("idempotent", [False, True])
async def test_restart_between_send_and_answer(tmp_path, l3, idempotent):
    """The process stops while the L3 holds the answer: at the next start a serialbox-like request is lost (size recorded,
    its numbers never used), an idempotent one is sent again with the same key."""
    l3.idempotent = idempotent
    l3.faults = ["hold"]
    store, prov, alarms, src = await make(tmp_path, l3, idempotent=idempotent, request_count=100)
    task = asyncio.create_task(prov.run())
    await until(l3.holding.is_set, what="L3 holding the answer")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await prov.aclose()
    assert [r.state for r in store.requests()] == ["pending"]
    key = store.requests()[0].key
    if idempotent:  # the held numbers were allocated under this key: the L3 answers them again
        l3.by_key[key] = [str(n) for n in range(10**8, 10**8 + 100)]
        l3.handed.extend(l3.by_key[key])
    prov2 = Provisioner(product(request_count=100), HttpSource(l3.url, idempotent=idempotent), store, alarms)
    try:
        await prov2.recover()
        rows = store.requests(kind="request")
        if idempotent:
            assert [r.state for r in rows] == ["imported"] and rows[0].key == key and store.available(GTIN) == 100
        else:
            assert [r.state for r in rows] == ["lost"] and rows[0].size == 100 and "never used" in (rows[0].error or "")
            assert "serial_request_lost" in alarms.codes() and store.available(GTIN) == 0
    finally:
        await prov2.aclose()
        await store.close()


async def test_answer_stored_but_not_imported_is_imported_at_start(tmp_path, l3):
    store, prov, alarms, src = await make(tmp_path, l3)
    rid = await store.request_new("request", "testl3", GTIN, 3, "k")
    await store.request_answered(rid, json.dumps({"serials": ["X1", "X2", "X3"]}), {"serials": ["X1", "X2", "X3"], "foreign": []})
    try:
        await prov.recover()
        assert store.requests()[0].state == "imported" and store.available(GTIN) == 3
        assert pool_rows(tmp_path / "line.db")["X1"] == f"testl3 request {rid}"
        assert prov.last_import is not None and prov.last_import["from_stored_answer"]
    finally:
        await prov.aclose()
        await store.close()


async def test_batch_close_reports_or_returns_voided_serials(tmp_path, l3):
    store, prov, alarms, src = await make(tmp_path, l3, request_count=100, return_unused_at_close=True)
    try:
        await prov.replenish()
        await store.create_batch("L1", GTIN, "301231", 10, actor="t")
        got = await store.allocate(GTIN, "L1", 10, prov.pool)
        await store.close_batch("L1", "void", "t")
        res = await prov.batch_closed("L1")
        assert res is not None and res["count"] == 10 and res["state"] == "pending"
        await prov._returns()  # noqa: SLF001 - the provisioner's step, run once here
        assert store.requests(kind="return")[0].state == "reported"  # this protocol has no return
        src.has_return = True
        await store.create_batch("L2", GTIN, "301231", 5, actor="t")
        got = await store.allocate(GTIN, "L2", 5, prov.pool)
        await store.close_batch("L2", "void", "t")
        assert (await prov.batch_closed("L2") or {})["count"] == 5
        await prov._returns()  # noqa: SLF001
        assert store.requests(kind="return")[1].state == "returned" and sorted(src.returned) == sorted(got)
        assert await prov.batch_closed("L2") is None  # given back once
    finally:
        await prov.aclose()
        await store.close()


# --------------------------------------------------------------------------- the real sources against the L3 simulator

SOAP_PATHS = {"sap": "/guardian/NumberRangeService/", "unitrace": "/unitrace/NumberRangeService/", "tracelink": "/soap/snx/snrequest/"}


@pytest.mark.parametrize(("flavour", "fault", "outcome"), [
    ("serialbox", "short", "imported"),
    ("serialbox", "duplicates", "imported"),
    ("serialbox", "bad_format", "imported"),
    ("serialbox", "http_500_html", "lost"),
    ("serialbox", "truncated", "parked"),
    ("serialbox", "drop", "lost"),
    ("sap", "soap_fault", "parked"),
    ("unitrace", "short", "imported"),
    ("tracelink", "foreign_gtin", "imported"),
    ("tracelink", "bad_format", "imported"),
])
async def test_real_sources_against_the_l3_simulator(tmp_path, flavour, fault, outcome):
    """serialbox REST and the SOAP number-range request (linectl.sources) through the provisioner, one fault each, the
    simulator's handed_out as ground truth: imported once, refused with a reason, or in a lost / parked request."""
    from linectl.simulators.l3_serials import L3SerialsSim

    sim = L3SerialsSim(seed=11)
    sim.add_pool(GTIN, "random", minimum=10**8, maximum=10**9 - 1)
    sim.inject("short", 1, GTIN)  # a first page to have something to duplicate
    await sim.start()
    if flavour == "serialbox":
        source = {"type": "serialbox", "url": sim.url, "page_size": 100, "timeout_s": 5}
    else:
        source = {"type": "number_range", "flavour": flavour, "url": sim.url + SOAP_PATHS[flavour], "sending_system": "LINE1",
                  "page_size": 100, "timeout_s": 5}
    prod = product(source=source, request_count=100, retry_max_s=0.2)
    from linectl.sources.provisioner import build_source

    store = await Store.open(tmp_path / "line.db")
    alarms = Alarms()
    prov = Provisioner(prod, build_source(prod), store, alarms)
    try:
        assert await prov.replenish() == 100  # 50 (short) + 50 on the continuation page
        sim.inject(fault, 1, GTIN)
        await prov.replenish()
        rows = store.requests(kind="request")
        states = [r.state for r in rows[2:]]
        assert states[0] == outcome, [(r.state, r.error) for r in rows]
        handed = set(sim.handed_out(GTIN))
        imported = pool_rows(tmp_path / "line.db")
        # a refused answer names the value as the L3 sent it: the number inside a mangled serial or an element string
        refused = {re.sub(r"^(BAD SERIAL |01\d{14}21)", "", s): w for s, w in refused_serials(store).items()}
        assert set(imported) <= handed
        assert not set(imported) & {s for s, w in refused.items() if not w.startswith("duplicate:")}
        # lost: maybe allocated, answer never arrived; parked after a malformed answer (truncated): allocated, never read
        lost = sum(r.size for r in rows if r.state in ("lost", "parked"))
        missing = [s for s in handed if s not in imported and s not in refused]
        assert len(missing) <= lost, (len(missing), lost, list(refused.items())[:3])
        if fault == "duplicates":
            assert sum(1 for w in refused.values() if w.startswith("duplicate: already known")) >= 1
        if fault in ("bad_format", "foreign_gtin"):
            assert any(w.startswith("foreign:") for w in refused.values()), refused
        if outcome == "parked":
            assert "serial_request_parked" in alarms.codes() and rows[2].error
    finally:
        await prov.aclose()
        await store.close()
        await sim.stop()
