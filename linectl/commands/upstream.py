"""`linectl upstream status [--db PATH | -c CONFIG] [--json] [--live]`: where every upstream sink and serial source stands.

Read from the store (read-only, beside the running daemon): per sink its cursor and backlog (sink_cursors), per serial
source its requests by state (pending, parked, lost), serials lost and imported, last error, and the serials available
per GTIN. `--live` (with -c) adds what the daemon publishes retained on <root>/state (connection state of each sink and
source) when the broker answers within a few seconds. `linectl upstream retry -c CONFIG --gtin GTIN` (or `--sink NAME`: sink_retry) sends the
serials_retry command over MQTT like `linectl batch` sends its commands (audited with its origin).
Exit 0, 2 bad input, 3 the store refused.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
import uuid
from typing import TYPE_CHECKING, Any

from linectl.store.cliutil import EXIT_BAD_INPUT, add_db_options, run_with_store

if TYPE_CHECKING:
    from linectl.config import LineConfig
    from linectl.store import Store


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("upstream", help="upstream sinks and serial sources: status, retry parked serial requests")
    usub = p.add_subparsers(dest="upstream_command", metavar="ACTION", required=True)
    s = usub.add_parser("status", help="per sink: cursor and backlog; per serial source: requests, last error, serials available")
    add_db_options(s)
    s.add_argument("--json", action="store_true")
    s.add_argument("--live", action="store_true", help="with -c: add the daemon's retained <root>/state from the broker")
    s.set_defaults(func=run_status)
    r = usub.add_parser(
        "retry", help="send a GTIN's parked serial requests to its source again, or make a parked sink deliver again (over MQTT, to the daemon)"
    )
    r.add_argument("-c", "--config", required=True)
    what = r.add_mutually_exclusive_group(required=True)
    what.add_argument("--gtin", help="the product whose parked serial requests go to its source again (serials_retry)")
    what.add_argument("--sink", help="the sink, as named in `upstream status`, that delivers its parked document again (sink_retry)")
    r.add_argument("--actor", default=None)
    r.add_argument("--timeout", type=float, default=30.0)
    from linectl.access.client import add_user_options

    add_user_options(r)
    r.set_defaults(func=run_retry)


def upstream_status(store: Store, cfg: LineConfig | None) -> dict[str, Any]:
    sinks = {name: {"cursor": int(c["seq"]), "pending": c.get("pending"), "updated_at": c.get("updated_at"),
                    "backlog": store.sink_backlog(name)} for name, c in sorted(store.cursors().items())}
    sources = store.requests_summary()
    gtins: set[str] = {r.gtin for r in store.requests(limit=100_000)}
    if cfg is not None:
        for p in cfg.products:
            if p.serials.scheme == "pool":
                gtins.add(p.gtin)
    available = {g: store.available(g) for g in sorted(gtins)}
    for name, s in sources.items():
        parked = store.requests(source=name, states=("parked",))
        s["parked"] = [{"request": r.id, "gtin": r.gtin, "size": r.size, "reason": r.error, "since": r.updated_at} for r in parked]
        s["pending"] = s["requests"].get("pending", 0) + s["requests"].get("answered", 0)
    return {"sinks": sinks, "sources": sources, "available": available}


def format_status(st: dict[str, Any]) -> str:
    out = ["sinks:"]
    for name, s in st["sinks"].items():
        out.append(f"  {name:<10} cursor {s['cursor']:<8} backlog {s['backlog']:<8} updated {s['updated_at']}")
    if not st["sinks"]:
        out.append("  (none)")
    out.append("serial sources:")
    for name, s in st["sources"].items():
        r = s["requests"]
        out.append(f"  {name}: pending {s['pending']}, parked {len(s['parked'])}, lost {r.get('lost', 0)} "
                   f"({s['serials_lost']} serials), imported {s.get('serials_imported', 0)} serials, "
                   f"returns {s['returns'] or '{}'}")
        if s.get("last_error"):
            out.append(f"    last error ({s.get('last_error_at')}): {s['last_error']}")
        for p in s["parked"]:
            out.append(f"    parked request {p['request']} ({p['size']} of {p['gtin']}): {p['reason']}")
    if not st["sources"]:
        out.append("  (none)")
    out.append("serials available:")
    for g, n in st["available"].items():
        out.append(f"  {g}: {n}")
    live = st.get("live")
    if live is not None:
        out.append("live (retained state):")
        for name, s in (live.get("upstream_sinks") or {}).items():
            out.append(f"  sink {name}: {json.dumps(s, default=str)[:300]}")
        for g, s in (live.get("serial_sources") or {}).items():
            out.append(f"  source {s.get('source')} ({g}): state {s.get('state')}, connected {s.get('connected')}, "
                       f"available {s.get('available')}, last error {s.get('last_error')}")
    return "\n".join(out)


async def retained_state(cfg: LineConfig, timeout: float = 3.0) -> dict[str, Any] | None:
    """The daemon's retained <root>/state, or None when the broker does not answer or holds none."""
    import aiomqtt

    from linectl.forwarder import client_options

    try:
        async with aiomqtt.Client(**client_options(cfg.mqtt, f"linectl-status-{uuid.uuid4().hex[:8]}")) as client:
            await client.subscribe(f"{cfg.topic_root}/state", qos=1)
            async with asyncio.timeout(timeout):
                async for msg in client.messages:
                    data = json.loads(bytes(msg.payload) if not isinstance(msg.payload, (bytes, bytearray)) else msg.payload)
                    return data if isinstance(data, dict) else None
    except (TimeoutError, aiomqtt.MqttError, OSError, ValueError):
        return None
    return None


def run_status(args: argparse.Namespace) -> int:
    if args.live and not args.config:
        print("linectl upstream status: --live needs -c CONFIG (the broker and topic root)", file=sys.stderr)
        return EXIT_BAD_INPUT

    async def body(store: Store, cfg: LineConfig | None) -> int:
        st = upstream_status(store, cfg)
        if args.live and cfg is not None:
            st["live"] = await retained_state(cfg)
        print(json.dumps(st, indent=2, default=str) if args.json else format_status(st))
        return 0

    return run_with_store(args, body, readonly=True)


def run_retry(args: argparse.Namespace) -> int:
    from linectl.commands.batch import credentials, send_command
    from linectl.config import load_config
    from linectl.control import COMMAND_ADAPTER
    from linectl.yamlsource import ConfigFileError

    try:
        cfg = load_config(args.config)
    except ConfigFileError as exc:
        for prob in exc.problems:
            print(prob.format(args.config), file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"linectl upstream: {args.config}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        user, password = credentials(cfg, args)
    except (ValueError, OSError) as exc:
        print(f"linectl upstream retry: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    body: dict[str, Any] = {"command_id": uuid.uuid4().hex, "actor": user or args.actor or getpass.getuser()}
    body.update({"name": "serials_retry", "gtin": args.gtin} if args.gtin else {"name": "sink_retry", "sink": args.sink})
    COMMAND_ADAPTER.validate_python(body)
    try:
        reply = asyncio.run(send_command(cfg, body, args.timeout, user=user, password=password))
    except TimeoutError:
        print(f"linectl upstream retry: no reply from the daemon within {args.timeout}s", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - broker unreachable etc.
        print(f"linectl upstream retry: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2))
    return 0 if reply.get("ok") else 1
