"""Serials provisioned from a real QU4RTET through linectl's sources (plain script, not a test).

    .venv/bin/python bench/bench_l4_serials.py [--total 100000] [--page 1000] [--modes rest-random,sap-random,...]

Starts QU4RTET with the tests' harness (tests/l4/harness.py: own venv, `runserver --nothreading`), makes one
pool per mode and asks `--total` serials in pages of `--page` through SerialboxSource (REST) or
NumberRangeSource (SOAP), as the provisioner would: one request after the other, every page parsed and checked
(AI 21 format, repeats). Prints the time of each block of 10,000 and the totals. Serials are not stored here
(the store's import is bench_serials.py's figure): this is the L4 round trip and linectl's parsing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchinfo import machine  # noqa: E402
from linectl.config import SourceAuth  # noqa: E402
from linectl.logging import setup_logging  # noqa: E402
from linectl.sources.base import SerialRequest  # noqa: E402
from linectl.sources.number_range import NumberRangeSource  # noqa: E402
from linectl.sources.serialbox import SerialboxSource  # noqa: E402
from tests.l4.harness import Qu4rtet  # noqa: E402

MODES = ("rest-random", "rest-sequential", "sap-random", "sap-sequential", "unitrace-random", "tracelink-random", "tracelink-gs1-random")
BLOCK = 10_000


def make_source(q: Qu4rtet, mode: str, page: int) -> SerialboxSource | NumberRangeSource:
    os.environ["BENCH_QU4RTET_TOKEN"] = q.token
    auth = SourceAuth(type="token", token_env="BENCH_QU4RTET_TOKEN")
    protocol, _, kind = mode.rpartition("-")
    if protocol == "rest":
        return SerialboxSource(q.base_url, page_size=page, auth=auth, timeout_s=120)
    flavour = protocol.split("-")[0]
    return NumberRangeSource(
        q.soap_url(flavour), flavour=flavour, sending_system="BENCH", receiving_system="QU4RTET",
        randomized=kind == "random", page_size=page, auth=auth, timeout_s=120,
    )


async def run_mode(q: Qu4rtet, mode: str, gtin: str, total: int, page: int) -> dict[str, Any]:
    src = make_source(q, mode, page)
    req = SerialRequest(request_id=1, gtin=gtin, size=total, key="bench")
    got: list[str] = []
    blocks: list[float] = []
    requests = 0
    t0 = block_start = time.perf_counter()
    continuation: str | None = None
    while True:
        p = await src.request(req, continuation)
        requests += 1
        if p.foreign:
            raise SystemExit(f"{mode}: {len(p.foreign)} serials refused, e.g. {p.foreign[0]}")
        got += p.serials
        while len(got) >= BLOCK * (len(blocks) + 1):
            now = time.perf_counter()
            blocks.append(now - block_start)
            block_start = now
        if not p.more:
            break
        continuation = p.continuation
    elapsed = time.perf_counter() - t0
    await src.aclose()
    if len(got) != total or len(set(got)) != total:
        raise SystemExit(f"{mode}: {len(got)} serials, {len(set(got))} distinct; expected {total}")
    return {"mode": mode, "elapsed": elapsed, "blocks": blocks, "requests": requests}


async def main_async(args: argparse.Namespace) -> None:
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES)}")
    with tempfile.TemporaryDirectory(prefix="bench-l4-") as tmp, Qu4rtet(Path(tmp)) as q:
        gtins = {m: q.new_gtin() for m in modes}
        specs = []
        for m in modes:
            protocol, _, kind = m.rpartition("-")
            lo, hi = (1, 10**12) if kind == "random" else (1, 10**9)
            spec: dict[str, Any] = dict(machine_name=gtins[m], kind=kind, minimum=lo, maximum=hi, request_threshold=args.page)
            if protocol != "rest":
                spec["response"] = protocol.split("-")[0]
                spec["element_strings"] = protocol == "tracelink-gs1"
            specs.append(spec)
        q.create_pools(specs)
        print(machine(), flush=True)
        print(f"QU4RTET at {q.base_url}; {args.total:,} serials per mode in pages of {args.page:,}", flush=True)
        for m in modes:
            r = await run_mode(q, m, gtins[m], args.total, args.page)
            per_block = ", ".join(f"{b:.2f}" for b in r["blocks"])
            rate = args.total / r["elapsed"]
            print(
                f"{m:22s} {r['elapsed']:7.2f} s total, {r['requests']} requests, {rate:8,.0f} serials/s; "
                f"s per 10,000: {per_block}",
                flush=True,
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--total", type=int, default=100_000)
    p.add_argument("--page", type=int, default=1000, help="serials per request (also the pools' request_threshold)")
    p.add_argument("--modes", default=",".join(MODES))
    args = p.parse_args()
    setup_logging("warning")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
