"""The epcis_rest sink into the EPCIS 2.0 repository simulator (its own process), over real HTTP on loopback.

    .venv/bin/python bench/bench_epcis_rest.py [--backlog 1000000] [--live-rate 10] [--after-s 20]
                                               [--max-events 1000] [--inflight 4] [--sustained 200000]
                                               [--catchup-max-rate 10000]

1. Sustained: a store holding `--sustained` commissioning events (rendered when stored, as the daemon does) is
   drained by the sink into the repository; events/s = events / time until the cursor reaches the end. Unpaced
   (`catchup_max_rate: null`): what the sink and repository can carry.
2. Catch-up: a `--backlog` event store (seeded once into bench/out/, copied per run) drains while a synthetic writer
   in the sink's process (as the engine would be) appends one LIVE event every 1/`--live-rate` s (10/s = 600 upm).
   The backlog lane is paced to `--catchup-max-rate` (the config's default 10,000/s; 0 = unpaced).
   Reported: drain time and rate, the line's store append latency, and the live delay (durably stored -> stored by the repository) p50/p99/max,
   during the catch-up and after it.
The repository validates every document against the official schema (jsonschema-rs) and keeps every event; the
run checks that it holds every outbox event exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchinfo  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
GTIN = "04012345000016"


def bench_config(url: str, max_events: int, inflight: int, max_age_s: float, catchup_max_rate: float | None) -> Any:
    from linectl.config import parse_config

    return parse_config({
        "line": {"enterprise": "bench", "site": "s1", "area": "pack", "name": "line1", "gln": "4012345000009", "company_prefix_length": 7},
        "products": [{"gtin": GTIN, "name": "Bench", "company_prefix_length": 7, "serials": {"scheme": "pool", "low_water": 0}}],
        "mqtt": {"enabled": False},
        "upstream": {"epcis_rest": [{"name": "bench", "url": url, "max_events": max_events, "inflight": inflight, "max_age_s": max_age_s,
                                     "max_bytes": 16 * 1024 * 1024, "catchup_max_rate": catchup_max_rate}]},
    })


async def seed(path: Path, lots: dict[str, tuple[int, bool]], cfg: Any) -> None:
    """lots: name -> (count, append UnitCommissioned rows now?); the rest are left 'sent' for the live writer."""
    from linectl import events as ev
    from linectl.config import PoolSerials
    from linectl.epcis import EpcisMapper
    from linectl.store import Store

    tmp = path.with_suffix(".tmp")
    for suffix in ("", "-wal", "-shm"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    store = await Store.open(tmp)
    store.set_epcis_mapper(EpcisMapper.from_config(cfg))  # rendered once when stored, as in the daemon
    chunk = 50_000
    for lot, (count, append) in lots.items():
        await store.create_batch(lot, GTIN, "271200", 100_000_000, actor="bench")
        for start in range(0, count, chunk):
            n = min(chunk, count - start)
            serials = [f"{lot}{i:010d}" for i in range(start, start + n)]
            await store.provision(GTIN, serials, source="bench")
            got = await store.allocate(GTIN, lot, n, PoolSerials(scheme="pool", low_water=0))
            await store.mark_sent(GTIN, lot, got)
            if append:
                evs = [ev.UnitCommissioned(gtin=GTIN, serial=s, lot=lot, expiry="271200") for s in got]
                for i in range(0, n, 5000):
                    await store.append(*evs[i : i + 5000])
            print(f"  seeded {lot}: {start + n}/{count}", file=sys.stderr, flush=True)
    await store.close()
    os.replace(tmp, path)


def fresh_copy(seed_path: Path, run_path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(str(run_path) + suffix).unlink(missing_ok=True)
    shutil.copyfile(seed_path, run_path)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))] * 1000, 1)


def cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by this process or by `pid` (/proc/<pid>/stat)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


REPO_PID: int | None = None


def start_repository() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "linectl.simulators.epcis_repository", "--port", "0"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "READY" not in line:
        raise SystemExit(f"repository did not start: {line!r}")
    return proc, line.split()[3]


async def run_sustained(args: argparse.Namespace, url: str) -> dict[str, Any]:
    from linectl.store import Store
    from linectl.upstream.epcis_rest import EpcisRestSink

    cfg = bench_config(url, args.max_events, args.inflight, 0.2, None)
    seed_path = OUT / f"epcis_rest_seed_{args.sustained}.db"
    if not seed_path.exists():
        print(f"seeding {args.sustained} events into {seed_path} (once)", file=sys.stderr)
        await seed(seed_path, {"SUS": (args.sustained, True)}, cfg)
    run_path = OUT / "epcis_rest_run.db"
    fresh_copy(seed_path, run_path)
    store = await Store.open(run_path)
    (sink,) = EpcisRestSink.from_config(cfg, store)
    store.set_sinks([sink.name])
    async with httpx.AsyncClient() as c:
        before = (await c.get(f"{url}/_sim/stats")).json()["events"]
    t0 = time.time()
    c0, r0 = cpu_s(), cpu_s(REPO_PID)
    task = asyncio.create_task(sink.run())
    last = store.last_seq()
    while sink.reader.cursor < last:  # not store.sink_backlog(): a count over the rows left costs the sink's process
        await asyncio.sleep(0.05)
    dt = time.time() - t0
    c1, r1 = cpu_s(), cpu_s(REPO_PID)
    st = sink.status()
    await sink.stop()
    await asyncio.gather(task, return_exceptions=True)
    await store.close()
    async with httpx.AsyncClient() as c:
        after = (await c.get(f"{url}/_sim/stats")).json()
    return {
        "events": args.sustained, "seconds": round(dt, 2), "events_per_s": round(args.sustained / dt),
        "repository_stored": after["events"] - before, "duplicates": after["duplicates"], "documents": st["documents_delivered"],
        "max_events": st["limits"]["events"], "inflight": args.inflight,
        # CPU per event on each side: what the pipeline could do with a core each to itself
        "sink_cpu_us_per_event": round((c1 - c0) / args.sustained * 1e6, 1),
        "repository_cpu_us_per_event": round((r1 - r0) / args.sustained * 1e6, 1),
        "ceiling_events_per_s_one_core_each": round(1e6 / max((c1 - c0) / args.sustained * 1e6, (r1 - r0) / args.sustained * 1e6)),
    }


async def run_catchup(args: argparse.Namespace, url: str) -> dict[str, Any]:
    from linectl import events as ev
    from linectl.store import Store
    from linectl.upstream.epcis_rest import EpcisRestSink

    cfg = bench_config(url, args.max_events, args.inflight, args.max_age_s, args.catchup_max_rate)
    live_max = int(args.live_rate * 3600)
    seed_path = OUT / f"epcis_rest_catchup_seed_{args.backlog}.db"
    if not seed_path.exists():
        print(f"seeding {args.backlog} backlog events into {seed_path} (once; takes a while)", file=sys.stderr)
        await seed(seed_path, {"OLD": (args.backlog, True), "LIVE": (live_max, False)}, cfg)
    run_path = OUT / "epcis_rest_catchup_run.db"
    fresh_copy(seed_path, run_path)
    store = await Store.open(run_path)
    from linectl.epcis import EpcisMapper

    store.set_epcis_mapper(EpcisMapper.from_config(cfg))
    (sink,) = EpcisRestSink.from_config(cfg, store)
    store.set_sinks([sink.name])
    backlog0 = store.sink_backlog(sink.name)
    last0 = store.last_seq()
    stored_at: dict[str, float] = {}
    during: set[str] = set()
    append_ms: list[float] = []
    stop_writing = asyncio.Event()
    draining = True

    async def writer() -> None:
        i = 0
        period = 1.0 / args.live_rate
        next_t = time.monotonic()
        while not stop_writing.is_set() and i < live_max:
            e = ev.UnitCommissioned(gtin=GTIN, serial=f"LIVE{i:010d}", lot="LIVE", expiry="271200")
            t_a = time.time()
            await store.append(e)
            stored_at[e.event_id] = time.time()
            append_ms.append(stored_at[e.event_id] - t_a)
            if draining:
                during.add(e.event_id)
            sink.notify()
            i += 1
            next_t += period
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))

    t0 = time.time()
    task = asyncio.create_task(sink.run())
    # what the line made before the sink saw the backlog is backlog by definition: the live measurement starts with
    # the catch-up (as in bench_catchup.py)
    while not sink.status()["catching_up"] and time.time() - t0 < 30:
        await asyncio.sleep(0.001)
    producer = asyncio.create_task(writer())
    while sink.reader.cursor < last0:  # drained: the cursor passed the last backlog row
        await asyncio.sleep(0.1)
    draining = False
    t_drained = time.time()
    await asyncio.sleep(args.after_s)
    stop_writing.set()
    await producer
    last = store.last_seq()
    while sink.reader.cursor < last:
        await asyncio.sleep(0.05)
    st = sink.status()
    await sink.stop()
    await asyncio.gather(task, return_exceptions=True)
    async with httpx.AsyncClient(timeout=120) as c:
        captured = (await c.post(f"{url}/_sim/captured-at", json=list(stored_at))).json()
        stats = (await c.get(f"{url}/_sim/stats")).json()
    await store.close()
    missing = [k for k, v in captured.items() if v is None]
    d_during = [captured[k] - stored_at[k] for k in stored_at if k in during and captured.get(k) is not None]
    d_after = [captured[k] - stored_at[k] for k in stored_at if k not in during and captured.get(k) is not None]
    dt = t_drained - t0
    return {
        "backlog_events": backlog0, "drain_s": round(dt, 1), "drain_events_per_s": round(backlog0 / dt),
        "live_rate_per_s": args.live_rate, "live_events": len(stored_at), "live_missing": len(missing),
        "live_delay_ms_during_catch_up": {"n": len(d_during), "p50": pct(d_during, 0.5), "p99": pct(d_during, 0.99), "max": pct(d_during, 1.0)},
        "live_delay_ms_after": {"n": len(d_after), "p50": pct(d_after, 0.5), "p99": pct(d_after, 0.99), "max": pct(d_after, 1.0)},
        "store_append_ms": {"p50": pct(append_ms, 0.5), "p99": pct(append_ms, 0.99), "max": pct(append_ms, 1.0)},
        "repository": {k: stats[k] for k in ("events", "duplicates", "jobs", "documents_invalid")},
        "sink": {k: st[k] for k in ("documents_delivered", "events_delivered", "events_already_there", "last_error")},
        "max_events": st["limits"]["events"], "inflight": args.inflight, "max_age_s": args.max_age_s,
        "catchup_max_rate": args.catchup_max_rate,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--backlog", type=int, default=1_000_000)
    p.add_argument("--sustained", type=int, default=200_000)
    p.add_argument("--live-rate", type=float, default=10.0, help="live events/s (10 = 600 upm)")
    p.add_argument("--after-s", type=float, default=20.0, help="keep writing this long after the catch-up")
    p.add_argument("--max-events", type=int, default=1000)
    p.add_argument("--inflight", type=int, default=4)
    p.add_argument("--max-age-s", type=float, default=0.2)
    p.add_argument("--skip-catchup", action="store_true")
    p.add_argument("--catchup-max-rate", type=float, default=10_000.0,
                   help="the sink's catchup_max_rate in the catch-up run (0: unpaced); the sustained run is always unpaced")
    args = p.parse_args()
    args.catchup_max_rate = args.catchup_max_rate or None
    from linectl.logging import setup_logging

    setup_logging("warning")
    OUT.mkdir(parents=True, exist_ok=True)
    repo, url = start_repository()
    global REPO_PID
    REPO_PID = repo.pid
    try:
        result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": benchinfo.machine(),
                                  "load_before": os.getloadavg()[0]}
        result["sustained"] = asyncio.run(run_sustained(args, url))
        print(json.dumps(result, indent=1), flush=True)
        if not args.skip_catchup:
            result["catchup"] = asyncio.run(run_catchup(args, url))
        result["load_after"] = os.getloadavg()[0]
        print(json.dumps(result, indent=1), flush=True)
    finally:
        repo.terminate()
        repo.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
