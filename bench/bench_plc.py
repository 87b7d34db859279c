"""Round trip of a reject verdict: write the verdict slot [seq, REJECT] + read it back (the driver's confirm).

The PLC simulator runs in its own process (`python -m linectl.simulators.plc`) on
pymodbus' server (Modbus TCP), on snap7's server (S7) and on asyncua's server (OPC UA,
security None, and Basic256Sha256 SignAndEncrypt with a user and password; the verdict
slot written with an IndexRange), with the driver's
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

#: (label, driver, confirm, OPC UA security mode): readback everywhere (like for like); OPC UA also with its write
#: StatusCode alone, and both over Basic256Sha256 SignAndEncrypt (what the README recommends for a gate on OPC UA)
CASES = (("modbus_tcp", "modbus_tcp", "readback", None), ("s7", "s7", "readback", None), ("opcua", "opcua", "readback", None),
         ("opcua_status", "opcua", "status", None), ("opcua_sae", "opcua", "readback", "SignAndEncrypt"),
         ("opcua_sae_status", "opcua", "status", "SignAndEncrypt"))
PKI = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "pki")


def _secured(mode: str) -> tuple[list[str], dict[str, object]]:
    """Simulator arguments and driver settings for a Basic256Sha256 endpoint in `mode` with a user and password."""
    from pathlib import Path

    from linectl.opcua_server import ensure_certificate

    pki = Path(PKI)
    ensure_certificate(pki / "client.der", pki / "client.pem", "urn:linectl:client", "localhost")
    os.environ["BENCH_PLC_PASSWORD"] = "bench-plc-pw"
    sim_args = ["--opcua-security", mode, "--opcua-certificate", str(pki / "plcsim.der"), "--opcua-key", str(pki / "plcsim.pem"),
                "--opcua-user", "linectl", "--opcua-password-env", "BENCH_PLC_PASSWORD"]
    settings: dict[str, object] = {
        "security_policy": "Basic256Sha256", "security_mode": mode, "certificate": pki / "client.der", "private_key": pki / "client.pem",
        "server_certificate": pki / "plcsim.der", "username": "linectl", "password_env": "BENCH_PLC_PASSWORD",
    }
    return sim_args, settings


async def bench(driver: str, n: int, confirm: str = "readback", security: str | None = None) -> dict[str, float]:
    from linectl.drivers.registry import driver_class

    port = free_tcp_port()
    sim_args, settings = _secured(security) if security else ([], {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "linectl.simulators.plc", "--driver", driver, "--port", str(port), *sim_args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        line = proc.stdout.readline()  # "listening on ..." (after "generated ..." on a first secured run)
        if line.startswith("generated"):
            proc.stdout.readline()
        cfg = default_config(driver, port=port, confirm=confirm, **settings)
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
    for label, driver, confirm, security in CASES:
        out[label] = asyncio.run(bench(driver, args.n, confirm, security))
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{out['date']} {out['machine']} Python {out['python']}")
    for label, _driver, confirm, _security in CASES:
        r = out[label]
        print(f"{label:16s} confirm={confirm:8s} n={r['n']}  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  max {r['max_ms']:.2f} ms")


if __name__ == "__main__":
    main()
