"""SerialboxSource against the L3 simulator over real HTTP: pages, intervals, auth, and each fault's verdict.

Every fault ends in the exception the provisioner needs (SourceUnavailable: retry; SourceRefused: park) with a
reason an operator can act on, or in the page that carries the right serials (the simulator's ground truth).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from linectl.config import SerialboxSourceConfig
from linectl.simulators.l3_serials import L3SerialsSim
from linectl.sources.base import SerialRequest, SerialSource, SourceRefused, SourceUnavailable
from linectl.sources.serialbox import SerialboxSource

GTIN = "09506000134352"
SEQ_GTIN = "09506000134369"
TOKEN = "t0k3n-for-tests"


@pytest.fixture
async def sim() -> AsyncIterator[L3SerialsSim]:
    s = L3SerialsSim(users={"line1": "pw-line1"}, tokens={TOKEN}, seed=7)
    s.add_pool(GTIN, "random", minimum=100_000, maximum=999_999, request_threshold=500)
    s.add_pool(SEQ_GTIN, "sequential", minimum=1, maximum=10_000, request_threshold=5000)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


def source(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch, **kw: object) -> SerialboxSource:
    monkeypatch.setenv("L3_TOKEN", TOKEN)
    cfg = {"type": "serialbox", "url": sim.url, "auth": {"type": "token", "token_env": "L3_TOKEN"}, "timeout_s": 3} | kw
    return SerialboxSource.from_config(SerialboxSourceConfig.model_validate(cfg))


def req(size: int, gtin: str = GTIN, rid: int = 1) -> SerialRequest:
    return SerialRequest(request_id=rid, gtin=gtin, size=size, key=f"k{rid}")


async def test_random_page_is_what_the_l3_handed_out(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    src = source(sim, monkeypatch)
    assert isinstance(src, SerialSource)
    page = await src.request(req(50))
    assert src.status()["connected"] and src.status()["requests"] == 1 and src.status()["last_error"] is None
    assert await src.give_back(GTIN, page.serials[:3], "k1") is False
    await src.aclose()
    assert page.serials == sim.handed_out(GTIN) and len(page.serials) == 50
    assert not page.more and page.foreign == []
    assert '"numbers": "[' in page.raw  # the body as received: serialbox's string holding a list literal


@pytest.mark.parametrize("fmt", ["json", "xml"])
async def test_sequential_interval_is_expanded(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    src = source(sim, monkeypatch, format=fmt)
    page = await src.request(req(25, SEQ_GTIN))
    await src.aclose()
    assert page.serials == [str(n) for n in range(1, 26)] == sim.handed_out(SEQ_GTIN)
    assert ("[1, 25]" in page.raw) and (page.raw.lstrip().startswith("<?xml") == (fmt == "xml"))


async def test_pages_follow_the_continuation_until_the_request_is_filled(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    src = source(sim, monkeypatch, page_size=40)
    r = req(100)
    got: list[str] = []
    page = await src.request(r)
    pages = 1
    got += page.serials
    while page.more:
        page = await src.request(r, page.continuation)
        got += page.serials
        pages += 1
    await src.aclose()
    assert pages == 3 and len(got) == 100 and got == sim.handed_out(GTIN)
    assert [a.asked for a in sim.allocations] == [40, 40, 20]


async def test_pool_defaults_to_the_gtin_and_an_explicit_pool_is_asked(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    sim.add_pool("line1-pool", "sequential", minimum=500, maximum=600)
    src = source(sim, monkeypatch, pool="line1-pool")
    page = await src.request(req(3))
    await src.aclose()
    assert page.serials == ["500", "501", "502"] and sim.allocations[0].pool == "line1-pool"


async def test_basic_auth_from_a_password_file(sim: L3SerialsSim, tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("pw-line1\n")
    cfg = {"type": "serialbox", "url": sim.url, "auth": {"type": "basic", "username": "line1", "password_file": str(pw)}}
    src = SerialboxSource.from_config(SerialboxSourceConfig.model_validate(cfg))
    assert len((await src.request(req(5))).serials) == 5
    pw.write_text("wrong\n")  # read at each request: a rotated secret is used without a restart
    with pytest.raises(SourceRefused, match="HTTP 401.*Invalid username/password"):
        await src.request(req(5))
    await src.aclose()


async def test_missing_credentials_and_unknown_pool_are_refused(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    anon = SerialboxSource(sim.url)
    with pytest.raises(SourceRefused, match="HTTP 401.*credentials were not provided"):
        await anon.request(req(5))
    await anon.aclose()
    monkeypatch.delenv("L3_TOKEN", raising=False)
    cfg = {"type": "serialbox", "url": sim.url, "auth": {"type": "token", "token_env": "L3_TOKEN"}}
    unset = SerialboxSource.from_config(SerialboxSourceConfig.model_validate(cfg))
    with pytest.raises(SourceRefused, match="environment variable L3_TOKEN is not set"):
        await unset.request(req(5))
    src = source(sim, monkeypatch)
    with pytest.raises(SourceRefused, match="HTTP 404.*Pool not found"):
        await src.request(req(5, "09506000134376"))
    assert src.status()["last_error"].startswith("HTTP 404")
    await src.aclose()
    assert sim.allocations == []


async def test_size_above_the_threshold_is_refused_with_the_l3s_message(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    src = source(sim, monkeypatch, page_size=501)
    with pytest.raises(SourceRefused, match="HTTP 500: The request threshold of 500 has been exceeded"):
        await src.request(req(501))
    await src.aclose()


async def test_exhausted_pool_ends_the_request_then_is_refused(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    sim.add_pool("tiny", "sequential", minimum=1, maximum=30)
    src = source(sim, monkeypatch, pool="tiny", page_size=20)
    first = await src.request(req(50))
    assert first.more and len(first.serials) == 20
    second = await src.request(req(50), first.continuation)
    assert second.serials == [str(n) for n in range(21, 31)] and not second.more  # fulfilled false: no more asked
    with pytest.raises(SourceRefused, match="all numbers were handed out"):
        await src.request(req(5))
    await src.aclose()


# --------------------------------------------------------------------------- faults


async def test_html_500_is_unavailable(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    sim.inject("http_500_html")
    src = source(sim, monkeypatch)
    with pytest.raises(SourceUnavailable, match="HTTP 500: HTML page '500 Internal Server Error'"):
        await src.request(req(5))
    assert len((await src.request(req(5))).serials) == 5  # the next one is answered
    await src.aclose()


async def test_html_200_is_refused(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    sim.inject("html_200")
    src = source(sim, monkeypatch)
    with pytest.raises(SourceRefused, match="answer is HTML page 'Sign in', not JSON"):
        await src.request(req(5))
    await src.aclose()


async def test_refusal_is_refused_with_the_detail(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    sim.inject("soap_fault")
    src = source(sim, monkeypatch)
    with pytest.raises(SourceRefused, match="HTTP 400: Number range request refused"):
        await src.request(req(5))
    await src.aclose()


async def test_hang_is_unavailable_after_the_timeout(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    sim.inject("hang")
    src = source(sim, monkeypatch, timeout_s=0.5)
    with pytest.raises(SourceUnavailable, match="no answer within 0.5 s"):
        await src.request(req(5))
    assert src.status()["connected"] is False
    sim.release()
    await src.aclose()
    assert sim.allocations == []


async def test_connection_dropped_mid_answer_is_unavailable(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    sim.inject("drop")
    src = source(sim, monkeypatch)
    with pytest.raises(SourceUnavailable, match="connection dropped mid-answer"):
        await src.request(req(8))
    await src.aclose()
    assert len(sim.handed_out(GTIN)) == 8 and sim.allocations[0].delivered is False  # lost at the L3


async def test_truncated_body_is_refused(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    sim.inject("truncated")
    src = source(sim, monkeypatch)
    with pytest.raises(SourceRefused, match="answer is not JSON .*truncated"):
        await src.request(req(8))
    await src.aclose()


async def test_short_page_asks_for_the_rest(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    sim.inject("short")
    src = source(sim, monkeypatch)
    page = await src.request(req(10))
    assert len(page.serials) == 5 and page.more and page.continuation == "remaining=5"
    rest = await src.request(req(10), page.continuation)
    await src.aclose()
    assert len(rest.serials) == 5 and not rest.more
    assert page.serials + rest.serials == sim.handed_out(GTIN)


async def test_duplicates_are_passed_on_for_the_provisioner_to_refuse(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    src = source(sim, monkeypatch)
    first = await src.request(req(10))
    sim.inject("duplicates", n=4)
    again = await src.request(req(10, rid=2))
    await src.aclose()
    resent = sim.allocations[1].resent
    assert len(resent) == 4 and set(resent) <= set(first.serials)
    assert sorted(again.serials) == sorted(resent + sim.allocations[1].new)


async def test_serials_of_wrong_format_go_to_foreign(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    sim.inject("bad_format")
    src = source(sim, monkeypatch)
    page = await src.request(req(10))
    await src.aclose()
    assert len(page.serials) == 5 and len(page.foreign) == 5
    assert all(s.startswith("BAD SERIAL") and "not a valid serial" in why for s, why in page.foreign)
    assert set(page.serials) <= set(sim.handed_out(GTIN))


async def test_held_answer_is_lost_when_the_client_is_gone(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    """The L3 allocated, the client died before the answer: the ground truth says which numbers never arrived."""
    sim.inject("hold")
    src = source(sim, monkeypatch)
    task = asyncio.create_task(src.request(req(6)))
    for _ in range(500):
        if sim.held:
            break
        await asyncio.sleep(0.01)
    assert sim.held == 1 and len(sim.handed_out(GTIN)) == 6
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await src.aclose()  # the connection closes as a killed process's would
    sim.release()
    for _ in range(500):
        if sim.allocations[0].delivered is not None:
            break
        await asyncio.sleep(0.01)
    assert sim.allocations[0].delivered is False and sim.delivered(GTIN) == []


async def test_held_answer_arrives_when_released(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    sim.inject("hold")
    src = source(sim, monkeypatch)
    task = asyncio.create_task(src.request(req(6)))
    for _ in range(500):
        if sim.held:
            break
        await asyncio.sleep(0.01)
    assert not task.done()
    sim.release()
    page = await asyncio.wait_for(task, 10)
    await src.aclose()
    assert page.serials == sim.delivered(GTIN) == sim.handed_out(GTIN)


async def test_nothing_listening_is_unavailable() -> None:
    from tests.l4.harness import free_port

    src = SerialboxSource(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SourceUnavailable, match="cannot connect"):
        await src.request(req(5))
    await src.aclose()
