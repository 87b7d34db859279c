"""Stall ride-through benchmark: the same ~1 s daemon stall at two line speeds, printer queue in codes vs in time.

The demo line on its simulators (simulator in its own process, daemon in this one). After the batch is
running, the daemon's event loop is blocked for `--stall` seconds (what a long GC pause, a swap-in or a
SIGSTOP does to it). For each rate and each printer-queue setting it prints whether the line stopped (and
why), the blank packs fed (no code on the printer for them: simulator truth), and the false rejects.

- "depth 4": `printer_queue_depth: 4` (the old demo config): 0.4 s of codes at 600 upm, 0.08 s at 3,000;
- "queue_s": `printer_queue_s: 1.5` with `rate_upm: 600` (the demo config now): the queue follows the pace.

    .venv/bin/python bench/bench_stall.py --rates 600 3000 --stall 1.0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from ruamel.yaml import YAML

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchinfo import machine  # noqa: E402

from linectl.demo import DEFAULT_CONFIG, SimulatedLine  # noqa: E402
from linectl.logging import setup_logging  # noqa: E402
from linectl.yamlsource import load_yaml, to_plain  # noqa: E402


def config(queue: str, tmp: Path) -> Path:
    raw = to_plain(load_yaml(DEFAULT_CONFIG))
    for st in raw["stations"]:
        if st.get("type") == "print_verify":
            if queue == "depth 4":
                for k in ("printer_queue_s", "rate_upm"):
                    st.pop(k, None)
                st["printer_queue_depth"] = 4
    path = tmp / f"line-{queue.replace(' ', '')}.yaml"
    with open(path, "w", encoding="utf-8") as fh:
        YAML(typ="safe").dump(raw, fh)
    return path


async def one(rate: float, queue: str, stall: float, seconds: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-stall-"))
    sl = SimulatedLine(config(queue, tmp), rate=rate, defect_rate=0.0, seed=7, db=tmp / "line.db",
                       overrides={"simulation": {"variation_rate": 0.0}})
    async with sl:
        line = sl.line
        units = int(rate / 60 * seconds)
        await sl.create_batch(units, challenge=False)
        await sl.start_batch()
        while line.batch.good_total() < units // 4 and line.fault is None:
            await asyncio.sleep(0.05)
        depth = line.stations[0].queue_target()
        time.sleep(stall)  # the stall: nothing in this process runs
        t0 = time.monotonic()
        while not line.completed.is_set() and line.fault is None and time.monotonic() - t0 < seconds * 2 + 10:
            await asyncio.sleep(0.1)
        fault = line.fault
        if fault is not None:
            await asyncio.sleep(3.0)
        rep = await sl.control.call(cmd="units", last=1000)
        fed = rep["units"]
        blanks = sum(1 for u in fed if u["job_seq"] is None and not u["challenge"])
        false_rejects = sum(1 for u in fed if u["outcome"] == "rejected" and not u["defect"] and not u["challenge"] and u["job_seq"] is not None)
    return {"rate_upm": rate, "queue": queue, "codes_on_printer": depth, "stall_s": stall,
            "stopped": fault or "no", "blank_packs": blanks, "false_rejects": false_rejects}


async def main(args: argparse.Namespace) -> None:
    setup_logging("error")
    rows = []
    for rate in args.rates:
        for queue in ("depth 4", "queue_s"):
            r = await one(rate, queue, args.stall, args.seconds)
            rows.append(r)
            print(f"{rate:>6.0f} upm  {queue:<8} {r['codes_on_printer']:>4} codes  stall {args.stall}s  stopped: {r['stopped']:<20} "
                  f"blank packs {r['blank_packs']:>3}  false rejects {r['false_rejects']:>3}", flush=True)
    print(json.dumps({"machine": machine(), "load": os.getloadavg(), "rows": rows}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[600, 3000])
    ap.add_argument("--stall", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=8.0, help="batch size in seconds of production")
    asyncio.run(main(ap.parse_args()))
