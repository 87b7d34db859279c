"""Recall and trace on a 1,000,000-unit batch: 120 units per case, 40 cases per pallet.

    .venv/bin/python bench/bench_trace.py [--units 1000000] [--per-case 120] [--per-pallet 40] [--traces 2000]

The batch is built once through the Store API exactly as the stations build
it (serials provisioned -> allocated -> sent -> UnitCommissioned; per case
ContainerCommissioned + Packed in one append; pallets the same one level up)
into bench/out/trace_seed_<units>.db and reused by later runs. Reported:
recall of the whole lot streamed to CSV and to JSON files (wall time, rows),
and trace latency (p50/p99/max) of random units, cases and pallets, plus
verify_code latency. Results are printed as JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchinfo import machine  # noqa: E402 - bench/ is the script's own directory

OUT = REPO / "bench" / "out"
GTIN = "04012345000016"
CP = "4012345"  # company prefix of GTIN (length 7)
LOT = "RECALL1"


async def seed(path: Path, units: int, per_case: int, per_pallet: int) -> None:
    from linectl import events as ev
    from linectl import gs1
    from linectl.config import PoolSerials
    from linectl.store import Store

    tmp = path.with_suffix(".tmp")
    for suffix in ("", "-wal", "-shm"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    store = await Store.open(tmp)
    t0 = time.monotonic()
    await store.create_batch(LOT, GTIN, "281231", units, actor="bench")
    serials: list[str] = []
    chunk = 50_000
    for start in range(0, units, chunk):
        n = min(chunk, units - start)
        await store.provision(GTIN, [f"R{i:011d}" for i in range(start, start + n)], source="bench")
        got = await store.allocate(GTIN, LOT, n, PoolSerials(scheme="pool", low_water=0))
        await store.mark_sent(GTIN, LOT, got)
        evs = [ev.UnitCommissioned(gtin=GTIN, serial=s, lot=LOT, expiry="281231") for s in got]
        await asyncio.gather(*(store.append(*evs[i : i + 5000]) for i in range(0, n, 5000)))
        serials.extend(got)
        print(f"  commissioned {start + n}/{units} ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
    n_cases = (units + per_case - 1) // per_case
    refs = await store.next_sscc_refs(CP, 0, n_cases)
    cases = [gs1.make_sscc(0, CP, r) for r in refs]

    async def pack_case(i: int) -> None:
        kids = [ev.ChildRef(gtin=GTIN, serial=s) for s in serials[i * per_case : (i + 1) * per_case]]
        await store.append(
            ev.ContainerCommissioned(sscc=cases[i], level="case", gtin=GTIN, lot=LOT, station="bench"),
            ev.Packed(parent=cases[i], children=kids, lot=LOT, station="bench"),
        )

    for i in range(0, n_cases, 200):
        await asyncio.gather(*(pack_case(j) for j in range(i, min(n_cases, i + 200))))
        if i % 2000 == 0:
            print(f"  cases {i}/{n_cases} ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
    n_pallets = (n_cases + per_pallet - 1) // per_pallet
    prefs = await store.next_sscc_refs(CP, 1, n_pallets)
    pallets = [gs1.make_sscc(1, CP, r) for r in prefs]

    async def pack_pallet(i: int) -> None:
        kids = [ev.ChildRef(sscc=c) for c in cases[i * per_pallet : (i + 1) * per_pallet]]
        await store.append(
            ev.ContainerCommissioned(sscc=pallets[i], level="pallet", gtin=GTIN, lot=LOT, station="bench"),
            ev.Packed(parent=pallets[i], children=kids, lot=LOT, station="bench"),
        )

    await asyncio.gather(*(pack_pallet(j) for j in range(n_pallets)))
    await store.close()
    for suffix in ("-wal", "-shm"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    os.replace(tmp, path)
    print(f"  seeded {units} units, {n_cases} cases, {n_pallets} pallets in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))], 2)


def lat(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": pct(values, 0.5), "p99_ms": pct(values, 0.99), "max_ms": round(max(values), 2)}


async def run(args: argparse.Namespace) -> dict:
    from linectl import gs1
    from linectl.store import Store
    from linectl.store.trace import trace, verify_code, write_recall_csv, write_recall_json

    OUT.mkdir(parents=True, exist_ok=True)
    seed_path = OUT / f"trace_seed_{args.units}.db"
    if not seed_path.exists():
        print(f"seeding {args.units} units into {seed_path} (once; takes a few minutes)", file=sys.stderr)
        await seed(seed_path, args.units, args.per_case, args.per_pallet)
    store = await Store.open(seed_path, readonly=True, integrity="none")
    result: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(), "load_avg_1m": os.getloadavg()[0], "units": args.units,
                    "units_per_case": args.per_case, "cases_per_pallet": args.per_pallet}
    try:
        for fmt, writer in (("csv", write_recall_csv), ("json", write_recall_json)):
            times, cpu = [], []
            for _ in range(args.repeat):
                out = OUT / f"recall.{fmt}"
                t0, c0 = time.perf_counter(), time.process_time()
                with open(out, "w", encoding="utf-8", newline="") as f:
                    counts = writer(store, LOT, f)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            size = out.stat().st_size
            out.unlink()
            result[f"recall_{fmt}"] = {"best_s": round(min(times), 3), "worst_s": round(max(times), 3), "cpu_s": round(min(cpu), 3),
                                       "rows": counts, "bytes": size}
        if args.loose:
            # mid-production: some commissioned units not (or no longer) packed -> the set-difference path
            import shutil

            from linectl.engine.rework import remove_unit

            run_path = OUT / "trace_run.db"
            for suffix in ("", "-wal", "-shm"):
                Path(str(run_path) + suffix).unlink(missing_ok=True)
            shutil.copyfile(seed_path, run_path)
            rw = await Store.open(run_path, integrity="none")
            try:
                some = rw._reader.q("SELECT serial FROM serials WHERE lot=? LIMIT 3", (LOT,))
                for (s,) in some:
                    await remove_unit(rw, gs1.compose_unit(GTIN, s).hri, "bench:rework")
                times, cpu = [], []
                for _ in range(args.repeat):
                    t0, c0 = time.perf_counter(), time.process_time()
                    with open(OUT / "recall_loose.csv", "w", encoding="utf-8", newline="") as f:
                        counts = write_recall_csv(rw, LOT, f)
                    times.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
                result["recall_csv_with_loose_units"] = {"best_s": round(min(times), 3), "worst_s": round(max(times), 3), "cpu_s": round(min(cpu), 3),
                                                         "rows": counts}
            finally:
                await rw.close()
                for suffix in ("", "-wal", "-shm"):
                    Path(str(run_path) + suffix).unlink(missing_ok=True)
                (OUT / "recall_loose.csv").unlink(missing_ok=True)
        rng = random.Random(1)
        rows = store._reader.q("SELECT serial FROM serials WHERE lot=? AND state='commissioned' LIMIT 1000000", (LOT,))
        serials = [r[0] for r in rows]
        containers = store._reader.q("SELECT sscc, level FROM containers WHERE lot=?", (LOT,))
        cases = [s for s, lv in containers if lv == "case"]
        pallets = [s for s, lv in containers if lv == "pallet"]
        samples = {
            "unit": [gs1.compose_unit(GTIN, rng.choice(serials), lot=LOT, expiry="281231").scan_string for _ in range(args.traces)],
            "case": ["]d2" + gs1.compose({"00": rng.choice(cases)}).element_string for _ in range(max(1, args.traces // 4))],
            "pallet": ["urn:epc:id:sscc:" + (p := rng.choice(pallets))[1:8] + "." + p[0] + p[8:17] for _ in range(max(1, args.traces // 20))],
        }
        for kind, codes in samples.items():
            trace(store, codes[0])  # warm the connection pool and caches
            ms = []
            for code in codes:
                t0 = time.perf_counter()
                t = trace(store, code)
                ms.append((time.perf_counter() - t0) * 1000)
                assert t["found"], code
            result[f"trace_{kind}"] = lat(ms)
        ms = []
        for code in samples["unit"]:
            t0 = time.perf_counter()
            v = verify_code(store, code)
            ms.append((time.perf_counter() - t0) * 1000)
            assert v["verdict"] == "genuine", v
        result["verify_unit"] = lat(ms)
    finally:
        await store.close()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--units", type=int, default=1_000_000)
    p.add_argument("--per-case", type=int, default=120)
    p.add_argument("--per-pallet", type=int, default=40)
    p.add_argument("--traces", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed-only", action="store_true")
    p.add_argument("--loose", action="store_true", help="also time a recall with loose commissioned units (copies the 1 GB seed)")
    args = p.parse_args()
    from linectl.logging import setup_logging

    setup_logging("warning")
    if args.seed_only:
        OUT.mkdir(parents=True, exist_ok=True)
        asyncio.run(seed(OUT / f"trace_seed_{args.units}.db", args.units, args.per_case, args.per_pallet))
        return 0
    print(json.dumps(asyncio.run(run(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
