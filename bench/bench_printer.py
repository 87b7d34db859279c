"""How fast the printer/reader simulators and drivers go, to show they are not the bottleneck at 6,000 units/min.

    .venv/bin/python bench/bench_printer.py [--units 3000]

Measures: CoderPrinterSim.on_trigger alone (content only, and with rendered
images as a camera needs), the LCP/1 driver end to end over loopback TCP
(DAT + ACK + trigger + PRN + confirmation), and ReaderSim -> LineReader.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from linectl import gs1  # noqa: E402
from linectl.drivers.base import PrintJob  # noqa: E402
from linectl.drivers.coder import CoderConfig, CoderPrinter  # noqa: E402
from linectl.drivers.reader import LineReader, ReaderConfig  # noqa: E402
from linectl.simulators.model import SimUnit  # noqa: E402
from linectl.simulators.printer import CoderPrinterSim  # noqa: E402
from linectl.simulators.reader import ReaderSim  # noqa: E402


def jobs(n: int) -> list[PrintJob]:
    out = []
    for i in range(1, n + 1):
        c = gs1.compose_unit("09501101530003", f"B{i:011d}", lot="LOT1", expiry="301231")
        out.append(PrintJob(i, c.element_string, c.hri))
    return out


def bench_trigger(n: int, render: bool) -> float:
    sim = CoderPrinterSim(render_images=render)
    sim.message = "UNIT"
    for j in jobs(n):
        sim.queue.append((j.seq, {"DM": j.element_string}))
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        sim.on_trigger(SimUnit(seq=i))
    return n / (time.perf_counter() - t0)


async def bench_coder(n: int) -> float:
    sim = CoderPrinterSim(port=0, capacity=64)
    await sim.start()
    drv = CoderPrinter("bench", CoderConfig(driver="coder", host="127.0.0.1", port=sim.port, message="UNIT"))
    await drv.start()
    await drv.wait_connected(3)
    js = jobs(n)
    got = 0

    async def confirms() -> None:
        nonlocal got
        async for _ in drv.confirmations():
            got += 1
            if got == n:
                return

    t0 = time.perf_counter()
    task = asyncio.create_task(confirms())
    for j in js[:16]:
        await drv.send(j)
    for i, j in enumerate(js[16:], start=1):
        sim.on_trigger(SimUnit(seq=i))
        await drv.send(j)
    for i in range(n - 15, n + 1):
        sim.on_trigger(SimUnit(seq=i))
    await asyncio.wait_for(task, 60)
    rate = n / (time.perf_counter() - t0)
    await drv.stop()
    await sim.stop()
    return rate


async def bench_reader(n: int) -> float:
    sim = ReaderSim(port=0)
    await sim.start()
    drv = LineReader("bench", ReaderConfig(driver="reader", host="127.0.0.1", port=sim.port))
    await drv.start()
    await drv.wait_connected(3)
    while not sim.connected:
        await asyncio.sleep(0.01)
    units = [SimUnit(seq=j.seq, content=j.element_string, quality=3.5) for j in jobs(n)]
    t0 = time.perf_counter()
    got = 0
    for u in units:
        sim.present(u)
    async for _ in drv.reads():
        got += 1
        if got == n:
            break
    rate = n / (time.perf_counter() - t0)
    await drv.stop()
    await sim.stop()
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", type=int, default=3000)
    n = p.parse_args().units
    from linectl.logging import setup_logging

    setup_logging("warning")
    print(f"on_trigger, content only   : {bench_trigger(n, False):10.0f} units/s")
    print(f"on_trigger, rendered image : {bench_trigger(min(n, 500), True):10.0f} units/s")
    print(f"coder driver+sim over TCP  : {asyncio.run(bench_coder(n)):10.0f} units/s (send, ACK, trigger, PRN, confirm)")
    print(f"reader sim -> driver (TCP) : {asyncio.run(bench_reader(n)):10.0f} reads/s")
    print("target: 100 units/s (6,000/min)")


if __name__ == "__main__":
    main()
