"""RFID tunnel at the case station: a 120-tag case decided from one LLRP window, close -> decision.

    .venv/bin/python bench/bench_rfid_tunnel.py [--cases 30] [--per-case 120] [--window-ms 300]

The physical world (LLRP reader simulator with the case's tags in its field, the PLC simulator behind
pymodbus' server that counts each case into the tunnel, the ZPL label printer simulator) runs in a thread
with its own event loop, as another box on the network would; linectl (drivers, the real Line, the store)
runs in the main loop. Per case: 120 freshly commissioned units' SGTIN-198 tags enter the field, the PLC's
case_trigger + 1, the station opens a window of --window-ms, closes it and decides the case. Timed from the
window's close (STOP_ROSPEC sent) by the station itself:
  decided  the reader's final reports and End_Of_ROSpec, EPC decoding, the store checks of 120 units in one
           query, the count: the case is known good or rejected (target: <= 200 ms);
  settled  then the SSCC allocated, its intent written, the label printed and confirmed by the printer
           (its ~HS status poll, status_interval_s 0.05), ContainerCommissioned + Packed committed, the PLC told.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchinfo import machine  # noqa: E402 - bench/ is the script's own directory

T = TypeVar("T")
GTIN = "04012345000016"
LOT = "TUNNELBENCH"


class World(threading.Thread):
    """The simulators' own event loop in a thread."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.loop = asyncio.new_event_loop()

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def do(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from linectl import epc
    from linectl.config import parse_config
    from linectl.daemon import build_drivers
    from linectl.engine.line import Line
    from linectl.events import UnitCommissioned
    from linectl.simulators.llrp_reader import LlrpReaderSim
    from linectl.simulators.plc import DEFAULT_MODBUS_TAGS, PlcSim, free_tcp_port
    from linectl.simulators.printer import ZplPrinterSim
    from linectl.store import Store

    world = World()
    world.start()
    reader_sim = LlrpReaderSim(seed=1, reads_per_s=args.reads_per_s)
    zpl_sim = ZplPrinterSim(port=0, print_time_s=0.0)

    async def start_sims() -> None:
        await reader_sim.start()
        await zpl_sim.start()

    await world.do(start_sims())
    fast = {"backoff_initial_s": 0.05, "backoff_max_s": 0.5, "reply_timeout_s": 1.0, "connect_timeout_s": 3.0}
    plc_dev = {"driver": "modbus_tcp", "host": "127.0.0.1", "port": free_tcp_port(),
               "tags": {**DEFAULT_MODBUS_TAGS, "case_trigger": {"table": "holding", "address": 18, "type": "uint32"}}, **fast}
    tmp = Path(tempfile.mkdtemp(prefix="bench-tunnel-"))
    cfg = parse_config({
        "line": {"enterprise": "acme", "site": "s1", "area": "pack", "name": "line1", "gln": "4012345000009", "company_prefix_length": 7},
        "products": [{"gtin": GTIN, "name": "Aspirin", "company_prefix_length": 7, "serials": {"scheme": "random", "length": 12}}],
        "store": {"path": str(tmp / "line.db")},
        "mqtt": {"enabled": False},
        "devices": {
            "tunnel": {"driver": "llrp", "host": "127.0.0.1", "port": reader_sim.port, "tag_population": args.per_case, **fast},
            "labeler": {"driver": "zpl", "host": "127.0.0.1", "port": zpl_sim.port, "status_interval_s": 0.05, "settle_s": 0.1, "gs1_128": True, **fast},
            "plc": plc_dev,
        },
        "stations": [{"type": "case", "name": "casepacker", "reader": "tunnel", "printer": "labeler", "plc": "plc",
                      "units_per_case": args.per_case, "window_ms": args.window_ms, "rfid_min_rssi": -65}],
    })
    plc_sim = PlcSim("plc", cfg.devices["plc"], heartbeat_period_s=0.5)
    await world.do(plc_sim.start())
    store = await Store.open(tmp / "line.db")
    await store.upsert_products(cfg.products)
    drivers = build_drivers(cfg)
    line = Line(cfg, store, drivers)
    (rt,) = line.stations
    tasks: list[asyncio.Task[Any]] = []
    try:
        for d in drivers.values():
            await d.start()
        for d in drivers.values():
            if not await d.wait_connected(10):
                raise SystemExit(f"{d.name} not connected: {d.health.reason}")
        await line.execute({"name": "create_batch", "lot": LOT, "gtin": GTIN, "expiry": "281231", "planned_qty": 10**6, "actor": "bench"}, "bench")
        scheme = cfg.product(GTIN).serials
        for name, factory in rt.tasks().items():
            tasks.append(asyncio.create_task(factory(), name=name))
        while rt.trigger_seen is None:
            await asyncio.sleep(0.01)
        wrong = 0
        for k in range(args.cases):
            serials = await store.allocate(GTIN, LOT, args.per_case, scheme)
            await store.mark_sent(GTIN, LOT, serials)
            await store.append(*[UnitCommissioned(gtin=GTIN, serial=s, lot=LOT, expiry="281231") for s in serials])
            epcs = [epc.make_epc(epc.choose_scheme(s), gtin=GTIN, serial=s, company_prefix_length=7, filter_value=1).epc_hex for s in serials]

            async def enter(epcs: list[str] = epcs, k: int = k) -> None:
                reader_sim.set_field(epcs)
                plc_sim.set("case_trigger", k + 1)

            await world.do(enter())
            while rt.counters.reads <= k:
                await asyncio.sleep(0.005)
            res = rt.recent[-1]
            wrong += not (res.ok and res.count == args.per_case)
        decided, settled = rt.decision_ms.summary(), rt.settled_ms.summary()
        return {
            "cases": args.cases, "per_case": args.per_case, "window_ms": args.window_ms, "wrong": wrong,
            "decided_ms": decided, "settled_ms": settled, "load": [round(x, 2) for x in os.getloadavg()],
        }
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for d in drivers.values():
            await d.stop()
        await store.close()

        async def stop_sims() -> None:
            for s in (reader_sim, zpl_sim, plc_sim):
                await s.stop()

        await world.do(stop_sims())
        world.loop.call_soon_threadsafe(world.loop.stop)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=30)
    ap.add_argument("--per-case", type=int, default=120)
    ap.add_argument("--window-ms", type=int, default=300)
    ap.add_argument("--reads-per-s", type=float, default=2000.0, help="the simulated reader's singulation rate")
    args = ap.parse_args()
    from linectl.logging import setup_logging

    setup_logging("warning")
    t0 = time.monotonic()
    out = asyncio.run(run(args))
    print(machine())
    print(f"{out['cases']} cases of {out['per_case']} tags, window {out['window_ms']} ms, load {out['load']}, "
          f"cases not packed whole: {out['wrong']} ({time.monotonic() - t0:.0f} s)")
    for what in ("decided", "settled"):
        s = out[f"{what}_ms"]
        print(f"close -> {what}: p50 {s['p50']} ms, p99 {s['p99']} ms, max {s['max']} ms, mean {s['mean']} ms")


if __name__ == "__main__":
    main()
