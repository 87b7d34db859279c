"""Round trip of a reject verdict: write the verdict slot [seq, REJECT] + read it back (the driver's confirm).

The PLC simulator runs in its own process (`python -m linectl.simulators.plc`) on
pymodbus' server (Modbus TCP), on snap7's server (S7) and on asyncua's server (OPC UA,
security None; the verdict slot written with an IndexRange), with the driver's
background poll loop running as in production, so the figure includes
waiting behind a poll request. This is the latency budget linectl spends
per unit between "verdict known" and "PLC has it".

    .venv/bin/python bench/bench_plc.py [--n 2000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from linectl.drivers.plc_tags import VERDICT_REJECT  # noqa: E402
from linectl.simulators.plc import default_config, free_tcp_port  # noqa: E402

#: (label, driver, confirm): readback everywhere (like for like); OPC UA also with its write StatusCode alone
CASES = (("modbus_tcp", "modbus_tcp", "readback"), ("s7", "s7", "readback"), ("opcua", "opcua", "readback"),
         ("opcua_status", "opcua", "status"))


async def bench(driver: str, n: int, confirm: str = "readback") -> dict[str, float]:
    from linectl.drivers.registry import driver_class

    port = free_tcp_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "linectl.simulators.plc", "--driver", driver, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        proc.stdout.readline()  # "listening on ..."
        cfg = default_config(driver, port=port, confirm=confirm)
        drv = driver_class(driver)("bench", cfg)
        await drv.start()
        if not await drv.wait_connected(5.0):
            raise SystemExit(f"{driver}: not connected: {drv.health}")
        ring = cfg.tags["verdict_ring"].count // 2
        lat: list[float] = []
        for seq in range(1, n + 101):
            t0 = time.perf_counter()
            await drv.write_tag("verdict_ring", [seq, VERDICT_REJECT], index=2 * (seq % ring))
            if seq > 100:  # warm-up
                lat.append(time.perf_counter() - t0)
        await drv.stop()
    finally:
        proc.terminate()
        proc.wait(5)
    lat.sort()
    return {
        "n": len(lat),
        "median_ms": statistics.median(lat) * 1000,
        "p50_ms": lat[len(lat) // 2] * 1000,
        "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1000,
        "max_ms": lat[-1] * 1000,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from linectl.logging import setup_logging

    setup_logging("warning")
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPU, {platform.processor() or platform.platform()}",
        "python": platform.python_version(),
    }
    for label, driver, confirm in CASES:
        out[label] = asyncio.run(bench(driver, args.n, confirm))
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{out['date']} {out['machine']} Python {out['python']}")
    for label, _driver, confirm in CASES:
        r = out[label]
        print(f"{label:12s} confirm={confirm:8s} n={r['n']}  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  max {r['max_ms']:.2f} ms")


if __name__ == "__main__":
    main()
