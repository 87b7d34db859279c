"""PLC simulator: the line's tag map served by pymodbus' own server (TCP, or RTU over a pty / socket),
by python-snap7's own server (S7) and by asyncua's own server (OPC UA), plus the PLC program around the reject gate.

The memory behind the servers is the same memory the simulated PLC program
scans, so linectl talks to a real protocol stack end to end. The program is
fail-safe like a real one: a unit passes the gate only when its verdict slot
holds (seq, GOOD); no verdict, a stale slot or a dead controller means
reject. Faults (disconnect, slow replies, heartbeat stop, gate jam, lost
reject confirm, e-stop) are injectable, so linectl's reaction can be tested
without a real line.

Run alone: `python -m linectl.simulators.plc --config line.yaml --device plc1`, or
`python -m linectl.simulators.plc --driver modbus_tcp --port 1502` with the built-in
default tag map (see DEFAULT_MODBUS_TAGS / DEFAULT_S7_TAGS / DEFAULT_OPCUA_TAGS); `--driver opcua` serves
it from asyncua's own server (OPC UA binary, the same program and memory).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import os
import pty
import signal
import socket
import sys
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from linectl.drivers.plc_tags import (
    CASE_ACCEPT,
    MODE_CHALLENGE,
    MODE_IDLE,
    MODE_PRODUCTION,
    VERDICT_GOOD,
    ModbusTagSpec,
    S7TagSpec,
)
from linectl.simulators.model import SimUnit

log = structlog.get_logger("linectl.simulators.plc")
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
logging.getLogger("snap7").setLevel(logging.CRITICAL)

RING = 64  # default verdict ring slots R

#: default Modbus tag map (holding registers + coils), the one the docs and example configs use
DEFAULT_MODBUS_TAGS: dict[str, dict[str, Any]] = {
    "heartbeat_plc": {"table": "coil", "address": 0, "type": "bool"},
    "heartbeat_ctl": {"table": "coil", "address": 1, "type": "bool"},
    "cmd_start": {"table": "coil", "address": 2, "type": "bool"},
    "cmd_stop": {"table": "coil", "address": 3, "type": "bool"},
    "cmd_pause": {"table": "coil", "address": 4, "type": "bool"},
    "cmd_reset": {"table": "coil", "address": 5, "type": "bool"},
    "estop": {"table": "coil", "address": 6, "type": "bool"},
    "line_mode": {"table": "holding", "address": 0, "type": "uint16"},
    "line_running": {"table": "holding", "address": 1, "type": "uint16"},
    "fault": {"table": "holding", "address": 2, "type": "uint16"},
    "alarm_code": {"table": "holding", "address": 3, "type": "uint16"},
    "good_count": {"table": "holding", "address": 4, "type": "uint32"},
    "reject_count": {"table": "holding", "address": 6, "type": "uint32"},
    "trigger_count": {"table": "holding", "address": 8, "type": "uint32"},
    "reject_total": {"table": "holding", "address": 10, "type": "uint32"},
    "pass_total": {"table": "holding", "address": 12, "type": "uint32"},
    "verdict_ring": {"table": "holding", "address": 100, "type": "uint32", "count": 2 * RING},
    "reject_ring": {"table": "holding", "address": 400, "type": "uint32", "count": RING},
    "case_result": {"table": "holding", "address": 14, "type": "uint16"},
    "case_seq": {"table": "holding", "address": 16, "type": "uint32"},
    "gate_reject_total": {"table": "holding", "address": 90, "type": "uint32"},
    "plc_epoch": {"table": "holding", "address": 92, "type": "uint32"},
}
#: default S7 tag map (DB1)
DEFAULT_S7_TAGS: dict[str, dict[str, Any]] = {
    "heartbeat_plc": {"db": 1, "offset": "0.0", "type": "BOOL"},
    "heartbeat_ctl": {"db": 1, "offset": "0.1", "type": "BOOL"},
    "cmd_start": {"db": 1, "offset": "0.2", "type": "BOOL"},
    "cmd_stop": {"db": 1, "offset": "0.3", "type": "BOOL"},
    "cmd_pause": {"db": 1, "offset": "0.4", "type": "BOOL"},
    "cmd_reset": {"db": 1, "offset": "0.5", "type": "BOOL"},
    "estop": {"db": 1, "offset": "0.6", "type": "BOOL"},
    "line_running": {"db": 1, "offset": "0.7", "type": "BOOL"},
    "fault": {"db": 1, "offset": "1.0", "type": "BOOL"},
    "line_mode": {"db": 1, "offset": "2", "type": "INT"},
    "alarm_code": {"db": 1, "offset": "4", "type": "INT"},
    "good_count": {"db": 1, "offset": "6", "type": "UDINT"},
    "reject_count": {"db": 1, "offset": "10", "type": "UDINT"},
    "trigger_count": {"db": 1, "offset": "14", "type": "UDINT"},
    "reject_total": {"db": 1, "offset": "18", "type": "UDINT"},
    "pass_total": {"db": 1, "offset": "22", "type": "UDINT"},
    "verdict_ring": {"db": 1, "offset": "26", "type": "UDINT", "count": 2 * RING},
    "reject_ring": {"db": 1, "offset": "538", "type": "UDINT", "count": RING},
    "case_result": {"db": 1, "offset": "794", "type": "INT"},
    "case_seq": {"db": 1, "offset": "796", "type": "UDINT"},
    "gate_reject_total": {"db": 1, "offset": "800", "type": "UDINT"},
    "plc_epoch": {"db": 1, "offset": "804", "type": "UDINT"},
}

#: default OPC UA tag map: the same logical tags as Variable nodes, namespace by URI (servers re-index namespaces)
_NSU = "nsu=urn:linectl:plcsim;s=Line."
DEFAULT_OPCUA_TAGS: dict[str, dict[str, Any]] = {
    "heartbeat_plc": {"node": _NSU + "HeartbeatPlc", "type": "Boolean"},
    "heartbeat_ctl": {"node": _NSU + "HeartbeatCtl", "type": "Boolean", "writable": True},
    "cmd_start": {"node": _NSU + "CmdStart", "type": "Boolean", "writable": True},
    "cmd_stop": {"node": _NSU + "CmdStop", "type": "Boolean", "writable": True},
    "cmd_pause": {"node": _NSU + "CmdPause", "type": "Boolean", "writable": True},
    "cmd_reset": {"node": _NSU + "CmdReset", "type": "Boolean", "writable": True},
    "estop": {"node": _NSU + "EStop", "type": "Boolean"},
    "line_mode": {"node": _NSU + "LineMode", "type": "UInt16", "writable": True},
    "line_running": {"node": _NSU + "LineRunning", "type": "UInt16", "writable": True},
    "fault": {"node": _NSU + "Fault", "type": "UInt16", "writable": True},
    "alarm_code": {"node": _NSU + "AlarmCode", "type": "UInt16", "writable": True},
    "good_count": {"node": _NSU + "GoodCount", "type": "UInt32", "writable": True},
    "reject_count": {"node": _NSU + "RejectCount", "type": "UInt32", "writable": True},
    "trigger_count": {"node": _NSU + "TriggerCount", "type": "UInt32"},
    "reject_total": {"node": _NSU + "RejectTotal", "type": "UInt32"},
    "pass_total": {"node": _NSU + "PassTotal", "type": "UInt32"},
    "verdict_ring": {"node": _NSU + "VerdictRing", "type": "UInt32", "count": 2 * RING, "writable": True},
    "reject_ring": {"node": _NSU + "RejectRing", "type": "UInt32", "count": RING},
    "case_result": {"node": _NSU + "CaseResult", "type": "UInt16", "writable": True},
    "case_seq": {"node": _NSU + "CaseSeq", "type": "UInt32", "writable": True},
    "gate_reject_total": {"node": _NSU + "GateRejectTotal", "type": "UInt32"},
    "plc_epoch": {"node": _NSU + "Epoch", "type": "UInt32"},
}

#: PackTags for a PLC programmed to PackML (README "PackTags on the PLC"), one map per protocol, to merge into a tag map
PACKML_MODBUS_TAGS: dict[str, dict[str, Any]] = {
    "packml_cmd_change_request": {"table": "coil", "address": 16, "type": "bool"},
    "packml_unit_mode_change_request": {"table": "coil", "address": 19, "type": "bool"},
    "packml_unit_mode": {"table": "holding", "address": 54, "type": "int32"},
    "packml_blocked": {"table": "coil", "address": 17, "type": "bool"},
    "packml_starved": {"table": "coil", "address": 18, "type": "bool"},
    "packml_cntrl_cmd": {"table": "holding", "address": 40, "type": "int32"},
    "packml_cmd_result": {"table": "holding", "address": 42, "type": "uint16"},
    "packml_state_current": {"table": "holding", "address": 44, "type": "int32"},
    "packml_unit_mode_current": {"table": "holding", "address": 46, "type": "int32"},
    "packml_stop_reason": {"table": "holding", "address": 48, "type": "int32"},
    "packml_prod_processed_count": {"table": "holding", "address": 50, "type": "int32"},
    "packml_prod_defective_count": {"table": "holding", "address": 52, "type": "int32"},
    "downstream_blocked": {"table": "coil", "address": 20, "type": "bool"},
    "infeed_starved": {"table": "coil", "address": 21, "type": "bool"},
}
PACKML_S7_TAGS: dict[str, dict[str, Any]] = {
    "packml_cmd_change_request": {"db": 1, "offset": "1.1", "type": "BOOL"},
    "packml_unit_mode_change_request": {"db": 1, "offset": "1.4", "type": "BOOL"},
    "packml_unit_mode": {"db": 1, "offset": "834", "type": "DINT"},
    "packml_blocked": {"db": 1, "offset": "1.2", "type": "BOOL"},
    "packml_starved": {"db": 1, "offset": "1.3", "type": "BOOL"},
    "packml_cntrl_cmd": {"db": 1, "offset": "808", "type": "DINT"},
    "packml_cmd_result": {"db": 1, "offset": "812", "type": "INT"},
    "packml_state_current": {"db": 1, "offset": "814", "type": "DINT"},
    "packml_unit_mode_current": {"db": 1, "offset": "818", "type": "DINT"},
    "packml_stop_reason": {"db": 1, "offset": "822", "type": "DINT"},
    "packml_prod_processed_count": {"db": 1, "offset": "826", "type": "DINT"},
    "packml_prod_defective_count": {"db": 1, "offset": "830", "type": "DINT"},
    "downstream_blocked": {"db": 1, "offset": "1.5", "type": "BOOL"},
    "infeed_starved": {"db": 1, "offset": "1.6", "type": "BOOL"},
}
_PT = "nsu=urn:linectl:plcsim;s=PackTags."
PACKML_OPCUA_TAGS: dict[str, dict[str, Any]] = {
    "packml_cntrl_cmd": {"node": _PT + "Command.CntrlCmd", "type": "Int32"},
    "packml_cmd_change_request": {"node": _PT + "Command.CmdChangeRequest", "type": "Boolean", "writable": True},
    "packml_unit_mode": {"node": _PT + "Command.UnitMode", "type": "Int32"},
    "packml_unit_mode_change_request": {"node": _PT + "Command.UnitModeChangeRequest", "type": "Boolean", "writable": True},
    "packml_cmd_result": {"node": _PT + "Status.CmdResult", "type": "UInt16", "writable": True},
    "packml_state_current": {"node": _PT + "Status.StateCurrent", "type": "Int32", "writable": True},
    "packml_unit_mode_current": {"node": _PT + "Status.UnitModeCurrent", "type": "Int32", "writable": True},
    "packml_blocked": {"node": _PT + "Status.EquipmentBlocked", "type": "Boolean", "writable": True},
    "packml_starved": {"node": _PT + "Status.EquipmentStarved", "type": "Boolean", "writable": True},
    "packml_stop_reason": {"node": _PT + "Admin.StopReason.ID", "type": "Int32", "writable": True},
    "packml_prod_processed_count": {"node": _PT + "Admin.ProdProcessedCount", "type": "Int32", "writable": True},
    "packml_prod_defective_count": {"node": _PT + "Admin.ProdDefectiveCount", "type": "Int32", "writable": True},
    "downstream_blocked": {"node": _NSU + "DownstreamBlocked", "type": "Boolean"},
    "infeed_starved": {"node": _NSU + "InfeedStarved", "type": "Boolean"},
}
#: the PLC program's two request kinds: (value tag, its change request)
_PACKML_REQUESTS = {"cntrl_cmd": ("packml_cntrl_cmd", "packml_cmd_change_request"), "unit_mode": ("packml_unit_mode", "packml_unit_mode_change_request")}
PACKML_TAGS = {"modbus_tcp": PACKML_MODBUS_TAGS, "modbus_rtu": PACKML_MODBUS_TAGS, "s7": PACKML_S7_TAGS, "opcua": PACKML_OPCUA_TAGS}

#: drop_subscriptions (OPC UA only): the server deletes every client subscription at once, as a PLC short of resources
#: or after a program download does; the sessions stay up and say nothing (asyncua's client then stops publishing)
FAULTS = ("disconnect", "slow", "heartbeat_stop", "gate_jam", "confirm_lost", "estop", "plc_restart", "drop_subscriptions",
          "downstream_blocked", "infeed_empty")
#: material faults around the line: the PLC holds the infeed (no product enters; units already on the belt run on to
#: the gate) and shows it in its input tag for the controller, when mapped (README "PackTags on the PLC")
MATERIAL_FAULTS = {"downstream_blocked": "downstream_blocked", "infeed_empty": "infeed_starved"}
#: tags a warm restart keeps (retentive memory); a cold restart clears everything but plc_epoch
RETENTIVE = frozenset({"trigger_count", "pass_total", "reject_total", "gate_reject_total", "verdict_ring", "reject_ring", "plc_epoch", "case_seq",
    "case_result"})


# --------------------------------------------------------------------------- memory


class ModbusMemory:
    """Tag access straight into the register lists pymodbus' SimCore serves (same event loop: no locking)."""

    def __init__(self, tags: dict[str, ModbusTagSpec], core: Any, device_id: int) -> None:
        self.tags = tags
        rt = core.devices[device_id]
        self._blocks = {t: rt.block[t[0]] for t in ("coil", "discrete", "holding", "input")}
        self.lock = contextlib.nullcontext()

    def get_elems(self, name: str, index: int = 0, n: int | None = None) -> list[Any]:
        s = self.tags[name]
        n = s.count - index if n is None else n
        start, _, regs, _ = self._blocks[s.table]
        a = s.address + index * s.width
        if s.is_bits:
            return [bool(regs[(x // 16) - start] >> (x % 16) & 1) for x in range(a, a + n)]
        return s.decode(regs[a - start : a - start + n * s.width])

    def set_elems(self, name: str, values: list[Any], index: int = 0) -> None:
        s = self.tags[name]
        start, _, regs, _ = self._blocks[s.table]
        a = s.address + index * s.width
        if s.is_bits:
            for k, v in enumerate(values):
                x = a + k
                i = (x // 16) - start
                regs[i] = (regs[i] | (1 << (x % 16))) if v else (regs[i] & ~(1 << (x % 16)))
            return
        wire = s.encode(values)
        regs[a - start : a - start + len(wire)] = wire


class S7Memory:
    """Tag access into the DB bytearrays the snap7 server serves from its own threads (hence the area lock)."""

    def __init__(self, tags: dict[str, S7TagSpec], dbs: dict[int, bytearray], locks: dict[int, threading.Lock]) -> None:
        self.tags = tags
        self._dbs = dbs
        self._locks = locks
        # one PLC-program lock for multi-tag steps; every DB lock is taken under it in DB order
        self.lock = _MultiLock([locks[k] for k in sorted(locks)])

    def _area(self, db: int) -> Any:
        # inside a program step (self.lock held by this thread) every area lock is already ours: taking one
        # again would deadlock (snap7's area locks are not re-entrant)
        return contextlib.nullcontext() if self.lock.held() else self._locks[db]

    def get_elems(self, name: str, index: int = 0, n: int | None = None) -> list[Any]:
        s = self.tags[name]
        with self._area(s.db):
            return s.decode(self._dbs[s.db], 0, index, n)

    def set_elems(self, name: str, values: list[Any], index: int = 0) -> None:
        s = self.tags[name]
        db = self._dbs[s.db]
        with self._area(s.db):
            if s.type == "BOOL":
                for k, v in enumerate(values):
                    b = s.byte * 8 + s.bit + index + k
                    db[b // 8] = (db[b // 8] | (1 << (b % 8))) if v else (db[b // 8] & ~(1 << (b % 8)))
            else:
                data = s.encode(values)
                start = s.byte + index * s.elem_size
                db[start : start + len(data)] = data


class _MultiLock:
    def __init__(self, locks: list[threading.Lock]) -> None:
        self._locks = locks
        self._owner: int | None = None

    def held(self) -> bool:
        return self._owner == threading.get_ident()

    def __enter__(self) -> None:
        for lk in self._locks:
            lk.acquire()
        self._owner = threading.get_ident()

    def __exit__(self, *exc: Any) -> None:
        self._owner = None
        for lk in reversed(self._locks):
            lk.release()


def _get(mem: Any, name: str) -> Any:
    vals = mem.get_elems(name)
    return vals if mem.tags[name].count > 1 else vals[0]


# --------------------------------------------------------------------------- pty link


class PtyLink:
    """Two pseudo-terminals joined back to back: a null-modem cable for RTU tests without socat or root.

    `client_path` is what the driver opens, `server_path` what the simulator's
    serial server opens. With `link` set, a symlink there points at
    client_path so a config can name a stable path.
    """

    def __init__(self, link: str | None = None) -> None:
        self._m1, self._s1 = pty.openpty()
        self._m2, self._s2 = pty.openpty()
        for fd in (self._s1, self._s2):
            tty.setraw(fd)
        for fd in (self._m1, self._m2):
            os.set_blocking(fd, False)
        self.server_path = os.ttyname(self._s1)
        self.client_path = os.ttyname(self._s2)
        self.link = link
        if link:
            if os.path.lexists(link):
                if not os.path.islink(link):
                    os.close(self._m1)
                    raise FileExistsError(f"{link} exists and is not a symlink; will not replace it")
                os.unlink(link)
            os.symlink(self.client_path, link)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.broken = False  # fault injection: drop every byte

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._m1, self._pump, self._m1, self._m2)
        self._loop.add_reader(self._m2, self._pump, self._m2, self._m1)

    def _pump(self, src: int, dst: int) -> None:
        try:
            data = os.read(src, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        if self.broken or not data:
            return
        while data:
            try:
                n = os.write(dst, data)
                data = data[n:]
            except BlockingIOError:
                time.sleep(0.0005)
            except OSError:
                return

    def close(self) -> None:
        if self._loop is not None:
            for fd in (self._m1, self._m2):
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(fd)
        for fd in (self._m1, self._m2, self._s1, self._s2):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.link and os.path.islink(self.link):
            with contextlib.suppress(OSError):
                os.unlink(self.link)


# --------------------------------------------------------------------------- servers


def _simdevice(tags: dict[str, ModbusTagSpec], device_id: int, action: Callable[..., Any]) -> Any:
    from pymodbus.simulator import DataType, SimData, SimDevice

    blocks = []
    for table in ("coil", "discrete", "holding", "input"):
        spans = [(s.address, s.address + s.size) for s in tags.values() if s.table == table]
        lo = min((a for a, _ in spans), default=0)
        hi = max((b for _, b in spans), default=1)
        if table in ("coil", "discrete"):
            blocks.append([SimData(lo, values=[False] * (hi - lo), datatype=DataType.BITS)])
        else:
            blocks.append([SimData(lo, values=[0] * (hi - lo), datatype=DataType.REGISTERS)])
    return SimDevice(id=device_id, simdata=tuple(blocks), action=action)  # type: ignore[arg-type]


class ModbusServerHost:
    """pymodbus' own server over TCP, RTU over TCP (`socket://` port) or RTU over a pty, restartable on one memory."""

    def __init__(self, cfg: Any, faults: FaultState) -> None:
        from pymodbus.simulator.simcore import SimCore

        self.cfg = cfg
        self.faults = faults
        self.device_id = cfg.device_id or 0
        self._simdev = _simdevice(cfg.tags, self.device_id, self._action)
        self.core = SimCore(self._simdev)
        self.server: Any = None
        self.pty: PtyLink | None = None
        self.bound: str = ""
        self.port: int | None = getattr(cfg, "port", None)

    async def _action(self, fc: int, start: int, address: int, count: int, regs: list[int], values: Any) -> None:
        # The slow-PLC fault: every request waits before the datastore answers.
        delay = self.faults.slow_delay()
        if delay > 0:
            await asyncio.sleep(delay)
        return None

    async def start(self) -> str:
        from pymodbus.framer import FramerType
        from pymodbus.server import ModbusSerialServer, ModbusTcpServer

        cfg = self.cfg
        srv: ModbusTcpServer | ModbusSerialServer
        if cfg.driver == "modbus_tcp":
            srv = ModbusTcpServer(context=self._simdev, address=(cfg.host, cfg.port))
        else:
            port = cfg.serial_port
            if not port.startswith("socket://"):
                if self.pty is None:
                    self.pty = PtyLink(link=port)
                    self.pty.start()
                port = self.pty.server_path
            srv = ModbusSerialServer(
                context=self._simdev,
                framer=FramerType.RTU,
                port=port,
                baudrate=cfg.baudrate,
                bytesize=cfg.bytesize,
                parity="N" if self.pty is not None else cfg.parity,  # some kernels refuse parity on a pty
                stopbits=cfg.stopbits,
            )
        srv.context = self.core  # keep one memory across restarts
        await srv.serve_forever(background=True)
        self.server = srv
        if cfg.driver == "modbus_tcp":
            # pymodbus types its listener as a BaseTransport; for TCP it is the asyncio.Server, which has sockets
            sock = srv.transport.sockets[0].getsockname()  # type: ignore[attr-defined]
            self.bound = f"modbus_tcp {sock[0]}:{sock[1]}"
            self.port = sock[1]
        elif self.pty is not None:
            self.bound = f"modbus_rtu {cfg.serial_port} -> {self.pty.client_path} (pty)"
        else:
            self.bound = f"modbus_rtu {cfg.serial_port}"
        return self.bound

    async def stop(self) -> None:
        srv, self.server = self.server, None
        if srv is not None:
            with contextlib.suppress(Exception):
                await srv.shutdown()

    async def close(self) -> None:
        await self.stop()
        if self.pty is not None:
            self.pty.close()
            self.pty = None

    def memory(self) -> ModbusMemory:
        return ModbusMemory(self.cfg.tags, self.core, self.device_id)


class S7ServerHost:
    """python-snap7's own (threaded) server on a configurable port, with fault hooks and correct bit writes."""

    def __init__(self, cfg: Any, faults: FaultState) -> None:
        self.cfg = cfg
        self.faults = faults
        sizes: dict[int, int] = {}
        for s in cfg.tags.values():
            start, n = s.byte_span()
            sizes[s.db] = max(sizes.get(s.db, 0), start + n)
        self.dbs = {db: bytearray(size) for db, size in sizes.items()}
        self.server: Any = None
        self.bound = ""
        self.port = cfg.port

    def _make(self) -> Any:
        from snap7.type import SrvArea

        srv = _s7_server_class()(self.faults)
        for db, data in self.dbs.items():
            srv.register_area(SrvArea.DB, db, data)
        return srv

    async def start(self) -> str:
        if self.server is None:
            self.server = self._make()
        ip = socket.gethostbyname(self.cfg.host)
        await asyncio.to_thread(self.server.start_to, ip, self.port)
        self.port = self.server.server_socket.getsockname()[1]
        self.bound = f"s7 {ip}:{self.port}"
        return self.bound

    async def stop(self) -> None:
        if self.server is not None and self.server.running:
            self.server.drop_clients()
            await asyncio.to_thread(self.server.stop)

    async def close(self) -> None:
        await self.stop()

    def memory(self) -> S7Memory:
        if self.server is None:
            self.server = self._make()
        locks = {k[1]: lk for k, lk in self.server.area_locks.items()}
        return S7Memory(self.cfg.tags, self.dbs, locks)


@functools.cache
def _s7_server_class() -> type:
    """Built on first use so importing this module does not import snap7."""
    import snap7
    from snap7.datatypes import S7WordLen

    class SimS7Server(snap7.Server):
        """snap7.Server plus: a slow-reply hook, dropping live connections, and real single-bit writes.

        snap7 3.3's server turns a BIT write into a whole-byte write at the
        byte address, which would clobber the neighbouring bits; a real CPU
        writes only the addressed bit, and linectl relies on that.
        """

        def __init__(self, faults: FaultState) -> None:
            super().__init__(log=False)
            self.faults = faults
            self._socks: set[socket.socket] = set()
            self._socks_lock = threading.Lock()

        def _handle_client(self, client_socket: socket.socket, address: Any) -> None:
            with self._socks_lock:
                self._socks.add(client_socket)
            try:
                super()._handle_client(client_socket, address)
            finally:
                with self._socks_lock:
                    self._socks.discard(client_socket)

        def drop_clients(self) -> None:
            with self._socks_lock:
                socks = list(self._socks)
            for s in socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

        def _process_request(self, request_data: bytes, client_address: Any) -> Any:
            delay = self.faults.slow_delay()
            if delay > 0:
                time.sleep(delay)
            return super()._process_request(request_data, client_address)

        def _parse_address_specification(self, addr_spec: bytes) -> dict[str, Any]:
            out = super()._parse_address_specification(addr_spec)
            if out and out.get("word_len") == S7WordLen.BIT:
                out["bit"] = int.from_bytes(addr_spec[9:12], "big") % 8
            return out

        def _handle_write_area(self, request: dict[str, Any], client_address: Any) -> bytes:
            spec = request.get("parameters", {}).get("address_spec", {})
            if spec.get("word_len") != S7WordLen.BIT:
                return super()._handle_write_area(request, client_address)
            data = request.get("data", {}).get("data", b"")
            key = (spec.get("area"), spec.get("db_number"))
            if not data or key not in self.memory_areas:
                return self._build_error_response(request, 0x8404)
            start, bit = spec["start"], spec.get("bit", 0)
            with self.area_locks[key]:
                area = self.memory_areas[key]
                if start >= len(area):
                    return self._build_error_response(request, 0x8404)
                area[start] = (area[start] | (1 << bit)) if data[0] & 1 else (area[start] & ~(1 << bit))
            import struct

            header = struct.pack(">BBHHHHBB", 0x32, 0x03, 0, request["sequence"], 2, 1, 0, 0)
            return header + struct.pack(">BB", 0x05, 1) + b"\xff"

    return SimS7Server



# --------------------------------------------------------------------------- OPC UA


@dataclasses.dataclass
class OpcuaSimSecurity:
    """How the simulated OPC UA server is secured (a real PLC's server has this in its hardware config, not in linectl's YAML).

    policies: endpoints offered ("None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt").
    users: username -> password; when given, anonymous sessions are refused.
    trusted_clients: client certificate files (DER) the server accepts on a secured channel; when given, any other
    client certificate is refused with BadCertificateUntrusted (a PLC's trust list); None: every certificate.
    """

    certificate: str | None = None
    private_key: str | None = None
    policies: tuple[str, ...] = ("None",)
    users: dict[str, str] | None = None
    trusted_clients: tuple[str, ...] | None = None


class OpcuaMemory:
    """Tag access into the asyncua server's address space: the nodes clients read and write are the program's memory.

    The address space is written by a coroutine (data change notifications go
    out from there), but the PLC program steps synchronously: a program write
    lands in `_pending` at once (the program reads its own writes from there)
    and a flusher task writes it to the node on the next loop turn, per node
    latest value only, so the backlog is bounded by the number of tags.
    Before the server exists (start) the values live in `_init`.
    """

    def __init__(self, tags: dict[str, Any]) -> None:
        self.tags = tags
        self.lock = contextlib.nullcontext()
        self.server: Any = None
        self.nodeids: dict[str, Any] = {}
        self._init: dict[str, list[Any]] = {n: [_opcua_zero(s.type)] * s.count for n, s in tags.items()}
        self._pending: dict[str, list[Any]] = {}
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    def attach(self, server: Any, nodeids: dict[str, Any]) -> None:
        self.server = server
        self.nodeids = nodeids
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="plcsim:opcua-flush")
        if self._pending:
            self._wake.set()  # program writes made while the server was down

    async def detach(self) -> None:
        task, self._flusher = self._flusher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _owned(self, name: str) -> bool:
        return name in self.nodeids and self.nodeids[name].NamespaceIndex != 0

    def current(self, name: str) -> list[Any]:
        if name in self._pending:
            return list(self._pending[name])
        if self.server is None or name not in self.nodeids:
            return list(self._init[name])
        dv = self.server.read_attribute_value(self.nodeids[name])
        val = dv.Value.Value if dv.Value is not None else None
        if self.tags[name].type == "DateTime":
            from linectl.drivers.opcua import _ms

            return [_ms(val) if val is not None else 0]
        return list(val) if isinstance(val, list) else [val]

    def get_elems(self, name: str, index: int = 0, n: int | None = None) -> list[Any]:
        vals = self.current(name)
        n = self.tags[name].count - index if n is None else n
        return vals[index : index + n]

    def set_elems(self, name: str, values: list[Any], index: int = 0) -> None:
        spec = self.tags[name]
        if spec.type == "DateTime" or (self.server is not None and not self._owned(name)):
            return  # a server-owned node (ServerStatus...) is the server's, not the program's
        cur = self.current(name)
        cur[index : index + len(values)] = [_opcua_norm(spec.type, v) for v in values]
        if self.server is None:
            self._init[name] = cur
            return
        self._pending[name] = cur
        self._wake.set()

    def datavalue(self, name: str, values: list[Any]) -> Any:
        from asyncua import ua

        spec = self.tags[name]
        vt = getattr(ua.VariantType, spec.type)
        return ua.DataValue(ua.Variant(list(values) if spec.count > 1 else values[0], vt))

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            for name, vals in list(self._pending.items()):
                try:
                    await self.server.write_attribute_value(self.nodeids[name], self.datavalue(name, vals))
                finally:
                    if self._pending.get(name) is vals:
                        del self._pending[name]


def _opcua_zero(typ: str) -> Any:
    return {"Boolean": False, "String": "", "Float": 0.0, "Double": 0.0}.get(typ, 0)


def _opcua_norm(typ: str, v: Any) -> Any:
    if typ == "Boolean":
        return bool(v)
    if typ == "String":
        return str(v) if v else ""
    if typ in ("Float", "Double"):
        return float(v)
    return int(v)


def _status(code: int) -> Any:
    from asyncua import ua

    return ua.StatusCode(ua.UInt32(code))


def _opcua_attribute_service(mem: OpcuaMemory, faults: FaultState) -> Any:
    """asyncua's AttributeService plus IndexRange writes (OPC UA Part 4 7.22), which PLC servers support and it ignores.

    A verdict slot is written as elements [2k, 2k+1] of the ring: applied to
    the whole array, the slot write would replace the ring by two elements.
    """
    from asyncua import ua
    from asyncua.server.address_space import AttributeService

    by_id = {v: k for k, v in mem.nodeids.items()}

    class IndexRangeAttributeService(AttributeService):  # type: ignore[misc]  # asyncua is taken as Any (pyproject: follow_imports skip)
        async def write(self, params: Any, user: Any = None) -> list[Any]:
            delay = faults.slow_delay()
            if delay > 0:
                await asyncio.sleep(delay)
            out: list[Any] = []
            for wv in params.NodesToWrite:
                name = by_id.get(wv.NodeId)
                if not wv.IndexRange or wv.AttributeId != ua.AttributeIds.Value:
                    out.extend(await self._one(wv, user))
                    continue
                if name is None or mem.tags[name].count == 1:
                    out.append(_status(ua.StatusCodes.BadIndexRangeInvalid))
                    continue
                try:
                    a, _, b = wv.IndexRange.partition(":")
                    lo, hi = int(a), int(b) if b else int(a)
                except ValueError:
                    out.append(_status(ua.StatusCodes.BadIndexRangeInvalid))
                    continue
                new = wv.Value.Value.Value if wv.Value.Value is not None else None
                cur = mem.current(name)
                if not isinstance(new, list) or lo < 0 or hi < lo or hi >= len(cur) or len(new) != hi - lo + 1:
                    out.append(_status(ua.StatusCodes.BadIndexRangeNoData))
                    continue
                cur[lo : hi + 1] = new
                whole = ua.WriteValue(NodeId=wv.NodeId, AttributeId=wv.AttributeId,
                                      Value=ua.DataValue(ua.Variant(cur, wv.Value.Value.VariantType)))
                out.extend(await self._one(whole, user))
            return out

        async def _one(self, wv: Any, user: Any) -> list[Any]:
            p = ua.WriteParameters()
            p.NodesToWrite = [wv]
            res: list[Any] = await (super().write(p, user) if user is not None else super().write(p))
            return res

    return IndexRangeAttributeService


class OpcuaServerHost:
    """asyncua's own server publishing the tag map as Variable nodes; transport outages and reboots on one address space.

    stop()/start() drop and restore the transport (a cable pulled: the
    server's StartTime stays); after reboot_next() they stop and start the
    whole server, so ServerStatus.StartTime changes as on a PLC restart.
    """

    NS_URI = "urn:linectl:plcsim"

    def __init__(self, cfg: Any, faults: FaultState, security: OpcuaSimSecurity | None = None) -> None:
        self.cfg = cfg
        self.faults = faults
        self.security = security or OpcuaSimSecurity()
        self.mem = OpcuaMemory(cfg.tags)
        self.server: Any = None
        self.bound = ""
        self._reboot = False
        self._up = False
        from urllib.parse import urlparse

        u = urlparse(cfg.url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 4840
        self.url = cfg.url

    def reboot_next(self) -> None:
        self._reboot = True

    async def _build(self) -> Any:
        from asyncua import Server, ua
        from asyncua.crypto.permission_rules import User, UserRole
        from asyncua.server.user_managers import UserManager

        sec = self.security
        users = sec.users

        class Users(UserManager):  # type: ignore[misc]
            def get_user(self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None) -> Any:
                if users is None:
                    return User(role=UserRole.User)
                if username is not None and users.get(username) == password:
                    return User(role=UserRole.User, name=username)
                return None

        srv = Server(user_manager=Users())
        await srv.init()
        srv.set_endpoint(self.url)
        srv.set_server_name("linectl PLC simulator")
        pol = {"None": ua.SecurityPolicyType.NoSecurity,
               "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
               "Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt}
        srv.set_security_policy([pol[p] for p in sec.policies])
        if users is not None:
            srv.set_identity_tokens([ua.UserNameIdentityToken])
        if sec.certificate:
            await srv.load_certificate(sec.certificate)
            assert sec.private_key is not None
            await srv.load_private_key(sec.private_key)
        if sec.trusted_clients is not None:
            trusted = {Path(p).read_bytes() for p in sec.trusted_clients}

            async def validate(cert: Any, app: Any) -> None:
                from cryptography.hazmat.primitives.serialization import Encoding

                if cert.public_bytes(Encoding.DER) not in trusted:
                    raise ua.UaStatusCodeError(ua.StatusCodes.BadCertificateUntrusted)

            srv.set_certificate_validator(validate)
        await self._address_space(srv)

        async def slow(*_a: Any) -> None:
            delay = self.faults.slow_delay()
            if delay > 0:
                await asyncio.sleep(delay)

        from asyncua.common.callback import CallbackType as CT

        srv.subscribe_server_callback(CT.PreRead, slow)
        srv.iserver.attribute_service = _opcua_attribute_service(self.mem, self.faults)(srv.iserver.aspace)
        self.server = srv
        return srv

    async def _address_space(self, srv: Any) -> None:
        from asyncua import ua

        from linectl.drivers.opcua import parse_node

        aliases = dict(getattr(self.cfg, "namespaces", {}) or {})
        uris = [self.NS_URI, *aliases.values()]
        refs = {n: parse_node(s.node, aliases) for n, s in self.cfg.tags.items()}
        uris += [r.ns_uri for r in refs.values() if r.ns_uri]
        for uri in dict.fromkeys(uris):
            await srv.register_namespace(uri)
        top = max([r.ns_index or 0 for r in refs.values()] + [int(p) for r in refs.values() for p, _ in r.path if p.isdigit()] + [0])
        while len(await srv.get_namespace_array()) <= top:
            await srv.register_namespace(f"{self.NS_URI}:ns{len(await srv.get_namespace_array())}")
        base = await srv.get_namespace_index(self.NS_URI)
        plc = await srv.nodes.objects.add_object(base, "PLC")
        nodeids: dict[str, Any] = {}
        for name, spec in self.cfg.tags.items():
            ref = refs[name]
            init = self.mem.datavalue(name, self.mem.current(name)).Value if spec.type != "DateTime" else None
            if ref.is_path:
                parent = srv.nodes.objects
                for k, (prefix, bname) in enumerate(ref.path):
                    idx = int(prefix) if prefix.isdigit() else (await srv.get_namespace_index(aliases[prefix]) if prefix else 0)
                    qn = ua.QualifiedName(bname, idx)
                    try:
                        child = await parent.get_child([qn])
                    except Exception:  # noqa: BLE001 - not there yet: create it
                        if k == len(ref.path) - 1:
                            child = await parent.add_variable(idx, bname, init)
                        else:
                            child = await parent.add_object(idx, bname)
                    parent = child
                var = parent
            else:
                idx = int(ref.ns_index or 0) if ref.ns_uri is None else await srv.get_namespace_index(ref.ns_uri)
                nid = ua.NodeId.from_string(f"ns={idx};{ref.ident}")
                if idx == 0:
                    nodeids[name] = nid  # a server node (ServerStatus...): read it, never create it
                    continue
                var = await plc.add_variable(nid, ua.QualifiedName(ref.ident[2:].split(".")[-1], idx), init)
            if spec.writable:
                await var.set_writable()
            nodeids[name] = var.nodeid
        self.mem.attach(srv, nodeids)

    async def start(self) -> str:
        if self.server is None:
            srv = await self._build()
            await srv.start()
        elif self._reboot:
            self._reboot = False
            await self.server.start()
        else:
            await self.server.bserver.start()
        self.mem.attach(self.server, self.mem.nodeids)
        self._up = True
        self.bound = f"opcua {self.url}"
        return self.bound

    async def stop(self) -> None:
        if self.server is None or not self._up:
            return
        self._up = False
        if self._reboot:
            await self.mem.detach()
            with contextlib.suppress(Exception):
                await self.server.stop()
        else:
            with contextlib.suppress(Exception):
                await self.server.bserver.stop()

    async def drop_subscriptions(self) -> int:
        """Delete every client subscription (the drop_subscriptions fault); how many there were."""
        if self.server is None:
            return 0
        svc = self.server.iserver.subscription_service
        ids = list(svc.subscriptions)
        await svc.delete_subscriptions(ids)
        return len(ids)

    async def close(self) -> None:
        self._reboot = True
        await self.stop()
        await self.mem.detach()

    def memory(self) -> OpcuaMemory:
        return self.mem


# --------------------------------------------------------------------------- faults


class FaultState:
    """Active injected faults, each until a monotonic deadline (or a unit count)."""

    def __init__(self) -> None:
        self.until: dict[str, float] = {}
        self.params: dict[str, dict[str, Any]] = {}
        self.counts: dict[str, int] = {}

    def set(self, kind: str, duration_s: float | None, **params: Any) -> None:
        self.until[kind] = time.monotonic() + duration_s if duration_s is not None else float("inf")
        self.params[kind] = params
        if params.get("units"):
            self.counts[kind] = int(params["units"])

    def clear(self, kind: str) -> None:
        self.until.pop(kind, None)
        self.params.pop(kind, None)
        self.counts.pop(kind, None)

    def active(self, kind: str) -> bool:
        t = self.until.get(kind)
        if t is None:
            return False
        if time.monotonic() >= t:
            self.clear(kind)
            return False
        return True

    def consume(self, kind: str) -> bool:
        """True when the fault applies to this unit (unit-counted faults count down)."""
        if not self.active(kind):
            return False
        if kind in self.counts:
            self.counts[kind] -= 1
            if self.counts[kind] <= 0:
                self.clear(kind)
        return True

    def slow_delay(self) -> float:
        if not self.active("slow"):
            return 0.0
        return float(self.params.get("slow", {}).get("delay_s", 1.0))

    def as_dict(self) -> dict[str, Any]:
        now = time.monotonic()
        return {k: {"remaining_s": (round(t - now, 3) if t != float("inf") else None), **self.params.get(k, {})}
                for k, t in self.until.items() if t > now}


# --------------------------------------------------------------------------- the PLC program


class PlcSim:
    """The simulated PLC: protocol server + scan cycle (heartbeats, interlock) + the reject gate.

    The conveyor asks `belt_running()` / `feed_mode()` for the interlock,
    `count_trigger()` for each product it feeds, and `gate(unit)` when a unit
    reaches the reject gate.
    """

    def __init__(
        self, name: str, cfg: Any, *, scan_s: float = 0.005, heartbeat_period_s: float = 0.5, opcua: OpcuaSimSecurity | None = None
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.faults = FaultState()
        self.host: ModbusServerHost | S7ServerHost | OpcuaServerHost
        if cfg.driver == "s7":
            self.host = S7ServerHost(cfg, self.faults)
        elif cfg.driver == "opcua":
            self.host = OpcuaServerHost(cfg, self.faults, opcua)
        else:
            self.host = ModbusServerHost(cfg, self.faults)
        self.mem: Any = self.host.memory()
        self.tags = cfg.tags
        self.ring = cfg.tags["verdict_ring"].count // 2 if "verdict_ring" in cfg.tags else 0
        self.scan_s = scan_s
        self.heartbeat_period_s = heartbeat_period_s
        self.heartbeat_timeout_s = getattr(cfg, "heartbeat_timeout_s", 2.0)
        self.controller_alive = False
        self.estop = False
        #: material conditions now (fault injected, or the input tag set from the field): fault kind -> active
        self.material: dict[str, bool] = dict.fromkeys(MATERIAL_FAULTS, False)
        self._material_fault_was: dict[str, bool] = dict.fromkeys(MATERIAL_FAULTS, False)
        self.line_mode = MODE_IDLE
        self.line_running = False
        self._ctl_value: Any = None
        self._ctl_changed_at = 0.0
        self._hb = False
        self._next_hb = 0.0
        self._task: asyncio.Task[None] | None = None
        self._fault_tasks: set[asyncio.Task[Any]] = set()
        self._listeners: list[Callable[[], None]] = []
        self.trigger_count = 0
        self.pass_total = 0
        self.reject_total = 0
        self.gate_reject_total = 0  # gate pushes, confirmed in the bin or not
        #: the PLC's boot counter (also in tag plc_epoch when mapped): +1 on every cold or warm restart
        self.epoch = 0
        self.restarts: list[dict[str, Any]] = []
        self.jammed = 0
        self.unconfirmed = 0
        #: the case reject pusher: (case_seq, case_result) of every case decision the program acted on
        self.case_decisions: list[tuple[int, int]] = []
        self.cases_diverted = 0
        self.cases_passed = 0
        self._case_seq_seen: int | None = None
        #: the PackML part of the program: commands queued by the HMI, the one in the handshake, the finished ones
        self.packml_queue: collections.deque[tuple[str, int]] = collections.deque(maxlen=64)
        self.packml_inflight: dict[str, Any] | None = None
        self.packml_done: collections.deque[dict[str, Any]] = collections.deque(maxlen=200)
        self.packml_timeout_s = 30.0
        self.log = log.bind(device=name)

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> str:
        bound = await self.host.start()
        self._task = asyncio.create_task(self._scan_loop(), name=f"plcsim:{self.name}")
        self.log.info("plc_sim_listening", at=bound)
        return bound

    async def stop(self) -> None:
        for t in list(self._fault_tasks):
            t.cancel()
        task, self._task = self._task, None
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)
        await self.host.close()

    @property
    def listening(self) -> str:
        return self.host.bound

    def on_change(self, cb: Callable[[], None]) -> None:
        """cb() after any interlock-relevant change (so the conveyor need not poll)."""
        self._listeners.append(cb)

    # -- tag helpers ----------------------------------------------------------------

    def has(self, name: str) -> bool:
        return name in self.tags

    def get(self, name: str) -> Any:
        return _get(self.mem, name) if name in self.tags else None

    def set(self, name: str, value: Any, index: int | None = None) -> None:
        if name not in self.tags:
            raise KeyError(f"{self.name}: no tag {name}")
        spec = self.tags[name]
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        values = [spec.check_value(v) for v in values]
        self.mem.set_elems(name, values, index or 0)

    # -- scan cycle -----------------------------------------------------------------

    async def _scan_loop(self) -> None:
        while True:
            try:
                self.scan()
            except Exception as exc:  # noqa: BLE001 - a bad scan must not kill the PLC
                self.log.error("plc_scan_error", error=str(exc))
            await asyncio.sleep(self.scan_s)

    def scan(self) -> None:
        now = time.monotonic()
        if now >= self._next_hb:
            self._next_hb = now + self.heartbeat_period_s
            if not self.faults.active("heartbeat_stop") and self.has("heartbeat_plc"):
                self._hb = not self._hb
                self.set("heartbeat_plc", self._hb)
        before = (self.controller_alive, self.estop, self.line_mode, self.line_running, tuple(self.material.values()))
        if self.has("heartbeat_ctl"):
            v = self.get("heartbeat_ctl")
            if v != self._ctl_value:
                if self._ctl_value is not None:
                    if not self.controller_alive:
                        self.log.info("plc_controller_alive")
                    self.controller_alive = True
                    self._ctl_changed_at = now
                self._ctl_value = v
            if self.controller_alive and now - self._ctl_changed_at > self.heartbeat_timeout_s:
                # Fail-safe: the controller died. Stop the line and drop its run permission, so a
                # restarted controller has to start the line deliberately.
                self.controller_alive = False
                self.log.warning("plc_controller_lost", timeout_s=self.heartbeat_timeout_s)
                if self.has("line_running"):
                    self.set("line_running", 0)
        else:
            self.controller_alive = True
        fault_estop = self.faults.active("estop")
        if self.has("estop") and fault_estop != getattr(self, "_estop_fault_was", False):
            # an e-stop pressed on the machine is an input the controller can read, not only a frozen belt
            self.set("estop", 1 if fault_estop else 0)
            self._estop_fault_was = fault_estop
        estop = bool(self.get("estop")) if self.has("estop") else False
        self.estop = estop or fault_estop
        for kind, tag in MATERIAL_FAULTS.items():
            active = self.faults.active(kind)
            if self.has(tag) and active != self._material_fault_was[kind]:
                self.set(tag, 1 if active else 0)  # the sensor the PLC wires to its input tag
            self._material_fault_was[kind] = active
            self.material[kind] = active or (bool(self.get(tag)) if self.has(tag) else False)
        self.line_mode = int(self.get("line_mode") or 0) if self.has("line_mode") else MODE_PRODUCTION
        self.line_running = bool(self.get("line_running")) if self.has("line_running") else True
        if (self.controller_alive, self.estop, self.line_mode, self.line_running, tuple(self.material.values())) != before:
            for cb in list(self._listeners):
                cb()
        if self.has("case_seq"):
            self._case_pusher()
        if self.packml_queue or self.packml_inflight is not None:
            self._packml_program(now)

    # -- PackML command handshake (the PLC's side) ----------------------------------

    def packml_command(self, command: str | int) -> int:
        """Queue a PackML command the program sends (a button on its HMI). Names as in TR88; a number goes as it is
        (also one that is no command: that is how a PLC with a wrong constant looks). Returns the queue length."""
        from linectl.engine.packml import PackmlCommand

        return self._packml_queue("cntrl_cmd", command, {c.name.lower(): int(c) for c in PackmlCommand})

    def packml_unit_mode(self, mode: str | int) -> int:
        """Queue a unit mode change request (Production, Maintenance, Manual, or any number)."""
        from linectl.engine.packml import UnitMode

        return self._packml_queue("unit_mode", mode, {m.name.lower(): int(m) for m in UnitMode})

    def _packml_queue(self, kind: str, value: str | int, names: dict[str, int]) -> int:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(f"a PackML {kind} is a name or a number")
        if isinstance(value, str):
            if value.lower() not in names:
                raise ValueError(f"no PackML {kind} {value!r} (known: {', '.join(names)})")
            value = names[value.lower()]
        tags = _PACKML_REQUESTS[kind]
        if not all(self.has(t) for t in tags):
            raise ValueError(f"{self.name}: the tag map has no {' / '.join(tags)}")
        self.packml_queue.append((kind, value))
        return len(self.packml_queue)

    def _packml_program(self, now: float) -> None:
        """One request at a time, as TR88 has it: the value (CntrlCmd / UnitMode), then its change request; done when
        the controller clears the request (its acknowledge), with packml_cmd_result and StateCurrent read then.
        Requests wait while StateCurrent is 0 (no controller there yet, or the PLC just restarted)."""
        fl = self.packml_inflight
        if fl is None:
            if self.has("packml_state_current") and not self.get("packml_state_current"):
                return  # StateCurrent 0: no controller has taken up the handshake yet (README "PackTags on the PLC")
            if self.packml_queue:
                kind, value = self.packml_queue.popleft()
                value_tag, req = _PACKML_REQUESTS[kind]
                self.set(value_tag, value)
                self.set(req, True)
                self.packml_inflight = {kind: value, "req": req, "sent_at": now}
            return
        if self.get(fl["req"]):
            if now - fl["sent_at"] > self.packml_timeout_s:
                self.set(fl["req"], False)  # no acknowledge: the program gives up (an alarm on its HMI)
                self._packml_finish(fl, now, timed_out=True)
            return
        self._packml_finish(fl, now)

    def _packml_finish(self, fl: dict[str, Any], now: float, *, timed_out: bool = False, lost: str | None = None) -> None:
        self.packml_inflight = None
        done = {k: v for k, v in fl.items() if k in _PACKML_REQUESTS}
        done["result"] = None if (timed_out or lost) else int(self.get("packml_cmd_result") or 0) if self.has("packml_cmd_result") else None
        for tag in ("packml_state_current", "packml_unit_mode_current"):
            done[tag.removeprefix("packml_")] = int(self.get(tag) or 0) if self.has(tag) else None
        done["took_s"] = round(now - fl["sent_at"], 3)
        if timed_out:
            done["timed_out"] = True
        if lost:
            done["lost"] = lost
        self.packml_done.append(done)
        self.log.info("plc_packml_done", **done)

    def packml_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "queued": list(self.packml_queue),
            "inflight": dict(self.packml_inflight) if self.packml_inflight else None,
            "done": list(self.packml_done),
        }
        for tag in ("packml_cntrl_cmd", "packml_cmd_change_request", "packml_unit_mode", "packml_unit_mode_change_request",
                    "packml_cmd_result", "packml_state_current",
                    "packml_unit_mode_current", "packml_stop_reason", "packml_blocked", "packml_starved",
                    "packml_prod_processed_count", "packml_prod_defective_count", *MATERIAL_FAULTS.values()):
            if self.has(tag):
                v = self.get(tag)
                out[tag] = bool(v) if isinstance(v, bool) else int(v)
        return out

    def _case_pusher(self) -> None:
        """A case packer's reject pusher: acts once per change of case_seq, on the case_result written before it.

        Whatever value case_seq holds at power-up is not a decision. Any result
        other than accept diverts (fail-safe, like the unit gate).
        """
        seq = int(self.get("case_seq"))
        if self._case_seq_seen is None or seq == self._case_seq_seen:
            self._case_seq_seen = seq
            return
        self._case_seq_seen = seq
        result = int(self.get("case_result")) if self.has("case_result") else 0
        self.case_decisions.append((seq, result))
        if result == CASE_ACCEPT:
            self.cases_passed += 1
        else:
            self.cases_diverted += 1

    # -- interlock, triggers, gate --------------------------------------------------

    def belt_running(self) -> bool:
        """The conveyor moves unless e-stopped or the controller is dead (fail-safe stop)."""
        return self.controller_alive and not self.estop

    def feed_mode(self) -> int:
        """Line mode the infeed runs in: 0 = no product (serialization interlock), 1 challenge, 2 production."""
        if not self.belt_running() or not self.line_running or self.line_mode not in (MODE_CHALLENGE, MODE_PRODUCTION):
            return MODE_IDLE
        if any(self.material.values()):
            return MODE_IDLE  # downstream blocked or infeed empty: no product enters (the belt runs on to the gate)
        return self.line_mode

    def count_trigger(self) -> int:
        self.trigger_count += 1
        if self.has("trigger_count"):
            self.set("trigger_count", self.trigger_count & 0xFFFFFFFF)
        return self.trigger_count

    def verdict_of(self, seq: int) -> tuple[int, int] | None:
        if not self.ring:
            return None
        slot = seq % self.ring
        s, v = self.mem.get_elems("verdict_ring", 2 * slot, 2)
        return int(s), int(v)

    def gate(self, unit: SimUnit) -> str:
        """Decide and physically act on one unit at the reject gate; returns its outcome."""
        seq = unit.seq
        with self.mem.lock:
            slot = self.verdict_of(seq)
            good = slot == (seq & 0xFFFFFFFF, VERDICT_GOOD)
            unit.extras["verdict"] = slot[1] if slot and slot[0] == seq else None
            if good:
                self.pass_total += 1
                if self.has("pass_total"):
                    self.set("pass_total", self.pass_total & 0xFFFFFFFF)
                return "passed"
            if self.faults.consume("gate_jam"):
                # The gate did not move: the unit escapes and no confirm comes (linectl must stop the line).
                self.jammed += 1
                unit.extras["gate"] = "jammed"
                self.pass_total += 1  # the pass counter counts what went by the gate, ordered or not
                if self.has("pass_total"):
                    self.set("pass_total", self.pass_total & 0xFFFFFFFF)
                return "passed"
            self.gate_reject_total += 1
            if self.has("gate_reject_total"):
                self.set("gate_reject_total", self.gate_reject_total & 0xFFFFFFFF)
            if self.faults.consume("confirm_lost"):
                self.unconfirmed += 1
                unit.extras["gate"] = "unconfirmed"
                return "rejected"
            self.reject_total += 1
            if self.ring and self.has("reject_ring"):
                self.set("reject_ring", seq & 0xFFFFFFFF, index=seq % self.ring)
            if self.has("reject_total"):
                self.set("reject_total", self.reject_total & 0xFFFFFFFF)
            return "rejected"

    # -- faults ---------------------------------------------------------------------

    def inject(self, fault: str, **params: Any) -> dict[str, Any]:
        """Inject a fault. duration_s (default 5 s) bounds timed faults; gate faults may give units=N instead."""
        if fault not in FAULTS and fault != "clear":
            raise ValueError(f"unknown PLC fault {fault!r} (known: {', '.join(FAULTS)}, clear)")
        if fault == "clear":
            for k in list(self.faults.until):
                self.faults.clear(k)
            return {"cleared": True}
        if fault == "plc_restart":
            return self.restart(cold=bool(params.pop("cold", False)), outage_s=float(params.pop("duration_s", 0.5)))
        if fault == "drop_subscriptions":
            if not isinstance(self.host, OpcuaServerHost):
                raise ValueError(f"PLC fault drop_subscriptions needs an OPC UA PLC; {self.name} is {self.cfg.driver}")
            host = self.host

            async def drop() -> None:
                self.log.warning("plc_fault_injected", fault=fault, subscriptions=await host.drop_subscriptions())

            t = asyncio.create_task(drop())
            self._fault_tasks.add(t)
            t.add_done_callback(self._fault_tasks.discard)
            return {"fault": fault}
        duration = params.pop("duration_s", None)
        if duration is None and not params.get("units"):
            duration = 5.0
        self.faults.set(fault, float(duration) if duration is not None else None, **params)
        self.log.warning("plc_fault_injected", fault=fault, duration_s=duration, **params)
        if fault == "disconnect":
            t = asyncio.create_task(self._outage(float(duration or 5.0)))
            self._fault_tasks.add(t)
            t.add_done_callback(self._fault_tasks.discard)
        return {"fault": fault, "duration_s": duration, **params}

    def restart(self, *, cold: bool, outage_s: float = 0.5) -> dict[str, Any]:
        """The PLC restarts: connections drop for `outage_s`, the program starts over.

        cold: all memory back to 0 (trigger count, rings, counters) except the
        boot counter. warm: retentive memory (counters, rings) kept, the rest
        (run permission, line mode, commands) back to 0. Both increment
        plc_epoch and stop the line until the controller starts it again. The
        conveyor's units and the ground truth are physical and stay as they are.
        """
        # (tag by tag, each under its own area lock: the S7 memory's program lock is not re-entrant; the scan
        # cycle and the gate run on this same event loop, so nothing of the program runs in between)
        self.epoch += 1
        for name, spec in self.tags.items():
            if name == "plc_epoch" or (not cold and name in RETENTIVE):
                continue
            zero = [False if spec.type in ("bool", "BOOL", "Boolean") else ("" if spec.type in ("STRING", "String") else 0)] * spec.count
            self.mem.set_elems(name, zero, 0)
        if self.has("plc_epoch"):
            self.set("plc_epoch", self.epoch & 0xFFFFFFFF)
        if cold:
            self.trigger_count = self.pass_total = self.reject_total = self.gate_reject_total = 0
            self._case_seq_seen = None
        if self.packml_inflight is not None:  # the program starts over: the handshake it was in is gone
            self._packml_finish(self.packml_inflight, time.monotonic(), lost="plc_restart")
        self.packml_queue.clear()
        self.controller_alive = False
        self._ctl_value = None
        self.line_running = False
        self.restarts.append({"cold": cold, "epoch": self.epoch, "at": time.time()})
        self.log.warning("plc_restart", cold=cold, epoch=self.epoch)
        for cb in list(self._listeners):
            cb()
        self.faults.set("disconnect", outage_s)
        if isinstance(self.host, OpcuaServerHost):
            self.host.reboot_next()  # the whole server restarts: its ServerStatus.StartTime changes
        t = asyncio.create_task(self._outage(outage_s))
        self._fault_tasks.add(t)
        t.add_done_callback(self._fault_tasks.discard)
        return {"fault": "plc_restart", "cold": cold, "epoch": self.epoch, "outage_s": outage_s}

    async def _outage(self, duration: float) -> None:
        host = self.host
        pty_link = getattr(host, "pty", None)
        if pty_link is not None:
            pty_link.broken = True  # a cut RS-485 cable: the port stays, the bytes vanish
        else:
            await host.stop()
        try:
            await asyncio.sleep(duration)
        finally:
            if pty_link is not None:
                pty_link.broken = False
            else:
                for _ in range(50):
                    try:
                        await host.start()
                        break
                    except Exception:  # noqa: BLE001 - the port may linger a moment
                        await asyncio.sleep(0.1)
            self.faults.clear("disconnect")
            self.log.info("plc_fault_over", fault="disconnect")

    def status(self) -> dict[str, Any]:
        return {
            "listening": self.listening,
            "controller_alive": self.controller_alive,
            "estop": self.estop,
            **{kind: on for kind, on in self.material.items()},
            "line_mode": self.line_mode,
            "line_running": self.line_running,
            "trigger_count": self.trigger_count,
            "pass_total": self.pass_total,
            "reject_total": self.reject_total,
            "gate_reject_total": self.gate_reject_total,
            "epoch": self.epoch,
            "restarts": list(self.restarts),
            "gate_jammed": self.jammed,
            "rejects_unconfirmed": self.unconfirmed,
            "cases_passed": self.cases_passed,
            "cases_diverted": self.cases_diverted,
            "faults": self.faults.as_dict(),
            **({"packml": self.packml_status()} if self.has("packml_cntrl_cmd") or self.has("packml_state_current") else {}),
        }


# --------------------------------------------------------------------------- standalone


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (tests, benches: never needs root, never port 102)."""
    with socket.socket() as so:
        so.bind((host, 0))
        port: int = so.getsockname()[1]
        return port


def default_config(driver: str, host: str = "127.0.0.1", port: int | None = None, **extra: Any) -> Any:
    """A driver config with the default tag map, for standalone runs and tests."""
    if driver == "s7":
        from linectl.drivers.s7 import S7Config

        return S7Config(driver="s7", host=host, port=port if port is not None else 1102, tags=DEFAULT_S7_TAGS, **extra)
    if driver == "opcua":
        from linectl.drivers.opcua import OpcuaConfig

        url = f"opc.tcp://{host}:{port if port is not None else 4840}"
        return OpcuaConfig(driver="opcua", url=url, tags=DEFAULT_OPCUA_TAGS, **extra)
    if driver == "modbus_rtu":
        from linectl.drivers.modbus import ModbusRtuConfig

        return ModbusRtuConfig(driver="modbus_rtu", serial_port=extra.pop("serial", "/tmp/linectl-plc-rtu"), tags=DEFAULT_MODBUS_TAGS, **extra)
    from linectl.drivers.modbus import ModbusTcpConfig

    return ModbusTcpConfig(driver="modbus_tcp", host=host, port=port if port is not None else 1502, tags=DEFAULT_MODBUS_TAGS, **extra)


def _opcua_security(args: argparse.Namespace) -> OpcuaSimSecurity | None:
    """The secured OPC UA endpoint of a standalone simulator: Basic256Sha256 in the given mode, its certificate
    generated on first start (as a real PLC's), optional user and password (then no anonymous session)."""
    from pathlib import Path

    from linectl.opcua_server import OpcuaServerError, ensure_certificate

    cert, key = Path(args.opcua_certificate), Path(args.opcua_key)
    try:
        if ensure_certificate(cert, key, "urn:linectl:plcsim:server", args.host):
            print(f"generated the simulator's certificate {cert} (key {key})", flush=True)
    except (OSError, OpcuaServerError) as exc:
        print(f"cannot use the simulator's certificate: {exc}", file=sys.stderr)
        return None
    users = None
    if args.opcua_user:
        password = os.environ.get(args.opcua_password_env or "", "")
        if not password:
            print("--opcua-user needs --opcua-password-env naming a set environment variable", file=sys.stderr)
            return None
        users = {args.opcua_user: password}
    return OpcuaSimSecurity(certificate=str(cert), private_key=str(key), policies=(f"Basic256Sha256_{args.opcua_security}",), users=users)


async def _amain(args: argparse.Namespace) -> int:
    if args.config:
        from linectl.config import load_config

        line = load_config(args.config)
        if args.device not in line.devices:
            print(f"no device {args.device!r} in {args.config}", file=sys.stderr)
            return 2
        cfg = line.devices[args.device]
        if cfg.driver not in ("modbus_tcp", "modbus_rtu", "s7", "opcua"):
            print(f"device {args.device} is a {cfg.driver}, not a PLC", file=sys.stderr)
            return 2
        name = args.device
    else:
        extra: dict[str, Any] = {}
        if args.driver == "modbus_rtu":
            extra["serial"] = args.serial
        cfg = default_config(args.driver, args.host, args.port, **extra)
        name = args.driver
    opcua = None
    if args.opcua_security != "None":
        if cfg.driver != "opcua":
            print("--opcua-security is for an OPC UA PLC", file=sys.stderr)
            return 2
        opcua = _opcua_security(args)
        if opcua is None:
            return 2
    sim = PlcSim(name, cfg, opcua=opcua)
    bound = await sim.start()
    print(f"{name}: listening on {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await sim.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m linectl.simulators.plc", description=__doc__.split("\n")[0])
    p.add_argument("--config", "-c", help="line YAML; serve the device named by --device")
    p.add_argument("--device", help="PLC device name in the config")
    p.add_argument("--driver", choices=["modbus_tcp", "modbus_rtu", "s7", "opcua"], default="modbus_tcp", help="standalone: protocol")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, help="standalone TCP port (default 1502 Modbus, 1102 S7, 4840 OPC UA)")
    p.add_argument("--serial", default="/tmp/linectl-plc-rtu", help="standalone RTU: symlink to the pty, or socket://host:port")
    p.add_argument("--opcua-security", choices=["None", "Sign", "SignAndEncrypt"], default="None",
                   help="OPC UA: offer only a Basic256Sha256 endpoint in this mode (default: an unsecured endpoint)")
    p.add_argument("--opcua-certificate", default="plcsim-cert.der", help="OPC UA: the server's certificate (DER), generated when missing")
    p.add_argument("--opcua-key", default="plcsim-key.pem", help="OPC UA: its private key (PEM, written 0600 when generated)")
    p.add_argument("--opcua-user", help="OPC UA: the one user allowed (no anonymous session then)")
    p.add_argument("--opcua-password-env", help="OPC UA: environment variable holding --opcua-user's password")
    args = p.parse_args(argv)
    if args.config and not args.device:
        p.error("--config needs --device")
    from linectl.logging import setup_logging

    setup_logging("info")
    return asyncio.run(_amain(args))


if __name__ == "__main__":
    sys.exit(main())
