"""The CLI as an MQTT client of the daemon, and who it speaks for (`--user`).

`linectl batch ...` and `linectl users ...` send the same commands an HMI sends. On a line with access control
(`access:` in the config) the CLI needs `--user NAME` (or LINECTL_USER) and the password, read from
`--password-file`, LINECTL_PASSWORD or a prompt, never from the command line. Over MQTT it logs in, sends the
command with the session token and logs out (`session="login"`), or sends the command with a one-shot
credential (`session="one_shot"`, what `users passwd` uses: an expired password may still change itself).

With MQTT 5 the replies come on a response topic of this client's own (`linectl-cli/<client id>/reply`), and the
client's id is its origin (user property), to which the daemon binds the token; with MQTT 3.1.1 the replies come
on the shared `<root>/cmd/<name>/reply` (anyone allowed to read it there sees a login's token: prefer MQTT 5).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import uuid
from typing import Any

from linectl.access.passwords import PASSWORD_ENV, read_password

USER_ENV = "LINECTL_USER"
#: the second signer's password (four eyes) when no --second-password-file is given
SECOND_PASSWORD_ENV = "LINECTL_SECOND_PASSWORD"
MEANINGS = ("performed", "reviewed", "approved")


def add_user_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", default=None, help=f"who commands (a user of the line; default ${USER_ENV}); needed when the line has access control")
    p.add_argument("--password-file", dest="password_file", metavar="FILE",
                   help=f"the user's password, first line of FILE (else ${PASSWORD_ENV}, else a prompt)")


def add_sign_options(p: argparse.ArgumentParser, *, meanings: tuple[str, ...] = MEANINGS) -> None:
    """--sign and its companions: the command's electronic signature (linectl/access/signing.py)."""
    p.add_argument("--sign", action="store_true", help="sign the command electronically with the password of --user "
                   "(needed for the actions access.signatures lists)")
    p.add_argument("--meaning", choices=meanings, help="what the signature means (default: the one access.signatures fixes)")
    p.add_argument("--second-user", dest="second_user", metavar="NAME", help="four eyes: the second person who signs (another user "
                   "allowed the command)")
    p.add_argument("--second-password-file", dest="second_password_file", metavar="FILE",
                   help=f"the second signer's password, first line of FILE (else ${SECOND_PASSWORD_ENV}, else a prompt)")
    p.add_argument("--second-meaning", dest="second_meaning", choices=MEANINGS, help="the second signature's meaning (default: the rule's)")


def signature_blocks(args: argparse.Namespace, user: str | None, password: str | None) -> dict[str, Any]:
    """The envelope's `signature` (and `second_signature`) from --sign: the password of --user, entered for this
    command, is the signature's; the second signer's is read now. {} without --sign. ValueError names what is missing."""
    if not args.sign:
        extra = [o for o, v in (("--meaning", args.meaning), ("--second-user", args.second_user), ("--second-meaning", args.second_meaning)) if v]
        if extra:
            raise ValueError(f"{', '.join(extra)} go with --sign")
        return {}
    if user is None or password is None:
        raise ValueError("--sign needs --user NAME (or LINECTL_USER) and the password: a signature is a user's")
    out: dict[str, Any] = {"signature": {"username": user, "password": password, **({"meaning": args.meaning} if args.meaning else {})}}
    if args.second_user:
        if args.second_user == user:
            raise ValueError("--second-user is --user: four eyes need another person")
        pw = read_password(file=args.second_password_file, env=SECOND_PASSWORD_ENV, prompt=f"password of the second signer {args.second_user}: ")
        out["second_signature"] = {"username": args.second_user, "password": pw,
                                   **({"meaning": args.second_meaning} if args.second_meaning else {})}
    elif args.second_meaning or args.second_password_file:
        raise ValueError("--second-meaning / --second-password-file go with --second-user")
    return out


def cli_user(args: argparse.Namespace) -> str | None:
    return args.user or os.environ.get(USER_ENV) or None


def user_password(args: argparse.Namespace, user: str) -> str:
    """The password of `user` (file, environment or prompt). ValueError when none can be had."""
    return read_password(file=args.password_file, env=PASSWORD_ENV, prompt=f"password for {user}: ")


async def send(cfg: Any, body: dict[str, Any], timeout: float, *, user: str | None = None, password: str | None = None,
               session: str = "login") -> dict[str, Any]:
    """Publish `body` on <root>/cmd/<name>, return the reply with its command_id (TimeoutError when none comes)."""
    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from linectl.forwarder import client_options

    root = cfg.topic_root
    cid = f"linectl-cli-{uuid.uuid4().hex[:12]}"
    v5 = cfg.mqtt.protocol == "5"
    own_reply = f"linectl-cli/{cid}/reply"
    async with aiomqtt.Client(**client_options(cfg.mqtt, cid)) as client:
        subscribed: set[str] = set()

        async def call(b: dict[str, Any]) -> dict[str, Any]:
            topic = own_reply if v5 else f"{root}/cmd/{b['name']}/reply"
            if topic not in subscribed:
                await client.subscribe(topic, qos=1)
                subscribed.add(topic)
            props = None
            if v5:
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic = own_reply
                props.UserProperty = [("origin", cid)]
            await client.publish(f"{root}/cmd/{b['name']}", json.dumps(b), qos=1, properties=props)
            async with asyncio.timeout(timeout):
                async for msg in client.messages:
                    try:
                        reply = json.loads(msg.payload)
                    except (ValueError, TypeError):
                        continue
                    if isinstance(reply, dict) and reply.get("command_id") == b["command_id"]:
                        return reply
            raise TimeoutError

        if user is None:
            return await call(body)
        assert password is not None
        if session == "one_shot":
            return await call({**body, "auth": {"username": user, "password": password}})
        login = await call({"name": "login", "command_id": uuid.uuid4().hex, "username": user, "password": password})
        if not login.get("ok"):
            return {**login, "command": body["name"], "command_id": body["command_id"]}
        token = login["result"]["token"]
        try:
            return await call({**body, "auth": {"token": token}})
        finally:
            try:
                await call({"name": "logout", "command_id": uuid.uuid4().hex, "auth": {"token": token}})
            except (TimeoutError, aiomqtt.MqttError):
                pass  # the session expires by itself (access.session_ttl_s)
