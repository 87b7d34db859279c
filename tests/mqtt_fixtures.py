"""Shared MQTT test helpers: private Mosquitto brokers, a gated TCP proxy, subscribers, a real CommandTarget.

Tests that stop, kill or pause a broker start their own `mosquitto -c <tmp conf>`
on a free port; everything else uses the Mosquitto at 127.0.0.1:1883 with a
unique topic root per test. Nothing here mocks aiomqtt or sockets.

Import in a test module with `from mqtt_fixtures import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import pytest_asyncio

REPO = Path(__file__).resolve().parent.parent
SHARED_HOST = "127.0.0.1"
SHARED_PORT = 1883
MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
GTIN = "04012345000016"
GTIN2 = "04012345000023"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def unique_root() -> str:
    return f"test/{uuid.uuid4().hex[:12]}/pack/line1"


async def clear_retained(port: int, root: str) -> None:
    """Leave the shared broker as we found it: an empty retained payload deletes a retained message."""
    with contextlib.suppress(aiomqtt.MqttError):
        async with aiomqtt.Client(SHARED_HOST, port, identifier=f"cleanup-{uuid.uuid4().hex[:8]}") as c:
            for suffix in ("status", "state"):
                await c.publish(f"{root}/{suffix}", b"", qos=1, retain=True)


# --------------------------------------------------------------------------- broker


class Broker:
    """A private mosquitto: start/stop/kill/pause/restart, with or without persistence, on a fixed free port."""

    def __init__(self, directory: Path, *, persistence: bool = False, port: int | None = None, extra: str = "") -> None:
        if MOSQUITTO is None:
            pytest.skip("mosquitto binary not found")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.persistence = persistence
        self.conf = self.dir / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {self.dir}/",
            "max_queued_messages 100000",
            "log_dest none",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to user "mosquitto", who cannot use the 0700 tmp dir
        self.conf.write_text("\n".join(lines) + "\n" + extra)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 5.0) -> Broker:
        assert not self.running
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_open(self.port):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode} (config {self.conf})")
            time.sleep(0.02)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        """SIGTERM: a clean broker stop (saves persistence)."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL: the broker dies mid-stream, nothing is saved."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(5)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> Broker:
        self.stop()
        return self.start()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.proc.send_signal(signal.SIGCONT)
            self.kill()


@pytest.fixture
def broker_factory(tmp_path: Path) -> Any:
    brokers: list[Broker] = []

    def make(*, persistence: bool = False, extra: str = "", start: bool = True) -> Broker:
        b = Broker(tmp_path / f"broker{len(brokers)}", persistence=persistence, extra=extra)
        brokers.append(b)
        return b.start() if start else b

    yield make
    for b in brokers:
        b.close()


# --------------------------------------------------------------------------- proxy


class GatedProxy:
    """TCP proxy in front of a broker: a network the test can cut. cut() drops every connection and stops
    listening (new connections are refused, as with a pulled cable or a down link); reopen() listens again."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target_port = target_port
        self.host = host
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    async def start(self) -> GatedProxy:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._conns.update((writer, uw))

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    w.transport.abort()

        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))
        self._conns.discard(writer)
        self._conns.discard(uw)

    def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._conns):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._conns.clear()

    async def reopen(self) -> None:
        await self.start()

    async def close(self) -> None:
        self.cut()


@pytest_asyncio.fixture
async def proxy_factory() -> AsyncIterator[Callable[[int], Any]]:
    proxies: list[GatedProxy] = []

    async def make(port: int) -> GatedProxy:
        p = await GatedProxy(port).start()
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        await p.close()


# --------------------------------------------------------------------------- subscriber


class Collector:
    """A subscriber that keeps (topic, payload, properties) of everything on root/# and survives broker restarts.

    With `port_getter` it reconnects (clean session, resubscribe) whenever the broker comes back;
    `subscribed` is set after each successful SUBACK.
    """

    def __init__(self, port: int, root: str, *, protocol: aiomqtt.ProtocolVersion = aiomqtt.ProtocolVersion.V5, confirm: bool = False) -> None:
        self.confirm = confirm  # act as the upstream: confirm every message's seq range on <root>/confirm
        self.port = port
        self.root = root
        self.protocol = protocol
        self.messages: list[tuple[str, bytes, Any, float]] = []
        self.subscribed = asyncio.Event()
        self.connections = 0
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> Collector:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.subscribed.wait(), 5)
        return self

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(SHARED_HOST, self.port, protocol=self.protocol, identifier=f"collector-{uuid.uuid4().hex[:8]}") as c:
                    await c.subscribe(f"{self.root}/#", qos=1)
                    self.connections += 1
                    self.subscribed.set()
                    async for m in c.messages:
                        if str(m.topic) == f"{self.root}/confirm":
                            continue
                        self.messages.append((str(m.topic), bytes(m.payload), m.properties, time.time()))
                        self._changed.set()
                        if self.confirm and m.properties is not None:
                            up = dict(getattr(m.properties, "UserProperty", None) or [])
                            if "first_seq" in up:
                                body = json.dumps({"ranges": [[int(up["first_seq"]), int(up["last_seq"])]]}).encode()
                                await c.publish(f"{self.root}/confirm", body, qos=1)
            except aiomqtt.MqttError:
                self.subscribed.clear()
                await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    def on(self, suffix: str) -> list[tuple[str, bytes, Any, float]]:
        return [m for m in self.messages if m[0] == f"{self.root}/{suffix}"]

    def event_ids(self) -> list[str]:
        """Every eventID / event_id received, in arrival order, duplicates included."""
        out: list[str] = []
        for topic, payload, _p, _t in self.messages:
            if topic.endswith("/events"):
                out += [e["eventID"] for e in json.loads(payload)["epcisBody"]["eventList"]]
            elif topic.endswith("/alarms") or topic.endswith("/records"):
                out.append(json.loads(payload)["event_id"])
        return out

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for messages")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.1)


# --------------------------------------------------------------------------- config and store


def line_yaml(path: Path, *, port: int = SHARED_PORT, root: str | None = None, protocol: str = "5", extra_mqtt: dict[str, Any] | None = None) -> Path:
    mqtt = {"host": "127.0.0.1", "port": port, "protocol": protocol, "state_interval_s": 0.5}
    if root:
        mqtt["topic_root"] = root
    mqtt.update(extra_mqtt or {})
    doc = {
        "line": {"enterprise": "acme", "site": "plant1", "area": "pack", "name": "line1", "gln": "4012345000009", "company_prefix_length": 7,
            "timezone_offset": "+01:00"},
        "products": [
            {"gtin": GTIN, "name": "Aspirin 100", "company_prefix_length": 7, "serials": {"scheme": "pool", "low_water": 10, "request_count": 100}},
            {"gtin": GTIN2, "name": "Aspirin 500", "company_prefix_length": 7, "serials": {"scheme": "pool"}},
        ],
        "store": {"path": str(path.parent / "line.db")},
        "mqtt": mqtt,
    }
    path.write_text(json.dumps(doc, indent=1))  # JSON is YAML
    return path


def load_line(path: Path) -> Any:
    from linectl.config import load_config

    return load_config(path)


class StoreTarget:
    """A small, real CommandTarget over the real Store: what the engine will do, minus the line."""

    def __init__(self, cfg: Any, store: Any) -> None:
        self.cfg = cfg
        self.store = store
        self.executed: list[tuple[Any, str]] = []

    async def execute(self, command: Any, origin: str) -> dict[str, Any]:
        from linectl.control import CommandRejected

        self.executed.append((command, origin))
        if command.name == "provision_pool":
            try:
                product = self.cfg.product(command.gtin)
            except KeyError as exc:
                raise CommandRejected(f"unknown GTIN {command.gtin}", "unknown_gtin") from exc
            res = await self.store.provision(product.gtin, command.serial_list(), source=origin)
            return {"gtin": product.gtin, "accepted": res.accepted, "duplicates": res.duplicates, "invalid": res.invalid, "request_id": command.request_id}
        if command.name == "create_batch":
            if self.store.batch(command.lot) is not None:
                raise CommandRejected(f"lot {command.lot} already exists", "lot_exists")
            product = self.cfg.product(command.gtin)
            await self.store.create_batch(command.lot, product.gtin, command.expiry, command.planned_qty, actor=command.actor)
            return {"lot": command.lot, "state": "created"}
        if command.name == "request_state":
            return self.snapshot()
        raise CommandRejected(f"{command.name} is not available in this test target", "not_supported")

    def snapshot(self) -> dict[str, Any]:
        return {
            "ts": time.time(),
            "state": "idle",
            "counters": {"available": {g: self.store.available(g) for g in (GTIN, GTIN2)}},
            "units": {"ts": "epoch s", "available": "serials"},
        }


# --------------------------------------------------------------------------- child processes


def spawn(args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, *args], cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def wait_line(proc: subprocess.Popen[bytes], text: str, timeout: float = 15.0) -> None:
    """Wait until the child prints `text` on stdout (e.g. READY)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stdout.fileno(), False)
    buf = b""
    while time.monotonic() < deadline:
        chunk = proc.stdout.read() or b""
        buf += chunk
        if text.encode() in buf:
            return
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise AssertionError(f"child exited with {proc.returncode} before {text!r}: {err[-2000:]}")
        time.sleep(0.02)
    raise AssertionError(f"child did not print {text!r}")


def bridge_child_main(argv: list[str]) -> int:
    """`python tests/mqtt_fixtures.py bridge CONFIG DB`: a bridge with a StoreTarget, for kill -9 tests."""
    cfg_path, db = argv[0], argv[1]
    sys.path.insert(0, str(REPO))

    async def go() -> None:
        from linectl.mqtt_bridge import MqttBridge
        from linectl.store import Store

        cfg = load_line(Path(cfg_path))
        store = await Store.open(db)
        bridge = MqttBridge(cfg, StoreTarget(cfg, store), store=store)
        task = asyncio.create_task(bridge.run())
        while not bridge.status()["connected"]:
            await asyncio.sleep(0.02)
        print("BRIDGE READY", flush=True)
        await task

    asyncio.run(go())
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["bridge"]:
        sys.exit(bridge_child_main(sys.argv[2:]))
    sys.exit(2)
