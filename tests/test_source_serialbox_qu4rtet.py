"""SerialboxSource against a real QU4RTET (tests/l4/harness.py): serialbox's own answers, errors and auth.

Nobody here wrote the counterpart: the JSON string holding a list literal, the sequential first/last pair, the
401/404/500 answers are QU4RTET's. What the source reads must be what serialbox allocated (fresh numbers, in the
pool's range, never twice).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from linectl.config import SerialboxSourceConfig
from linectl.sources.base import SerialRequest, SourceRefused
from linectl.sources.serialbox import SerialboxSource
from tests.l4.harness import Qu4rtet, qu4rtet  # noqa: F401


@pytest.fixture(scope="module")
def pools(qu4rtet: Qu4rtet) -> Iterator[dict[str, str]]:  # noqa: F811
    names = {k: qu4rtet.new_gtin() for k in ("random", "sequential", "small")}
    qu4rtet.create_pools(
        [
            dict(machine_name=names["random"], kind="random", minimum=100_000, maximum=999_999_999, request_threshold=500),
            dict(machine_name=names["sequential"], kind="sequential", minimum=1000, maximum=1_000_000, request_threshold=500),
            dict(machine_name=names["small"], kind="sequential", minimum=1, maximum=25, request_threshold=500),
        ]
    )
    yield names


def source(q: Qu4rtet, monkeypatch: pytest.MonkeyPatch, **kw: object) -> SerialboxSource:
    monkeypatch.setenv("QU4RTET_TOKEN", q.token)
    cfg = {"type": "serialbox", "url": q.base_url, "auth": {"type": "token", "token_env": "QU4RTET_TOKEN"}, "timeout_s": 60} | kw
    return SerialboxSource.from_config(SerialboxSourceConfig.model_validate(cfg))


def req(gtin: str, size: int, rid: int = 1) -> SerialRequest:
    return SerialRequest(request_id=rid, gtin=gtin, size=size, key=f"k{rid}")


async def test_random_pool_in_pages(qu4rtet: Qu4rtet, pools: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    src = source(qu4rtet, monkeypatch, page_size=200)
    gtin = pools["random"]
    page = await src.request(req(gtin, 450))
    got = list(page.serials)
    while page.more:
        page = await src.request(req(gtin, 450), page.continuation)
        got += page.serials
    again = await src.request(req(gtin, 100, rid=2))
    await src.aclose()
    assert len(got) == 450 == len(set(got)) and all(100_000 <= int(s) <= 999_999_999 for s in got)
    assert not set(again.serials) & set(got) and len(again.serials) == 100
    assert '"type":"random"' in page.raw.replace(" ", "") and src.status()["requests"] == 4


async def test_sequential_pool_interval(qu4rtet: Qu4rtet, pools: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """(`format: xml` is proven against the simulator only: the harness's QU4RTET site enables no XML renderer
    for REST, so `?format=xml` answers 404 there.)"""
    src = source(qu4rtet, monkeypatch)
    first = await src.request(req(pools["sequential"], 100))
    second = await src.request(req(pools["sequential"], 50, rid=2))
    await src.aclose()
    start = int(first.serials[0])
    assert first.serials == [str(n) for n in range(start, start + 100)]
    assert second.serials == [str(n) for n in range(start + 100, start + 150)]
    assert f"[{start}, {start + 99}]" in first.raw


async def test_exhausted_pool(qu4rtet: Qu4rtet, pools: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    src = source(qu4rtet, monkeypatch, page_size=10)
    page = await src.request(req(pools["small"], 20))
    assert page.serials == [str(n) for n in range(1, 11)] and page.more
    rest = await src.request(req(pools["small"], 20), page.continuation)
    assert rest.serials == [str(n) for n in range(11, 21)] and not rest.more
    await src.aclose()


async def test_errors_are_refused_with_qu4rtets_words(qu4rtet: Qu4rtet, pools: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    anon = SerialboxSource(qu4rtet.base_url)
    with pytest.raises(SourceRefused, match="HTTP 401.*Authentication credentials were not provided"):
        await anon.request(req(pools["random"], 5))
    await anon.aclose()
    src = source(qu4rtet, monkeypatch, page_size=501)
    with pytest.raises(SourceRefused, match="HTTP 404"):
        await src.request(req("09506009999995", 5))
    with pytest.raises(SourceRefused, match="HTTP 500: .*threshold"):
        await src.request(req(pools["random"], 501))
    await src.aclose()


async def test_basic_auth(qu4rtet: Qu4rtet, pools: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("QU4RTET_PW", qu4rtet.password)
    src = source(qu4rtet, monkeypatch, auth={"type": "basic", "username": qu4rtet.username, "password_env": "QU4RTET_PW"})
    assert len((await src.request(req(pools["random"], 7))).serials) == 7
    monkeypatch.setenv("QU4RTET_PW", "wrong")
    with pytest.raises(SourceRefused, match="HTTP 401"):
        await src.request(req(pools["random"], 7))
    await src.aclose()
