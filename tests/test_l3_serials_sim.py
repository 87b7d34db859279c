"""The L3 serial simulator itself: it answers in QU4RTET's shapes (compared with a real QU4RTET, element by
element), keeps a true record of what it handed out, and runs standalone with its control API for desk work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator

import httpx
import pytest

from linectl.simulators.l3_serials import SOAP_PATHS, L3SerialsSim
from linectl.sources.base import SerialRequest
from linectl.sources.number_range import NumberRangeSource
from linectl.sources.serialbox import SerialboxSource
from tests.l4.harness import Qu4rtet, free_port, qu4rtet  # noqa: F401

PATH = {flavour: path for path, flavour in SOAP_PATHS.items()}


def shape(xml: str) -> list[str]:
    """Element names in document order, runs of SerialNo folded: the structure without the numbers."""
    out: list[str] = []
    for el in ET.fromstring(xml).iter():
        name = el.tag.rpartition("}")[2]
        if not (name == "SerialNo" and out and out[-1] == "SerialNo"):
            out.append(name)
    return out


@pytest.fixture
async def sim() -> AsyncIterator[L3SerialsSim]:
    s = L3SerialsSim(seed=3)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


@pytest.mark.parametrize("flavour", ["sap", "unitrace", "tracelink"])
@pytest.mark.parametrize("kind", ["random", "sequential"])
async def test_soap_answers_have_qu4rtets_shape(qu4rtet: Qu4rtet, sim: L3SerialsSim, flavour: str, kind: str) -> None:  # noqa: F811
    gtin = qu4rtet.new_gtin()
    qu4rtet.create_pool(gtin, kind=kind, minimum=1, maximum=10**6, request_threshold=500, response=flavour)  # type: ignore[arg-type]
    sim.add_pool(gtin, kind, minimum=1, maximum=10**6)
    r = SerialRequest(1, gtin, 5, "k")
    real = NumberRangeSource(qu4rtet.soap_url(flavour), flavour=flavour, sending_system="LINE-01", receiving_system="L3")
    body = real.envelope(r, 5).encode()
    async with httpx.AsyncClient(timeout=60) as client:
        theirs = await client.post(qu4rtet.soap_url(flavour), content=body, headers={"Content-Type": "text/xml", **qu4rtet.auth_header})
        ours = await client.post(sim.url + PATH[flavour], content=body, headers={"Content-Type": "text/xml"})
    assert theirs.status_code == ours.status_code == 200, theirs.text[:500]
    assert shape(ours.text) == shape(theirs.text)


async def test_rest_answer_has_serialboxs_fields(qu4rtet: Qu4rtet, sim: L3SerialsSim) -> None:  # noqa: F811
    gtin = qu4rtet.new_gtin()
    qu4rtet.create_pool(gtin, kind="sequential", minimum=1, maximum=1000)
    sim.add_pool(gtin, "sequential", minimum=1, maximum=1000)
    async with httpx.AsyncClient(timeout=60) as client:
        theirs = (await client.get(qu4rtet.allocate_url(gtin, 10), headers=qu4rtet.auth_header)).json()
        ours = (await client.get(f"{sim.url}/serialbox/allocate/{gtin}/10/?format=json")).json()
        missing = await client.get(f"{sim.url}/serialbox/allocate/nope/10/?format=json")
        real_missing = await client.get(qu4rtet.allocate_url("nope", 10), headers=qu4rtet.auth_header)
    assert set(ours) >= set(theirs) - {"remote_host"}
    assert {k: ours[k] for k in ("numbers", "fulfilled", "type", "encoding", "size_granted")} == {
        k: theirs[k] for k in ("numbers", "fulfilled", "type", "encoding", "size_granted")
    }
    assert missing.status_code == real_missing.status_code == 404 and "detail" in missing.json() and "detail" in real_missing.json()


async def test_random_pool_never_repeats_and_runs_out(sim: L3SerialsSim) -> None:
    sim.add_pool("p", "random", minimum=1, maximum=300)
    src = SerialboxSource(sim.url, pool="p", page_size=100)
    got: list[str] = []
    for i in range(3):
        got += (await src.request(SerialRequest(i, "09506000134352", 100, "k"))).serials
    await src.aclose()
    assert sorted(got, key=int) == [str(n) for n in range(1, 301)] and sim.pools["p"].left == 0
    assert sim.handed_out("p") == got


async def test_control_api(sim: L3SerialsSim) -> None:
    async with httpx.AsyncClient(base_url=sim.url, timeout=10) as c:
        assert (await c.post("/_sim/pools", json={"machine_name": "09506000134352", "kind": "sequential", "maximum": 50})).status_code == 200
        assert (await c.post("/_sim/pools", json={"machine_name": "x", "kind": "spiral"})).status_code == 400
        assert (await c.post("/_sim/faults", json={"kind": "melt"})).status_code == 400
        assert (await c.post("/_sim/faults", json={"kind": "http_500_html", "count": 2})).json()["faults"][0]["count"] == 2
        for _ in range(2):
            assert (await c.get("/serialbox/allocate/09506000134352/5/")).status_code == 500
        assert (await c.get("/serialbox/allocate/09506000134352/5/")).status_code == 200
        assert (await c.get("/_sim/handed_out/09506000134352")).json() == ["1", "2", "3", "4", "5"]
        await c.post("/_sim/faults", json={"kind": "short"})
        assert (await c.delete("/_sim/faults")).json() == {"faults": []}
        state = (await c.get("/_sim/state")).json()
    assert state["pools"]["09506000134352"] == {"kind": "sequential", "left": 45, "handed_out": 5} and state["requests"] == 3


async def test_auth_is_enforced_when_configured() -> None:
    s = L3SerialsSim(users={"u": "p"}, tokens={"tok"})
    s.add_pool("p", "sequential")
    await s.start()
    try:
        async with httpx.AsyncClient(base_url=s.url, timeout=10) as c:
            assert (await c.get("/serialbox/allocate/p/1/")).status_code == 401
            assert (await c.get("/serialbox/allocate/p/1/", auth=("u", "bad"))).status_code == 401
            assert (await c.get("/serialbox/allocate/p/1/", auth=("u", "p"))).status_code == 200
            assert (await c.get("/serialbox/allocate/p/1/", headers={"Authorization": "Token tok"})).status_code == 200
            bad = await c.post(PATH["sap"], content=b"<not-soap/>", headers={"Authorization": "Token tok"})
    finally:
        await s.stop()
    assert bad.status_code == 500 and "soapenv:Client" in bad.text and s.handed_out("p") == ["1", "2"]


def test_standalone_for_desk_commissioning() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "linectl.simulators.l3_serials", "--port", str(port), "--pool", "09506000134352:sequential:1:1000:100", "--token", "desk"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                state = httpx.get(f"http://127.0.0.1:{port}/_sim/state", timeout=2).json()
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "simulator did not start"
                time.sleep(0.1)
        assert state["pools"]["09506000134352"]["left"] == 1000
        r = httpx.get(f"http://127.0.0.1:{port}/serialbox/allocate/09506000134352/101/", headers={"Authorization": "Token desk"})
        assert r.status_code == 500 and "threshold of 100" in r.json()["detail"]
        r = httpx.get(f"http://127.0.0.1:{port}/serialbox/allocate/09506000134352/3/", headers={"Authorization": "Token desk"})
        assert json.loads(r.text)["numbers"] == "[1, 3]"
    finally:
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and f"L3 serials simulator at http://127.0.0.1:{port}" in out
