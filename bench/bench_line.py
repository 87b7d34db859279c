"""Whole-line benchmark: the demo line on its simulators at a given rate, for a given time.

Prints units/min achieved, decision latency (read received → verdict written to the PLC) p50/p99/max,
missed and false rejects from the simulators' ground truth, and the daemon's RSS over time (memory must stay
flat). Not a test: run it by hand on a quiet machine and record the figures in bench/RESULTS.md.

    .venv/bin/python bench/bench_line.py --rate 6000 --minutes 10
    .venv/bin/python bench/bench_line.py --rate 1500 --minutes 5 --camera
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import tempfile
import time

from linectl import control as C
from linectl.demo import SimulatedLine
from linectl.logging import setup_logging


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 1e6


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


async def main(args: argparse.Namespace) -> dict:
    units = int(args.rate * args.minutes)
    over = {"simulation": {"gate_distance": args.gate_distance}} if args.gate_distance else None
    config = None
    if args.queue_depth:  # jobs kept on the coder ahead of the trigger = how long a daemon stall the print buffer hides
        from ruamel.yaml import YAML

        from linectl.demo import DEFAULT_CONFIG
        from linectl.yamlsource import load_yaml, to_plain

        raw = to_plain(load_yaml(DEFAULT_CONFIG))
        for st in raw["stations"]:
            if st.get("type") == "print_verify":
                st["printer_queue_depth"] = args.queue_depth
        config = os.path.join(tempfile.mkdtemp(prefix="bench-line-"), "line.yaml")
        with open(config, "w", encoding="utf-8") as fh:
            YAML(typ="safe").dump(raw, fh)
    sl = SimulatedLine(config, rate=args.rate, defect_rate=args.defect_rate, seed=args.seed, camera=args.camera, overrides=over)
    async with sl:
        line = sl.line
        await sl.create_batch(units, challenge=False)
        rss = [(0.0, rss_mb())]
        t0 = time.monotonic()
        cpu0, sim_cpu0 = cpu_s(os.getpid()), cpu_s(sl.sim.pid)
        await line.execute(C.StartBatch(actor="bench"), origin="bench")
        next_sample = t0 + 10
        stopped = None
        while not line.completed.is_set():
            if line.fault is not None and line.batch.state.value == "stopped":
                # a result too: how long the line ran before a stop rule fired, and why
                stopped = {"fault": line.fault, "after_s": round(time.monotonic() - t0, 1),
                           "alarms": [a.message for a in line.alarms.values()][-5:]}
                break
            await asyncio.sleep(0.5)
            if time.monotonic() >= next_sample:
                rss.append((round(time.monotonic() - t0, 1), round(rss_mb(), 1)))
                next_sample += 10
        elapsed = time.monotonic() - t0
        cpu1, sim_cpu1 = cpu_s(os.getpid()), cpu_s(sl.sim.pid)
        st = line.stations[0]
        truth = await sl.truth()
        n = st.counters.production_units
        q = max(1, len(rss) // 4)
        first = sum(r for _, r in rss[:q]) / q
        last = sum(r for _, r in rss[-q:]) / q
        return {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.processor() or platform.machine()} {os.cpu_count()} cores",
            "mode": "camera (local decoding)" if args.camera else "reader result lines",
            "rate_upm_set": args.rate,
            "gate_distance_pitches": args.gate_distance or "config default",
            "printer_queue_depth": args.queue_depth or "config default",
            "stopped": stopped,
            "units": n,
            "achieved_rate_upm": round(n / elapsed * 60, 1),
            "commissioned": st.counters.good,
            "rejected": st.counters.rejected,
            "missed_rejects": truth.get("missed_rejects"),
            "false_rejects": truth.get("false_rejects"),
            "decision_latency_ms": st.latency.summary(),
            "daemon_cpu_pct": round(100 * (cpu1 - cpu0) / elapsed, 1),
            "simulator_cpu_pct": round(100 * (sim_cpu1 - sim_cpu0) / elapsed, 1),
            "rss_mb_first_quarter": round(first, 1),
            "rss_mb_last_quarter": round(last, 1),
            "rss_samples": rss,
        }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=6000)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--defect-rate", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--camera", action="store_true")
    ap.add_argument("--queue-depth", type=int, default=None, help="printer_queue_depth of the station (default: the demo config's 4)")
    ap.add_argument("--gate-distance", type=float, default=None, help="pitches read point -> gate (default: the demo config's)")
    a = ap.parse_args()
    setup_logging("error")
    print(json.dumps(asyncio.run(main(a)), indent=1))
