"""Shared rig for the aggregation, rework and trace tests: real store, real drivers, real simulators.

`Rig` wires CameraSim -> frame folder -> camera driver -> case runtime, a
ZplPrinterSim on TCP -> ZPL driver, and optionally a scanner simulator as the
label reader (it "reads" each label the ZPL simulator prints, the way a label
camera would), and optionally a PlcSim (pymodbus' or snap7's own server) as
the PLC of the case reject pusher. The Line is the real one, built from a parsed LineConfig, so
the station runtime is constructed by Line.__init__ like in the daemon.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine_helpers import wait_for

from linectl import gs1
from linectl.config import parse_config
from linectl.events import UnitCommissioned
from linectl.simulators.model import SimUnit

GTIN = "04012345000016"
GTIN2 = "04012345000023"
CP = "4012345"
LOT = "LOTA1"
EXPIRY = "281231"
FAST = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "reply_timeout_s": 0.5, "connect_timeout_s": 1.0}


def product(gtin: str = GTIN, name: str = "Aspirin 100 mg x 20") -> dict[str, Any]:
    return {"gtin": gtin, "name": name, "company_prefix_length": 7, "serials": {"scheme": "random", "length": 12}}


def config(devices: dict[str, Any] | None = None, stations: list[dict[str, Any]] | None = None, db: str = "linectl.db") -> Any:
    return parse_config(
        {
            "line": {"enterprise": "acme", "site": "s1", "area": "pack", "name": "line1", "gln": "4012345000009", "company_prefix_length": 7},
            "products": [product(), product(GTIN2, "Ibuprofen 400 mg x 10")],
            "store": {"path": db},
            "mqtt": {"enabled": False},
            "devices": devices or {},
            "stations": stations or [],
        }
    )


async def open_store(path: Path, cfg: Any = None) -> Any:
    from linectl.store import Store

    store = await Store.open(path)
    await store.upsert_products((cfg or config()).products)
    return store


async def new_batch(store: Any, lot: str = LOT, gtin: str = GTIN, expiry: str = EXPIRY) -> None:
    await store.create_batch(lot, gtin, expiry, 1_000_000, actor="test")


async def commission(store: Any, n: int, lot: str = LOT, gtin: str = GTIN, expiry: str = EXPIRY) -> list[str]:
    """n units printed, verified and commissioned for `lot`, the way the print_verify station leaves them."""
    cfg = config()
    scheme = cfg.product(gtin).serials
    serials = await store.allocate(gtin, lot, n, scheme)
    await store.mark_sent(gtin, lot, serials)
    await store.append(*[UnitCommissioned(gtin=gtin, serial=s, lot=lot, expiry=expiry) for s in serials])
    return serials


def unit_code(serial: str, lot: str = LOT, gtin: str = GTIN, expiry: str = EXPIRY) -> gs1.ParsedCode:
    return gs1.compose_unit(gtin, serial, lot=lot, expiry=expiry)


def sim_unit(seq: int, serial: str, lot: str = LOT, gtin: str = GTIN, **kw: Any) -> SimUnit:
    return SimUnit(seq=seq, content=unit_code(serial, lot, gtin).element_string, quality=3.6, **kw)


class Rig:
    """One case (or pallet) station with its devices and simulators, started and stopped as a unit."""

    def __init__(self, tmp: Path, *, per_case: int = 120, label_reader: bool = False, print_time_s: float = 0.01,
                 label_timeout_s: float = 4.0, pallet: bool = False, reader: str = "camera", plc: str | None = None,
                 plc_tags: dict[str, Any] | None = None) -> None:
        self.tmp = tmp
        self.per_case = per_case
        self.use_label_reader = label_reader
        self.print_time_s = print_time_s
        self.label_timeout_s = label_timeout_s
        self.pallet = pallet
        self.reader_kind = reader
        #: PLC driver of the case station ("modbus_tcp" or "s7"), served by a PlcSim; None = no plc
        self.plc_driver = plc
        self.plc_tags = plc_tags
        self.tasks: list[asyncio.Task[Any]] = []
        self.label_scans: list[str] = []
        #: what the label reader reports for the next label: None = the label's DataMatrix; a str = that data
        self.label_override: Callable[[Any], str | None] | None = None

    async def start(self) -> Rig:
        from linectl.daemon import build_drivers
        from linectl.engine.line import Line
        from linectl.simulators.camera import CameraSim
        from linectl.simulators.printer import ZplPrinterSim
        from linectl.simulators.scanner import ScannerSim

        self.frames = self.tmp / "frames"
        self.frames.mkdir(parents=True, exist_ok=True)
        self.zpl_sim = ZplPrinterSim(port=0, print_time_s=self.print_time_s)
        await self.zpl_sim.start()
        devices: dict[str, Any] = {
            "labeler": {"driver": "zpl", "host": "127.0.0.1", "port": self.zpl_sim.port, "status_interval_s": 0.05, "settle_s": 0.1,
                        "gs1_128": True, "text_fields": ["product", "gtin", "lot", "expiry", "count"], **FAST},
        }
        if self.reader_kind == "camera":
            self.cam_sim = CameraSim(folder=self.frames)
            await self.cam_sim.start()
            devices["casecam"] = {"driver": "camera", "source": str(self.frames), "watch": True, "poll_interval_s": 0.002,
                "max_codes": max(2, self.per_case + 4)}
        else:
            self.child_scan_sim = ScannerSim(port=0, no_read="NOREAD")
            await self.child_scan_sim.start()
            devices["casecam"] = {"driver": "scanner", "host": "127.0.0.1", "port": self.child_scan_sim.port, "no_read": "NOREAD", **FAST}
        if self.use_label_reader:
            self.label_sim = ScannerSim(port=0, no_read="NOREAD")
            await self.label_sim.start()
            devices["labelcam"] = {"driver": "scanner", "host": "127.0.0.1", "port": self.label_sim.port, "no_read": "NOREAD", **FAST}
        st: dict[str, Any] = {"type": "pallet" if self.pallet else "case", "name": "palletizer" if self.pallet else "casepacker",
                              "reader": "casecam", "printer": "labeler"}
        if self.plc_driver is not None:
            devices["caseplc"] = await self._start_plc_sim()
            st["plc"] = "caseplc"
        st["cases_per_pallet" if self.pallet else "units_per_case"] = self.per_case
        if self.use_label_reader:
            st["label_reader"] = "labelcam"
        self.cfg = config(devices, [st], db=str(self.tmp / "line.db"))
        self.store = await open_store(self.tmp / "line.db", self.cfg)
        self.drivers = build_drivers(self.cfg)
        self.line = Line(self.cfg, self.store, self.drivers)
        (self.rt,) = self.line.stations
        self.rt.label_timeout_s = self.label_timeout_s
        for d in self.drivers.values():
            await d.start()
        for d in self.drivers.values():
            assert await d.wait_connected(5), d.name
        for name, factory in self.rt.tasks().items():
            self.tasks.append(asyncio.create_task(factory(), name=name))
        if self.use_label_reader:
            self.tasks.append(asyncio.create_task(self._label_camera()))
        return self

    async def _start_plc_sim(self) -> dict[str, Any]:
        from linectl.simulators.plc import DEFAULT_MODBUS_TAGS, DEFAULT_S7_TAGS, PlcSim, free_tcp_port

        assert self.plc_driver in ("modbus_tcp", "s7"), self.plc_driver
        tags = self.plc_tags or (DEFAULT_S7_TAGS if self.plc_driver == "s7" else DEFAULT_MODBUS_TAGS)
        dev = {"driver": self.plc_driver, "host": "127.0.0.1", "port": free_tcp_port(), "tags": tags,
               "heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 1.0, **FAST}
        sim_cfg = config({"caseplc": dev}).devices["caseplc"]
        self.plc_sim = PlcSim("caseplc", sim_cfg, heartbeat_period_s=0.2)
        await self.plc_sim.start()
        return dev

    async def _label_camera(self) -> None:
        """Stands in for a label camera: whatever the ZPL simulator prints is read back a moment later."""
        seen = 0
        while True:
            await asyncio.sleep(0.01)
            while len(self.zpl_sim.printed) > seen:
                label = self.zpl_sim.printed[seen]
                seen += 1
                data = self.label_override(label) if self.label_override else None
                if data is None and label.dm is not None:
                    sym, content = label.dm
                    self.label_sim.scan(content, sym)
                    self.label_scans.append(content)
                elif data == "NOREAD":
                    self.label_sim.send(b"NOREAD\r\n")
                elif data:
                    self.label_sim.scan(data, "]d2")

    async def create_batch(self, lot: str = LOT, gtin: str = GTIN) -> None:
        await self.line.execute({"name": "create_batch", "lot": lot, "gtin": gtin, "expiry": EXPIRY, "planned_qty": 100000, "actor": "qa"}, "test")

    async def frame(self, units: list[SimUnit], timeout: float = 20.0) -> Any:
        """Present one case-camera frame and wait for the station's decision on it."""
        n = len(self.rt.recent)
        self.cam_sim.present_many(units)
        await wait_for(lambda: len(self.rt.recent) > n, timeout, "case decision")
        return self.rt.recent[-1]

    async def scan(self, codes: list[str], expect_decision: bool = True, timeout: float = 10.0) -> Any:
        n = len(self.rt.recent)
        for c in codes:
            if c == "NOREAD":
                self.child_scan_sim.send(b"NOREAD\r\n")
            else:
                self.child_scan_sim.scan(c, "]d2")
        if not expect_decision:
            await wait_for(lambda: len(self.rt._open) == len(codes) or len(self.rt.recent) > n, timeout, "scans taken")
            return None
        await wait_for(lambda: len(self.rt.recent) > n, timeout, "decision")
        return self.rt.recent[-1]

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        for d in self.drivers.values():
            await d.stop()
        for sim in ("zpl_sim", "label_sim", "child_scan_sim", "plc_sim"):
            if hasattr(self, sim):
                await getattr(self, sim).stop()
        if hasattr(self, "cam_sim"):
            await self.cam_sim.stop()
        await self.store.close()
