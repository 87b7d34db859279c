"""Forwarder against real Mosquitto brokers: order, PUBACK-gated marking, broker restarts and kills,
the forwarder itself killed with SIGKILL, catch-up with live traffic, TLS + password."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from mqtt_fixtures import GTIN, SHARED_PORT, Collector, broker_factory, line_yaml, load_line, proxy_factory, spawn, unique_root, wait_line  # noqa: F401 (fixtures)

from linectl import events as ev
from linectl.epcis import EpcisMapper
from linectl.forwarder import Forwarder

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- helpers


def make_cfg(tmp_path: Path, *, port: int = SHARED_PORT, root: str | None = None, **mqtt: Any) -> Any:
    return load_line(line_yaml(tmp_path / "line.yaml", port=port, root=root or unique_root(), extra_mqtt=mqtt))


async def open_store(tmp_path: Path, name: str = "line.db") -> Any:
    from linectl.store import Store

    return await Store.open(tmp_path / name)


class Producer:
    """Makes valid UnitCommissioned events: serials provisioned, allocated and sent first, as the engine does."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.n = 0
        self.ready: dict[str, list[str]] = {}

    async def prepare(self, lot: str, count: int, *, sent: bool = True) -> None:
        from linectl.config import PoolSerials

        if self.store.batch(lot) is None:
            await self.store.create_batch(lot, GTIN, "271200", 10_000_000, actor="test")
        serials = [f"{lot}S{self.n + i}" for i in range(count)]
        self.n += count
        await self.store.provision(GTIN, serials, source="test")
        got = await self.store.allocate(GTIN, lot, count, PoolSerials(scheme="pool", low_water=0))  # no pool-low alarm rows in these tests
        if sent:
            await self.store.mark_sent(GTIN, lot, got)
        self.ready.setdefault(lot, []).extend(got)

    def events(self, lot: str, count: int) -> list[ev.UnitCommissioned]:
        serials, self.ready[lot] = self.ready[lot][:count], self.ready[lot][count:]
        assert len(serials) == count, "prepare() more serials"
        return [ev.UnitCommissioned(gtin=GTIN, serial=s, lot=lot, expiry="271200") for s in serials]

    async def fill(self, lots: list[str], per_lot: int, chunk: int = 2000) -> list[ev.Event]:
        """Interleaved lots, appended in chunks; returns the events in seq order."""
        out: list[ev.Event] = []
        for lot in lots:
            await self.prepare(lot, per_lot)
        step = max(1, chunk // len(lots))
        for i in range(0, per_lot, step):
            batch: list[ev.Event] = []
            for lot in lots:
                batch += self.events(lot, min(step, per_lot - i))
            await self.store.append(*batch)
            out += batch
        return out


def expected_ids(cfg: Any, events: list[ev.Event]) -> list[str]:
    m = EpcisMapper.from_config(cfg)
    out: list[str] = []
    for e in events:
        mapped = m.map(e) if e.epcis else []
        out += [x["eventID"] for x in mapped] if mapped else [e.event_id]
    return out


def first_occurrences(ids: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for i in ids:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def lot_order_kept(received: list[str], events: list[ev.Event]) -> None:
    """Per lot, the first arrival of each event follows seq order."""
    lot_of = {e.event_id: e.lot for e in events}
    pos = {e.event_id: i for i, e in enumerate(events)}
    per_lot: dict[Any, list[int]] = {}
    for i in first_occurrences(received):
        if i in lot_of:
            per_lot.setdefault(lot_of[i], []).append(pos[i])
    for lot, seq in per_lot.items():
        assert seq == sorted(seq), f"lot {lot} out of order"


async def wait_until(pred: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(fwd: Forwarder):
    task = asyncio.create_task(fwd.run())
    try:
        yield task
    finally:
        await fwd.stop()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


# --------------------------------------------------------------------------- tests


async def test_forwards_everything_in_order_to_the_right_topics(tmp_path):
    cfg = make_cfg(tmp_path, max_events_per_message=100)
    store = await open_store(tmp_path)
    prod = Producer(store)
    events = await prod.fill(["LOTA", "LOTB"], 600, chunk=300)
    extra = [
        ev.AlarmRaised(code="pool_low", severity=ev.Severity.WARNING, message="pool low", lot="LOTA"),
        ev.BatchStateChanged(gtin=GTIN, state=ev.BatchState.RUNNING, previous=ev.BatchState.CREATED, lot="LOTA"),
    ]
    await store.append(*extra)
    await prod.prepare("LOTC", 2500, sent=False)  # allocated, never printed
    void = ev.SerialsVoided(gtin=GTIN, serials=prod.ready["LOTC"], lot="LOTC")  # split into 3 EPCIS events
    await store.append(void)
    events += extra + [void]
    stored = [r.event for r in store.outbox(0, 100_000, only_unforwarded=False)]  # the store may add its own (pool alarm)
    assert {e.event_id for e in events} <= {e.event_id for e in stored}
    want = expected_ids(cfg, stored)

    col = await Collector(SHARED_PORT, cfg.topic_root).start()
    fwd = Forwarder(cfg, store)
    async with running(fwd):
        await col.wait_for(lambda: len(col.event_ids()) >= len(want))
        await wait_until(lambda: store.backlog() == 0, what="all rows marked")
    await col.stop()
    assert col.event_ids() == want  # nothing lost, nothing duplicated, seq order
    assert "pool_low" in [json.loads(p)["code"] for _t, p, _pr, _ts in col.on("alarms")]
    rec = json.loads(col.on("records")[0][1])
    assert (rec["kind"], rec["state"], rec["previous"]) == ("batch_state", "running", "created") and rec["seq"] > 0
    docs = col.on("events")
    assert all(len(json.loads(p)["epcisBody"]["eventList"]) <= 100 for _t, p, _pr, _ts in docs)
    props = dict(docs[0][2].UserProperty)
    assert int(props["first_seq"]) <= int(props["last_seq"])
    assert store.outbox(0, 10) == []
    st = fwd.status()
    assert st["forwarded_rows"] == len(stored) and st["connected"] is False
    await store.close()


async def test_rows_marked_only_after_puback(tmp_path, broker_factory):
    broker = broker_factory()
    cfg = make_cfg(tmp_path, port=broker.port)
    store = await open_store(tmp_path)
    prod = Producer(store)
    await prod.prepare("LOTA", 300)
    fwd = Forwarder(cfg, store, ack_timeout_s=20, stats_interval_s=0.05)
    async with running(fwd):
        await wait_until(lambda: fwd.status()["connected"], what="connect")
        broker.pause()  # the broker receives nothing and acknowledges nothing
        try:
            await store.append(*prod.events("LOTA", 300))
            fwd.notify()
            await wait_until(lambda: fwd.status()["inflight_messages"] > 0, what="publish in flight")
            await asyncio.sleep(0.5)
            assert store.backlog() == 300  # published, not acknowledged: nothing marked
            st = fwd.status()
            assert st["forwarded_rows"] == 0
            assert st["backlog_rows"] == 300 and st["oldest_unforwarded_age_s"] >= 0.4  # reported for the state topic
        finally:
            broker.resume()
        await wait_until(lambda: store.backlog() == 0, what="marking after PUBACK")
    await store.close()


async def test_refused_publish_is_not_marked(tmp_path, broker_factory):
    """MQTT 5: Mosquitto answers an ACL-denied PUBLISH with PUBACK 0x87. aiomqtt's publish() would return
    normally; the forwarder must treat it as not delivered."""
    root = unique_root()
    acl = tmp_path / "acl"
    acl.write_text(f"topic read {root}/#\n")  # no write: every publish refused
    broker = broker_factory(extra=f"acl_file {acl}\n")
    cfg = make_cfg(tmp_path, port=broker.port, root=root)
    store = await open_store(tmp_path)
    prod = Producer(store)
    await prod.fill(["LOTA"], 50)
    fwd = Forwarder(cfg, store, backoff_initial_s=0.05, backoff_max_s=0.2)
    async with running(fwd):
        await wait_until(lambda: "Not authorized" in (fwd.status()["last_error"] or ""), what="refusal noticed")
        assert store.backlog() == 50
        acl.write_text(f"topic readwrite {root}/#\n")
        broker.proc.send_signal(signal.SIGHUP)  # mosquitto reloads the ACL
        await wait_until(lambda: store.backlog() == 0, what="forwarding after the ACL fix")
    await store.close()


@pytest.mark.parametrize("persistence", [True, False], ids=["persistent-broker", "broker-state-lost"])
async def test_broker_stopped_then_restarted_loses_nothing(tmp_path, broker_factory, proxy_factory, persistence):
    broker = broker_factory(persistence=persistence)
    proxy = await proxy_factory(broker.port)
    cfg = make_cfg(tmp_path, port=proxy.port, max_events_per_message=20)
    store = await open_store(tmp_path)
    prod = Producer(store)
    await prod.prepare("LOTA", 400)
    await prod.prepare("LOTB", 400)
    col = await Collector(broker.port, cfg.topic_root).start()
    appended: list[ev.Event] = []

    async def produce(n: int) -> None:
        for i in range(n):
            e = prod.events("LOTA" if i % 3 else "LOTB", 1)
            await store.append(*e)
            appended.extend(e)
            await asyncio.sleep(0.004)

    fwd = Forwarder(cfg, store, backoff_initial_s=0.05, backoff_max_s=0.3)
    async with running(fwd):
        producer = asyncio.create_task(produce(500))
        await col.wait_for(lambda: len(col.event_ids()) >= 50)
        broker.stop()
        proxy.cut()  # the forwarder stays away until the collector is subscribed again
        await asyncio.sleep(0.8)
        assert fwd.status()["connected"] is False
        broker.start()
        await wait_until(lambda: col.connections >= 2 and col.subscribed.is_set(), what="collector resubscribed")
        await proxy.reopen()
        await producer
        want = [e.event_id for e in appended]
        await col.wait_for(lambda: set(want) <= set(col.event_ids()), timeout=20)
        await wait_until(lambda: store.backlog() == 0, what="all marked")
    await col.stop()
    lot_order_kept(col.event_ids(), appended)
    await store.close()


async def test_network_cut_mid_publish_loses_nothing(tmp_path, broker_factory, proxy_factory):
    """The link dies with documents in flight (sent, PUBACK not back): they are sent again."""
    broker = broker_factory()
    proxy = await proxy_factory(broker.port)
    cfg = make_cfg(tmp_path, port=proxy.port, max_events_per_message=25)
    store = await open_store(tmp_path)
    events = await Producer(store).fill(["LOTA", "LOTB"], 3000)
    col = await Collector(broker.port, cfg.topic_root).start()
    fwd = Forwarder(cfg, store, backoff_initial_s=0.05, backoff_max_s=0.3, catchup_threshold=None)
    async with running(fwd):
        await col.wait_for(lambda: len(col.event_ids()) >= 500)
        proxy.cut()
        assert store.backlog() > 0
        await asyncio.sleep(0.3)
        await proxy.reopen()
        want = {e.event_id for e in events}
        await col.wait_for(lambda: want <= set(col.event_ids()), timeout=30)
        await wait_until(lambda: store.backlog() == 0, what="all marked")
    await col.stop()
    lot_order_kept(col.event_ids(), events)
    await store.close()


async def test_broker_killed_mid_stream_resends_all_unacknowledged(tmp_path, broker_factory, proxy_factory):
    """SIGKILL the broker mid-stream. Everything it had not acknowledged is sent again after it is back.
    What it had acknowledged was in its custody: a broker without persistence loses what it had not yet
    delivered (MQTT's limit, hence upstream confirmation, see test_upstream_confirmation_*)."""
    broker = broker_factory()
    proxy = await proxy_factory(broker.port)
    cfg = make_cfg(tmp_path, port=proxy.port, max_events_per_message=25)
    store = await open_store(tmp_path)
    events = await Producer(store).fill(["LOTA", "LOTB"], 3000)
    col = await Collector(broker.port, cfg.topic_root).start()
    fwd = Forwarder(cfg, store, backoff_initial_s=0.05, backoff_max_s=0.3, catchup_threshold=None)
    async with running(fwd):
        await col.wait_for(lambda: len(col.event_ids()) >= 500)
        broker.kill()  # SIGKILL while documents are in flight
        proxy.cut()
        # PUBACKs already in the socket buffer still count: take the snapshot once the forwarder saw the end
        await wait_until(lambda: not fwd.status()["connected"], what="forwarder noticed")
        unforwarded = {r.seq for r in store.outbox(0, 1_000_000)}
        acked_at_kill = {
            r.event_id for r in store.outbox(0, 1_000_000, only_unforwarded=False) if r.seq not in unforwarded or r.seq in fwd.acknowledged_unmarked()
        }
        assert len(acked_at_kill) < len(events)
        broker.start()
        await wait_until(lambda: col.connections >= 2 and col.subscribed.is_set(), what="collector resubscribed")
        await proxy.reopen()
        not_acked = {e.event_id for e in events} - acked_at_kill
        await col.wait_for(lambda: not_acked <= set(col.event_ids()), timeout=30)
        await wait_until(lambda: store.backlog() == 0, what="all marked")
    await col.stop()
    lot_order_kept(col.event_ids(), events)
    await store.close()


async def test_upstream_confirmation_survives_broker_sigkill(tmp_path, broker_factory, proxy_factory):
    """confirm="upstream": rows are marked only when the consumer confirms them, so what a SIGKILLed broker
    had acknowledged but not delivered is sent again: nothing lost end to end."""
    broker = broker_factory()
    proxy = await proxy_factory(broker.port)
    cfg = make_cfg(tmp_path, port=proxy.port, max_events_per_message=25)
    store = await open_store(tmp_path)
    events = await Producer(store).fill(["LOTA", "LOTB"], 3000)
    col = await Collector(broker.port, cfg.topic_root, confirm=True).start()
    fwd = Forwarder(cfg, store, backoff_initial_s=0.05, backoff_max_s=0.3, catchup_threshold=None, confirm="upstream", confirm_timeout_s=3.0)
    async with running(fwd):
        await col.wait_for(lambda: len(col.event_ids()) >= 500)
        broker.kill()
        proxy.cut()
        assert store.backlog() > len(events) - len(set(col.event_ids())) - 1  # only confirmed rows are marked
        broker.start()
        await wait_until(lambda: col.connections >= 2 and col.subscribed.is_set(), what="collector resubscribed")
        await proxy.reopen()
        want = {e.event_id for e in events}
        await col.wait_for(lambda: want <= set(col.event_ids()), timeout=30)
        await wait_until(lambda: store.backlog() == 0, what="all confirmed")
    await col.stop()
    lot_order_kept(col.event_ids(), events)
    await store.close()


async def test_forwarder_process_killed_with_sigkill_resends(tmp_path, broker_factory):
    broker = broker_factory()
    cfg_path = line_yaml(tmp_path / "line.yaml", port=broker.port, root=unique_root(), extra_mqtt={"max_events_per_message": 20})
    cfg = load_line(cfg_path)
    store = await open_store(tmp_path)
    events = await Producer(store).fill(["LOTA"], 4000)
    await store.close()
    col = await Collector(broker.port, cfg.topic_root).start()
    args = ["-m", "linectl.forwarder", "-c", str(cfg_path), "--db", str(tmp_path / "line.db")]
    child = spawn(args)
    try:
        wait_line(child, "FORWARDER READY")
        await col.wait_for(lambda: len(col.event_ids()) >= 400)
        broker.pause()  # hold the PUBACKs so the window is full of unacknowledged documents
        await asyncio.sleep(0.3)
        child.send_signal(signal.SIGKILL)
        child.wait(5)
        broker.resume()
        store = await open_store(tmp_path)
        left = store.backlog()
        assert 0 < left < len(events)  # killed mid-way, with rows not yet marked
        child = spawn(args)
        wait_line(child, "FORWARDER READY")
        want = {e.event_id for e in events}
        await col.wait_for(lambda: want <= set(col.event_ids()), timeout=30)
        await wait_until(lambda: store.backlog() == 0, what="all marked after restart")
        await store.close()
    finally:
        with contextlib.suppress(Exception):
            broker.resume()
        if child.poll() is None:
            child.terminate()
            child.wait(5)
        await col.stop()
    ids = col.event_ids()
    assert set(ids) == {e.event_id for e in events}
    lot_order_kept(ids, events)


async def test_catch_up_does_not_starve_live_events(tmp_path):
    cfg = make_cfg(tmp_path, max_events_per_message=10)
    store = await open_store(tmp_path)
    prod = Producer(store)
    backlog = await prod.fill(["OLD"], 6000)
    await prod.prepare("LIVE", 60)
    col = await Collector(SHARED_PORT, cfg.topic_root).start()
    stored_at: dict[str, float] = {}
    fwd = Forwarder(cfg, store, max_inflight=1, catchup_threshold=1000)
    async with running(fwd):
        await wait_until(lambda: fwd.status()["mode"] == "catch_up", what="catch-up mode")
        live: list[ev.Event] = []
        for _ in range(30):
            e = prod.events("LIVE", 1)
            await store.append(*e)
            stored_at[e[0].event_id] = time.time()
            live += e
            fwd.notify()
            await asyncio.sleep(0.02)
        want = {e.event_id for e in backlog + live}
        await col.wait_for(lambda: want <= set(col.event_ids()), timeout=30)
    await col.stop()
    arrival: dict[str, float] = {}
    for _topic, payload, _p, t in col.on("events"):
        for e in json.loads(payload)["epcisBody"]["eventList"]:
            arrival.setdefault(e["eventID"], t)
    delays = sorted(arrival[i] - stored_at[i] for i in stored_at)
    last_backlog = max(arrival[e.event_id] for e in backlog)
    assert any(arrival[e.event_id] < last_backlog for e in live), "live events waited for the whole backlog"
    assert delays[-1] < 1.0, delays
    ids = col.event_ids()
    lot_order_kept(ids, backlog + live)  # each lane keeps seq order
    await store.close()


async def test_strict_order_without_catch_up(tmp_path):
    cfg = make_cfg(tmp_path, max_events_per_message=50)
    store = await open_store(tmp_path)
    events = await Producer(store).fill(["LOTA", "LOTB"], 1500)
    col = await Collector(SHARED_PORT, cfg.topic_root).start()
    fwd = Forwarder(cfg, store, catchup_threshold=None)
    async with running(fwd):
        await col.wait_for(lambda: len(col.event_ids()) >= len(events))
    await col.stop()
    assert col.event_ids() == [e.event_id for e in events]
    await store.close()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("mosquitto_passwd") is None, reason="needs openssl and mosquitto_passwd")
async def test_tls_client_certificate_and_password_from_env(tmp_path, broker_factory, monkeypatch):
    d = tmp_path / "pki"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test-ca", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile",
        "ext", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=line1", cwd=d)
    _openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "client.crt", "-days", "2", cwd=d)
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(d / "passwd"), "line1", "s3cret"], check=True, capture_output=True)
    broker = broker_factory(start=False)
    broker.conf.write_text(
        broker.conf.read_text().replace("allow_anonymous true", "allow_anonymous false")
        + f"password_file {d}/passwd\ncafile {d}/ca.crt\ncertfile {d}/server.crt\nkeyfile {d}/server.key\nrequire_certificate true\n"
    )
    broker.start()
    root = unique_root()
    monkeypatch.setenv("LINECTL_TEST_MQTT_PASSWORD", "s3cret")
    cfg_path = line_yaml(
        tmp_path / "line.yaml", port=broker.port, root=root,
        extra_mqtt={
            "username": "line1", "password": "${LINECTL_TEST_MQTT_PASSWORD}",
            "tls": {"ca_file": str(d / "ca.crt"), "cert_file": str(d / "client.crt"), "key_file": str(d / "client.key")},
        },
    )
    cfg = load_line(cfg_path)
    assert cfg.mqtt.password == "s3cret"
    store = await open_store(tmp_path)
    await Producer(store).fill(["LOTA"], 20)
    fwd = Forwarder(cfg, store)
    async with running(fwd):
        await wait_until(lambda: store.backlog() == 0, what="forwarded over TLS")
    bad = cfg.model_copy(update={"mqtt": cfg.mqtt.model_copy(update={"password": "wrong"})})
    await Producer(store).fill(["LOTB"], 5)
    fwd2 = Forwarder(bad, store, backoff_initial_s=0.05, backoff_max_s=0.2)
    async with running(fwd2):
        await wait_until(lambda: fwd2.status()["last_error"] is not None, what="refused login")
        assert store.backlog() == 5 and not fwd2.status()["connected"]
    await store.close()
