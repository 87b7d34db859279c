"""MQTT bridge against real Mosquitto: status/LWT, retained state, commands (good and malformed),
MQTT 5 response topic + correlation data, 3.1.1 fallback replies, idempotency, serial requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from mqtt_fixtures import (  # noqa: F401 (fixtures)
    GTIN,
    SHARED_PORT,
    StoreTarget,
    broker_factory,
    clear_retained,
    line_yaml,
    load_line,
    proxy_factory,
    spawn,
    unique_root,
    wait_line,
)
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from linectl.mqtt_bridge import MqttBridge

pytestmark = pytest.mark.timeout(60)
V5 = aiomqtt.ProtocolVersion.V5
V311 = aiomqtt.ProtocolVersion.V311


def make_cfg(tmp_path: Path, *, port: int = SHARED_PORT, **mqtt: Any) -> Any:
    return load_line(line_yaml(tmp_path / "line.yaml", port=port, root=unique_root(), extra_mqtt=mqtt))


async def open_store(tmp_path: Path) -> Any:
    from linectl.store import Store

    return await Store.open(tmp_path / "line.db")


class Bridge:
    """A running MqttBridge over a StoreTarget and the real store."""

    def __init__(self, cfg: Any, store: Any, *, cleanup: bool = True, **kw: Any) -> None:
        self.cleanup = cleanup
        self.cfg = cfg
        self.store = store
        self.target = StoreTarget(cfg, store)
        self.bridge = MqttBridge(cfg, self.target, store=store, backoff_initial_s=0.05, backoff_max_s=0.3, **kw)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Bridge:
        self.task = asyncio.create_task(self.bridge.run())
        deadline = time.monotonic() + 10
        while not self.bridge.status()["connected"]:
            assert time.monotonic() < deadline, "bridge did not connect"
            await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.bridge.stop()
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task
        if self.cleanup:
            await clear_retained(self.cfg.mqtt.port, self.cfg.topic_root)


async def first_message(client: aiomqtt.Client, timeout: float = 5.0) -> aiomqtt.Message:
    async def get() -> aiomqtt.Message:
        async for m in client.messages:
            return m
        raise AssertionError("no message")

    return await asyncio.wait_for(get(), timeout)


async def retained(port: int, topic: str, timeout: float = 3.0) -> bytes | None:
    """The retained message on `topic` as a new subscriber sees it (None if there is none)."""
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"ret-{uuid.uuid4().hex[:8]}") as c:
        await c.subscribe(topic, qos=1)
        try:
            m = await first_message(c, timeout)
        except TimeoutError:
            return None
        return bytes(m.payload)


class Commander:
    """An operator client. MQTT 5: ResponseTopic + CorrelationData; 3.1.1: listens on cmd/<name>/reply."""

    def __init__(self, port: int, root: str, protocol: aiomqtt.ProtocolVersion = V5) -> None:
        self.port = port
        self.root = root
        self.protocol = protocol
        self.reply_topic = f"replies/{uuid.uuid4().hex[:8]}/{root}"  # outside the line's own namespace, as required
        self.client: aiomqtt.Client | None = None

    async def __aenter__(self) -> Commander:
        self.client = aiomqtt.Client("127.0.0.1", self.port, protocol=self.protocol, identifier=f"op-{uuid.uuid4().hex[:8]}")
        await self.client.__aenter__()
        await self.client.subscribe(self.reply_topic if self.protocol == V5 else f"{self.root}/cmd/+/reply", qos=1)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.client is not None
        await self.client.__aexit__(None, None, None)

    async def send(self, name: str, payload: Any, *, origin: str | None = None, raw: bool = False) -> tuple[dict[str, Any], aiomqtt.Message]:
        assert self.client is not None
        body = payload if raw else json.dumps(payload).encode()
        props = None
        corr = uuid.uuid4().bytes
        if self.protocol == V5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = corr
            if origin:
                props.UserProperty = [("origin", origin)]
        await self.client.publish(f"{self.root}/cmd/{name}", body, qos=1, properties=props)
        m = await first_message(self.client)
        if self.protocol == V5:
            assert str(m.topic) == self.reply_topic
            assert m.properties.CorrelationData == corr
        return json.loads(m.payload), m


def store_state(store: Any) -> Any:
    return (store.serial_counts(), sorted((b.lot, b.gtin) for b in store.batches()))


# --------------------------------------------------------------------------- status, state


async def test_status_online_and_offline_on_clean_stop_and_state_retained(tmp_path):
    cfg = make_cfg(tmp_path)
    store = await open_store(tmp_path)
    root = cfg.topic_root
    async with Bridge(cfg, store, cleanup=False) as b:
        assert await retained(SHARED_PORT, f"{root}/status") == b"online"
        state = json.loads(await retained(SHARED_PORT, f"{root}/state"))
        assert state["state"] == "idle" and state["units"]["available"] == "serials"
        assert state["mqtt"]["connected"] is True and "ts" in state
        n = b.bridge.state_published
        b.bridge.state_changed()
        await asyncio.sleep(0.4)
        assert b.bridge.state_published > n
    assert await retained(SHARED_PORT, f"{root}/status") == b"offline"
    await clear_retained(SHARED_PORT, root)
    await store.close()


async def test_last_will_offline_when_process_is_killed(tmp_path):
    cfg_path = line_yaml(tmp_path / "line.yaml", root=unique_root())
    root = load_line(cfg_path).topic_root
    child = spawn(["tests/mqtt_fixtures.py", "bridge", str(cfg_path), str(tmp_path / "line.db")])
    try:
        wait_line(child, "BRIDGE READY")
        assert await retained(SHARED_PORT, f"{root}/status") == b"online"
        async with aiomqtt.Client("127.0.0.1", SHARED_PORT) as watcher:
            await watcher.subscribe(f"{root}/status", qos=1)
            assert (await first_message(watcher)).payload == b"online"  # the retained one
            child.send_signal(signal.SIGKILL)
            child.wait(5)
            m = await first_message(watcher, timeout=5)
            assert m.payload == b"offline" and m.retain is False  # delivered live...
        assert await retained(SHARED_PORT, f"{root}/status") == b"offline"  # ...and retained
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)
        await clear_retained(SHARED_PORT, root)


async def test_state_and_subscriptions_come_back_after_broker_restart(tmp_path, broker_factory):
    broker = broker_factory(persistence=False)  # the restart loses every retained message
    cfg = make_cfg(tmp_path, port=broker.port, state_interval_s=60)  # no periodic republish to hide a missing one
    store = await open_store(tmp_path)
    async with Bridge(cfg, store) as b:
        assert await retained(broker.port, f"{cfg.topic_root}/state") is not None
        broker.stop()
        await asyncio.sleep(0.3)
        assert b.bridge.status()["connected"] is False
        broker.start()
        deadline = time.monotonic() + 10
        while not b.bridge.status()["connected"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        assert await retained(broker.port, f"{cfg.topic_root}/status") == b"online"
        state = json.loads(await retained(broker.port, f"{cfg.topic_root}/state"))
        assert state["mqtt"]["connected"] is True
        async with Commander(broker.port, cfg.topic_root) as op:  # the cmd subscription was renewed
            reply, _ = await op.send("request_state", {"command_id": "rs-1"})
            assert reply["ok"] is True and reply["result"]["state"] == "idle"
    await store.close()


# --------------------------------------------------------------------------- commands


async def test_valid_commands_with_mqtt5_response_topic(tmp_path):
    cfg = make_cfg(tmp_path)
    store = await open_store(tmp_path)
    async with Bridge(cfg, store) as b, Commander(SHARED_PORT, cfg.topic_root) as op:
        reply, m = await op.send("provision_pool", {"command_id": "p-1", "gtin": GTIN, "serials": ["A1", "A2", "A3"]}, origin="l3-site")
        assert reply == {"ok": True, "command_id": "p-1", "command": "provision_pool", "result": reply["result"]}
        assert reply["result"]["accepted"] == 3
        assert m.properties.ContentType == "application/json"
        assert store.available(GTIN) == 3
        assert b.target.executed[-1][1] == "mqtt:l3-site"
        # name may be omitted: taken from the topic
        reply, _ = await op.send("create_batch", {"command_id": "c-1", "lot": "LOT1", "gtin": GTIN, "expiry": "271200", "planned_qty": 100})
        assert reply["ok"] is True and reply["result"] == {"lot": "LOT1", "state": "created"}
        assert store.batch("LOT1") is not None
        # the target refuses (CommandRejected): error reply, nothing changed
        before = store_state(store)
        reply, _ = await op.send("create_batch", {"command_id": "c-2", "lot": "LOT1", "gtin": GTIN, "expiry": "271200", "planned_qty": 100})
        assert reply["ok"] is False and reply["error"]["code"] == "lot_exists"
        assert store_state(store) == before
    await store.close()


async def test_fallback_reply_topic_for_mqtt311_clients(tmp_path):
    cfg = make_cfg(tmp_path, protocol="3.1.1")
    store = await open_store(tmp_path)
    async with Bridge(cfg, store), Commander(SHARED_PORT, cfg.topic_root, protocol=V311) as op:
        reply, m = await op.send("provision_pool",
            {"name": "provision_pool", "command_id": "p-311", "gtin": GTIN, "range_start": 1, "range_count": 5, "range_width": 6})
        assert str(m.topic) == f"{cfg.topic_root}/cmd/provision_pool/reply"
        assert reply["ok"] is True and reply["command_id"] == "p-311" and reply["result"]["accepted"] == 5
        assert store.serial(GTIN, "000003") is not None
        reply, m = await op.send("nonsense", {"x": 1})
        assert str(m.topic) == f"{cfg.topic_root}/cmd/nonsense/reply"
        assert reply["error"]["code"] == "unknown_command"
    await store.close()


@pytest.mark.parametrize(
    "name, payload, code, words",
    [
        ("provision_pool", b"{not json", "bad_json", "JSON"),
        ("provision_pool", b"[1, 2]", "bad_request", "object"),
        ("launch_rockets", b"{}", "unknown_command", "launch_rockets"),
        ("provision_pool", json.dumps({"gtin": GTIN, "serials": "A1"}).encode(), "invalid", "serials"),
        ("create_batch", json.dumps({"lot": "L", "gtin": GTIN, "expiry": "27-12-31", "planned_qty": 5}).encode(), "invalid", "expiry"),
        ("create_batch", json.dumps({"lot": "L", "gtin": GTIN, "expiry": "271231", "planned_qty": "many"}).encode(), "invalid", "planned_qty"),
        ("create_batch", json.dumps({"lot": "L", "gtin": GTIN, "expiry": "271231", "planned_qty": 5, "colour": "red"}).encode(), "invalid", "colour"),
        ("provision_pool", json.dumps({"gtin": "04012345000030", "serials": ["A1"]}).encode(), "unknown_gtin", "04012345000030"),
        ("create_batch", json.dumps({"lot": "L", "gtin": "04012345000030", "expiry": "271231", "planned_qty": 5}).encode(), "unknown_gtin", "not configured"),
        ("provision_pool", json.dumps({"gtin": GTIN, "serials": ["A1", "A2", "A1"]}).encode(), "invalid", "duplicates"),
        ("provision_pool", json.dumps({"name": "create_batch", "gtin": GTIN, "serials": ["A1"]}).encode(), "name_mismatch", "create_batch"),
        ("provision_pool", json.dumps({"gtin": GTIN, "serials": ["S" * 20] * 1} | {"pad": "x" * 3000}).encode(), "too_large", "max_command_bytes"),
    ],
    ids=["bad-json", "not-object", "unknown-command", "wrong-type", "bad-pattern", "wrong-type-int", "extra-field", "unknown-gtin", "unknown-gtin-batch",
        "pool-duplicates", "name-mismatch", "oversize"],
)
async def test_malformed_commands_get_an_error_reply_and_change_nothing(tmp_path, name, payload, code, words):
    cfg = make_cfg(tmp_path, max_command_bytes=2048)
    store = await open_store(tmp_path)
    before = store_state(store)
    async with Bridge(cfg, store) as b, Commander(SHARED_PORT, cfg.topic_root) as op:
        reply, _ = await op.send(name, payload, raw=True)
        assert reply["ok"] is False and reply["command"] == name
        assert reply["error"]["code"] == code, reply
        assert words in reply["error"]["message"], reply
        assert b.target.executed == []  # refused before the target saw it
    assert store_state(store) == before
    await store.close()


async def test_unauthorised_origin_is_refused(tmp_path):
    cfg = make_cfg(tmp_path, authorized_origins=["l3-site"])
    store = await open_store(tmp_path)
    async with Bridge(cfg, store) as b, Commander(SHARED_PORT, cfg.topic_root) as op:
        reply, _ = await op.send("provision_pool", {"gtin": GTIN, "serials": ["X1"]}, origin="someone")
        assert reply["error"]["code"] == "unauthorized" and "someone" in reply["error"]["message"]
        reply, _ = await op.send("provision_pool", {"gtin": GTIN, "serials": ["X1"]})  # no origin at all
        assert reply["error"]["code"] == "unauthorized"
        assert store.available(GTIN) == 0 and b.target.executed == []
        reply, _ = await op.send("provision_pool", {"gtin": GTIN, "serials": ["X1"]}, origin="l3-site")
        assert reply["ok"] is True and store.available(GTIN) == 1
    await store.close()


async def test_repeated_command_id_gets_the_first_reply_and_applies_once(tmp_path):
    cfg = make_cfg(tmp_path)
    store = await open_store(tmp_path)
    async with Bridge(cfg, store) as b, Commander(SHARED_PORT, cfg.topic_root) as op:
        cmd = {"command_id": "dup-1", "gtin": GTIN, "serials": ["D1", "D2"]}
        first, _ = await op.send("provision_pool", cmd)
        again, _ = await op.send("provision_pool", cmd)
        assert first == again and first["result"]["accepted"] == 2
        assert len(b.target.executed) == 1
        assert store.available(GTIN) == 2
        reused, _ = await op.send("create_batch", {"command_id": "dup-1", "lot": "L9", "gtin": GTIN, "expiry": "271200", "planned_qty": 1})
        assert reused["error"]["code"] == "command_id_reused" and store.batch("L9") is None
    await store.close()


# --------------------------------------------------------------------------- serial requests


async def test_serial_request_answered_in_pages(tmp_path):
    cfg = make_cfg(tmp_path)
    store = await open_store(tmp_path)
    root = cfg.topic_root
    async with aiomqtt.Client("127.0.0.1", SHARED_PORT, protocol=V5) as l3:
        await l3.subscribe(f"{root}/serials/request", qos=1)
        async with Bridge(cfg, store) as b, Commander(SHARED_PORT, root) as op:
            rid = b.bridge.request_serials(GTIN, 6, "alnum8")
            m = await first_message(l3)
            req = json.loads(m.payload)
            assert req["request_id"] == rid and req["gtin"] == GTIN and req["count"] == 6 and req["format"] == "alnum8"
            assert req["reply_to"] == f"{root}/cmd/provision_pool"
            assert [r["request_id"] for r in b.bridge.pending_serial_requests()] == [rid]
            for page in (["R1", "R2", "R3"], ["R4", "R5", "R6"]):
                reply, _ = await op.send("provision_pool", {"command_id": f"{rid}-{page[0]}", "gtin": GTIN, "serials": page, "request_id": rid}, origin="l3")
                assert reply["ok"] is True
            assert store.available(GTIN) == 6
            assert b.bridge.pending_serial_requests() == []
    await store.close()


async def test_serial_request_made_offline_is_sent_after_connect(tmp_path, broker_factory, proxy_factory):
    broker = broker_factory()
    proxy = await proxy_factory(broker.port)
    proxy.cut()  # the line's link is down
    cfg = make_cfg(tmp_path, port=proxy.port)
    store = await open_store(tmp_path)
    bridge = MqttBridge(cfg, StoreTarget(cfg, store), store=store, backoff_initial_s=0.05, backoff_max_s=0.2)
    task = asyncio.create_task(bridge.run())
    try:
        await asyncio.sleep(0.2)
        rid = bridge.request_serials(GTIN, 10)  # returns at once: the line keeps running
        assert bridge.status()["connected"] is False
        async with aiomqtt.Client("127.0.0.1", broker.port) as l3:
            await l3.subscribe(f"{cfg.topic_root}/serials/request", qos=1)
            await proxy.reopen()
            m = await first_message(l3, timeout=10)
            assert json.loads(m.payload)["request_id"] == rid
    finally:
        await bridge.stop()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    await store.close()
