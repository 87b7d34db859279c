"""The whole simulated line of one line YAML, in one asyncio process.

Every device of the config gets its simulator, listening where the config
says linectl will connect; each print_verify / verify station that has a PLC
gets a conveyor wiring its printer -> reader/camera -> the PLC's reject gate.
The simulators keep the ground truth (`Truth`) about every unit, which the
control server hands out, so linectl's results can be checked against what
physically happened.

Construction of the device simulators owned by other modules is one small
function per kind (`_make_printer`, `_make_reader`, ...), so a change in
their constructors is a one-place fix.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import ipaddress
import random
import socket
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import structlog

from linectl.simulators.config import SimulationConfig
from linectl.simulators.control import ControlServer
from linectl.simulators.conveyor import ChallengeFactory, Conveyor
from linectl.simulators.defects import DefectPlan
from linectl.simulators.model import SimUnit, Truth, UnitJournal
from linectl.simulators.packer import Packer
from linectl.simulators.plc import PlcSim
from linectl.simulators.tunnel import RfidTunnel

log = structlog.get_logger("linectl.simulators.line")

PLC_DRIVERS = ("modbus_tcp", "modbus_rtu", "s7", "opcua")
PRINTER_CLASSES = {"coder": ("linectl.simulators.printer", "CoderPrinterSim"), "zpl": ("linectl.simulators.printer", "ZplPrinterSim")}
READER_CLASSES = {
    "reader": ("linectl.simulators.reader", "ReaderSim"),
    "scanner": ("linectl.simulators.scanner", "ScannerSim"),
    "camera": ("linectl.simulators.camera", "CameraSim"),
}


class SimulatorError(Exception):
    """The line cannot be simulated as configured (the message says why)."""


# --------------------------------------------------------------------------- device factories


def _transport_kwargs(name: str, cfg: Any) -> dict[str, Any]:
    """Where a stream device simulator listens: the config's TCP host/port, or a pty linked at its serial_port."""
    serial = getattr(cfg, "serial_port", None)
    if serial:
        if "://" in serial:
            raise SimulatorError(f"device {name}: cannot simulate serial URL {serial!r}; use a path for a pty link")
        return {"serial_link": serial, "name": name}
    return {"host": cfg.host, "port": cfg.port, "name": name}


def _make_plc(name: str, cfg: Any, line: LineSim) -> Any:
    return PlcSim(name, cfg)


def _make_printer(name: str, cfg: Any, line: LineSim) -> Any:
    mod, cls = PRINTER_CLASSES[cfg.driver]
    klass = getattr(importlib.import_module(mod), cls)
    kw: dict[str, Any] = {"render_images": name in line.rendering, "seed": line.sim.seed}
    if cfg.driver == "zpl":
        kw["auto_print"] = name not in line.wired  # on a conveyor the product trigger prints, else it runs free
        if cfg.rfid is not None and cfg.rfid.enabled:
            kw.update(
                rfid_void_rate=line.sim.rfid_void_rate,
                rfid_wrong_epc_rate=line.sim.rfid_wrong_epc_rate,
                rfid_no_answer_rate=line.sim.rfid_no_answer_rate,
            )
    # Unit defects are printed by the coders on the conveyor; label printers print clean unless a fault is injected.
    defects = None if name in line.labellers and name not in line.wired else line.plan.defect_for
    return klass(config=cfg, defect_for=defects, **kw, **_transport_kwargs(name, cfg))


def _make_rfid_reader(name: str, cfg: Any, line: LineSim) -> Any:
    from linectl.simulators.llrp_reader import LlrpReaderSim

    return LlrpReaderSim(config=cfg, name=name, antennas=max([4, *cfg.antennas]), seed=line.sim.seed)


def _make_reader(name: str, cfg: Any, line: LineSim) -> Any:
    mod, cls = READER_CLASSES[cfg.driver]
    klass = getattr(importlib.import_module(mod), cls)
    if cfg.driver == "camera":
        return klass(config=cfg, name=name)
    return klass(config=cfg, seed=line.sim.seed, **_transport_kwargs(name, cfg))


FACTORIES: dict[str, Callable[[str, Any, LineSim], Any]] = {
    **{k: _make_plc for k in PLC_DRIVERS},
    **{k: _make_printer for k in PRINTER_CLASSES},
    **{k: _make_reader for k in READER_CLASSES},
    "llrp": _make_rfid_reader,
}


def _check_local(name: str, cfg: Any) -> None:
    host = getattr(cfg, "host", None)
    if not host or getattr(cfg, "serial_port", None):
        return
    try:
        addr = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError) as exc:
        raise SimulatorError(f"device {name}: host {host!r} does not resolve ({exc})") from None
    if not addr.is_loopback:
        raise SimulatorError(
            f"device {name}: host {host} is not this machine's loopback; the simulator only listens on localhost "
            "(point the config at 127.0.0.1 to simulate it)"
        )


# --------------------------------------------------------------------------- the line


class LineSim:
    def __init__(self, line_cfg: Any, sim: SimulationConfig | None = None, *, camera: bool | None = None) -> None:
        self.cfg = line_cfg
        self.sim = sim or SimulationConfig.from_line(line_cfg)
        self.camera = camera
        self.truth = Truth()
        self.journal: UnitJournal | None = None
        self.plan = DefectPlan(self.sim.defect_rate, self.sim.defect_mix, self.sim.seed, self.sim.variation_rate)
        self.devices: dict[str, Any] = {}
        self.listening: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.conveyors: dict[str, Conveyor] = {}
        self.wired: set[str] = set()
        self.rendering: set[str] = set()
        self.labellers: set[str] = set()  # printers of case/pallet stations
        self.downstream: dict[str, Conveyor] = {}  # conveyor -> the verify station's conveyor its gate feeds
        self.packer: Packer | None = None
        self.control: ControlServer | None = None
        self.control_address: tuple[str, int] | None = None
        self._fault_tasks: list[asyncio.Task[Any]] = []
        self.done = asyncio.Event()

    # -- build / lifecycle ----------------------------------------------------------

    def _conveyor_stations(self) -> list[Any]:
        return [st for st in self.cfg.stations if st.type in ("print_verify", "verify") and getattr(st, "plc", None)]

    def _build(self) -> None:
        if self.sim.units_log and self.journal is None:
            self.journal = UnitJournal(self.sim.units_log)
        # Which devices a conveyor drives (a ZPL head then prints on the trigger) and which printers
        # must render the pack image because a camera reads it.
        for st in self._conveyor_stations():
            printer = getattr(st, "printer", None) if st.type == "print_verify" else None
            self.wired.update(x for x in (printer, st.reader, st.plc) if x)
            reader_cfg = self.cfg.devices.get(st.reader) if st.reader else None  # (print_verify of carrier rfid: no reader)
            if printer and reader_cfg is not None and reader_cfg.driver == "camera":
                self.rendering.add(printer)
        self.labellers = {st.printer for st in self.cfg.stations if st.type in ("case", "pallet")}
        for name, dcfg in self.cfg.devices.items():
            factory = FACTORIES.get(dcfg.driver)
            if factory is None:
                self.skipped[name] = f"no simulator for driver {dcfg.driver}"
                continue
            if dcfg.driver == "camera" and self.camera is False:
                self.skipped[name] = "camera simulation off (--no-camera)"
                continue
            _check_local(name, dcfg)
            try:
                self.devices[name] = factory(name, dcfg, self)
            except (ImportError, AttributeError) as exc:
                if dcfg.driver == "camera" and self.camera:
                    raise SimulatorError(f"device {name}: camera simulator unavailable: {exc}") from None
                self.skipped[name] = f"simulator not available: {exc}"
                log.warning("sim_device_skipped", device=name, driver=dcfg.driver, reason=str(exc))
        gtin = self.cfg.products[0].gtin if getattr(self.cfg, "products", None) else None
        used_plcs: dict[str, str] = {}
        upstream: Conveyor | None = None  # the last print_verify conveyor: a verify station after it takes what it passes
        for st in self._conveyor_stations():
            plc = self.devices.get(st.plc)
            if not isinstance(plc, PlcSim):
                raise SimulatorError(f"station {st.name}: PLC {st.plc} is not simulated ({self.skipped.get(st.plc, '?')})")
            if st.plc in used_plcs:
                raise SimulatorError(f"stations {used_plcs[st.plc]} and {st.name} share PLC {st.plc}: one gate per PLC")
            used_plcs[st.plc] = st.name
            if plc.ring and self.sim.gate_distance >= plc.ring - 1:
                raise SimulatorError(
                    f"gate_distance {self.sim.gate_distance} pitches >= verdict ring of {plc.ring} slots - 1: "
                    "a slot would be reused before its unit reaches the gate"
                )
            printer = self.devices.get(getattr(st, "printer", None) or "") if st.type == "print_verify" else None
            reader = self.devices.get(st.reader) if st.reader else None
            camera = self.cfg.devices[st.reader].driver == "camera" if st.reader and st.reader in self.cfg.devices else False
            fed_by = upstream if st.type == "verify" else None
            self.conveyors[st.name] = conv = Conveyor(
                st.name,
                plc,
                self.truth if fed_by is None else Truth(),  # a downstream gate's truth is its own (units counted once each)
                rate_upm=self.sim.rate_upm,
                camera_distance=self.sim.camera_distance,
                gate_distance=self.sim.gate_distance,
                printer=printer,
                reader=reader,
                challenge=ChallengeFactory(gtin, self.sim.seed, render=camera),
                free_run=self.sim.free_run,
                units=self.sim.units if fed_by is None else 0,
                on_unit=functools.partial(self._on_unit, st.name),
                journal=self.journal if fed_by is None else None,
                fed_by=fed_by,
                downstream_defect_rate=self.sim.downstream_defect_rate,
                seed=self.sim.seed,
            )
            if fed_by is not None:
                self.downstream[fed_by.name] = conv
            elif st.type == "print_verify":
                upstream = conv
        self.packer = self._build_packer()

    def _build_packer(self) -> Packer | None:
        """The case packer (and palletizer) behind the gate, when the config has a case station.

        A line has one case packer: units of every conveyor go to the first
        case station; its cases go to the first pallet station.
        """
        cases = [st for st in self.cfg.stations if st.type == "case"]
        if not cases:
            return None
        case = cases[0]
        if len(cases) > 1:
            log.warning("sim_packer_first_case_station_only", station=case.name, ignored=[c.name for c in cases[1:]])
        pallet = next((st for st in self.cfg.stations if st.type == "pallet"), None)

        def dev(name: str | None, role: str, required: bool = True) -> Any:
            if name is None:
                return None
            d = self.devices.get(name)
            if d is None and required:
                raise SimulatorError(f"station {case.name}: {role} {name} is not simulated ({self.skipped.get(name, '?')})")
            return d

        reader_cfg = self.cfg.devices[case.reader]
        tunnel = self._build_tunnel(case, reader_cfg, dev) if reader_cfg.driver == "llrp" else None
        return Packer(
            case.name,
            units_per_case=case.units_per_case,
            case_reader=None if tunnel is not None else dev(case.reader, "case reader"),
            case_frame=getattr(reader_cfg, "max_codes", 1) > 1,
            case_printer=dev(case.printer, "case label printer"),
            case_label_reader=dev(case.label_reader, "case label reader"),
            pallet_reader=dev(pallet.reader, "pallet reader") if pallet else None,
            pallet_printer=dev(pallet.printer, "pallet label printer") if pallet else None,
            pallet_label_reader=dev(pallet.label_reader, "pallet label reader") if pallet else None,
            pack_delay_s=self.sim.pack_delay_s,
            case_travel_s=self.sim.case_travel_s,
            tunnel=tunnel,
        )

    def _build_tunnel(self, case: Any, reader_cfg: Any, dev: Callable[[str | None, str], Any]) -> RfidTunnel:
        """The case station reads an RFID tunnel: its reader simulator, and the PLC that counts cases into it."""
        plc = dev(case.plc, "tunnel PLC")
        if not isinstance(plc, PlcSim):
            raise SimulatorError(f"station {case.name}: the RFID tunnel needs a simulated PLC (plc: counts cases into it)")
        try:
            return RfidTunnel(dev(case.reader, "RFID tunnel reader"), plc, self.sim.rfid_tunnel, self.unit_epc,
                              antennas=list(reader_cfg.antennas) or [1, 2, 3, 4], seed=self.sim.seed)
        except ValueError as exc:
            raise SimulatorError(f"station {case.name}: {exc}") from None

    def unit_epc(self, unit: SimUnit) -> str | None:
        """The EPC the unit's RFID tag answers a reader with, so the tunnel's field holds what is physically on it.

        A unit whose label an RFID printer encoded carries that tag: the EPC the simulated tag holds (another one
        after a wrong-EPC fault), None when it does not answer (VOID, dead). A unit without an RFID label gets the
        tag its product's rfid settings would encode for the code printed on it (Product.epc: scheme, filter value,
        company prefix length; scheme auto, filter 1 for a DataMatrix-only product), so the tunnel also runs behind a
        unit printer that encodes no tag. None for a unit without an identity."""
        from linectl import epc, gs1

        if unit.rfid_labelled:
            return None if unit.rfid_void else unit.rfid_epc
        if not unit.content:
            return None
        try:
            p = gs1.parse(unit.content)
            if not (p.gtin and p.serial):
                return None
            tag: str = self.cfg.product(p.gtin).epc(p.gtin, p.serial).epc_hex
            return tag
        except (gs1.GS1Error, epc.EpcError, KeyError):
            return None

    async def start(self) -> None:
        self._build()
        started: list[Any] = []
        try:
            for name, dev in self.devices.items():
                res = await dev.start()
                started.append(dev)
                self.listening[name] = _where(dev, res)
            self.control = ControlServer(self, self.sim.control_host, self.sim.control_port)
            self.control_address = await self.control.start()
        except BaseException:
            for dev in reversed(started):
                try:
                    await dev.stop()
                except Exception:  # noqa: BLE001
                    pass
            raise
        for c in self.conveyors.values():
            c.start()
        self._start_fault_schedules()
        log.info("line_sim_started", devices=self.listening, control=self.control_address, rate_upm=self.sim.rate_upm)

    async def stop(self) -> None:
        for t in self._fault_tasks:
            t.cancel()
        for c in self.conveyors.values():
            await c.stop()
        if self.control is not None:
            await self.control.stop()
        for name, dev in self.devices.items():
            try:
                await dev.stop()
            except Exception as exc:  # noqa: BLE001
                log.warning("sim_device_stop_failed", device=name, error=repr(exc))
        if self.journal is not None:
            self.journal.close()

    async def wait_done(self) -> None:
        """Until every conveyor has fed and gated its `units` (never, when units = 0)."""
        if not self.conveyors or not self.sim.units:
            await asyncio.Event().wait()
        await asyncio.gather(*(c.done.wait() for c in self.conveyors.values()))

    def _on_unit(self, conveyor: str, unit: SimUnit) -> None:
        """A unit left a conveyor's gate: on to the verify conveyor after it when there is one, else to the packer."""
        nxt = self.downstream.get(conveyor)
        if nxt is not None:
            if unit.outcome == "passed":
                nxt.feed(unit)
        elif self.packer is not None:
            self.packer.on_unit(unit)

    # -- random faults --------------------------------------------------------------

    def _start_fault_schedules(self) -> None:
        for dev, kinds in self.sim.faults.items():
            if dev not in self.devices:
                log.warning("sim_fault_device_unknown", device=dev)
                continue
            for kind, rate in kinds.items():
                if rate.per_hour > 0:
                    rng = random.Random(f"{self.sim.seed}:{dev}:{kind}")
                    self._fault_tasks.append(asyncio.create_task(self._fault_loop(dev, kind, rate, rng)))

    async def _fault_loop(self, dev: str, kind: str, rate: Any, rng: random.Random) -> None:
        while True:
            await asyncio.sleep(rng.expovariate(rate.per_hour / 3600.0))
            params = dict(rate.params)
            if rate.duration_s is not None:
                params.setdefault("duration_s", rate.duration_s)
            try:
                _inject(self.devices[dev], kind, params)
            except Exception as exc:  # noqa: BLE001
                log.warning("sim_fault_failed", device=dev, fault=kind, error=repr(exc))

    # -- control commands -----------------------------------------------------------

    def command(self, msg: dict[str, Any]) -> dict[str, Any]:
        cmd = msg["cmd"]
        if cmd == "truth":
            return {"ok": True, **self.truth.as_dict()}
        if cmd == "status":
            return {"ok": True, **self.status()}
        if cmd == "units":
            last = int(msg.get("last", 100))
            conv = self._conveyor(msg.get("conveyor"))
            return {"ok": True, "units": list(conv.recent)[-last:] if last > 0 else []}
        if cmd == "challenge":
            kinds = msg.get("kinds")
            if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
                raise ValueError('"kinds" must be a list of challenge kinds')
            queued = self._conveyor(msg.get("conveyor")).queue_challenge(kinds)
            return {"ok": True, "queued": queued}
        if cmd == "inject":
            name, fault = msg.get("device"), msg.get("fault")
            if name not in self.devices:
                raise ValueError(f"no simulated device {name!r} (devices: {', '.join(self.devices)})")
            if not isinstance(fault, str):
                raise ValueError('"fault" is required')
            params = {k: v for k, v in msg.items() if k not in ("cmd", "device", "fault")}
            res = _inject(self.devices[name], fault, params)
            return {"ok": True, "device": name, "result": res}
        if cmd == "set":
            return self._set(msg)
        if cmd == "packml":
            dev = self.devices.get(str(msg.get("device")))
            if not isinstance(dev, PlcSim):
                raise ValueError(f"device {msg.get('device')!r} is not a simulated PLC")
            kind = [k for k in ("command", "unit_mode") if msg.get(k) is not None]
            if len(kind) != 1:
                raise ValueError('packml takes "command" (Start, Hold, ... or a CntrlCmd number) or "unit_mode" (Production, ... or a number)')
            value = msg[kind[0]]
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise ValueError(f"{value!r}: a PackML command / unit mode is a name or a number")
            queued = dev.packml_command(value) if kind[0] == "command" else dev.packml_unit_mode(value)
            dev.scan()
            return {"ok": True, "device": dev.name, "queued": queued}
        if cmd == "take_off":
            uids = msg.get("uids")
            if not isinstance(uids, list) or not all(isinstance(u, str) for u in uids):
                raise ValueError('"uids" must be a list of unit ids (the journal\'s uid)')
            return {"ok": True, "taken": self._conveyor(msg.get("conveyor")).take_off(set(uids))}
        if cmd == "pack":
            if self.packer is None:
                raise ValueError("this line has no case station to pack for")
            flushed = self.packer.flush() if msg.get("flush") else 0
            return {"ok": True, "flushed": flushed, **self.packer.status()}
        raise ValueError(f"unknown cmd {cmd!r} (truth, status, units, challenge, inject, set, take_off, pack, packml)")

    def _set(self, msg: dict[str, Any]) -> dict[str, Any]:
        changed: dict[str, Any] = {}
        if "device" in msg or "tags" in msg:
            dev = self.devices.get(str(msg.get("device")))
            if not isinstance(dev, PlcSim):
                raise ValueError(f"device {msg.get('device')!r} is not a simulated PLC")
            tags = msg.get("tags") or {}
            if not isinstance(tags, dict):
                raise ValueError('"tags" must be an object')
            for tag, value in tags.items():
                dev.set(tag, value)
            dev.scan()
            changed["tags"] = tags
        if "defect_rate" in msg:
            rate = float(msg["defect_rate"])
            if not 0 <= rate <= 1:
                raise ValueError("defect_rate must be within 0..1")
            self.plan.rate = changed["defect_rate"] = rate
        if "variation_rate" in msg:
            rate = float(msg["variation_rate"])
            if not 0 <= rate <= 1:
                raise ValueError("variation_rate must be within 0..1")
            self.plan.variation_rate = changed["variation_rate"] = rate
        if "defect_mix" in msg:
            self.plan.set_mix(msg["defect_mix"])
            changed["defect_mix"] = self.plan.mix
        if "rate_upm" in msg:
            rate = float(msg["rate_upm"])
            if not 0 < rate <= 12_000:
                raise ValueError("rate_upm must be within 0..12000")
            for c in self.conveyors.values():
                c.set_rate(rate)
            changed["rate_upm"] = rate
        if not changed:
            raise ValueError("set: nothing to set (defect_rate, variation_rate, defect_mix, rate_upm, device+tags)")
        return {"ok": True, "set": changed}

    def _conveyor(self, name: Any) -> Conveyor:
        if not self.conveyors:
            raise ValueError("this line has no conveyor (no print_verify/verify station with a PLC)")
        if name is None:
            return next(iter(self.conveyors.values()))
        if name not in self.conveyors:
            raise ValueError(f"no conveyor {name!r} (conveyors: {', '.join(self.conveyors)})")
        return self.conveyors[name]

    def status(self) -> dict[str, Any]:
        devices: dict[str, Any] = {}
        for name, dev in self.devices.items():
            try:
                devices[name] = dev.status() if isinstance(dev, Reporting) else {"listening": self.listening.get(name)}
            except Exception as exc:  # noqa: BLE001
                devices[name] = {"error": repr(exc)}
        return {
            "conveyors": {n: c.status() for n, c in self.conveyors.items()},
            "packer": self.packer.status() if self.packer is not None else None,
            "devices": devices,
            "listening": self.listening,
            "skipped": self.skipped,
            "defects": self.plan.as_dict(),
            "truth": self.truth.as_dict(),
        }


@runtime_checkable
class Injectable(Protocol):
    """A device simulator that takes faults (printers, readers, scanners, cameras, PLCs)."""

    def inject(self, kind: str, /, **params: Any) -> Any: ...


@runtime_checkable
class Reporting(Protocol):
    """A device simulator with a status of its own (the others are reported by where they listen)."""

    def status(self) -> dict[str, Any]: ...


def _inject(dev: Any, fault: str, params: dict[str, Any]) -> Any:
    if not isinstance(dev, Injectable):
        raise ValueError(f"{type(dev).__name__} takes no fault injection")
    return dev.inject(fault, **params)


def _where(dev: Any, started: Any) -> str:
    if isinstance(started, str):
        return started
    for attr in ("listening", "address"):
        v = getattr(dev, attr, None)
        if isinstance(v, str) and v:
            return v
    serial = getattr(dev, "serial_path", None)
    if serial:
        return f"serial {serial}"
    host, port = getattr(dev, "host", None), getattr(dev, "port", None)
    if host and port:
        return f"tcp {host}:{port}"
    return "started"


def main(argv: list[str] | None = None) -> int:
    """`python -m linectl.simulators.line -c CONFIG [...]` = `linectl simulate -c CONFIG [...]`."""
    import sys

    from linectl.cli import main as cli_main

    return cli_main(["simulate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
