"""NumberRangeSource against a real QU4RTET: its SOAP number-range views (quartet_integrations) with the reply
templates of tests/l4 in the SAP AII/Guardian, UniTrace and TraceLink SNX shapes, random and sequential pools.

The TraceLink request is also validated against the XSD QU4RTET publishes for its SNX endpoint (TraceLink's
schema, served at ?xsd=1 / ?xsd=2), with lxml: a schema nobody here wrote.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from lxml import etree

from linectl.config import NumberRangeSourceConfig
from linectl.sources.base import SerialRequest, SourceRefused
from linectl.sources.number_range import NumberRangeSource
from tests.l4.harness import SOAP_PATHS, Qu4rtet, qu4rtet  # noqa: F401

FLAVOURS = ["sap", "unitrace", "tracelink"]


@pytest.fixture(scope="module")
def pools(qu4rtet: Qu4rtet) -> Iterator[dict[str, str]]:  # noqa: F811
    names: dict[str, str] = {}
    specs = []
    for flavour in FLAVOURS:
        for kind in ("random", "sequential"):
            gtin = names[f"{flavour}-{kind}"] = qu4rtet.new_gtin()
            lo, hi = (1, 10**9) if kind == "random" else (1000, 10**6)
            specs.append(dict(machine_name=gtin, kind=kind, minimum=lo, maximum=hi, request_threshold=500, response=flavour))
    for kind in ("random", "sequential"):
        gtin = names[f"tracelink-gs1-{kind}"] = qu4rtet.new_gtin()
        specs.append(dict(machine_name=gtin, kind=kind, minimum=1000, maximum=10**6, request_threshold=500, response="tracelink", element_strings=True))
    qu4rtet.create_pools(specs)
    yield names


def source(q: Qu4rtet, monkeypatch: pytest.MonkeyPatch, flavour: str, **kw: object) -> NumberRangeSource:
    monkeypatch.setenv("QU4RTET_TOKEN", q.token)
    cfg = {
        "type": "number_range", "url": q.soap_url(flavour), "flavour": flavour, "sending_system": "LINE-01",
        "receiving_system": "QU4RTET", "auth": {"type": "token", "token_env": "QU4RTET_TOKEN"}, "timeout_s": 60,
    } | kw
    return NumberRangeSource.from_config(NumberRangeSourceConfig.model_validate(cfg))


def req(gtin: str, size: int, rid: int = 1) -> SerialRequest:
    return SerialRequest(request_id=rid, gtin=gtin, size=size, key=f"k{rid}")


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_random(qu4rtet: Qu4rtet, pools: dict[str, str], monkeypatch: pytest.MonkeyPatch, flavour: str) -> None:  # noqa: F811
    gtin = pools[f"{flavour}-random"]
    src = source(qu4rtet, monkeypatch, flavour, page_size=150)
    page = await src.request(req(gtin, 300))
    got = list(page.serials)
    while page.more:
        page = await src.request(req(gtin, 300), page.continuation)
        got += page.serials
    await src.aclose()
    assert len(got) == 300 == len(set(got)) and all(1 <= int(s) <= 10**9 for s in got)
    assert page.foreign == [] and f"<Value>{gtin}</Value>" in page.raw and "<SerialNo>" in page.raw


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_sequential(qu4rtet: Qu4rtet, pools: dict[str, str], monkeypatch: pytest.MonkeyPatch, flavour: str) -> None:  # noqa: F811
    gtin = pools[f"{flavour}-sequential"]
    src = source(qu4rtet, monkeypatch, flavour, randomized=False)
    first = await src.request(req(gtin, 120))
    second = await src.request(req(gtin, 30, rid=2))
    await src.aclose()
    start = int(first.serials[0])
    assert first.serials == [str(n) for n in range(start, start + 120)]
    assert second.serials == [str(n) for n in range(start + 120, start + 150)]
    assert "<Interval>" in first.raw and f"<NumberTo>{start + 119}</NumberTo>" in first.raw


@pytest.mark.parametrize("kind", ["random", "sequential"])
async def test_tracelink_element_strings(qu4rtet: Qu4rtet, pools: dict[str, str], monkeypatch: pytest.MonkeyPatch, kind: str) -> None:  # noqa: F811
    gtin = pools[f"tracelink-gs1-{kind}"]
    src = source(qu4rtet, monkeypatch, "tracelink", randomized=kind == "random")
    page = await src.request(req(gtin, 50))
    await src.aclose()
    assert len(page.serials) == 50 == len(set(page.serials)) and page.foreign == []
    assert all(s.isdigit() and 1000 <= int(s) <= 10**6 for s in page.serials)
    assert f"01{gtin}21{page.serials[0]}<" in page.raw


async def test_a_request_for_another_gtin_than_its_object_key_is_foreign(
    qu4rtet: Qu4rtet, pools: dict[str, str], monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """object_key_value names the pool; the line's product is another GTIN: element strings of the pool's GTIN
    are serials of another product and must not be imported."""
    pool_gtin = pools["tracelink-gs1-random"]
    src = source(qu4rtet, monkeypatch, "tracelink", object_key_value=pool_gtin)
    page = await src.request(req("09506000134352", 5))
    await src.aclose()
    assert page.serials == [] and len(page.foreign) == 5
    assert all(why == f"for GTIN {pool_gtin}, not 09506000134352" for _, why in page.foreign)


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_errors(qu4rtet: Qu4rtet, pools: dict[str, str], monkeypatch: pytest.MonkeyPatch, flavour: str) -> None:  # noqa: F811
    src = source(qu4rtet, monkeypatch, flavour, page_size=501)
    with pytest.raises(SourceRefused, match="HTTP 404"):
        await src.request(req("09506009999995", 5))
    with pytest.raises(SourceRefused, match="threshold"):
        await src.request(req(pools[f"{flavour}-random"], 501))
    await src.aclose()
    anon = NumberRangeSource(qu4rtet.soap_url(flavour), flavour=flavour, sending_system="LINE-01")
    with pytest.raises(SourceRefused, match="HTTP 401"):
        await anon.request(req(pools[f"{flavour}-random"], 5))
    await anon.aclose()


def test_tracelink_request_is_valid_against_the_published_xsd(qu4rtet: Qu4rtet, tmp_path: Path) -> None:  # noqa: F811
    base = qu4rtet.base_url + SOAP_PATHS["tracelink"]
    for n in ("1", "2"):
        r = httpx.get(base, params={"xsd": n}, headers=qu4rtet.auth_header, timeout=60)
        assert r.status_code == 200, r.text[:500]
        text = r.text.strip()
        if text.startswith('"'):  # DRF may render the template string as a JSON string
            text = httpx.Response(200, content=text).json()
        # the import points at the server; the copy next to it is read instead
        text = re.sub(r'schemaLocation="[^"]*\?xsd=2"', 'schemaLocation="xsd2.xsd"', text)
        (tmp_path / f"xsd{n}.xsd").write_text(text, encoding="utf-8")
    schema = etree.XMLSchema(etree.parse(str(tmp_path / "xsd1.xsd")))
    src = NumberRangeSource(base, flavour="tracelink", sending_system="LINE-01", receiving_system="QU4RTET")
    envelope = etree.fromstring(src.envelope(req("09506000134352", 100), 100).encode())
    body = envelope.find("{http://schemas.xmlsoap.org/soap/envelope/}Body")
    assert body is not None
    message = body[0]
    assert message.tag == "{urn:tracelink:soap}serialNumbersRequest"
    schema.assertValid(etree.ElementTree(message))
    sscc = NumberRangeSource(base, flavour="tracelink", sending_system="LINE-01", randomized=False, id_type="SSCC", object_key_value="0950600")
    other = etree.fromstring(sscc.envelope(req("09506000134352", 5), 5).encode()).find(".//{urn:tracelink:soap}serialNumbersRequest")
    assert other is not None
    schema.assertValid(etree.ElementTree(other))
    other.find("IdType").text = "GTIN"  # type: ignore[union-attr]  # the schema does reject what TraceLink does not define
    assert not schema.validate(etree.ElementTree(other))
