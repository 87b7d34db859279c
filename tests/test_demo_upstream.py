"""Done-when of the upstream issue: a subscriber receives, for a demo batch, schema-valid EPCIS documents covering
every commissioned and decommissioned serial exactly as the store has them. Real simulators, real Mosquitto."""

from __future__ import annotations

import asyncio
import json
import uuid

import aiomqtt
import pytest

from linectl import control as C
from linectl import gs1
from linectl.demo import SimulatedLine
from linectl.epcis import validate_document

pytestmark = pytest.mark.timeout(240)


async def test_subscriber_gets_every_serial_of_a_demo_batch_as_valid_epcis() -> None:
    root = f"test/{uuid.uuid4().hex[:10]}/pkg/demo"
    enterprise, site, area, name = root.split("/")
    overrides = {"line": {"enterprise": enterprise, "site": site, "area": area, "name": name}, "mqtt": {"protocol": "5"}}
    docs: list[dict] = []
    ready = asyncio.Event()

    async def subscriber() -> None:
        async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"sub-{uuid.uuid4().hex[:8]}") as client:
            await client.subscribe(f"{root}/events", qos=1)
            ready.set()
            async for msg in client.messages:
                docs.append(json.loads(msg.payload))

    sub = asyncio.create_task(subscriber())
    await asyncio.wait_for(ready.wait(), 10)
    sl = SimulatedLine(rate=1200, defect_rate=0.08, seed=11, broker="127.0.0.1:1883", overrides=overrides)
    async with sl:
        lot = await sl.create_batch(150)
        await sl.start_batch()
        await asyncio.wait_for(sl.line.completed.wait(), 120)
        await sl.line.execute(C.CloseBatch(actor="test"), origin="test")
        for _ in range(200):
            if sl.daemon.store.backlog() == 0:
                break
            await asyncio.sleep(0.1)
        assert sl.daemon.store.backlog() == 0
        store = sl.daemon.store
        gtin = sl.cfg.products[0].gtin
        cp_len = sl.cfg.products[0].company_prefix_length
        counts = store.lot_counts(lot)
        expected = {"commissioned": set(), "decommissioned": set()}
        after = 0
        while True:
            rows = store.events_of_lot(lot, after, 10000)
            if not rows:
                break
            for r in rows:
                ev = r.event
                if r.kind == "unit_commissioned":
                    expected["commissioned"].add(gs1.sgtin_urn(ev.gtin, ev.serial, cp_len))
                elif r.kind == "unit_decommissioned":
                    expected["decommissioned"].add(gs1.sgtin_urn(ev.gtin, ev.serial, cp_len))
            after = rows[-1].seq
        # what the registry says agrees with the events
        assert len(expected["commissioned"] - expected["decommissioned"]) == counts.get("commissioned", 0) == 150
        assert len(expected["decommissioned"]) == counts.get("decommissioned", 0) > 0
    await asyncio.sleep(1.0)
    sub.cancel()
    got = {"commissioning": set(), "decommissioning": set()}
    for d in docs:
        validate_document(d)  # the official EPCIS 2.0 JSON Schema, offline
        for e in d["epcisBody"]["eventList"]:
            step = e.get("bizStep", "").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
            for key in got:
                if step == key:
                    got[key].update(e.get("epcList", []))
                    if key == "commissioning":
                        assert e["ilmd"]["cbvmda:lotNumber"] == lot and e["action"] == "ADD"
    assert got["commissioning"] == expected["commissioned"]
    assert got["decommissioning"] == expected["decommissioned"]
    assert all(epc.startswith(f"urn:epc:id:sgtin:{gtin[1:1 + cp_len]}.") for epc in got["commissioning"])
