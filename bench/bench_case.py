"""Case aggregation decision time: 120 units read from one camera frame, end to end on real drivers.

    .venv/bin/python bench/bench_case.py [--cases 30] [--per-case 120] [--print-time 0.0] [--grading]

What is timed, per case, from the moment the frame file appears in the case
camera's folder (atomic rename, as a camera or frame grabber publishes it):
  read     the camera driver has loaded and decoded the frame (zxing-cpp, all
           codes) and the station starts on it;
  checked  every code parsed and all children checked in one SQL query, an
           SSCC allocated and its durable intent written (`sscc_label_printing`);
  decided  the label was sent over TCP to the ZPL printer simulator, printed
           (`--print-time`, 0 = instant), read back by the label scanner
           simulator, and ContainerCommissioned + Packed committed.
The label print and read-back depend on the printer and scanner on the line;
`checked` is linectl's own share. Results are printed as JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchinfo import machine  # noqa: E402 - bench/ is the script's own directory

GTIN = "04012345000016"
LOT = "CASEBENCH"
EXPIRY = "281231"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 1)


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": pct(values, 0.5), "p99_ms": pct(values, 0.99), "max_ms": round(max(values) * 1000, 1)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from linectl import gs1
    from linectl.config import parse_config
    from linectl.daemon import build_drivers
    from linectl.engine.line import Line
    from linectl.events import UnitCommissioned
    from linectl.logging import setup_logging
    from linectl.simulators.camera import CameraSim
    from linectl.simulators.model import SimUnit
    from linectl.simulators.printer import ZplPrinterSim
    from linectl.simulators.scanner import ScannerSim
    from linectl.store import Store

    setup_logging("warning")
    tmp = Path(tempfile.mkdtemp(prefix="bench-case-"))
    frames = tmp / "frames"
    frames.mkdir()
    zpl = ZplPrinterSim(port=0, print_time_s=args.print_time)
    label_scan = ScannerSim(port=0)
    await zpl.start()
    await label_scan.start()
    zpl.on_label = lambda label, unit: label_scan.scan(label.dm[1], label.dm[0]) if label.dm else None
    fast = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "connect_timeout_s": 1.0}
    cfg = parse_config({
        "line": {"enterprise": "acme", "site": "s1", "area": "pack", "name": "bench", "gln": "4012345000009", "company_prefix_length": 7},
        "products": [{"gtin": GTIN, "name": "Aspirin 100 mg x 20", "company_prefix_length": 7, "serials": {"scheme": "random", "length": 12}}],
        "store": {"path": str(tmp / "line.db")},
        "mqtt": {"enabled": False},
        "devices": {
            "casecam": {"driver": "camera", "source": str(frames), "watch": True, "delete_after": True, "poll_interval_s": 0.002,
                        "max_codes": args.per_case + 4, "grading": args.grading},
            "labeler": {"driver": "zpl", "host": "127.0.0.1", "port": zpl.port, "status_interval_s": 0.05, "settle_s": 0.1, "gs1_128": True,
                        "text_fields": ["product", "gtin", "lot", "expiry", "count"], **fast},
            "labelscan": {"driver": "scanner", "host": "127.0.0.1", "port": label_scan.port, **fast},
        },
        "stations": [{"type": "case", "name": "casepacker", "reader": "casecam", "printer": "labeler", "label_reader": "labelscan",
                      "units_per_case": args.per_case}],
    })
    store = await Store.open(tmp / "line.db")
    await store.upsert_products(cfg.products)
    drivers = build_drivers(cfg)
    line = Line(cfg, store, drivers)
    (rt,) = line.stations
    for d in drivers.values():
        await d.start()
    for d in drivers.values():
        assert await d.wait_connected(5), d.name
    tasks = [asyncio.create_task(f()) for f in rt.tasks().values()]
    await line.execute({"name": "create_batch", "lot": LOT, "gtin": GTIN, "expiry": EXPIRY, "planned_qty": 10_000_000, "actor": "bench"}, "bench")

    n = args.cases * args.per_case
    serials = await store.allocate(GTIN, LOT, n, cfg.product(GTIN).serials)
    await store.mark_sent(GTIN, LOT, serials)
    for i in range(0, n, 5000):
        await store.append(*[UnitCommissioned(gtin=GTIN, serial=s, lot=LOT, expiry=EXPIRY) for s in serials[i : i + 5000]])

    cam = CameraSim(folder=tmp / "render")
    t_read: dict[int, float] = {}
    t_checked: dict[int, float] = {}
    orig_handle, orig_allocate = rt.handle_read, rt._allocate_sscc

    async def handle_read(r: Any) -> Any:
        t_read[len(t_read)] = time.perf_counter()
        return await orig_handle(r)

    async def allocate(batch: Any) -> str:
        sscc = await orig_allocate(batch)
        t_checked[len(t_checked)] = time.perf_counter()
        return sscc

    rt.handle_read, rt._allocate_sscc = handle_read, allocate  # type: ignore[method-assign]
    published: list[float] = []
    decided: list[float] = []
    results = []
    try:
        for c in range(args.cases):
            chunk = serials[c * args.per_case : (c + 1) * args.per_case]
            units = [SimUnit(seq=i, content=gs1.compose_unit(GTIN, s, lot=LOT, expiry=EXPIRY).element_string, quality=3.6) for i, s in enumerate(chunk, 1)]
            frame = cam.render_many(units, c + 1)
            data = b"P5\n%d %d\n255\n" % (frame.shape[1], frame.shape[0]) + frame.tobytes()
            before = len(rt.recent)
            part = frames / f".frame_{c + 1:010d}.pgm.tmp"
            part.write_bytes(data)
            published.append(time.perf_counter())
            os.replace(part, frames / f"frame_{c + 1:010d}.pgm")
            deadline = time.monotonic() + 30
            while len(rt.recent) == before:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"case {c + 1}: no decision within 30 s")
                await asyncio.sleep(0.0005)
            decided.append(time.perf_counter())
            res = rt.recent[-1]
            results.append(res)
            if not res.ok:
                raise RuntimeError(f"case {c + 1} rejected: {res.reason} {res.detail}")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for d in drivers.values():
            await d.stop()
        await zpl.stop()
        await label_scan.stop()
        await store.close()
    to_read = [t_read[i] - published[i] for i in range(len(published))]
    to_checked = [t_checked[i] - published[i] for i in range(len(published))]
    to_decided = [decided[i] - published[i] for i in range(len(published))]
    return {
        "bench": "case aggregation from one camera frame",
        "date": datetime.now(UTC).date().isoformat(),
        "machine": machine(),
        "cases": args.cases,
        "units_per_case": args.per_case,
        "grading": args.grading,
        "label_print_time_s": args.print_time,
        "frame_to_read": summary(to_read),
        "frame_to_checked_and_sscc": summary(to_checked),
        "frame_to_recorded": summary(to_decided),
        "all_recorded": all(r.ok and r.count == args.per_case for r in results),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=30)
    p.add_argument("--per-case", type=int, default=120)
    p.add_argument("--print-time", type=float, default=0.0, help="seconds the ZPL simulator takes per label")
    p.add_argument("--grading", action="store_true", help="grade every code too (ISO 15415 estimates)")
    args = p.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
