"""Catch-up after a long outage: drain a 1,000,000-row backlog while the line keeps producing.

    .venv/bin/python bench/bench_catchup.py [--backlog 1000000] [--live-rate 100] [--port 1883] [--after-s 5]

The outbox is seeded once into bench/out/ (backlog lot OLD appended, serials of
lot LIVE sent and waiting) and copied for each run. The forwarder starts on
the full backlog; a producer in the same process (like the engine) appends
one LIVE UnitCommissioned every 1/rate s. A subscriber in its own process
notes when each LIVE eventID arrives. Reported: drain time of the backlog,
and the live end-to-end delay (durably stored -> received by the subscriber)
p50/p99/max, during the catch-up and after it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import GTIN, OUT, bench_config, fresh_copy, machine, seed  # noqa: E402


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))] * 1000, 1)


def subscriber_main(args: argparse.Namespace) -> int:
    import aiomqtt

    async def go() -> None:
        arrivals: dict[str, float] = {}
        total = 0
        async with aiomqtt.Client("127.0.0.1", args.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
            await c.subscribe(f"{args.root}/events", qos=1)
            await c.subscribe(f"{args.root}/bench/done", qos=1)
            print("SUB READY", flush=True)
            async for m in c.messages:
                now = time.time()
                if str(m.topic).endswith("/bench/done"):
                    break
                p = bytes(m.payload)
                total += p.count(b'"eventID"')
                if b'"LIVE"' in p:
                    for e in json.loads(p)["epcisBody"]["eventList"]:
                        if e.get("ilmd", {}).get("cbvmda:lotNumber") == "LIVE":
                            arrivals.setdefault(e["eventID"], now)
        print(json.dumps({"total": total, "arrivals": arrivals}), flush=True)

    asyncio.run(go())
    return 0


async def run(args: argparse.Namespace) -> dict:
    import aiomqtt

    from linectl import events as ev
    from linectl.forwarder import Forwarder
    from linectl.store import Store

    live_max = int(args.live_rate * 3600)  # serials ready for an hour of live production
    OUT.mkdir(parents=True, exist_ok=True)
    seed_path = OUT / f"catchup_seed_{args.backlog}.db"
    if not seed_path.exists():
        print(f"seeding {args.backlog} backlog rows into {seed_path} (once; takes a while)", file=sys.stderr)
        await seed(seed_path, {"OLD": (args.backlog, True), "LIVE": (live_max, False)})
    run_path = OUT / "catchup_run.db"
    fresh_copy(seed_path, run_path)
    root = f"bench/{uuid.uuid4().hex[:8]}"
    cfg = bench_config(args.port, root, args.max_events)
    sub = subprocess.Popen([sys.executable, __file__, "--subscriber", "--root", root, "--port", str(args.port)], stdout=subprocess.PIPE, text=True)
    assert sub.stdout is not None
    assert sub.stdout.readline().strip() == "SUB READY"

    store = await Store.open(run_path)
    backlog0 = store.backlog()
    # the LIVE serials are 'sent' in the seed: the producer only appends their commissioning
    live_serials = [f"LIVE{i:010d}" for i in range(live_max)]
    stored_at: dict[str, float] = {}
    during: set[str] = set()
    fwd = Forwarder(cfg, store, max_inflight=args.inflight, catchup_threshold=args.threshold, catchup_max_rate=None if args.max_rate <= 0 else args.max_rate)
    stop_producing = asyncio.Event()
    append_ms: list[float] = []

    async def produce() -> None:
        i = 0
        period = 1.0 / args.live_rate
        next_t = time.monotonic()
        while not stop_producing.is_set() and i < live_max:
            e = ev.UnitCommissioned(gtin=GTIN, serial=live_serials[i], lot="LIVE", expiry="271200")
            t_a = time.time()
            await store.append(e)
            stored_at[e.event_id] = time.time()
            append_ms.append((stored_at[e.event_id] - t_a) * 1000)
            if fwd.catch_up is not None:
                during.add(e.event_id)
            if args.notify:
                fwd.notify()
            i += 1
            next_t += period
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))

    t0 = time.time()
    task = asyncio.create_task(fwd.run())
    while fwd.catch_up is None and time.time() - t0 < 10:
        await asyncio.sleep(0.001)
    started = fwd.catch_up is not None
    # the line produced all along; what it produced before the reconnect is backlog by definition,
    # so the live measurement starts with the catch-up
    producer = asyncio.create_task(produce())
    while fwd.catch_up is not None:
        await asyncio.sleep(0.05)
    t_drained = time.time()
    await asyncio.sleep(args.after_s)
    stop_producing.set()
    await producer
    while store.backlog() > 0:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    async with aiomqtt.Client("127.0.0.1", args.port) as c:
        await c.publish(f"{root}/bench/done", b"1", qos=1)
    res = json.loads(sub.stdout.readline())
    sub.wait(30)
    await fwd.stop()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await store.close()

    arrivals = res["arrivals"]
    missing = [k for k in stored_at if k not in arrivals]
    d_during = [arrivals[k] - stored_at[k] for k in stored_at if k in during and k in arrivals]
    d_after = [arrivals[k] - stored_at[k] for k in stored_at if k not in during and k in arrivals]
    drain = t_drained - t0
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "backlog_rows": backlog0,
        "catch_up_mode": started,
        "drain_s": round(drain, 1),
        "drain_events_per_s": round(backlog0 / drain) if drain else None,
        "live_rate_per_s": args.live_rate,
        "live_events": len(stored_at),
        "live_missing": len(missing),
        "subscriber_events_total": res["total"],
        "live_delay_ms_during_catch_up": {"n": len(d_during), "p50": pct(d_during, 0.5), "p99": pct(d_during, 0.99), "max": pct(d_during, 1.0)},
        "live_delay_ms_after": {"n": len(d_after), "p50": pct(d_after, 0.5), "p99": pct(d_after, 0.99), "max": pct(d_after, 1.0)},
        "store_append_ms": {"p50": pct([x / 1000 for x in append_ms], 0.5), "p99": pct([x / 1000 for x in append_ms], 0.99),
            "max": pct([x / 1000 for x in append_ms], 1.0)},
        "catchup_max_rate": args.max_rate or None,
        "notify": args.notify,
        "max_events_per_message": args.max_events,
        "max_inflight": args.inflight,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--backlog", type=int, default=1_000_000)
    p.add_argument("--live-rate", type=float, default=100.0)
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--max-events", type=int, default=500)
    p.add_argument("--inflight", type=int, default=20)
    p.add_argument("--threshold", type=int, default=20_000, help="catch-up threshold (rows)")
    p.add_argument("--max-rate", type=float, default=10_000, help="catch-up pacing, rows/s (0 = unpaced)")
    p.add_argument("--after-s", type=float, default=5.0, help="keep producing this long after the drain")
    p.add_argument("--notify", action="store_true", help="producer calls forwarder.notify() after each append (else the 50 ms poll)")
    p.add_argument("--subscriber", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.subscriber:
        return subscriber_main(args)
    from linectl.logging import setup_logging

    setup_logging("warning")
    print(json.dumps(asyncio.run(run(args)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
