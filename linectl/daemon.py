"""`linectl run`: the unattended daemon on the line PC.

Start order matters for safety: the store opens (and refuses a corrupt or
foreign file) before any device is touched; in-flight serials from a crash
are decommissioned before any new batch can run; the line is never resumed
automatically after a restart — an operator starts it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from linectl.config import LineConfig
from linectl.drivers.base import Driver
from linectl.drivers.registry import driver_class
from linectl.engine.line import Line, store_refuses_writes
from linectl.engine.plc_surface import PlcSurface
from linectl.engine.supervisor import Supervisor

log = structlog.get_logger("linectl.daemon")


def sd_notify(message: str) -> bool:
    """systemd's notify protocol without a dependency: one datagram to $NOTIFY_SOCKET."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError as exc:
        log.warning("sd_notify_failed", error=str(exc))
        return False


def build_drivers(cfg: LineConfig) -> dict[str, Driver]:
    return {name: driver_class(dev.driver)(name, dev) for name, dev in cfg.devices.items()}


class Upstream(Protocol):
    """The forwarder and the MQTT bridge, as the daemon stops them."""

    async def stop(self, timeout: float = 3.0) -> None: ...


@dataclass
class Daemon:
    cfg: LineConfig
    db_path: str | None = None
    #: only the demo and tests create their own store; `linectl run` refuses a missing one (`linectl init` creates it)
    create: bool = False
    store: Any = None
    line: Line | None = None
    drivers: dict[str, Driver] = field(default_factory=dict)
    supervisor: Supervisor | None = None
    upstream: list[Upstream] = field(default_factory=list)
    #: one per pool product with a serial source (linectl/sources/provisioner.py), by GTIN
    provisioners: dict[str, Any] = field(default_factory=dict)
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    loop_lag_ms: float = 0.0
    _bridge: Any = None
    #: records each sink's and source's state in the store (linectl/upstream/link_state.py) for `upstream status`
    _links: Any = None
    #: the access gate (linectl/access): logins, tokens, users_admin; shared by the MQTT bridge and the OPC UA server
    access: Any = None
    #: the default users' passwords of a store this daemon created (the demo signs as them); empty otherwise
    initial_passwords: dict[str, str] = field(default_factory=dict, repr=False)

    async def start(self) -> None:
        from linectl.epcis import EpcisMapper
        from linectl.store import Store
        from linectl.store.store import line_identity

        t0 = time.monotonic()
        phases: dict[str, float] = {}

        def phase(name: str) -> None:
            phases[name] = round((time.monotonic() - t0) * 1000.0 - sum(phases.values()), 1)

        path = self.db_path or self.cfg.store.path
        # the owner lock first (held until store.close()), before crash recovery or any migration touches the file;
        # then the line identity: another line's store is refused, a store from before identities adopts this one
        self.store = await Store.open(
            path, group_commit_max=self.cfg.store.group_commit_max, queue_max=self.cfg.store.queue_max, create=self.create,
            lock="linectl run", identity=line_identity(self.cfg), actor="system", origin="daemon",
        )
        # every EPCIS event is rendered once, when stored, with the context in force then (linectl/epcis.py)
        self.store.set_epcis_mapper(EpcisMapper.from_config(self.cfg))
        await self.store.upsert_products(self.cfg.products)
        phase("store_open")
        self.drivers = build_drivers(self.cfg)
        self.line = Line(self.cfg, self.store, self.drivers)
        await self._start_access()
        await self.line.recover_in_flight()
        from linectl.engine.aggregation import recover_containers  # SSCCs labelled but never recorded: void them

        await recover_containers(self.store)
        await self.line.load_open_batch()
        phase("recovery")
        for d in self.drivers.values():
            await d.start()
        phase("drivers")
        self.supervisor = Supervisor(on_give_up=self._task_gave_up, on_crash=self.line.task_crashed, uncounted=store_refuses_writes)
        for st in self.line.stations:
            for name, factory in st.tasks().items():
                self.supervisor.start(name, factory)
        for plc in self.line.plcs:
            self.supervisor.start(f"plc_surface.{plc.name}", PlcSurface(self.line, plc).run)
        self.supervisor.start("loop_health", self._loop_health)
        self._start_provisioners()
        await self._start_upstream()
        if self.cfg.opcua_server.enabled:  # the line as a PackML unit for SCADA/MES (linectl/opcua_server.py)
            from pathlib import Path

            from linectl.opcua_server import PackmlServer

            ua_server = PackmlServer(self.cfg, self.line, base_dir=Path(path).resolve().parent, access=self.access)
            self.upstream.append(ua_server)  # stopped with the upstream links, also when its start fails half-way
            await ua_server.start()
        self.supervisor.start("retention", self._retention)
        phase("tasks")
        # what exists now (config, drivers, pydantic models) lives for the whole run: keep it out of GC scans,
        # so a full collection costs less mid-production
        await self._audit_start()
        gc.freeze()
        sd_notify("READY=1\nSTATUS=line controller running")
        log.info("daemon_started", line=self.cfg.topic_root, db=path, devices=list(self.drivers), startup_ms=phases)

    async def _audit_start(self) -> None:
        """The start in the audit trail with the config's hashes and the clock the records rest on; a config that
        differs from the one of the last start is recorded as a change (old and new hashes)."""
        from linectl.config_hash import clock_source, config_fingerprint
        from linectl.store.audit import change
        from linectl.store.review_reads import last_audit_of

        fp = config_fingerprint(self.cfg)
        clock = await asyncio.to_thread(clock_source)
        last = await asyncio.to_thread(last_audit_of, self.store, "daemon_started")
        seen = last.detail.get("config") if last is not None else None
        if isinstance(seen, dict) and seen.get("config_sha256") != fp["config_sha256"]:
            await self.store.audit("system", "daemon", "config_changed",
                                   {**change(seen, fp, "the daemon started with another configuration than at its last start"),
                                    "last_start_seq": last.seq if last is not None else None})
        await self.store.audit("system", "daemon", "daemon_started", {"config": fp, "clock": clock, "pid": os.getpid()})

    async def _start_access(self) -> None:
        from linectl.access.gate import Access

        assert self.line is not None
        self.access = Access(self.cfg.access, self.store, refusals=self.line.access_refusals)
        if not self.cfg.access.enabled:
            log.warning("access_control_disabled", message="access control disabled: every command is anonymous",
                        fix="add an access: section to the line config (README: Users and access)")
            return
        self.line.on_users_admin = self.access.admin
        if self.create and not self.store.users():  # a store the demo (or a test) makes: its default users, as init does
            from pathlib import Path

            from linectl.access.bootstrap import create_default_users, write_password_file
            from linectl.access.passwords import PasswordRefused
            from linectl.store.model import StoreError

            try:
                generated = await create_default_users(self.cfg.access, self.store, actor="system", origin="daemon")
            except PasswordRefused as exc:  # a default user's password from the environment (the demo shows it, no traceback)
                raise StoreError(f"default users: {exc}") from None
            where = write_password_file(Path(f"{self.store.path}.initial-passwords"), generated)
            import os

            from linectl.access.bootstrap import password_env

            # the demo harness signs its critical actions as these users (in memory only, never logged)
            self.initial_passwords = {n: pw or os.environ.get(password_env(n), "") for n, pw in generated.items()}
            log.info("default_users_created", users=sorted(generated), generated_passwords_in=None if where is None else str(where))
        users = self.store.users()
        log.info("access_control_enabled", users=sum(1 for u in users if u.active), ldap=self.cfg.access.ldap is not None,
                 session_ttl_s=self.cfg.access.session_ttl_s)
        if not any(u.active for u in users) and self.cfg.access.ldap is None:
            log.warning("access_no_users", message="access control is on but the store has no active user: nobody can command the line",
                        fix="linectl users add (offline) or linectl init on a new store")

    def _start_provisioners(self) -> None:
        """A provisioner task per pool product with a serial source; the line nudges it below low water, routes
        serials_retry to it and tells it of a batch close (its unused serials go back to the source, or are reported)."""
        from linectl.sources.provisioner import Provisioner, build_source

        assert self.line is not None and self.supervisor is not None
        for product in self.cfg.products:
            if product.serials.scheme == "pool" and product.serials.source is not None:
                prov = Provisioner(product, build_source(product), self.store, self.line)
                self.provisioners[product.gtin] = prov
                self.supervisor.start(f"provisioner.{product.gtin}", prov.run)
        if not self.provisioners:
            return
        provs = self.provisioners
        line = self.line

        async def retry(gtin: str, actor: str, origin: str) -> dict[str, Any]:
            return await provs[gtin].retry(actor, origin)  # type: ignore[no-any-return]

        async def closed(lot: str, gtin: str) -> dict[str, Any] | None:
            p = provs.get(gtin)
            return None if p is None else await p.batch_closed(lot)

        line.on_serials_retry = retry
        line.on_batch_closed = closed
        line.on_pool_low = self._pool_low

    def _pool_low(self, gtin: str, count: int) -> str | None:
        """Below low water: the product's provisioner when it has a source, else the MQTT serials/request path."""
        prov = self.provisioners.get(gtin)
        if prov is not None:
            prov.nudge()
            return None
        if self._bridge is not None:
            return self._bridge.request_serials(gtin, count, "pool")  # type: ignore[no-any-return]
        return None

    async def _start_upstream(self) -> None:
        """Every enabled sink (linectl/upstream/sink.py) with its own cursor; the MQTT bridge when MQTT is on."""
        from linectl.events import Severity
        from linectl.upstream.bridge import MqttBridge
        from linectl.upstream.sink import build_sinks

        assert self.line is not None and self.supervisor is not None
        line = self.line
        # one config key may make several instances (upstream.epcis_rest[]): each instance's name is its cursor
        sinks = build_sinks(self.cfg, self.store, on_alarm=lambda code, message: line.alarm(code, message, Severity.WARNING))
        # forwarded_at and retention follow exactly these cursors (a sink removed from the config no longer holds rows)
        self.store.set_sinks([s.name for s in sinks])
        for sink in sinks:
            self.supervisor.start("forwarder" if sink.name == "mqtt" else f"upstream.{sink.name}", sink.run)
        self.upstream = list(sinks)
        by_name = {s.name: s for s in sinks}

        async def sink_retry(name: str, actor: str, origin: str) -> dict[str, Any]:
            from linectl import control as C

            sink = by_name.get(name)
            if sink is None:
                raise C.CommandRejected(f"no upstream sink {name!r} on this line; sinks: {', '.join(by_name)}", "unknown_sink")
            unparked = sink.unpark()
            log.info("sink_retry", sink=name, unparked=unparked, actor=f"{actor}@{origin}")
            return {"sink": name, "unparked": unparked, "status": sink.status()}

        line.on_sink_retry = sink_retry
        from linectl.upstream.link_state import LinkStateRecorder

        self._links = LinkStateRecorder(self.store, sinks, list(self.provisioners.values()))
        self.supervisor.start("upstream.link_state", self._links.run)
        if self.cfg.mqtt.enabled:
            fwd = next(s for s in sinks if s.name == "mqtt")
            bridge = MqttBridge(self.cfg, self.line, store=self.store, forwarder=fwd, sinks=sinks, sources=list(self.provisioners.values()),
                                access=self.access)
            self.upstream.insert(0, bridge)
            self.supervisor.start("mqtt_bridge", bridge.run)
            self.line.on_state_change(bridge.state_changed)
            self._bridge = bridge
            self.line.on_pool_low = self._pool_low

    async def _task_gave_up(self, name: str, exc: BaseException) -> None:
        if self.line is not None:
            await self.line.fault_stop("task_failed", f"task {name} keeps failing: {exc}")

    async def _loop_health(self, interval: float = 0.5) -> None:
        """Feed the systemd watchdog only while the event loop answers on time and the store writer lives.

        A dead writer also stops the line at once (Line.store_failed: infeed idle, fault, alarm kept in memory):
        nothing it decides could be recorded. systemd, no longer fed, restarts the daemon."""
        usec = os.environ.get("WATCHDOG_USEC")
        wd_every = (int(usec) / 1e6 / 2) if usec else None
        last_feed = 0.0
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(interval)
            self.loop_lag_ms = (time.monotonic() - t0 - interval) * 1000.0
            writer_ok = self.store.writer_alive()
            healthy = self.loop_lag_ms < 1000.0 and writer_ok
            if wd_every is not None and healthy and time.monotonic() - last_feed >= wd_every:
                sd_notify("WATCHDOG=1")
                last_feed = time.monotonic()
            elif not healthy:
                log.error("loop_unhealthy", lag_ms=round(self.loop_lag_ms, 1), store_writer_alive=writer_ok)
            if not writer_ok and self.line is not None and self.line.store_down is None:
                await self.line.store_failed(self.store.writer_gone())

    async def _retention(self) -> None:
        while True:
            await asyncio.sleep(3600)
            n = await self.store.purge_forwarded(self.cfg.store.retention_days)
            if n:
                log.info("retention_purged", rows=n)

    async def shutdown(self, reason: str = "shutdown") -> None:
        """Stop the line cleanly (drain units on the belt), then flush the store."""
        sd_notify("STOPPING=1")
        line = self.line
        if line is not None:
            line.shutting_down = True
        if line is not None and line.batch is not None:
            try:
                await asyncio.wait_for(line._stop_batch(actor="system", origin="daemon", reason=reason), 30)
            except Exception as exc:  # noqa: BLE001
                log.error("stop_on_shutdown_failed", error=str(exc))
        if self.supervisor is not None:
            self.supervisor.stopping()
        for u in self.upstream:
            try:
                await asyncio.wait_for(u.stop(), 5)
            except Exception as exc:  # noqa: BLE001
                log.warning("upstream_stop_failed", error=str(exc))
        if self.supervisor is not None:
            await self.supervisor.stop()
        for d in self.drivers.values():
            try:
                await asyncio.wait_for(d.stop(), 5)
            except Exception as exc:  # noqa: BLE001
                log.warning("driver_stop_failed", device=d.name, error=str(exc))
        for prov in self.provisioners.values():
            try:
                await asyncio.wait_for(prov.aclose(), 5)
            except Exception as exc:  # noqa: BLE001
                log.warning("serial_source_close_failed", source=prov.name, error=str(exc))
        if self._links is not None:  # each link as it was at the stop, for `upstream status` while the daemon is down
            await self._links.final()
        if line is not None:  # refusals counted since the last interval: their aggregated audit record before the store closes
            await line.access_refusals.flush()
        if self.store is not None:
            await self.store.close()
        log.info("daemon_stopped", reason=reason)


async def run_daemon(cfg: LineConfig, db_path: str | None = None, on_started: Callable[[Daemon], Awaitable[None]] | None = None) -> int:
    d = Daemon(cfg, db_path)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, d.stop_event.set)
    try:
        await d.start()
    except BaseException:
        await d.shutdown("start failed")  # releases the store (and its lock) and any driver already started
        raise
    if on_started is not None:
        await on_started(d)
    await d.stop_event.wait()
    await d.shutdown("SIGTERM")
    return 0
