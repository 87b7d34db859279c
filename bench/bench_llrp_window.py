"""RFID tunnel: time from the close of an inventory window to the driver's decided tag set, 120 tags a window.

    .venv/bin/python bench/bench_llrp_window.py [--windows 50] [--tags 120] [--window-ms 300]

The LLRP reader simulator runs in its own process (a reader is another box on the network) with `--tags`
SGTIN-96 tags in its field; the driver (driver: llrp, this process) opens and closes windows. Close-to-decided is
end_window(): STOP_ROSPEC, the reader's final RO_ACCESS_REPORT and End_Of_ROSpec event, decoding, merging.
Measured for the two report modes: everything at the end of the window (default), and every 10 tags during it.
Target (issue): the tag set decided ≤ 200 ms after the window closes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchinfo import machine  # noqa: E402 - bench/ is the script's own directory

from linectl.drivers.llrp import LlrpConfig, LlrpReader  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run(port: int, windows: int, tags: int, window_ms: int, every_n: int | None) -> tuple[list[float], int]:
    drv = LlrpReader("tunnel", LlrpConfig(driver="llrp", host="127.0.0.1", port=port, report_every_n_tags=every_n))
    await drv.start()
    if not await drv.wait_connected(10):
        raise SystemExit(f"reader not connected: {drv.health.reason}")
    lat: list[float] = []
    short = 0
    try:
        for _ in range(windows):
            await drv.start_window()
            await asyncio.sleep(window_ms / 1000)
            t0 = time.perf_counter()
            window = await drv.end_window()
            lat.append((time.perf_counter() - t0) * 1000)
            short += len(window.tags) != tags or not window.complete
    finally:
        await drv.stop()
    return lat, short


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=50)
    ap.add_argument("--tags", type=int, default=120)
    ap.add_argument("--window-ms", type=int, default=300)
    args = ap.parse_args()
    from linectl.logging import setup_logging

    setup_logging("warning")
    port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "linectl.simulators.llrp_reader", "--port", str(port), "--demo-tags", str(args.tags)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)
        import llrpkit

        print(machine(f"llrpkit {llrpkit.__version__}"))
        print(f"{args.windows} windows of {args.window_ms} ms, {args.tags} tags in the field; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        for every_n in (None, 10):
            lat, short = asyncio.run(run(port, args.windows, args.tags, args.window_ms, every_n))
            mode = "reports at the end of the window" if every_n is None else f"reports every {every_n} tags"
            print(
                f"{mode}: close -> decided p50 {statistics.median(lat):.1f} ms, p99 {pct(lat, 99):.1f} ms, max {max(lat):.1f} ms;"
                f" windows short of {args.tags} tags or incomplete: {short}"
            )
    finally:
        sim.terminate()
        sim.wait(5)


if __name__ == "__main__":
    main()
