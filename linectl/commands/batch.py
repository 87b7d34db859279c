"""`linectl batch ...`: operator commands to a running daemon, sent over MQTT like any other client.

The CLI holds no special door into the daemon: it publishes the same
validated command on `<root>/cmd/<name>` and waits for the reply, so the
command is audited with its origin like one from the MES or the HMI.

`close` and `stop` need no line, so they also work offline: when the store
(`store.path` of the config, or `--db`) is on this machine and no daemon holds
it, the command takes the store's owner lock and runs there, through the same
store operation and audit record as the daemon's (origin `cli:offline`). A
batch a crash left running/challenge/paused is recorded stopped first. When a
daemon holds the store, the command goes to it over MQTT as usual.

On a line with access control (`access:`) every command names its user:
`--user NAME` (or LINECTL_USER) and the password from `--password-file`,
LINECTL_PASSWORD or a prompt (linectl/access/client.py). Over MQTT the CLI
logs in, sends the command with the token and logs out; offline it checks the
password and the user's permission against the store itself. The actor of the
command is that user. `--sign [--meaning M] [--second-user NAME]` signs the
command electronically (linectl/access/signing.py): the password of --user,
entered for this command, is the signature's; a second signer's password comes
from --second-password-file, LINECTL_SECOND_PASSWORD or a prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import uuid
from typing import Any

from linectl.access.client import add_sign_options, add_user_options, cli_user, send, signature_blocks, user_password

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
    "packml": "packml_command",  # --packml-command Start|Hold|... or its CntrlCmd number (README "PackML")
    "unit-mode": "set_unit_mode",  # --mode Production|Maintenance|Manual
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("batch", help="send a batch/line command to the running daemon (over MQTT)")
    p.add_argument("action", choices=sorted(ACTIONS))
    p.add_argument("-c", "--config", required=True, help="line YAML (gives the broker and topic root)")
    p.add_argument("--file", help="batch YAML/JSON file with lot, gtin, expiry, planned_qty and any of production_date, "
                   "packaging_date, best_before, sell_by (for create)")
    p.add_argument("--lot")
    p.add_argument("--gtin")
    p.add_argument("--expiry", help="YYMMDD")
    # the other dates a product's code_template may print; a template AI without its date is refused at create
    p.add_argument("--production-date", dest="production_date", help="YYMMDD: AI (11); bounds the expiry by shelf_life_days")
    p.add_argument("--packaging-date", dest="packaging_date", help="YYMMDD: AI (13)")
    p.add_argument("--best-before", dest="best_before", help="YYMMDD: AI (15)")
    p.add_argument("--sell-by", dest="sell_by", help="YYMMDD: AI (16)")
    p.add_argument("--qty", type=int, dest="planned_qty")
    p.add_argument("--no-challenge", action="store_true")
    p.add_argument("--reason", default="", help="why: kept in the audit trail; required for the commands the config's "
                   "audit.reason_required lists")
    p.add_argument("--unused", choices=["return", "void"], help="close: what to do with unused serials")
    p.add_argument("--alarm-id")
    p.add_argument("--serials", help="reconcile: comma-separated serials of units of unknown fate")
    p.add_argument("--outcome", choices=["in_bin", "passed"], help="reconcile: found in the reject bin, or passed")
    p.add_argument("--copies", type=int, help="reconcile in_bin: packs carrying each code found in the bin (when copies were rejected as duplicates)")
    p.add_argument("--packml-command", dest="packml_command", help="packml: the PackML command (name or CntrlCmd number)")
    p.add_argument("--mode", help="unit-mode: Production, Maintenance or Manual (or 1-3)")
    p.add_argument("--actor", default=None, help="who is commanding, on a line without access control (default: the login name)")
    add_user_options(p)
    add_sign_options(p)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--db", metavar="PATH", help="store for an offline close/stop (default: store.path of the config)")
    p.set_defaults(func=run)


OFFLINE = {"close", "stop"}
OFFLINE_ORIGIN = "cli:offline"


async def run_offline(cfg: Any, body: dict[str, Any], path: str, password: str | None = None,
                      signature: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Close/stop on the store itself when no daemon holds it; None when one does (then: MQTT).

    With access control the actor (body["actor"], the --user) must prove `password` and hold the command's permission,
    and a command access.signatures lists needs `signature` (the envelope's signature blocks, linectl.access.signing),
    written with the command's audit record."""
    from linectl.control import AUTHENTICATED, COMMAND_ADAPTER, CloseBatch, CommandRejected, StopBatch
    from linectl.engine.audit_changes import REASON_REQUIRED, missing_reason
    from linectl.store.audit import change
    from linectl.store.cliutil import open_store
    from linectl.store.lock import StoreLocked
    from linectl.store.model import StoreError

    cmd = COMMAND_ADAPTER.validate_python(body, context=AUTHENTICATED if cfg.access.enabled else None)
    refusal = missing_reason(cfg.audit.reason_required, cmd.name, cmd.reason)
    if refusal is not None:  # the daemon refuses it the same way (Line.execute)
        return _refused(cmd, refusal, REASON_REQUIRED)
    try:
        store = await open_store(path, cfg, readonly=False, command=f"linectl batch {cmd.name}", actor=cmd.actor, origin=OFFLINE_ORIGIN)
    except StoreLocked:
        return None
    access = None
    signed = None
    blocks = signature or {}
    try:
        if blocks and not cfg.access.enabled:
            return _refused(cmd, "access control is off on this line: there are no users to sign", "unsupported")
        if cfg.access.enabled:
            from linectl.access.gate import Access
            from linectl.access.principal import permits
            from linectl.access.signing import sign

            access = Access(cfg.access, store)
            try:
                principal = await access.authenticate(cmd.actor, password, channel="cli", origin=OFFLINE_ORIGIN)
            except CommandRejected as exc:
                return _refused(cmd, exc.reason, exc.code)
            refused = permits(principal, cmd)
            if refused is not None:
                access.deny("forbidden", refused, OFFLINE_ORIGIN, principal.name)
                return _refused(cmd, refused, "forbidden")
            try:
                signed = await sign(access, cmd, principal, blocks.get("signature"), blocks.get("second_signature"), channel="cli",
                                    origin=OFFLINE_ORIGIN)
            except CommandRejected as exc:
                return _refused(cmd, exc.reason, exc.code)
        who = f"{cmd.actor}@{OFFLINE_ORIGIN}"
        open_batches = [b for b in store.batches() if b.state != "closed"]
        lot = body.get("lot")
        if lot is None:
            if len(open_batches) != 1:
                listed = ", ".join(f"{b.lot} ({b.state})" for b in open_batches) or "none"
                return _refused(cmd, f"name the batch with --lot; open batches: {listed}", "no_batch" if not open_batches else "ambiguous_lot")
            lot = open_batches[0].lot
        try:
            if isinstance(cmd, CloseBatch):
                policy = cmd.unused_serials or cfg.batch.unused_serials
                res = await store.close_batch(lot, policy, who, stop_reason="no daemon running (crash or interrupt); stopped offline to close")
                from linectl.report import batch_report

                result: dict[str, Any] = {"lot": lot, "state": "closed", "previous": res["previous"],
                                          "unused_serials": {"policy": policy, "count": res["unused"]},
                                          "decommissioned_in_flight": res["decommissioned"], "offline": True,
                                          "report": batch_report(store, lot)}
            elif isinstance(cmd, StopBatch):
                res = await store.stop_batch(lot, who, cmd.reason or "stopped offline: no daemon running")
                result = {"lot": lot, "state": "stopped", "previous": res["previous"], "offline": True}
            else:  # OFFLINE names only close and stop
                raise AssertionError(f"{cmd.name} has no offline form")
        except StoreError as exc:
            return _refused(cmd, str(exc), "refused")
        # the same audit record the daemon's Line.execute writes for a command
        if signed is not None:
            result["signature"] = signed.public()
        short = {k: v for k, v in result.items() if k != "report"}
        moved = change({"lot": lot, "state": res["previous"]}, {"lot": lot, "state": result["state"]}, cmd.reason)
        await store.audit(cmd.actor, OFFLINE_ORIGIN, cmd.name, {**cmd.model_dump(mode="json", exclude={"serials"}), "lot": lot, "result": short,
                                                                **moved, **({} if signed is None else {"signature": signed.public()})},
                          signature=None if signed is None else signed.spec())
        return {"ok": True, "command_id": cmd.command_id, "command": cmd.name, "result": result}
    finally:
        if access is not None:
            await access.refusals.flush()  # a refused login is audited (aggregated) before the store closes
        await store.close()


def _refused(cmd: Any, reason: str, code: str) -> dict[str, Any]:
    return {"ok": False, "command_id": cmd.command_id, "command": cmd.name, "error": {"code": code, "message": reason}, "offline": True}


def build_command(args: argparse.Namespace) -> dict[str, Any]:
    name = ACTIONS[args.action]
    body: dict[str, Any] = {"name": name, "command_id": uuid.uuid4().hex, "actor": cli_user(args) or args.actor or getpass.getuser()}
    if args.file:
        from linectl.yamlsource import load_yaml, to_plain

        body.update(to_plain(load_yaml(args.file)))
    for key in ("lot", "gtin", "expiry", "planned_qty"):
        v = getattr(args, key)
        if v is not None:
            body[key] = v
    for key in ("production_date", "packaging_date", "best_before", "sell_by"):
        v = getattr(args, key)
        if v is not None:
            if name != "create_batch":
                raise ValueError(f"--{key.replace('_', '-')} belongs to a batch's creation (batch create), not to batch {args.action}")
            body[key] = v
    if name == "create_batch" and args.no_challenge:
        body["challenge"] = False
    if args.reason:
        body["reason"] = args.reason
    if name == "close_batch" and args.unused:
        body["unused_serials"] = args.unused
    if name == "reconcile_units":
        body["serials"] = [s.strip() for s in (args.serials or "").split(",") if s.strip()]
        if args.outcome:
            body["outcome"] = args.outcome
        if args.copies is not None:
            body["copies"] = args.copies
    if name == "packml_command" and args.packml_command is not None:
        body["command"] = args.packml_command
    if name == "set_unit_mode" and args.mode is not None:
        body["mode"] = args.mode
    if name == "ack_alarm" and args.alarm_id:
        body["alarm_id"] = args.alarm_id
    from linectl.control import AUTHENTICATED, COMMAND_ADAPTER

    # fail here, with pydantic's message, before touching the network
    COMMAND_ADAPTER.validate_python(body, context=AUTHENTICATED if cli_user(args) else None)
    return body


async def send_command(cfg: Any, body: dict[str, Any], timeout: float, *, user: str | None = None, password: str | None = None) -> dict[str, Any]:
    """The command to the daemon over MQTT (logged in as `user` when given); its reply."""
    return await send(cfg, body, timeout, user=user, password=password)


def credentials(cfg: Any, args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(user, password) for a line with access control, (None, None) without; ValueError names what is missing."""
    user = cli_user(args)
    if not cfg.access.enabled:
        return None, None
    if not user:
        raise ValueError("this line has access control (access: in the config): give --user NAME (or set LINECTL_USER)")
    if args.actor and args.actor != user:
        raise ValueError(f"--actor {args.actor!r} is not --user {user!r}: with access control the actor is the user who logs in")
    return user, user_password(args, user)


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
    except OSError as exc:
        print(f"linectl batch: {exc.filename or args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        user, password = credentials(cfg, args)
        blocks = signature_blocks(args, user, password)
    except ValueError as exc:
        print(f"linectl batch: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"linectl batch: {exc.filename or args.password_file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if args.action in OFFLINE:
        from linectl.store.model import StoreError

        path = str(args.db or cfg.store.path)
        if args.db or os.path.exists(path):  # a store on this machine: offline unless a daemon holds it
            try:
                reply = asyncio.run(run_offline(cfg, body, path, password, blocks))
            except StoreError as exc:
                print(f"linectl batch: store error: {exc}", file=sys.stderr)
                return 3
            if reply is not None:
                print(json.dumps(reply, indent=2))
                if not reply.get("ok"):
                    print(f"linectl batch {args.action}: refused: {reply['error']['message']}", file=sys.stderr)
                return 0 if reply.get("ok") else 1
    try:
        reply = asyncio.run(send_command(cfg, {**body, **blocks}, args.timeout, user=user, password=password))
    except TimeoutError:
        print(f"linectl batch: no reply from the daemon within {args.timeout}s (is it running and connected to {cfg.mqtt.host}:{cfg.mqtt.port}?)",
            file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - broker unreachable etc.
        print(f"linectl batch: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2))
    return 0 if reply.get("ok") else 1
