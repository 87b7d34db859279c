"""The MQTT command channel cannot be turned against the line.

Real daemon (linectl.demo.SimulatedLine: simulators, drivers, store, bridge, forwarder) on a real Mosquitto:
retained and empty commands are never executed (live, after a daemon restart, after a broker restart with its
retained messages); abusive response topics are refused and cost no connection; a 100,000-deep JSON is refused
without a traceback while production and the PLC heartbeat go on; a flood of garbage verify_code commands leaves
the alarm and audit tables bounded; a command id retried after a daemon restart gets the stored reply; commands
sent while the bridge reconnects are not lost (persistent MQTT 5 session). Plus the store's v2 -> v3 migration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from engine_helpers import alarm_codes, db_query, simulated_line, state_of, unique_root, wait_for, wait_good
from mqtt_fixtures import GTIN, SHARED_PORT, StoreTarget, broker_factory, line_yaml, load_line, proxy_factory  # noqa: F401 (fixtures)
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from linectl.mqtt_bridge import REFUSAL_INTERVAL_S, MqttBridge, json_shape_problem

pytestmark = pytest.mark.timeout(180)
V5 = aiomqtt.ProtocolVersion.V5


@contextlib.asynccontextmanager
async def line(tmp_path: Path, port: int = SHARED_PORT, **mqtt: Any) -> AsyncIterator[Any]:
    async with simulated_line(tmp_path, rate=600.0, overrides={"mqtt": {"topic_root": unique_root(), "port": port, "protocol": "5", **mqtt}}) as sl:
        await wait_for(lambda: bridge(sl).status()["connected"], 15, "the bridge to connect")
        yield sl


def bridge(sl: Any) -> MqttBridge:
    b = sl.daemon.upstream[0]
    assert isinstance(b, MqttBridge)
    return b


async def restart_daemon(sl: Any) -> None:
    await sl.daemon.shutdown("test restart")
    await sl.start_daemon()
    await wait_for(lambda: bridge(sl).status()["connected"], 15, "the bridge to connect after the restart")


def count(sl: Any, sql: str, params: tuple[Any, ...] = ()) -> int:
    return int(db_query(sl.db, sql, params)[0][0])


class Operator:
    """An MQTT 5 client sending commands; listens on its own reply topic and on every fallback reply topic."""

    def __init__(self, port: int, root: str) -> None:
        self.port, self.root = port, root
        self.reply_topic = f"replies/{uuid.uuid4().hex[:8]}"
        self.client = aiomqtt.Client("127.0.0.1", port, protocol=V5, identifier=f"op-{uuid.uuid4().hex[:8]}")
        self.replies: list[tuple[str, dict[str, Any]]] = []
        self._task: asyncio.Task[None] | None = None
        self._new = asyncio.Event()

    async def __aenter__(self) -> Operator:
        await self.client.__aenter__()
        await self.client.subscribe(self.reply_topic, qos=1)
        await self.client.subscribe(f"{self.root}/cmd/+/reply", qos=1)
        self._task = asyncio.create_task(self._listen())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        await self.client.__aexit__(None, None, None)

    async def _listen(self) -> None:
        async for m in self.client.messages:
            self.replies.append((str(m.topic), json.loads(m.payload)))
            self._new.set()

    async def publish(self, name: str, payload: Any, *, response_topic: str | None = None, retain: bool = False) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        props = Properties(PacketTypes.PUBLISH)
        if response_topic is not None:
            props.ResponseTopic = response_topic
            props.CorrelationData = uuid.uuid4().bytes
        await self.client.publish(f"{self.root}/cmd/{name}", body, qos=1, retain=retain, properties=props)

    async def send(self, name: str, payload: Any, *, response_topic: str | None = "", timeout: float = 10.0) -> tuple[str, dict[str, Any]]:
        """Publish and wait for the next reply (default response topic: the operator's own)."""
        n = len(self.replies)
        await self.publish(name, payload, response_topic=self.reply_topic if response_topic == "" else response_topic)
        deadline = time.monotonic() + timeout
        while len(self.replies) <= n:
            assert time.monotonic() < deadline, f"no reply to {name}"
            self._new.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._new.wait(), 0.1)
        return self.replies[n]


async def retained_on(port: int, topic: str) -> bytes | None:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"ret-{uuid.uuid4().hex[:8]}") as c:
        await c.subscribe(topic, qos=1)
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(1.5):
                async for m in c.messages:
                    return bytes(m.payload)
    return None


def create_cmd(sl: Any, lot: str, command_id: str) -> dict[str, Any]:
    expiry = (date.today() + timedelta(days=730)).strftime("%y%m%d")
    return {"command_id": command_id, "lot": lot, "gtin": sl.cfg.products[0].gtin, "expiry": expiry, "planned_qty": 50, "challenge": False}


# --------------------------------------------------------------------------- retained and empty


async def test_retained_and_empty_commands_are_never_executed(tmp_path, broker_factory):
    broker = broker_factory(persistence=True)  # the broker keeps retained messages across its restart
    async with line(tmp_path, broker.port) as sl:
        root = sl.cfg.topic_root
        await sl.create_batch(50, challenge=False)
        assert state_of(sl) == "created"
        async with Operator(broker.port, root) as op:
            await op.publish("start_batch", {"command_id": "ret-1", "actor": "hmi"}, retain=True)  # a misconfigured HMI
            await asyncio.sleep(1.5)
            assert state_of(sl) == "created", "a retained start_batch was executed live"
            assert await retained_on(broker.port, f"{root}/cmd/start_batch") is not None  # it is still there

            await restart_daemon(sl)
            await asyncio.sleep(1.5)
            assert state_of(sl) == "created", "a retained start_batch was executed after a daemon restart"

            since = bridge(sl).status()["connected_since"]
            broker.stop()
            broker.start()
            await wait_for(lambda: bridge(sl).status()["connected"] and bridge(sl).status()["connected_since"] != since, 15, "reconnect")
            await asyncio.sleep(1.5)
            assert state_of(sl) == "created", "a retained start_batch was executed after a broker restart"
            assert await retained_on(broker.port, f"{root}/cmd/start_batch") is not None

        async with Operator(broker.port, root) as op:
            await op.publish("start_batch", b"", retain=True)  # clearing the retained message
            await op.publish("start_batch", b"")  # and a plain empty one
            await asyncio.sleep(1.5)
            assert state_of(sl) == "created", "an empty payload was taken as {}"
            assert op.replies == [], "ignored input is not replied to"
            assert bridge(sl).status()["commands_ignored"] >= 2
            assert count(sl, "SELECT count(*) FROM audit WHERE action='start_batch'") == 0
            # the channel itself works: a real start is executed
            _t, reply = await op.send("start_batch", {"command_id": "real-1", "actor": "op1"})
            assert reply["ok"] is True, reply
            assert state_of(sl) in ("running", "challenge")  # started (the challenge, if the batch needs one)


async def test_retained_command_ignored_on_mqtt311(tmp_path, broker_factory):
    """3.1.1 has no subscription options: the retain flag of the delivery is what tells."""
    broker = broker_factory()
    cfg = load_line(line_yaml(tmp_path / "line.yaml", port=broker.port, root=unique_root(), protocol="3.1.1"))
    from linectl.store import Store

    store = await Store.open(tmp_path / "line.db")
    async with aiomqtt.Client("127.0.0.1", broker.port) as hmi:
        body = json.dumps({"command_id": "r-311", "lot": "L311", "gtin": GTIN, "expiry": "301231", "planned_qty": 5}).encode()
        await hmi.publish(f"{cfg.topic_root}/cmd/create_batch", body, qos=1, retain=True)
    target = StoreTarget(cfg, store)
    b = MqttBridge(cfg, target, store=store, backoff_initial_s=0.05)
    task = asyncio.create_task(b.run())
    try:
        await wait_for(lambda: b.status()["connected"], 10, "connect")
        await asyncio.sleep(1.0)
        assert target.executed == [] and store.batch("L311") is None
        assert b.status()["commands_ignored"] == 1
    finally:
        await b.stop()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await store.close()


# --------------------------------------------------------------------------- response topics


async def test_abusive_response_topics_are_refused_and_the_connection_stays(tmp_path):
    async with line(tmp_path) as sl:
        root = sl.cfg.topic_root
        since = bridge(sl).status()["connected_since"]
        async with aiomqtt.Client("127.0.0.1", SHARED_PORT, protocol=V5) as watcher, Operator(SHARED_PORT, root) as op:
            await watcher.subscribe(f"{root}/events", qos=1)
            await watcher.subscribe(f"{root}/state", qos=1)
            for rt in ("$SYS/x", f"{root}/events", f"{root}/state", root, "a/+/b", "a/#", "r" * 300):
                topic, reply = await op.send("request_state", {"command_id": f"rt-{rt[:8]}"}, response_topic=rt)
                assert topic == f"{root}/cmd/request_state/reply", (rt, topic)
                assert reply["ok"] is False and reply["error"]["code"] == "bad_response_topic", (rt, reply)
            assert bridge(sl).status()["connected"] and bridge(sl).status()["connected_since"] == since, "the broker dropped the daemon"
            # the next valid command is executed
            topic, reply = await op.send("create_batch", create_cmd(sl, "LOTRT1", "rt-ok"))
            assert topic == op.reply_topic and reply["ok"] is True, reply
            assert state_of(sl) == "created"
            # nothing of linectl's replies ended up in its own event stream or state topic
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout(0.5):
                    async for m in watcher.messages:
                        if str(m.topic).endswith("/events"):
                            assert b'"command"' not in m.payload and b'"ok"' not in m.payload
                        elif not m.retain:  # state: the snapshot, never a reply
                            assert b'"command_id"' not in m.payload


# --------------------------------------------------------------------------- bounded parsing


async def test_deeply_nested_json_refused_without_traceback_while_the_line_runs(tmp_path, capfd):
    async with line(tmp_path) as sl:
        await sl.create_batch(100_000, challenge=False)
        await sl.start_batch()
        await wait_good(sl, 10)
        async with Operator(SHARED_PORT, sl.cfg.topic_root) as op:
            deep = b'{"code":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            for _ in range(5):
                _t, reply = await op.send("verify_code", deep)
                assert reply["ok"] is False and reply["error"]["code"] == "too_complex", reply
                assert "deeper than 32 levels" in reply["error"]["message"]
            good = sl.line.batch.good_total()
            await wait_good(sl, good + 10)  # production went on
            _t, reply = await op.send("request_state", {"command_id": "after-deep"})
            assert reply["ok"] is True
        assert state_of(sl) == "running" and sl.line.fault is None
        assert "plc_lost" not in alarm_codes(sl), "the PLC heartbeat was lost"
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "RecursionError" not in out + err


def test_json_shape_check():
    assert json_shape_problem(b'{"a": [1, {"b": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}]}') is None  # brackets in a string
    assert json_shape_problem(b"[" * 32 + b"]" * 32) is None
    assert "deeper than 32" in (json_shape_problem(b"[" * 33 + b"]" * 33) or "")
    assert "deeper than 32" in (json_shape_problem(b'{"a":' * 33 + b"1" + b"}" * 33) or "")
    assert json_shape_problem(b'{"a":' * 32 + b"1" + b"}" * 32) is None
    # strings with escaped quotes and backslashes hide no structure, and show none
    tricky = rb'"\\", "\"[[[[[[[[[", "x\\\"]]]]]]]]]]]]]]]]]]"'
    assert json.loads(b"[" + tricky + b"]") == ["\\", '"[[[[[[[[[', 'x\\"]]]]]]]]]]]]]]]]]]']
    assert json_shape_problem(b"[" * 30 + tricky + b"]" * 30 + b"[" * 5 + b"]" * 5) is None
    assert json_shape_problem(rb'["\\"' + b",[" * 40 + b"]" * 40 + b"]") is not None  # the string closed: 41 deep
    assert json_shape_problem(json.dumps({"serials": [f"S{i:012d}" for i in range(50_000)]}).encode()) is None


# --------------------------------------------------------------------------- refused input is cheap


@pytest.mark.timeout(600)  # 10,500 commands, one at a time through the bridge (about 65/s on a loaded 2-CPU box)
async def test_garbage_verify_code_flood_keeps_alarm_and_audit_tables_bounded(tmp_path):
    async with line(tmp_path) as sl:
        b = bridge(sl)
        alarms0 = count(sl, "SELECT count(*) FROM outbox WHERE kind='alarm'")
        audit0 = count(sl, "SELECT count(*) FROM audit")
        n_garbage, n_bad = 10_000, 500
        t0 = time.monotonic()
        async with aiomqtt.Client("127.0.0.1", SHARED_PORT, protocol=V5) as flood:
            topic = f"{sl.cfg.topic_root}/cmd/verify_code"
            for i in range(n_garbage + n_bad):
                body = b"{not json" if i % 21 == 20 else json.dumps({"code": f"garbage-{i}"}).encode()
                await flood.publish(topic, body, qos=1)
                if i % 200 == 199:  # stay below the bridge's bounded incoming queue
                    await wait_for(lambda: b.commands_accepted + b.commands_refused >= i - 400, 60, "the bridge to keep up")  # noqa: B023 (awaited here)
        sent = n_garbage + n_bad
        await wait_for(lambda: b.commands_accepted + b.commands_refused >= sent, 300, "every command handled")
        intervals = int((time.monotonic() - t0) // REFUSAL_INTERVAL_S) + 1
        assert b.commands_refused == n_bad
        await sl.line.verify_tally.flush()
        await b.refusals.flush()
        alarms = count(sl, "SELECT count(*) FROM outbox WHERE kind='alarm'") - alarms0
        audit = count(sl, "SELECT count(*) FROM audit") - audit0
        assert alarms == 1, f"{alarms} alarms for one cause"  # one unknown_code alarm while it is active
        # that alarm + one summary record per tally (verify alarms, refused commands) and interval: not one per command
        assert audit <= 1 + 2 * intervals, f"{audit} audit records in {intervals} interval(s)"
        summary = db_query(sl.db, "SELECT detail FROM audit WHERE action='verify_alarms_suppressed'")
        assert sum(json.loads(d)["counts"]["unknown_code"] for (d,) in summary) == n_garbage - 1
        refused = db_query(sl.db, "SELECT detail FROM audit WHERE action='commands_refused'")
        assert sum(json.loads(d)["counts"]["bad_json"] for (d,) in refused) == n_bad


# --------------------------------------------------------------------------- idempotency and sessions


async def test_command_id_retried_after_a_daemon_restart_is_not_executed_twice(tmp_path):
    async with line(tmp_path) as sl:
        root = sl.cfg.topic_root
        async with Operator(SHARED_PORT, root) as op:
            _t, first = await op.send("create_batch", create_cmd(sl, "LOTIDEM", "idem-1"))
            assert first["ok"] is True, first
        await restart_daemon(sl)
        audit_before = count(sl, "SELECT count(*) FROM audit")
        async with Operator(SHARED_PORT, root) as op:
            _t, again = await op.send("create_batch", create_cmd(sl, "LOTIDEM", "idem-1"))
        assert again == first
        assert count(sl, "SELECT count(*) FROM batches WHERE lot='LOTIDEM'") == 1
        assert count(sl, "SELECT count(*) FROM audit WHERE action='create_batch'") == 1
        assert count(sl, "SELECT count(*) FROM audit") == audit_before, "the retry changed nothing"
        assert count(sl, "SELECT count(*) FROM command_ids WHERE command_id='idem-1'") == 1


async def test_commands_sent_while_the_bridge_reconnects_are_not_lost(tmp_path, proxy_factory):
    proxy = await proxy_factory(SHARED_PORT)
    async with line(tmp_path, proxy.port) as sl:
        assert bridge(sl).persistent_session
        async with Operator(SHARED_PORT, sl.cfg.topic_root) as op:
            proxy.cut()  # the daemon's link drops; the broker keeps its session
            await wait_for(lambda: not bridge(sl).status()["connected"], 10, "the bridge to notice")
            await op.publish("create_batch", create_cmd(sl, "LOTSESS", "sess-1"), response_topic=op.reply_topic)
            await asyncio.sleep(0.5)
            await proxy.reopen()
            await wait_for(lambda: op.replies, 20, "the reply after the reconnect")
            assert op.replies[0][1]["ok"] is True and op.replies[0][1]["command_id"] == "sess-1"
        assert sl.line.batch is not None and sl.line.batch.lot == "LOTSESS"


# --------------------------------------------------------------------------- store


async def test_store_migrates_v2_file_with_command_ids_table(tmp_path):
    from linectl.store import SCHEMA_VERSION, Store

    p = tmp_path / "v2.db"
    s = await Store.open(p)
    await s.create_batch("LOTV2", GTIN, "301231", 10, actor="test")
    await s.close()
    with sqlite3.connect(p) as c:  # what a v2 linectl left: no command_ids table
        c.execute("DROP TABLE command_ids")
        c.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
    s = await Store.open(p)
    try:
        assert s.opened_from_version == 2 and s.stats()["schema_version"] == SCHEMA_VERSION
        assert s.batch("LOTV2") is not None
        assert s.command_reply("x") is None
        await s.audit("op", "mqtt:t", "create_batch", {"lot": "L"}, command_id="x", reply={"lot": "L", "state": "created"})
        assert s.command_reply("x") == {"ok": True, "command_id": "x", "command": "create_batch", "result": {"lot": "L", "state": "created"}}
        mig = [a.detail for a in s.audit_log() if a.action == "schema_migrated"]
        assert {"from": 2, "to": 3} in mig
        assert s.verify_audit().ok
    finally:
        await s.close()


async def test_command_ids_are_bounded_by_retention(tmp_path):
    from linectl.store import Store

    s = await Store.open(tmp_path / "r.db")
    try:
        await s.audit("op", "mqtt:t", "pause_batch", {}, command_id="old-1", reply={"state": "paused"})
        assert s.command_reply("old-1") is not None
        await s.purge_forwarded(1.0)  # younger than the retention: kept
        assert s.command_reply("old-1") is not None
        await asyncio.sleep(0.01)
        await s.purge_forwarded(0.0)  # older than the retention: purged with the outbox
        assert s.command_reply("old-1") is None
        assert s.verify_audit().ok  # the audit record itself is never purged
        assert [a.action for a in s.audit_log()].count("pause_batch") == 1
    finally:
        await s.close()
