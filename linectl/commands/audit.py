"""`linectl audit verify`: walk the hash-chained audit trail; `linectl audit review`: the batch review document.

verify: exit 0 "audit trail OK: N records"; exit 1 naming the first bad record
(altered, deleted, or the tail truncated); 3 when the store cannot be opened.

review --batch LOT [--format json|html|pdf] [-o FILE]: the document a QA
reviewer signs (linectl.review). Exit 0 written; 1 written, but the hash
chain is broken (the document says so on its first line); 2 bad input (no
such lot, a PDF to a terminal); 3 the store cannot be opened.

review --batch LOT --sign --user NAME [--meaning reviewed|approved] [--digest D]
[--second-user NAME]: sign the review electronically (command sign_review):
the document is built (and written) as above, then signed, offline on the
store or, when a daemon holds it, through the daemon over MQTT (-c CONFIG).
--digest is the review_digest of the document the signer read: when the batch's
records changed since, the review built at signing time has another digest and
the signing is refused (record_changed, exit 1). Without --digest the document
just built is the one signed. The signing's reply is one JSON line on stderr
(stdout carries the document). Exit 1 for any refused signing.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from linectl.access.client import add_sign_options, add_user_options
from linectl.store.cliutil import add_db_options, run_with_store

if TYPE_CHECKING:
    from linectl.config import LineConfig
    from linectl.store import Store


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("audit", help="audit trail tools")
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    v = asub.add_parser("verify", help="verify the audit trail's hash chain and its head kept in meta")
    add_db_options(v)
    v.set_defaults(func=run_verify)
    r = asub.add_parser("review", help="the batch review document: identity, config hash, audit trail, signatures, challenge, "
                        "reconciliation, alarms, chain verification")
    add_db_options(r)
    r.add_argument("--batch", required=True, metavar="LOT")
    r.add_argument("--format", choices=("json", "html", "pdf"), default="json")
    r.add_argument("-o", "--output", metavar="FILE", help="write here (FILE.tmp, then renamed) instead of stdout")
    r.add_argument("--digest", metavar="SHA256", help="with --sign: the review_digest of the document the signer read")
    add_user_options(r)
    add_sign_options(r, meanings=("reviewed", "approved"))
    r.set_defaults(func=run_review)


def run_verify(args: argparse.Namespace) -> int:
    async def body(store: Store, cfg: LineConfig | None) -> int:
        check = store.verify_audit()
        if check.ok:
            print(f"audit trail OK: {check.checked} records")
            return 0
        print(f"audit trail BROKEN at record {check.first_bad_seq}: {check.reason} ({check.checked} records verified before it)")
        return 1

    return run_with_store(args, body, readonly=True)


def run_review(args: argparse.Namespace) -> int:
    import os
    import sys

    from linectl.review import UnknownLot, build_review
    from linectl.store.cliutil import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_OK

    if args.format == "pdf" and not args.output and sys.stdout.isatty():
        print("linectl: a PDF is not for a terminal: give -o FILE", file=sys.stderr)
        return EXIT_BAD_INPUT

    async def body(store: Store, cfg: LineConfig | None) -> int:
        from linectl.engine.line import zone_info
        from linectl.review_render import render_html, render_pdf

        try:
            doc = build_review(store, args.batch, zone=zone_info(cfg.line.zone) if cfg is not None else None)
        except UnknownLot as exc:
            print(f"linectl: {exc.args[0]}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if args.format == "json":
            data = (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        elif args.format == "html":
            data = render_html(doc).encode("utf-8")
        else:
            data = render_pdf(doc)
        if args.output:
            tmp = args.output + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, args.output)
        else:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        chain = doc["chain"]
        if not chain["verified"]:
            print(f"linectl: audit trail BROKEN at record {chain['first_bad_seq']}: {chain['problem']} (the review says so)", file=sys.stderr)
            return EXIT_CHECK_FAILED
        print(f"batch review {args.batch}: {len(doc['audit_trail']['records'])} audit records, chain verified to #{chain['head_seq']}, "
              f"review digest {doc['review_digest']}", file=sys.stderr)
        digest[0] = str(doc["review_digest"])
        return EXIT_OK

    if args.digest is not None and not args.sign:
        print("linectl: --digest goes with --sign", file=sys.stderr)
        return EXIT_BAD_INPUT
    digest = [""]
    rc = run_with_store(args, body, readonly=True)
    if rc != EXIT_OK or not args.sign:
        return rc
    return sign_review(args, args.digest or digest[0])


def sign_review(args: argparse.Namespace, digest: str) -> int:
    """`--sign`: the review signed offline on the store, or through the daemon that holds it (command sign_review)."""
    import sys
    import uuid

    from linectl.access.client import cli_user, send, signature_blocks, user_password
    from linectl.store.cliutil import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_OK, BadInput, db_path, load_line_config, open_store, run_async
    from linectl.store.lock import StoreLocked

    user = cli_user(args)
    try:
        cfg = load_line_config(args)
        path = db_path(args, cfg)
        if not user:
            raise ValueError("--sign needs --user NAME (or LINECTL_USER): a signature is a user's")
        password = user_password(args, user)
        blocks = signature_blocks(args, user, password)
    except (ValueError, BadInput) as exc:
        print(f"linectl audit review: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"linectl audit review: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    body = {"name": "sign_review", "command_id": uuid.uuid4().hex, "actor": user, "lot": args.batch, "review_digest": digest}

    async def main() -> int:
        try:
            store = await open_store(path, cfg, readonly=False, command="linectl audit review --sign", actor=user, origin=SIGN_ORIGIN)
        except StoreLocked:
            if cfg is None:
                print("linectl audit review: a daemon holds the store: give -c CONFIG to sign through it", file=sys.stderr)
                return EXIT_BAD_INPUT
            try:
                reply = await send(cfg, {**body, **blocks}, 30.0, user=user, password=password)
            except TimeoutError:
                print("linectl audit review: the store is held (by a daemon?) and no daemon answered over MQTT", file=sys.stderr)
                return EXIT_CHECK_FAILED
        else:
            try:
                reply = await sign_review_offline(store, cfg, body, blocks)
            finally:
                await store.close()
        print(json.dumps(reply), file=sys.stderr)  # stdout carries the document (without -o)
        if not reply.get("ok"):
            print(f"linectl audit review --sign: refused ({reply['error']['code']}): {reply['error']['message']}", file=sys.stderr)
            return EXIT_CHECK_FAILED
        sig = reply["result"]["signature"]
        print(f"review of batch {args.batch} signed by {sig['signer']} ({sig['meaning']}), review digest {digest}", file=sys.stderr)
        return EXIT_OK

    return run_async(main)


SIGN_ORIGIN = "cli:offline"


async def sign_review_offline(store: Store, cfg: LineConfig | None, body: dict[str, Any], blocks: dict[str, Any]) -> dict[str, Any]:
    """What the daemon's Line does for sign_review, on the store itself: the signer proven, the review built again and
    compared, the sign_review record and its signature written in one transaction."""
    import asyncio

    from linectl.access.gate import Access
    from linectl.access.settings import AccessConfig
    from linectl.access.signing import sign
    from linectl.control import AUTHENTICATED, CommandRejected, SignReview
    from linectl.review import review_to_sign

    cmd = SignReview.model_validate(body, context=AUTHENTICATED)
    access = Access(cfg.access if cfg is not None else AccessConfig(), store)

    def refused(code: str, message: str) -> dict[str, Any]:
        return {"ok": False, "command_id": cmd.command_id, "command": cmd.name, "error": {"code": code, "message": message}, "offline": True}

    try:
        try:
            # the signer's password and permission are checked here (the signature is the whole credential)
            signed = await sign(access, cmd, None, blocks.get("signature"), blocks.get("second_signature"), channel="cli", origin=SIGN_ORIGIN)
            assert signed is not None and signed.first.username == cmd.actor  # a review always needs its signature
            result = await asyncio.to_thread(review_to_sign, store, cmd.lot, cmd.review_digest)
        except CommandRejected as exc:
            if exc.code == "record_changed":
                access.refusals.note("record_changed", SIGN_ORIGIN, f"{cmd.actor}: sign_review {cmd.lot}")
            return refused(exc.code, exc.reason)
        result["signature"] = signed.public()
        await store.audit(cmd.actor, SIGN_ORIGIN, cmd.name, {**cmd.model_dump(mode="json"), "result": result, "signature": signed.public(),
                                                             "auth": {"kind": "user", "channel": "cli", "session": None}},
                          command_id=cmd.command_id, reply=result, signature=signed.spec())
        return {"ok": True, "command_id": cmd.command_id, "command": cmd.name, "result": result, "offline": True}
    finally:
        await access.refusals.flush()
