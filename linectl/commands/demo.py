"""`linectl demo`: run a whole simulated line for one batch and print a summary (`--json`: one JSON object, last line)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="run a simulated line for one batch and summarise it")
    p.add_argument(
        "--config",
        help="line YAML, or the name of a shipped example (default: demo-line; demo-aggregation adds case and pallet "
        "stations; `linectl example` lists them)",
    )
    p.add_argument("--units", type=int, default=500, help="production units to commission (planned quantity)")
    p.add_argument("--rate", type=float, default=600.0, help="line speed, units per minute")
    p.add_argument("--defect-rate", type=float, default=0.03, help="fraction of units the simulator damages")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--camera", action="store_true", help="decode camera images locally instead of reader result lines")
    p.add_argument("--broker", help="HOST:PORT of an MQTT broker (default: an embedded one)")
    p.add_argument("--db", help="store path (default: a temporary file)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    p.add_argument(
        "--l3", choices=["sim", "real"], default="sim",
        help="sim (default): serial sources and EPCIS REST repositories the config names on 127.0.0.1/localhost are "
        "answered by simulators, epcis_xml directories go into the demo's folder; real: use them as configured "
        "(a QU4RTET, a repository of your own)",
    )
    p.add_argument(
        "--drive", choices=["engine", "packml", "opcua"], default="engine",
        help="packml: the simulated PLC resets and starts the batch through the PackTags command handshake (a config "
        "whose PLC has the packml_* tags, e.g. packml-line); opcua: a SCADA client calls Reset and Start on the line's "
        "OPC UA server as the store user operator (a config with opcua_server: and access:, e.g. packml-line); either "
        "way the batch ends in PackML Complete at the planned quantity. The OPC UA server runs whenever the config "
        "enables it: its endpoint and how to log in are printed at start",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from linectl.demo import DEFAULT_CONFIG, run_demo
    from linectl.packaged import ExampleNotFound, resolve_config
    from linectl.store.model import StoreError
    from linectl.yamlsource import ConfigFileError

    if args.config:
        try:
            args.config = str(resolve_config(args.config))
        except ExampleNotFound as exc:
            print(f"linectl demo: {exc}", file=sys.stderr)
            return 2
    if args.db and os.path.exists(args.db):
        problem = _open_batches(args.db)
        if problem:
            print(f"linectl demo: {problem}", file=sys.stderr)
            return 3
    try:
        summary = asyncio.run(run_demo(args))
    except RuntimeError as exc:
        print(f"linectl demo: {exc}", file=sys.stderr)
        return 1
    except StoreError as exc:
        print(f"linectl demo: store error: {exc}", file=sys.stderr)
        return 3
    except ConfigFileError as exc:
        for prob in exc.problems:
            print(prob.format(exc.file), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.db:
            cfg = args.config or DEFAULT_CONFIG
            print(
                f"linectl demo: interrupted; the store {args.db} keeps the batch as it was left. "
                f"Close it offline with `linectl batch close -c {cfg} --db {args.db} --unused void` "
                f"and see it with `linectl report --db {args.db} --batch LOT`",
                file=sys.stderr,
            )
        else:
            print("linectl demo: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(summary))
    else:
        _print_human(summary)
    ok = summary.get("missed_rejects") == 0 and summary.get("balanced")
    if "aggregation" in summary:
        ok = ok and not summary["aggregation"]["hierarchy_violations"]
    return 0 if ok and not upstream_problems(summary) else 1


def upstream_problems(summary: dict[str, Any]) -> list[str]:
    """What the upstream part of a demo summary shows wrong: a sink that did not deliver everything, a repository
    simulator that did not receive exactly the store's EPCIS events (its own record, not linectl's)."""
    up = summary.get("upstream") or {}
    out = [f"sink {name}: {s['backlog']} rows not delivered" for name, s in (up.get("sinks") or {}).items() if s["backlog"]]
    want = up.get("store_epcis_events")
    for name, got in ((up.get("simulators") or {}).get("repository_events") or {}).items():
        if got["distinct"] != want:
            out.append(f"repository {name} holds {got['distinct']} distinct events, the store {want}")
    return out


def _open_batches(db: str) -> str | None:
    """A demo on a store that still has an open batch (e.g. an interrupted demo) would be refused mid-way: say so first."""
    from linectl.store.cliutil import open_store, run_async

    found: list[str] = []

    async def look() -> int:
        store = await open_store(db, None, readonly=True, command="linectl demo")
        try:
            found.extend(f"{b.lot} ({b.state})" for b in store.batches() if b.state != "closed")
        finally:
            await store.close()
        return 0

    rc = run_async(look)
    if rc != 0:
        return f"cannot use the store {db} (see above)"
    if found:
        return (f"the store {db} has an open batch {', '.join(found)}; close it first with "
                f"`linectl batch close -c CONFIG --db {db} --unused void`, or give the demo another --db")
    return None


def _print_human(s: dict[str, Any]) -> None:
    print(f"batch {s['batch']}: {s['units']} units at {s['achieved_rate_upm']} upm")
    print(f"  commissioned     {s['commissioned']}")
    print(f"  rejected         {sum(s['rejected'].values())}  {s['rejected']}")
    print(f"  reject confirmed {s['reject_confirmed']}")
    print(f"  missed rejects   {s['missed_rejects']}   false rejects {s['false_rejects']}   (simulator ground truth)")
    print(f"  challenge        {s['challenge']}")
    print(f"  events stored    {s['events_stored']}   forwarded {s['events_forwarded']}")
    lat = s["decision_latency_ms"]
    print(f"  decision latency p50 {lat['p50']} ms  p99 {lat['p99']} ms  max {lat['max']} ms")
    print(f"  reconciliation   {'balanced' if s['balanced'] else 'NOT balanced'}")
    agg = s.get("aggregation")
    if agg:
        print(f"  cases            {agg['cases']}   pallets {agg['pallets']}   units aggregated {agg['units_aggregated']}")
        for name, c in agg.items():
            if isinstance(c, dict) and "recorded" in c:
                print(f"    {name:<14} recorded {c['recorded']} (partial {c['partial']})  rejected {c['rejected_total']} {c['rejected']}")
        rfid, tunnel = agg.get("rfid"), (agg.get("packer") or {}).get("tunnel")
        if rfid and tunnel:
            c = rfid["counters"]
            print(f"  RFID tunnel      windows {c['windows']}  tags {c['tags']}  strays {c['strays']}  read failed {c['read_failed']}  "
                  f"no window {c['no_window']}   (simulated: {tunnel['cases']} cases, faults {tunnel['faults']})")
        bad = agg["hierarchy_violations"]
        print(f"  hierarchy        {'consistent' if not bad else f'{len(bad)} violation(s): ' + '; '.join(bad[:3])}")
    pm = s.get("packml")
    if pm and "plc" in pm:
        steps = ", ".join(f"{next(iter(h.values()))}→{h.get('state_current')} (result {h.get('result')})" for h in pm["handshakes"])
        print(f"  PackML           PLC {pm['plc']}: {steps}; at the planned quantity StateCurrent {pm['state_current']} "
              f"({pm['packtags']['State']})")
    elif pm:
        steps = ", ".join(f"{c['method']} as {c['user']}: {c['status']}" for c in pm["calls"])
        print(f"  PackML           OPC UA {pm['opcua']}: {steps}; at the planned quantity StateCurrent {pm['state_current']} "
              f"({pm['packtags']['State']})")
    up = s.get("upstream")
    if up:
        for name, sink in (up.get("sinks") or {}).items():
            print(f"  sink {name:<22} cursor {sink['cursor']}  backlog {sink['backlog']}")
        for name, src in (up.get("sources") or {}).items():
            print(f"  source {name:<20} requests {src['requests']}  serials lost {src['serials_lost']}")
        sims = up.get("simulators") or {}
        if sims:
            print(f"  simulators       L3 handed out {sims.get('l3_handed_out', {})}  repositories {sims.get('repository_events', {})}  "
                  f"store EPCIS events {up.get('store_epcis_events')}")
        for problem in upstream_problems(s):
            print(f"  UPSTREAM PROBLEM {problem}")
    print(f"  db               {s['db']}")
