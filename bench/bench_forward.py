"""Sustained forwarding rate: a pre-filled outbox -> EPCIS documents -> local Mosquitto, QoS 1.

    .venv/bin/python bench/bench_forward.py [--events 200000] [--port 1883] [--max-events 500] [--inflight 20]

The outbox is seeded once (valid UnitCommissioned rows: serials provisioned,
allocated and sent first, as the engine does) into bench/out/ and copied for
each run. A subscriber in its own process counts the eventIDs it receives.
The rate is events marked forwarded (after PUBACK) per second of wall time,
and the subscriber's rate between its first and last message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import benchinfo  # noqa: E402 - bench/ is the script's own directory

OUT = REPO / "bench" / "out"
GTIN = "04012345000016"


def bench_config(port: int, root: str, max_events: int, protocol: str = "5") -> object:
    from linectl.config import parse_config

    return parse_config(
        {
            "line": {"enterprise": "bench", "site": "s1", "area": "pack", "name": "line1", "gln": "4012345000009", "company_prefix_length": 7},
            "products": [{"gtin": GTIN, "name": "Bench", "company_prefix_length": 7, "serials": {"scheme": "pool", "low_water": 0}}],
            "mqtt": {"host": "127.0.0.1", "port": port, "topic_root": root, "max_events_per_message": max_events, "protocol": protocol},
        }
    )


async def seed(path: Path, lots: dict[str, tuple[int, bool]]) -> None:
    """lots: name -> (count, append UnitCommissioned rows now?). Rows not appended are left 'sent' for a live producer."""
    from linectl import events as ev
    from linectl.config import PoolSerials
    from linectl.store import Store

    tmp = path.with_suffix(".tmp")
    for suffix in ("", "-wal", "-shm"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    store = await Store.open(tmp)
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


def machine() -> str:
    mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()[:1] if shutil.which("mosquitto") else ["?"]
    return benchinfo.machine(mosq[0] if mosq else "?")


# --------------------------------------------------------------------------- subscriber process


def subscriber_main(args: argparse.Namespace) -> int:
    import aiomqtt

    async def go() -> None:
        stats = {"events": 0, "messages": 0, "bytes": 0, "first": None, "last": None}
        async with aiomqtt.Client("127.0.0.1", args.port, protocol=aiomqtt.ProtocolVersion.V5, max_queued_incoming_messages=0) as c:
            await c.subscribe(f"{args.root}/events", qos=1)
            print("SUB READY", flush=True)
            async for m in c.messages:
                now = time.time()
                p = bytes(m.payload)
                stats["events"] += p.count(b'"eventID"')
                stats["messages"] += 1
                stats["bytes"] += len(p)
                stats["first"] = stats["first"] or now
                stats["last"] = now
                if stats["events"] >= args.expect:
                    break
        print(json.dumps(stats), flush=True)

    asyncio.run(asyncio.wait_for(go(), args.timeout))
    return 0


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> dict:
    from linectl.forwarder import Forwarder
    from linectl.store import Store

    OUT.mkdir(parents=True, exist_ok=True)
    seed_path = OUT / f"forward_seed_{args.events}.db"
    if not seed_path.exists():
        print(f"seeding {args.events} events into {seed_path} (once)", file=sys.stderr)
        await seed(seed_path, {"BENCH": (args.events, True)})
    run_path = OUT / "forward_run.db"
    fresh_copy(seed_path, run_path)
    root = f"bench/{uuid.uuid4().hex[:8]}"
    cfg = bench_config(args.port, root, args.max_events)
    sub = subprocess.Popen(
        [sys.executable, __file__, "--subscriber", "--root", root, "--port", str(args.port), "--expect", str(args.events), "--timeout", "600"],
        stdout=subprocess.PIPE, text=True,
    )
    assert sub.stdout is not None
    assert sub.stdout.readline().strip() == "SUB READY"
    store = await Store.open(run_path)
    assert store.backlog() == args.events
    # pipeline capacity: unpaced (a 200k outbox is a catch-up, which the daemon paces to 10k rows/s by default)
    fwd = Forwarder(cfg, store, max_inflight=args.inflight, catchup_max_rate=None if args.max_rate <= 0 else args.max_rate, page_size=args.page)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.time()
    task = asyncio.create_task(fwd.run())
    while store.backlog() > 0:
        await asyncio.sleep(0.05)
    t1 = time.time()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    await fwd.stop()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await store.close()
    sub_stats = json.loads(sub.stdout.readline())
    sub.wait(10)
    elapsed = t1 - t0
    sub_span = (sub_stats["last"] - sub_stats["first"]) or 1e-9
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "events": args.events,
        "max_events_per_message": args.max_events,
        "max_inflight": args.inflight,
        "catchup_max_rate": args.max_rate or None,
        "page_size": args.page,
        "forwarded_per_s": round(args.events / elapsed),
        "wall_s": round(elapsed, 2),
        "subscriber_events": sub_stats["events"],
        "subscriber_per_s": round(sub_stats["events"] / sub_span),
        "messages": sub_stats["messages"],
        "mean_message_kb": round(sub_stats["bytes"] / max(1, sub_stats["messages"]) / 1024, 1),
        "forwarder_cpu_s": round((r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime), 2),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--max-events", type=int, default=500)
    p.add_argument("--inflight", type=int, default=20)
    p.add_argument("--page", type=int, default=500, help="outbox rows read per page")
    p.add_argument("--max-rate", type=float, default=0, help="catch-up pacing rows/s (default 0 = unpaced: measure capacity)")
    p.add_argument("--subscriber", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--expect", type=int, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=600, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.subscriber:
        return subscriber_main(args)
    from linectl.logging import setup_logging

    setup_logging("warning")
    print(json.dumps(asyncio.run(run(args)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
