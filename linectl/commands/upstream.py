"""`linectl upstream status [--db PATH | -c CONFIG] [--json] [--live]`: where every upstream sink and serial source stands.

Read from the store (read-only, beside the running daemon, or with the daemon down): per sink its cursor and backlog
(sink_cursors) and the state the daemon last recorded (connected, last error, parked, as of when:
linectl/upstream/link_state.py), per serial source its requests by state (pending, parked, lost), serials lost and
imported, its recorded state per GTIN, and the serials available per GTIN. `--live` (with -c) adds what the daemon
publishes retained on <root>/state (each sink's and source's state now, the MQTT path's serial requests) when the
broker answers within a few seconds. `linectl upstream retry -c CONFIG --gtin GTIN` (or `--sink NAME`: sink_retry)
sends the serials_retry command over MQTT like `linectl batch` sends its commands (audited with its origin), signed
with --sign and with --reason when the line's access.signatures / audit.reason_required list it.
Exit 0, 2 bad input, 3 the store refused.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from linectl.store.cliutil import EXIT_BAD_INPUT, add_db_options, run_with_store
from linectl.upstream.link_state import sink_state

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
    r.add_argument("--actor", default=None, help="who is commanding, on a line without access control (default: the login name)")
    r.add_argument("--reason", default="", help="why: kept in the audit trail; required when audit.reason_required lists "
                   "serials_retry / sink_retry")
    r.add_argument("--timeout", type=float, default=30.0)
    from linectl.access.client import add_sign_options, add_user_options

    add_user_options(r)
    add_sign_options(r)
    r.set_defaults(func=run_retry)


def upstream_status(store: Store, cfg: LineConfig | None) -> dict[str, Any]:
    """Per sink its cursor, backlog and last recorded state; per source its requests, parked ones and recorded state.

    The states are what the daemon recorded (linectl/upstream/link_state.py), each with `as_of`; `running: false`
    means it was recorded at a clean stop. The backlog is counted from the cursor now, so it is exact either way."""
    links = store.link_states()
    cursors = store.cursors()
    names = sorted(set(cursors) | {k[len("sink:"):] for k in links if k.startswith("sink:")})
    sinks: dict[str, Any] = {}
    for name in names:
        c = cursors.get(name) or {}
        sinks[name] = {"cursor": int(c.get("seq") or 0), "pending": c.get("pending"), "updated_at": c.get("updated_at"),
                       "backlog": store.sink_backlog(name), "state": links.get(f"sink:{name}")}
    sources = store.requests_summary()
    for key, st in links.items():
        if key.startswith("source:"):
            name, _, gtin = key[len("source:"):].rpartition(":")
            s = sources.setdefault(name, {"requests": {}, "returns": {}, "serials_lost": 0, "serials_reported_unused": 0})
            s.setdefault("state", {})[gtin] = st
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
        s.setdefault("state", {})
    return {"sinks": sinks, "sources": sources, "available": available}


def _link_line(st: dict[str, Any] | None) -> str:
    """One link's recorded state in words, with the time it was recorded."""
    if not st:
        return "state not recorded (no daemon has run this link since linectl recorded states)"
    parts = []
    if "state" in st:
        parts.append(str(st["state"]))
    if st.get("connected") is not None:
        parts.append("connected" if st["connected"] else "not connected")
    if st.get("parked"):
        rows = st.get("parked_rows")
        parts.append("PARKED" + (f" at rows {rows[0]}-{rows[1]}" if rows else "") + (f": {st['parked_reason']}" if st.get("parked_reason") else ""))
    if st.get("last_error"):
        since = st.get("error_since") or st.get("last_error_at")
        if isinstance(since, (int, float)):  # sinks keep epoch seconds
            since = datetime.fromtimestamp(since, UTC).isoformat(timespec="seconds")
        parts.append(f"last error{f' (since {since})' if since else ''}: {st['last_error']}")
    else:
        parts.append("no error")
    when = f"as of {st.get('as_of')}" + ("" if st.get("running", True) else ", when the daemon stopped")
    return f"{', '.join(parts)} [{when}]"


def format_status(st: dict[str, Any]) -> str:
    out = ["sinks:"]
    for name, s in st["sinks"].items():
        out.append(f"  {name:<10} cursor {s['cursor']:<8} backlog {s['backlog']:<8} updated {s['updated_at']}")
        out.append(f"    {_link_line(s.get('state'))}")
    if not st["sinks"]:
        out.append("  (none)")
    out.append("serial sources:")
    for name, s in st["sources"].items():
        r = s["requests"]
        out.append(f"  {name}: pending {s['pending']}, parked {len(s['parked'])}, lost {r.get('lost', 0)} "
                   f"({s['serials_lost']} serials), imported {s.get('serials_imported', 0)} serials, "
                   f"returns {s['returns'] or '{}'}")
        for gtin, ls in s.get("state", {}).items():
            out.append(f"    {gtin}: {_link_line(ls)}")
        if s.get("last_error"):
            out.append(f"    last error of a request ({s.get('last_error_at')}): {s['last_error']}")
        for p in s["parked"]:
            out.append(f"    parked request {p['request']} ({p['size']} of {p['gtin']}): {p['reason']}")
    if not st["sources"]:
        out.append("  (none)")
    out.append("serials available:")
    for g, n in st["available"].items():
        out.append(f"  {g}: {n}")
    if "live" in st:
        live = st["live"]
        if live is None:
            out.append("live (retained state): none (the broker did not answer, or holds no state)")
        else:
            out.append(f"live (retained state, as of {live.get('ts')}):")
            for name, s in (live.get("upstream_sinks") or {}).items():
                out.append(f"  sink {name}: backlog {s.get('backlog_rows')}, {_link_line({**sink_state(s), 'as_of': live.get('ts')})}")
            for g, s in (live.get("serial_sources") or {}).items():
                out.append(f"  source {s.get('source')} ({g}): state {s.get('state')}, connected {s.get('connected')}, "
                           f"available {s.get('available')}, pending {s.get('pending')}, parked {len(s.get('parked') or [])}, "
                           f"last error {s.get('last_error')}")
            for r in live.get("serial_requests") or []:
                out.append(f"  MQTT serial request {r.get('request_id')} ({r.get('count')} of {r.get('gtin')}): received "
                           f"{r.get('received')} in {r.get('pages')} pages, asked {r.get('requested_at')}")
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
    from pydantic import ValidationError

    from linectl.access.client import signature_blocks
    from linectl.commands.batch import credentials, send_command
    from linectl.config import load_config
    from linectl.control import AUTHENTICATED, COMMAND_ADAPTER
    from linectl.engine.audit_changes import missing_reason
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
        blocks = signature_blocks(args, user, password)
    except (ValueError, OSError) as exc:
        print(f"linectl upstream retry: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    body: dict[str, Any] = {"command_id": uuid.uuid4().hex, "actor": user or args.actor or getpass.getuser()}
    body.update({"name": "serials_retry", "gtin": args.gtin} if args.gtin else {"name": "sink_retry", "sink": args.sink})
    if args.reason:
        body["reason"] = args.reason
    try:
        COMMAND_ADAPTER.validate_python(body, context=AUTHENTICATED if user else None)
    except ValidationError as exc:
        print(f"linectl upstream retry: invalid command: {'; '.join(str(e['msg']) for e in exc.errors(include_url=False))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    refusal = missing_reason(cfg.audit.reason_required, body["name"], args.reason)
    if refusal is not None:  # the daemon refuses it too: say so before logging in
        print(f"linectl upstream retry: {refusal} (--reason)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        reply = asyncio.run(send_command(cfg, {**body, **blocks}, args.timeout, user=user, password=password))
    except TimeoutError:
        print(f"linectl upstream retry: no reply from the daemon within {args.timeout}s", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - broker unreachable etc.
        print(f"linectl upstream retry: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2))
    return 0 if reply.get("ok") else 1
