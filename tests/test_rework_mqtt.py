"""Rework from an HMI/MES over MQTT: `cmd/rework` and `cmd/rework_mode` against a real line, store, broker and printer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from mqtt_fixtures import SHARED_PORT, clear_retained
from test_aggregation_support import FAST, GTIN, commission, new_batch, open_store, product, unit_code
from test_rework import hri, make_case, make_pallet

from linectl.config import parse_config
from linectl.engine import rework as R
from linectl.mqtt_bridge import MqttBridge
from linectl.store.trace import unit_facts

pytestmark = pytest.mark.timeout(60)


class Operator:
    """An MQTT 3.1.1 HMI client: publishes cmd/<name>, reads cmd/<name>/reply."""

    def __init__(self, root: str) -> None:
        self.root = root

    async def __aenter__(self) -> Operator:
        self.client = aiomqtt.Client("127.0.0.1", SHARED_PORT, identifier=f"hmi-{uuid.uuid4().hex[:8]}")
        await self.client.__aenter__()
        await self.client.subscribe(f"{self.root}/cmd/+/reply", qos=1)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.client.__aexit__(None, None, None)

    async def send(self, name: str, payload: Any) -> dict[str, Any]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await self.client.publish(f"{self.root}/cmd/{name}", body, qos=1)

        async def reply() -> dict[str, Any]:
            async for m in self.client.messages:
                return json.loads(m.payload)
            raise AssertionError("no reply")

        return await asyncio.wait_for(reply(), 10)


@pytest.fixture
async def rig(tmp_path: Path):
    from linectl.daemon import build_drivers
    from linectl.engine.line import Line
    from linectl.simulators.printer import ZplPrinterSim
    from linectl.simulators.scanner import ScannerSim

    zpl, scan = ZplPrinterSim(port=0, print_time_s=0.01), ScannerSim(port=0)
    await zpl.start()
    await scan.start()
    name = f"rw{uuid.uuid4().hex[:8]}"
    cfg = parse_config({
        "line": {"enterprise": "acme", "site": "s1", "area": "pack", "name": name, "gln": "4012345000009", "company_prefix_length": 7},
        "products": [product()],
        "store": {"path": str(tmp_path / "r.db")},
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": SHARED_PORT, "protocol": "3.1.1"},
        "devices": {
            "bench_scanner": {"driver": "scanner", "host": "127.0.0.1", "port": scan.port, **FAST},
            "bench_printer": {"driver": "zpl", "host": "127.0.0.1", "port": zpl.port, "status_interval_s": 0.05, "settle_s": 0.1, **FAST},
        },
        "stations": [{"type": "rework", "name": "rework1", "scanner": "bench_scanner", "printer": "bench_printer"}],
    })
    store = await open_store(tmp_path / "r.db", cfg)
    drivers = build_drivers(cfg)
    line = Line(cfg, store, drivers)
    (bench,) = line.stations
    tasks: list[asyncio.Task[Any]] = []
    bridge = MqttBridge(cfg, line, store=store, backoff_initial_s=0.05, backoff_max_s=0.3)
    try:
        for d in drivers.values():
            await d.start()
            assert await d.wait_connected(5)
        tasks = [asyncio.create_task(f()) for f in bench.tasks().values()] + [asyncio.create_task(bridge.run())]
        deadline = time.monotonic() + 10
        while not bridge.status()["connected"]:
            assert time.monotonic() < deadline, "bridge did not connect"
            await asyncio.sleep(0.02)
        await new_batch(store)
        yield cfg, store, bench, zpl
    finally:
        await bridge.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for d in drivers.values():
            await d.stop()
        await zpl.stop()
        await scan.stop()
        await store.close()
        with contextlib.suppress(Exception):
            await clear_retained(SHARED_PORT, cfg.topic_root)


async def test_rework_operations_over_mqtt_are_applied_once_with_the_operator_recorded(rig):
    cfg, store, bench, zpl = rig
    u = await commission(store, 6)
    c1 = await make_case(store, u[0:3])
    c2 = await make_case(store, u[3:4])
    await make_pallet(store, [c2])
    async with Operator(cfg.topic_root) as op:
        r = await op.send("rework", {"operation": "remove", "code": hri(u[0]), "actor": "alice", "command_id": "rw-1"})
        assert r["ok"] and r["result"]["rework"]["parent"] == c1 and r["result"]["rework"]["events"] == ["unpacked"], r
        r = await op.send("rework", {"operation": "replace", "code": hri(u[1]), "child": hri(u[4]), "actor": "bob",
                                     "decommission_old": True, "reason": "torn carton"})
        assert r["ok"] and r["result"]["rework"]["events"] == ["unpacked", "packed", "unit_decommissioned"], r
        r = await op.send("rework", {"operation": "add", "code": f"(00){c1}", "child": unit_code(u[0]).element_string, "actor": "bob"})
        assert r["ok"] and r["result"]["rework"]["parent"] == c1, r
        r = await op.send("rework", {"operation": "dissolve", "code": f"(00){c2}", "actor": "carol", "reason": "pallet broken"})
        assert r["ok"] and r["result"]["rework"]["from_parent"] is not None and r["result"]["rework"]["sscc_voided"] is True, r
        r = await op.send("rework", {"operation": "reprint", "code": f"(00){c1}", "actor": "dan"})
        assert r["ok"] and r["result"]["rework"]["confirmed"] is True, r
        assert zpl.printed[-1].dm == ("]d2", "00" + c1)
        # the same command_id again: the first reply, nothing applied twice
        before = store.last_seq()
        r = await op.send("rework", {"operation": "remove", "code": hri(u[0]), "actor": "alice", "command_id": "rw-1"})
        assert r["ok"] and r["result"]["rework"]["parent"] == c1 and store.last_seq() == before

        # refusals: precise code, nothing written
        before = store.last_seq()
        r = await op.send("rework", {"operation": "remove", "code": hri(u[5]), "actor": "alice"})
        assert not r["ok"] and r["error"]["code"] == "not_packed", r
        r = await op.send("rework", {"operation": "add", "code": f"(00){c1}", "child": hri(u[1]), "actor": "alice"})
        assert not r["ok"], r  # u[1] was destroyed in the replace
        r = await op.send("rework", {"operation": "reprint", "code": f"(00){c2}", "actor": "alice"})
        assert not r["ok"] and r["error"]["code"] == "not_commissioned", r  # voided SSCCs are never relabelled
        for bad, words in [
            ({"operation": "remove", "code": hri(u[2])}, "actor"),  # no operator named
            ({"operation": "replace", "code": hri(u[2]), "actor": "x"}, "child"),
            ({"operation": "explode", "code": hri(u[2]), "actor": "x"}, "operation"),
            (b"\xff\xfe not json", "json"),
        ]:
            r = await op.send("rework", bad)
            assert not r["ok"] and words in json.dumps(r).lower(), (bad, r)
        assert store.last_seq() == before

    assert unit_facts(store, [(GTIN, u[0])])[(GTIN, u[0])].parent == c1
    assert unit_facts(store, [(GTIN, u[1])])[(GTIN, u[1])].state == "decommissioned"
    assert R.check_hierarchy(store) == []
    rows = [r for r in store.outbox(0, 10000, only_unforwarded=False) if r.kind in ("unpacked", "packed", "unit_decommissioned")][-7:]
    assert [r.event.actor for r in rows] == ["alice@mqtt:anonymous", "bob@mqtt:anonymous", "bob@mqtt:anonymous", "bob@mqtt:anonymous", "bob@mqtt:anonymous",
        "carol@mqtt:anonymous", "carol@mqtt:anonymous"]
    reprint = [a for a in store.audit_log(0, 10000) if a.action == R.REPRINT_ACTION][-1]
    assert reprint.actor == "dan@mqtt:anonymous" and reprint.detail["confirmed"] is True


async def test_rework_mode_sets_the_bench_operation_and_operator(rig):
    cfg, store, bench, zpl = rig
    async with Operator(cfg.topic_root) as op:
        r = await op.send("rework_mode", {"mode": "dissolve", "operator": "jdoe", "actor": "supervisor"})
        assert r["ok"] and (r["result"]["station"], r["result"]["mode"], r["result"]["operator"]) == ("rework1", "dissolve", "jdoe"), r
        assert (bench.mode, bench.actor) == ("dissolve", "jdoe")
        r = await op.send("rework_mode", {"mode": "dissolve", "station": "nope"})
        assert not r["ok"] and r["error"]["code"] == "no_station", r
        r = await op.send("rework_mode", {"mode": "melt"})
        assert not r["ok"], r
    assert bench.mode == "dissolve"
    audit = [a for a in store.audit_log(0, 10000) if a.action == "rework_mode"]
    assert len(audit) == 1  # refused commands change nothing, the accepted one is on record with who asked
    assert (audit[0].actor, audit[0].origin) == ("supervisor", "mqtt:anonymous") and (audit[0].detail["mode"], audit[0].detail["operator"]) == ("dissolve",
        "jdoe")
