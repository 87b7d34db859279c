"""`linectl batch ...`: operator commands to a running daemon, sent over MQTT like any other client.

The CLI holds no special door into the daemon: it publishes the same
validated command on `<root>/cmd/<name>` and waits for the reply, so the
command is audited with its origin like one from the MES or the HMI.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
import uuid
from typing import Any

ACTIONS = {
    "create": "create_batch",
    "start": "start_batch",
    "pause": "pause_batch",
    "resume": "resume_batch",
    "stop": "stop_batch",
    "close": "close_batch",
    "challenge": "challenge",
    "state": "request_state",
    "ack-alarm": "ack_alarm",
    "reset": "reset",
    "reconcile": "reconcile_units",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="send a batch/line command to the running daemon (over MQTT)")
    p.add_argument("action", choices=sorted(ACTIONS))
    p.add_argument("-c", "--config", required=True, help="line YAML (gives the broker and topic root)")
    p.add_argument("--file", help="batch YAML/JSON file with lot, gtin, expiry, planned_qty (for create)")
    p.add_argument("--lot")
    p.add_argument("--gtin")
    p.add_argument("--expiry", help="YYMMDD")
    p.add_argument("--qty", type=int, dest="planned_qty")
    p.add_argument("--no-challenge", action="store_true")
    p.add_argument("--reason", default="")
    p.add_argument("--unused", choices=["return", "void"], help="close: what to do with unused serials")
    p.add_argument("--alarm-id")
    p.add_argument("--serials", help="reconcile: comma-separated serials of units of unknown fate")
    p.add_argument("--outcome", choices=["in_bin", "passed"], help="reconcile: found in the reject bin, or passed")
    p.add_argument("--actor", default=None, help="who is commanding (default: the login name)")
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(func=run)


def build_command(args: argparse.Namespace) -> dict[str, Any]:
    name = ACTIONS[args.action]
    body: dict[str, Any] = {"name": name, "command_id": uuid.uuid4().hex, "actor": args.actor or getpass.getuser()}
    if args.file:
        from linectl.yamlsource import load_yaml, to_plain

        body.update(to_plain(load_yaml(args.file)))
    for key in ("lot", "gtin", "expiry", "planned_qty"):
        v = getattr(args, key)
        if v is not None:
            body[key] = v
    if name == "create_batch" and args.no_challenge:
        body["challenge"] = False
    if name == "stop_batch" and args.reason:
        body["reason"] = args.reason
    if name == "close_batch" and args.unused:
        body["unused_serials"] = args.unused
    if name == "reconcile_units":
        body["serials"] = [s.strip() for s in (args.serials or "").split(",") if s.strip()]
        if args.outcome:
            body["outcome"] = args.outcome
    if name == "ack_alarm" and args.alarm_id:
        body["alarm_id"] = args.alarm_id
    from linectl.control import COMMAND_ADAPTER

    COMMAND_ADAPTER.validate_python(body)  # fail here, with pydantic's message, before touching the network
    return body


async def send_command(cfg: Any, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    import aiomqtt

    from linectl.forwarder import client_options

    root = cfg.topic_root
    name = body["name"]
    reply_topic = f"{root}/cmd/{name}/reply"
    async with aiomqtt.Client(**client_options(cfg.mqtt, f"linectl-cli-{uuid.uuid4().hex[:8]}")) as client:
        await client.subscribe(reply_topic, qos=1)
        await client.publish(f"{root}/cmd/{name}", json.dumps(body), qos=1)
        async with asyncio.timeout(timeout):
            async for msg in client.messages:
                try:
                    reply = json.loads(msg.payload)
                except ValueError:
                    continue
                if reply.get("command_id") == body["command_id"]:
                    return reply
    raise TimeoutError


def run(args: argparse.Namespace) -> int:
    from linectl.config import load_config
    from linectl.yamlsource import ConfigFileError

    try:
        cfg = load_config(args.config)
        body = build_command(args)
    except ConfigFileError as exc:
        for prob in exc.problems:
            print(prob.format(args.config), file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"linectl batch: invalid command: {exc}", file=sys.stderr)
        return 2
    try:
        reply = asyncio.run(send_command(cfg, body, args.timeout))
    except TimeoutError:
        print(f"linectl batch: no reply from the daemon within {args.timeout}s (is it running and connected to {cfg.mqtt.host}:{cfg.mqtt.port}?)", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - broker unreachable etc.
        print(f"linectl batch: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2))
    return 0 if reply.get("ok") else 1
