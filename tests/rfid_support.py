"""Rig for the RFID tunnel tests and bench: a case station whose reader is the LLRP reader simulator over TCP.

Real parts end to end: LlrpReaderSim (our LLRP encoding) <-TCP-> driver: llrp (llrpkit), PlcSim behind
pymodbus' own server <-Modbus TCP-> driver: modbus_tcp (case_trigger in, case_result/case_seq out),
ZplPrinterSim <-TCP-> driver: zpl for the SSCC label, the real Line and store. A case enters the tunnel the
way the line simulator's packer puts it there: its tags into the reader's field, then the PLC's case_trigger
+1 (the photo-eye), and out of the field once decided.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from engine_helpers import wait_for
from test_aggregation_support import FAST, GTIN, LOT, commission, config, open_store

from linectl import epc
from linectl.simulators.llrp_reader import FieldTag, LlrpReaderSim

CASE_TRIGGER_SPEC = {"table": "holding", "address": 18, "type": "uint32"}
LLRP_FAST = {**FAST, "keepalive_s": 0.2, "keepalive_timeout_s": 1.0}


def unit_epc(serial: str, gtin: str = GTIN, filter_value: int = 1) -> str:
    """The EPC an RFID label of this unit carries: the smallest SGTIN that holds the serial."""
    return epc.make_epc(epc.choose_scheme(serial), gtin=gtin, serial=serial, company_prefix_length=7, filter_value=filter_value).epc_hex


class TunnelRig:
    def __init__(self, tmp: Path, *, per_case: int = 6, window_ms: int = 150, min_rssi: int | None = -65,
                 reads_per_s: float = 4000.0, llrp: dict[str, Any] | None = None) -> None:
        self.tmp = tmp
        self.per_case = per_case
        self.window_ms = window_ms
        self.min_rssi = min_rssi
        self.reads_per_s = reads_per_s
        self.llrp = llrp or {}
        self.tasks: list[asyncio.Task[Any]] = []
        self.trigger = 0

    async def start(self) -> TunnelRig:
        from linectl.daemon import build_drivers
        from linectl.engine.line import Line
        from linectl.simulators.plc import DEFAULT_MODBUS_TAGS, PlcSim, free_tcp_port
        from linectl.simulators.printer import ZplPrinterSim

        self.reader_sim = LlrpReaderSim(seed=3, reads_per_s=self.reads_per_s)
        await self.reader_sim.start()
        self.zpl_sim = ZplPrinterSim(port=0, print_time_s=0.005)
        await self.zpl_sim.start()
        plc = {"driver": "modbus_tcp", "host": "127.0.0.1", "port": free_tcp_port(), "tags": {**DEFAULT_MODBUS_TAGS, "case_trigger": CASE_TRIGGER_SPEC},
               "heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 1.0, **FAST}
        devices: dict[str, Any] = {
            "labeler": {"driver": "zpl", "host": "127.0.0.1", "port": self.zpl_sim.port, "status_interval_s": 0.05, "settle_s": 0.1,
                        "gs1_128": True, **FAST},
            "tunnel": {"driver": "llrp", "host": "127.0.0.1", "port": self.reader_sim.port, "window_ms": 500, **LLRP_FAST, **self.llrp},
            "caseplc": plc,
        }
        st: dict[str, Any] = {"type": "case", "name": "casepacker", "reader": "tunnel", "printer": "labeler", "plc": "caseplc",
                              "units_per_case": self.per_case, "window_ms": self.window_ms}
        if self.min_rssi is not None:
            st["rfid_min_rssi"] = self.min_rssi
        self.cfg = config(devices, [st], db=str(self.tmp / "line.db"))
        self.plc_sim = PlcSim("caseplc", self.cfg.devices["caseplc"], heartbeat_period_s=0.2)
        await self.plc_sim.start()
        self.store = await open_store(self.tmp / "line.db", self.cfg)
        self.drivers = build_drivers(self.cfg)
        self.line = Line(self.cfg, self.store, self.drivers)
        (self.rt,) = self.line.stations
        self.rt.label_timeout_s = 4.0
        for d in self.drivers.values():
            await d.start()
        for d in self.drivers.values():
            assert await d.wait_connected(5), d.name
        await wait_for(lambda: "case_trigger" in self.drivers["caseplc"].latest(), 5, "first PLC poll")
        for name, factory in self.rt.tasks().items():
            self.tasks.append(asyncio.create_task(factory(), name=name))
        await wait_for(lambda: self.rt.trigger_seen is not None, 5, "station watching case_trigger")
        return self

    async def create_batch(self, lot: str = LOT, gtin: str = GTIN) -> None:
        await self.line.execute({"name": "create_batch", "lot": lot, "gtin": gtin, "expiry": "281231", "planned_qty": 100000, "actor": "qa"}, "test")

    async def commission(self, n: int, lot: str = LOT) -> list[str]:
        return await commission(self.store, n, lot=lot)

    def enter(self, tags: list[FieldTag | str]) -> None:
        for t in tags:
            if isinstance(t, str):
                self.reader_sim.field_enter(t)
            else:
                self.reader_sim.field_enter(t.epc_hex, antenna=t.antenna, rssi=t.rssi, unit=t.unit, dead=t.dead, stray=t.stray,
                                            reports_as=t.reports_as)

    def count_case(self, n: int = 1) -> None:
        """The PLC counts n cases into the tunnel (its photo-eye)."""
        self.trigger += n
        self.plc_sim.set("case_trigger", self.trigger)

    async def case(self, tags: list[FieldTag | str], *, leave: bool = True, timeout: float = 10.0) -> Any:
        """One case through the tunnel: its tags into the field, the PLC counts it, the station decides."""
        n = len(self.rt.recent)
        self.enter(tags)
        self.count_case()
        await wait_for(lambda: len(self.rt.recent) > n, timeout, "case decision")
        if leave:
            self.reader_sim.set_field([])
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
        for sim in (self.reader_sim, self.zpl_sim, self.plc_sim):
            await sim.stop()
        await self.store.close()
