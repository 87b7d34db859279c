"""Serial allocation benchmark (plain script, not a test): serials/s per scheme, in blocks, committed durably.

    .venv/bin/python bench/bench_serials.py [--total N] [--block B] [--dir DIR]

Target: >= 100,000 serials/s in blocks. Each allocate() is one transaction
(synchronous=FULL); random serials are new rows checked for uniqueness by the
(gtin, serial) key, pool serials are provisioned rows taken in order.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from linectl.config import PoolSerials, RandomSerials, SequentialSerials  # noqa: E402
from linectl.logging import setup_logging  # noqa: E402
from linectl.store import Store  # noqa: E402
from linectl.store.serials import random_serials  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store import machine  # noqa: E402

GTIN = "09501101530003"


async def run(d: Path, total: int, block: int) -> None:
    t = time.perf_counter()
    random_serials(total, "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ", 12)
    gen = total / (time.perf_counter() - t)
    print(f"generation only (secrets + translate): {gen:,.0f} serials/s")

    for name, scheme, blk in (
        ("random 12 of 34", RandomSerials(scheme="random", length=12), block),
        ("random 12 of 34", RandomSerials(scheme="random", length=12), block * 10),
        ("sequential", SequentialSerials(scheme="sequential", width=12), block),
    ):
        store = await Store.open(d / f"{name.split()[0]}{blk}.db")
        await store.create_batch("B", GTIN, "271231", 10**9, actor="bench")
        t = time.perf_counter()
        got = 0
        quarters = []
        tq = t
        while got < total:
            got += len(await store.allocate(GTIN, "B", min(blk, total - got), scheme))
            if got * 4 // total > len(quarters):
                now = time.perf_counter()
                quarters.append(total / 4 / (now - tq))
                tq = now
        dt = time.perf_counter() - t
        await store.close()
        print(f"allocate {name}: {total:,} in blocks of {blk:,}: {total / dt:,.0f} serials/s (durable); "
              f"per quarter of the registry: {', '.join(f'{q:,.0f}' for q in quarters)}")

    store = await Store.open(d / "pool.db")
    await store.create_batch("B", GTIN, "271231", 10**9, actor="bench")
    pool = random_serials(total, "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ", 16)
    t = time.perf_counter()
    acc = 0
    for i in range(0, total, block):
        acc += (await store.provision(GTIN, pool[i : i + block], "bench")).accepted
    dt = time.perf_counter() - t
    print(f"provision (validate + insert): {acc:,} in blocks of {block:,}: {acc / dt:,.0f} serials/s (durable)")
    t = time.perf_counter()
    got = 0
    sch = PoolSerials(scheme="pool", low_water=0)
    while got < acc:
        got += len(await store.allocate(GTIN, "B", min(block, acc - got), sch))
    dt = time.perf_counter() - t
    await store.close()
    print(f"allocate pool: {got:,} in blocks of {block:,}: {got / dt:,.0f} serials/s (durable)")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--total", type=int, default=1_000_000)
    ap.add_argument("--block", type=int, default=10_000)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    setup_logging("warning")
    d = Path(a.dir or tempfile.mkdtemp(prefix="linectl-bench-"))
    d.mkdir(parents=True, exist_ok=True)
    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')} — {machine()} — load average {os.getloadavg()[0]:.1f}")
    try:
        await run(d, a.total, a.block)
    finally:
        if a.dir is None:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
