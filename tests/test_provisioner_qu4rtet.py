"""The provisioner against a real QU4RTET (tests/l4/harness.py): serialbox allocations paged into the store, and a
pool QU4RTET cannot serve (too small) parked with an alarm and QU4RTET's own reason.

Nobody here wrote the counterpart: what lands in the pool must be exactly what serialbox allocated, once each.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from linectl.config import Product
from linectl.events import Severity
from linectl.sources.provisioner import Provisioner, build_source
from linectl.store import Store
from tests.l4.harness import Qu4rtet, qu4rtet  # noqa: F401


class Alarms:
    def __init__(self) -> None:
        self.raised: list[tuple[str, str]] = []
        self.batch: Any = None

    async def alarm(self, code: str, message: str, severity: Severity, station: str | None = None) -> None:
        self.raised.append((code, message))


@pytest.fixture(scope="module")
def pools(qu4rtet: Qu4rtet) -> Iterator[dict[str, str]]:  # noqa: F811
    names = {k: qu4rtet.new_gtin() for k in ("random", "small")}
    qu4rtet.create_pools([
        dict(machine_name=names["random"], kind="random", minimum=100_000, maximum=999_999_999, request_threshold=500),
        dict(machine_name=names["small"], kind="sequential", minimum=1, maximum=25, request_threshold=500),
    ])
    yield names


def product(q: Qu4rtet, gtin: str, **pool: Any) -> Product:
    serials = {"scheme": "pool", "low_water": 10, "request_count": 450, "retry_max_s": 0.5,
               "source": {"type": "serialbox", "url": q.base_url, "page_size": 200, "timeout_s": 60,
                          "auth": {"type": "token", "token_env": "QU4RTET_TOKEN"}}} | pool
    return Product.model_validate({"gtin": gtin, "name": "QU4RTET pool", "company_prefix_length": 7, "serials": serials})


def pool_rows(db: Path, gtin: str) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as c:
        return list(c.execute("SELECT serial, source FROM serials WHERE gtin=? ORDER BY id", (gtin,)))


async def test_pool_filled_from_qu4rtet(qu4rtet: Qu4rtet, pools: dict[str, str], tmp_path: Path,  # noqa: F811
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QU4RTET_TOKEN", qu4rtet.token)
    gtin = pools["random"]
    prod = product(qu4rtet, gtin)
    store = await Store.open(tmp_path / "line.db")
    prov = Provisioner(prod, build_source(prod), store, Alarms())
    try:
        assert await prov.replenish() == 450
        rows = store.requests(kind="request")
        assert [(r.state, r.size) for r in rows] == [("imported", 200), ("imported", 200), ("imported", 50)]
        got = pool_rows(tmp_path / "line.db", gtin)
        assert len(got) == 450 == len({s for s, _ in got}) and all(100_000 <= int(s) <= 999_999_999 for s, _ in got)
        assert {src for _, src in got} == {prov.source_text(r.id) for r in rows}
        raw, answer, refused = store.request_answer(rows[0].id)
        assert raw is not None and '"numbers"' in raw and answer is not None and len(answer["serials"]) == 200 and refused == []
    finally:
        await prov.aclose()
        await store.close()


async def test_a_pool_qu4rtet_cannot_serve_is_parked_with_its_reason(qu4rtet: Qu4rtet, pools: dict[str, str],  # noqa: F811
                                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QU4RTET_TOKEN", qu4rtet.token)
    gtin = pools["small"]
    prod = product(qu4rtet, gtin, request_count=40, source={
        "type": "serialbox", "url": qu4rtet.base_url, "page_size": 20, "timeout_s": 60,
        "auth": {"type": "token", "token_env": "QU4RTET_TOKEN"}})
    store = await Store.open(tmp_path / "line.db")
    alarms = Alarms()
    prov = Provisioner(prod, build_source(prod), store, alarms)
    try:
        got = await prov.replenish()
        rows = store.requests(kind="request")
        states = [r.state for r in rows]
        assert got == len(pool_rows(tmp_path / "line.db", gtin)) >= 20
        assert states[0] == "imported" and "parked" in states, [(r.state, r.error) for r in rows]
        parked = [r for r in rows if r.state == "parked"][0]
        assert parked.error and [c for c, _ in alarms.raised] == ["serial_request_parked"]
    finally:
        await prov.aclose()
        await store.close()
