"""NumberRangeSource (SOAP sap / unitrace / tracelink) against the L3 simulator over real HTTP.

The request fields must arrive as the L3 reads them (the simulator records them); each fault ends in the right
exception with the L3's words, or in the page with the right serials (the simulator's ground truth).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from linectl.config import NumberRangeSourceConfig
from linectl.simulators.l3_serials import OTHER_GTIN, SOAP_PATHS, L3SerialsSim
from linectl.sources.base import SerialRequest, SerialSource, SourceRefused, SourceUnavailable
from linectl.sources.number_range import NumberRangeSource

GTIN = "09506000134352"
SEQ_GTIN = "09506000134369"
PATH = {flavour: path for path, flavour in SOAP_PATHS.items()}
FLAVOURS = ["sap", "unitrace", "tracelink"]


@pytest.fixture
async def sim() -> AsyncIterator[L3SerialsSim]:
    s = L3SerialsSim(users={"line1": "pw-line1"}, seed=11)
    s.add_pool(GTIN, "random", minimum=100_000, maximum=999_999, request_threshold=500)
    s.add_pool(SEQ_GTIN, "sequential", minimum=1, maximum=100_000, request_threshold=5000)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


def source(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch, flavour: str, **kw: object) -> NumberRangeSource:
    monkeypatch.setenv("L3_PW", "pw-line1")
    cfg = {
        "type": "number_range", "url": sim.url + PATH[flavour], "flavour": flavour, "sending_system": "LINE-1",
        "receiving_system": "L3-SIM", "auth": {"type": "basic", "username": "line1", "password_env": "L3_PW"},
        "timeout_s": 3,
    } | kw
    return NumberRangeSource.from_config(NumberRangeSourceConfig.model_validate(cfg))


def req(size: int, gtin: str = GTIN, rid: int = 1) -> SerialRequest:
    return SerialRequest(request_id=rid, gtin=gtin, size=size, key=f"k{rid}")


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_randomized_list(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch, flavour: str) -> None:
    src = source(sim, monkeypatch, flavour)
    assert isinstance(src, SerialSource)
    page = await src.request(req(40))
    await src.aclose()
    assert page.serials == sim.handed_out(GTIN) and len(page.serials) == 40 and not page.more
    assert page.raw.count("<SerialNo>") == 40
    fields = sim.allocations[0].request
    expected = {
        "sap": {"id_type": "GTIN", "encoding_type": "SGTIN-198", "object_key_name": "GTIN"},
        "unitrace": {"id_type": "GTIN", "encoding_type": "SGTIN-198", "object_key_name": "GTIN"},
        "tracelink": {"id_type": "GS1_SER", "encoding_type": "SGTIN", "object_key_name": "GTIN", "sync": "true"},
    }[flavour]
    assert fields == fields | expected | {
        "sending_system": "LINE-1", "receiving_system": "L3-SIM", "size": "40", "object_key_value": GTIN, "randomized": "X",
    }


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_sequential_interval(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch, flavour: str) -> None:
    src = source(sim, monkeypatch, flavour, randomized=False)
    page = await src.request(req(30, SEQ_GTIN))
    await src.aclose()
    assert page.serials == [str(n) for n in range(1, 31)] == sim.handed_out(SEQ_GTIN)
    assert "<NumberFrom>1</NumberFrom>" in page.raw and "<NumberTo>30</NumberTo>" in page.raw
    assert "randomized" not in sim.allocations[0].request


async def test_tracelink_element_strings_are_split(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    sim.pools[GTIN].element_strings = True
    sim.pools[SEQ_GTIN].element_strings = True
    src = source(sim, monkeypatch, "tracelink")
    page = await src.request(req(10))
    seq = await src.request(req(5, SEQ_GTIN))
    await src.aclose()
    assert page.serials == sim.handed_out(GTIN) and f"<SerialNo>01{GTIN}21{page.serials[0]}</SerialNo>" in page.raw
    assert seq.serials == ["1", "2", "3", "4", "5"] and f"<NumberFrom>01{SEQ_GTIN}211</NumberFrom>" in seq.raw


async def test_tracelink_serials_of_another_gtin_are_foreign(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    sim.inject("foreign_gtin")
    src = source(sim, monkeypatch, "tracelink")
    page = await src.request(req(10))
    await src.aclose()
    handed = sim.handed_out(GTIN)
    assert len(page.serials) == 5 and len(page.foreign) == 5
    assert all(v == f"01{OTHER_GTIN}21{v[18:]}" and why == f"for GTIN {OTHER_GTIN}, not {GTIN}" for v, why in page.foreign)
    assert sorted(page.serials + [v[18:] for v, _ in page.foreign]) == sorted(handed)


@pytest.mark.parametrize("flavour", ["sap", "unitrace"])
async def test_answer_for_another_object_key_is_refused(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch, flavour: str) -> None:
    sim.inject("foreign_gtin")
    src = source(sim, monkeypatch, flavour)
    with pytest.raises(SourceRefused, match=f"answer is for ObjectKey '{OTHER_GTIN}', asked '{GTIN}'"):
        await src.request(req(10))
    await src.aclose()


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_soap_fault_is_refused_with_the_faultstring(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch, flavour: str) -> None:
    sim.inject("soap_fault")
    src = source(sim, monkeypatch, flavour)
    with pytest.raises(SourceRefused, match="SOAP Fault \\(HTTP 500\\): soapenv:Server: Number range request refused"):
        await src.request(req(10))
    await src.aclose()


async def test_unknown_pool_threshold_and_auth_are_refused(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    src = source(sim, monkeypatch, "sap")
    with pytest.raises(SourceRefused, match="HTTP 404 \\(unknown pool or endpoint\\): Pool not found"):
        await src.request(req(5, "09506000134376"))
    with pytest.raises(SourceRefused, match="HTTP 500: The request threshold of 500 has been exceeded"):
        await source(sim, monkeypatch, "sap", page_size=600).request(req(600))
    await src.aclose()
    anon = NumberRangeSource(sim.url + PATH["sap"], flavour="sap", sending_system="LINE-1")
    with pytest.raises(SourceRefused, match="HTTP 401"):
        await anon.request(req(5))
    await anon.aclose()


async def test_object_key_value_names_the_pool(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    sim.add_pool("PLANT-A-POOL", "sequential", minimum=7, maximum=99)
    src = source(sim, monkeypatch, "unitrace", object_key_value="PLANT-A-POOL", encoding_type="SGTIN-96")
    page = await src.request(req(3))
    await src.aclose()
    assert page.serials == ["7", "8", "9"]
    assert sim.allocations[0].request["encoding_type"] == "SGTIN-96"


@pytest.mark.parametrize(
    ("fault", "exc", "reason"),
    [
        ("http_500_html", SourceUnavailable, "HTTP 500: HTML page '500 Internal Server Error'"),
        ("html_200", SourceRefused, "answer is HTML page 'Sign in', not XML"),
        ("drop", SourceUnavailable, "connection dropped mid-answer"),
        ("truncated", SourceRefused, "answer is not well-formed XML .*truncated"),
    ],
)
async def test_fault_verdicts(
    sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch, fault: str, exc: type[Exception], reason: str
) -> None:
    sim.inject(fault)
    src = source(sim, monkeypatch, "sap")
    with pytest.raises(exc, match=reason):
        await src.request(req(10))
    assert src.status()["last_error"] is not None and src.status()["failures"] == 1
    page = await src.request(req(10, rid=2))  # the fault was one request's
    assert len(page.serials) == 10 and src.status()["last_error"] is None
    await src.aclose()


async def test_hang_is_unavailable(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    sim.inject("hang")
    src = source(sim, monkeypatch, "tracelink", timeout_s=0.5)
    with pytest.raises(SourceUnavailable, match="no answer within 0.5 s"):
        await src.request(req(10))
    sim.release()
    await src.aclose()


async def test_short_duplicates_and_bad_format(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    src = source(sim, monkeypatch, "sap")
    sim.inject("short")
    short = await src.request(req(10))
    assert len(short.serials) == 5 and short.more and short.continuation == "remaining=5"
    sim.inject("duplicates", n=3)
    dup = await src.request(req(10, rid=2))
    assert set(sim.allocations[1].resent) <= set(short.serials) and len(sim.allocations[1].resent) == 3
    assert sorted(dup.serials) == sorted(sim.allocations[1].resent + sim.allocations[1].new)
    sim.inject("bad_format")
    bad = await src.request(req(10, rid=3))
    await src.aclose()
    assert len(bad.serials) == 5 and [why for _, why in bad.foreign] == [why for _, why in bad.foreign if "not a valid serial" in why]
    assert len(bad.foreign) == 5


async def test_held_answer_released(sim: L3SerialsSim, monkeypatch: pytest.MonkeyPatch) -> None:
    sim.inject("hold")
    src = source(sim, monkeypatch, "unitrace")
    task = asyncio.create_task(src.request(req(4)))
    for _ in range(500):
        if sim.held:
            break
        await asyncio.sleep(0.01)
    assert sim.held == 1 and not task.done() and len(sim.handed_out(GTIN)) == 4
    sim.release()
    page = await asyncio.wait_for(task, 10)
    await src.aclose()
    assert page.serials == sim.delivered(GTIN)
