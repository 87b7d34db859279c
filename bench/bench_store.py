"""Store benchmarks (plain script, not a test): durable group-commit throughput, commit latency at line rate, RSS.

    .venv/bin/python bench/bench_store.py [throughput|latency|rss|all] [--events N] [--dir DIR]

Every figure is for synchronous=FULL commits: an event counts once its append
returned, i.e. once its transaction was fsynced.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from linectl import events as ev  # noqa: E402
from linectl.config import RandomSerials  # noqa: E402
from linectl.logging import setup_logging  # noqa: E402
from linectl.store import Store  # noqa: E402

GTIN = "09501101530003"
SCHEME = RandomSerials(scheme="random", length=12)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> str:
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                     if ln.startswith("Model name"))
    except Exception:  # noqa: BLE001
        model = platform.processor() or "?"
    return f"{os.cpu_count()} CPU(s), {model}, Python {platform.python_version()}"


async def prepare(store: Store, n: int, lot: str = "BENCH") -> list[str]:
    """n serials allocated and sent (the state UnitCommissioned needs)."""
    if store.batch(lot) is None:
        await store.create_batch(lot, GTIN, "271231", 100_000_000, actor="bench")
    out: list[str] = []
    block = 50_000
    for i in range(0, n, block):
        got = await store.allocate(GTIN, lot, min(block, n - i), SCHEME)
        await store.mark_sent(GTIN, lot, got)
        out += got
    return out


def uuid7_urn() -> str:
    """A time-ordered UUID (RFC 9562 v7): what new_event_id() would make if it switched from v4."""
    ms = time.time_ns() // 1_000_000
    r = int.from_bytes(secrets.token_bytes(10), "big")
    v = (ms << 80) | (0x7 << 76) | (((r >> 64) & 0xFFF) << 64) | (0b10 << 62) | (r & ((1 << 62) - 1))
    return f"urn:uuid:{uuid.UUID(int=v)}"


def commissioned(serials: list[str], lot: str = "BENCH", v7: bool = False) -> list[ev.UnitCommissioned]:
    extra = (lambda: {"event_id": uuid7_urn()}) if v7 else dict  # noqa: E731
    return [ev.UnitCommissioned(gtin=GTIN, serial=s, lot=lot, expiry="271231", station="pv1", seq=i, grade=3.5, **extra())
            for i, s in enumerate(serials)]


#: set by --epcis: render each event's EPCIS when it is stored, as the daemon does (linectl.epcis)
RENDER_EPCIS = False


def with_mapper(store: Store) -> Store:
    if RENDER_EPCIS:
        from linectl.epcis import EpcisMapper

        sgln = "urn:epc:id:sgln:9501101.00001.0"
        store.set_epcis_mapper(EpcisMapper(read_point=sgln, biz_location=sgln, timezone="Europe/Berlin", cp_lengths={GTIN: 7},
                                           read_points={"pv1": "urn:epc:id:sgln:9501101.00001.pv1"}))
    return store


async def bench_throughput(d: Path, n: int) -> None:
    for mode, per_append, producers, v7 in (
        ("one event per append", 1, 2000, False),
        ("100 events per append", 100, 40, False),
        ("one event per append, uuid7 event ids", 1, 2000, True),
        ("100 events per append, uuid7 event ids", 100, 40, True),
    ):
        db = d / f"tp_{per_append}_{v7}.db"
        store = with_mapper(await Store.open(db, group_commit_max=2000, queue_max=50_000))
        serials = await prepare(store, n)
        events = commissioned(serials, v7=v7)
        chunks = [events[i : i + per_append] for i in range(0, n, per_append)]
        it = iter(chunks)

        async def producer() -> None:
            for chunk in it:  # noqa: B023 (gathered before the loop moves on)
                await store.append(*chunk)  # noqa: B023

        g0 = store.stats()["writer"]["groups"]
        t0 = time.perf_counter()
        await asyncio.gather(*(producer() for _ in range(producers)))
        dt = time.perf_counter() - t0
        st = store.stats()["writer"]
        groups = st["groups"] - g0
        assert store.backlog() == n
        await store.close()
        rendered = ", EPCIS rendered at append" if RENDER_EPCIS else ""
        print(f"throughput [{mode}, {producers} producers{rendered}]: {n} UnitCommissioned in {dt:.2f} s = {n / dt:,.0f} events/s durable "
              f"({groups} commits, {n / max(groups, 1):.0f} events/commit)")


async def bench_latency(d: Path, seconds: float, rate: float) -> None:
    db = d / "lat.db"
    store = await Store.open(db)
    n = int(seconds * rate)
    serials = await prepare(store, n + 10)
    events = commissioned(serials)
    lat: list[float] = []
    period = 1.0 / rate
    start = time.perf_counter()

    async def one(e: ev.Event) -> None:
        t = time.perf_counter()
        await store.append(e)
        lat.append((time.perf_counter() - t) * 1000)

    tasks = []
    for i in range(n):
        target = start + i * period
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(events[i])))
    await asyncio.gather(*tasks)
    commit = sorted(store._writer.commit_ms) if store._writer else []
    await store.close()
    lat.sort()
    p = lambda xs, q: xs[min(len(xs) - 1, int(len(xs) * q))]  # noqa: E731
    print(f"latency at {rate:.0f} events/s for {seconds:.0f} s ({n} appends): append->durable p50 {p(lat, .5):.2f} ms, "
          f"p99 {p(lat, .99):.2f} ms, max {lat[-1]:.2f} ms; writer commit p99 {p(commit, .99):.2f} ms (last {len(commit)} groups)")


async def bench_rss(d: Path, n: int) -> None:
    db = d / "rss.db"
    store = await Store.open(db)
    block = 50_000
    await store.create_batch("BENCH", GTIN, "271231", 100_000_000, actor="bench")
    samples: list[tuple[int, float]] = []
    done = 0
    t0 = time.perf_counter()
    rss_start = rss_mib()
    while done < n:
        # serials for the next block, then its events in appends of 500 from 4 producers (events made on the fly)
        serials = await store.allocate(GTIN, "BENCH", min(block, n - done), SCHEME)
        await store.mark_sent(GTIN, "BENCH", serials)
        chunks = iter(range(0, len(serials), 500))

        async def producer() -> None:
            for i in chunks:  # noqa: B023 (gathered before the loop moves on)
                await store.append(*commissioned(serials[i : i + 500]))  # noqa: B023

        await asyncio.gather(*(producer() for _ in range(4)))
        done += len(serials)
        samples.append((done, rss_mib()))
    dt = time.perf_counter() - t0
    size = os.path.getsize(db) + os.path.getsize(str(db) + "-wal")
    await store.close()
    q = max(1, len(samples) // 4)
    first = statistics.mean(r for _, r in samples[:q])
    last = statistics.mean(r for _, r in samples[-q:])
    print(f"rss over {n:,} events (+ their serials) in {dt:.0f} s: start {rss_start:.0f} MiB, first quartile mean {first:.0f} MiB, "
          f"last quartile mean {last:.0f} MiB ({(last - first) / first * 100:+.1f} %); end of Q1 {samples[q - 1][1]:.0f} MiB, "
          f"end {samples[-1][1]:.0f} MiB ({(samples[-1][1] - samples[q - 1][1]) / samples[q - 1][1] * 100:+.1f} %); db+wal {size / 1e6:.0f} MB")
    print("  rss samples (events: MiB): " + ", ".join(f"{k // 1000}k:{r:.0f}" for k, r in samples))


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="?", default="all", choices=["throughput", "latency", "rss", "all"])
    ap.add_argument("--events", type=int, default=200_000, help="events for the throughput runs")
    ap.add_argument("--rss-events", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--epcis", action="store_true", help="render each event's EPCIS when stored, as the daemon does")
    ap.add_argument("--dir", default=None, help="where to put the databases (default: a temp dir, removed after)")
    a = ap.parse_args()
    global RENDER_EPCIS
    RENDER_EPCIS = a.epcis
    setup_logging("warning")
    d = Path(a.dir or tempfile.mkdtemp(prefix="linectl-bench-"))
    d.mkdir(parents=True, exist_ok=True)
    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')} — {machine()} — load average {os.getloadavg()[0]:.1f} — db in {d}")
    try:
        if a.what in ("throughput", "all"):
            await bench_throughput(d, a.events)
        if a.what in ("latency", "all"):
            await bench_latency(d, a.seconds, a.rate)
        if a.what in ("rss", "all"):
            await bench_rss(d, a.rss_events)
    finally:
        if a.dir is None:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
