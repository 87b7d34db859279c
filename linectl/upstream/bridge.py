"""The line's MQTT face for operators and L3: availability, retained state, commands, serial requests.

Topics under <root> (mqtt.topic_root or <enterprise>/<site>/<area>/<line>):
  status                  retained "online" after every connect; Last Will (retained) "offline";
                          "offline" again on a clean stop
  state                   retained JSON: target.snapshot() + upstream (forwarder) status, stamped ts, interval_s, seq
                          (README "Operators' view: the state message"), on change (rate-limited), every
                          state_interval_s, after every connect, and a last one on a clean stop
  packml/status           retained JSON, PackTags Status: StateCurrent (+ State name), UnitModeCurrent, MachSpeed,
                          CurMachSpeed, EquipmentBlocked, EquipmentStarved, Allowed commands
  packml/admin            retained JSON, PackTags Admin: StopReason (first-out), ProdProcessedCount,
                          ProdDefectiveCount (+ by reason), ProdConsumedCount, lot and planned count
                          (both from target.packtags(), published when their content changes: checked on every
                          state change and every packml.publish_interval_s, and after every connect)
  cmd/<name>              commands in (QoS 1); subscription renewed on every connect
  cmd/<name>/reply        reply for MQTT 3.1.1 clients (MQTT 5 clients name a ResponseTopic and
                          get their CorrelationData back)
  serials/request         linectl asks L3 for serials; answers arrive as provision_pool commands
                          carrying the request_id, possibly in several pages
Events and alarms are published by the forwarder (linectl.upstream.mqtt), from the outbox; the connection
plumbing (options, link tracking, reconnect with capped jittered backoff) is linectl.upstream.mqtt_client.

Every command is validated here before the target sees it, so anything malformed
is refused with a reply naming the problem and nothing changes. Accepted
commands go to target.execute(cmd, origin="mqtt:<origin>"), which applies and
audits them. A repeated command_id gets the first successful reply again
(bounded in-memory LRU, then the store's command_ids table, which survives a
restart), so an at-least-once client cannot apply a command twice.

The command topic is hostile ground (a misconfigured HMI, a script in a loop):
- a retained command is never executed (it would run again after every broker or
  daemon restart, with nobody commanding it), nor an empty payload (that is how a
  retained message is cleared); both are ignored without a reply;
- a response topic that could reach linectl's own namespace or a $-topic is
  refused (the broker drops a client publishing to $SYS, and a reply in
  <root>/events would enter the EPCIS stream);
- the JSON is bounded in size, nesting depth and item count by a scan without
  recursion *before* json.loads, so no payload can raise RecursionError or hold
  the event loop (big payloads are parsed in a worker thread);
- refusals cost a counter: one log line per reason and interval, one aggregated
  audit record per interval (control.RefusalTally), never one per message.
MQTT 5: the session is persistent for mqtt.command_session_expiry_s, so commands
sent while the bridge reconnects are queued by the broker, not lost; the
subscription asks the broker not to send retained messages at all.

`origin` comes from the MQTT 5 user property "origin" (or "client_id"): MQTT
does not tell a subscriber who published, so it is the sender's claim. When
mqtt.authorized_origins is set, a command without a listed origin is refused,
which keeps honest clients apart; the broker's ACL on <root>/cmd/# still decides
who may publish at all.

With access control on (linectl/access, config `access:`), every command names
who sends it, checked here before anything else (also before a cached reply is
handed out):
  cmd/login    {"username", "password"} -> result {token, expires_at, username, roles, ...}:
               a session token bound to this client's origin (above), valid access.session_ttl_s
  cmd/logout   {"auth": {"token"}} -> the session is closed; its token is refused from then on
  cmd/<other>  {"auth": {"token": ...}, ...} or, one-shot, {"auth": {"username", "password"}, ...}
The `auth` block is an envelope, not part of the command: it is taken off before the command is
validated, and the command's actor becomes the verified user. A command that names a different
`actor` is refused (forged_actor); naming oneself is allowed. Refusals carry error.code
(unauthenticated, wrong_password, token_expired, token_revoked, token_client_mismatch, locked,
deactivated, password_expired, directory_unavailable, forbidden, forged_actor, rate_limited).
A login reply carries the token: send login with an MQTT 5 ResponseTopic only this client reads
(the broker's ACL, e.g. a pattern on %c), not to the shared cmd/login/reply, and use TLS. The token
is bound to the origin the bridge sees, which is the client's claim: binding stops a token copied
into another client from working there, not a client that lies about its origin (the broker's ACL
and TLS keep tokens from being read in the first place).
Electronic signatures (linectl/access/signing.py) are envelope keys too: `signature` {username,
password, meaning} and, for four eyes, `second_signature`; both passwords are checked for this
command (also within a session), and the signature is written with the command's audit record.
Codes: signature_required, invalid_signature, signer_mismatch, wrong_meaning, same_signer,
signature_failed, signer_forbidden, record_changed (sign_review).
The L3 answers serials/request through a service account (a user whose only role is l3): its provision_pool
with the request_id of an outstanding request, for that GTIN and at most the serials still owed, needs no
signature (the line decided the import when it asked); anything else it sends is refused (request_mismatch,
request_exceeded, signature_required) and a person's provision_pool is signed as access.signatures says.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import ValidationError

from linectl.access.settings import SERVICE_ROLE
from linectl.access.signing import SIGNATURE_KEYS, requirement, sign
from linectl.control import AUTHENTICATED, COMMAND_ADAPTER, COMMAND_NAMES, CommandRejected, ProvisionPool, RefusalTally
from linectl.drivers.base import Backoff
from linectl.jsonable import json_default
from linectl.upstream.mqtt_client import client_options, default_client_id, reconnect_loop, track_link

if TYPE_CHECKING:  # pragma: no cover
    from linectl.access.gate import Access
    from linectl.config import LineConfig
    from linectl.engine.packml import PackTags


@runtime_checkable
class StoppableSink(Protocol):
    """An upstream sink that can be stopped (every sink of linectl.upstream.sink)."""

    async def stop(self, timeout: float = 3.0) -> None: ...


@runtime_checkable
class PackmlTarget(Protocol):
    """A target that is a PackML unit (the Line): it has PackTags to publish under <root>/packml/."""

    def packtags(self) -> PackTags: ...

log = structlog.get_logger("linectl.mqtt")

REPLY_CACHE_SIZE = 10_000
MAX_PENDING_REQUESTS = 100
STATE_MIN_INTERVAL_S = 0.2
MAX_JSON_DEPTH = 32  # commands nest 2-3 levels; json.loads recurses per level
MAX_JSON_ITEMS = 250_000  # keys + array items; a 1 MB provision_pool page holds < 100,000 serials
MAX_RESPONSE_TOPIC_BYTES = 256
PARSE_IN_THREAD_BYTES = 64 * 1024  # bigger payloads are decoded and validated off the event loop
REFUSAL_INTERVAL_S = 60.0
READ_ONLY_COMMANDS = frozenset({"verify_code", "request_state"})
#: commands of the access gate, answered here (not engine commands)
AUTH_COMMANDS = ("login", "logout")
#: keys of a command payload that are not the command: who sends it, and its electronic signatures
ENVELOPE_KEYS = ("auth", *SIGNATURE_KEYS)

_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b"[]{},")
_DEPTH_STEP = [0] * 256
_DEPTH_STEP[ord("[")] = _DEPTH_STEP[ord("{")] = 1
_DEPTH_STEP[ord("]")] = _DEPTH_STEP[ord("}")] = -1
_DEPTH_CHUNK = 8192


def json_shape_problem(data: bytes, max_depth: int = MAX_JSON_DEPTH, max_items: int = MAX_JSON_ITEMS) -> str | None:
    """Why `data` is too deep or too big to hand to json.loads, or None. No recursion, no Python loop per byte.

    Only C-speed bytes operations in short steps, so even a worst-case payload in a
    worker thread never holds the GIL long enough for the line to notice: escaped
    backslashes and quotes are dropped, so every remaining quote delimits a string
    and the text outside strings is every other piece of a split on quotes; of it
    only brackets and commas are kept. The depth is the running sum of +1/-1 over
    the brackets, taken chunk by chunk (stopping at the first chunk that goes too deep).
    """
    opens = data.count(b"[") + data.count(b"{")
    if opens <= max_depth and data.count(b",") + opens <= max_items:
        return None  # fast path (every normal command): brackets and commas inside strings only add to these counts
    outside = b"".join(data.replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')[::2])
    structure = outside.translate(None, _NOT_STRUCTURE)
    nest = structure.replace(b",", b"")
    if len(structure) - len(nest) + nest.count(b"[") + nest.count(b"{") > max_items:
        return f"more than {max_items} JSON keys/items"
    depth = 0
    for i in range(0, len(nest), _DEPTH_CHUNK):
        steps = list(itertools.accumulate(map(_DEPTH_STEP.__getitem__, nest[i : i + _DEPTH_CHUNK]), initial=depth))
        if max(steps) > max_depth:
            return f"JSON nested deeper than {max_depth} levels"
        depth = steps[-1]
    return None


class CommandError(Exception):
    """A command refused before it reached the target."""

    def __init__(self, code: str, message: str, command_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.command_id = command_id


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=json_default).encode()


class MqttBridge:
    """One MQTT connection for status, state, commands and serial requests. `run()` until `stop()`."""

    def __init__(
        self,
        cfg: LineConfig,
        target: Any,
        *,
        store: Any = None,
        forwarder: Any = None,
        sinks: list[Any] | None = None,
        sources: list[Any] | None = None,
        client_id: str | None = None,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 10.0,
        access: Access | None = None,
    ) -> None:
        self.cfg = cfg
        #: the access gate (linectl/access); None or disabled: commands are anonymous, as before
        self.access = access if access is not None and access.enabled else None
        self.mqtt = cfg.mqtt
        self.target = target
        self.store = store
        self.forwarder = forwarder
        self.sinks = list(sinks or [])
        #: the serial provisioners (linectl/sources/provisioner.py): each one's status in the state, by GTIN
        self.sources = list(sources or [])
        self.root = cfg.topic_root
        self.client_id = client_id or cfg.mqtt.client_id or default_client_id(cfg)
        self.topic_status = f"{self.root}/status"
        self.topic_state = f"{self.root}/state"
        self.topic_cmd = f"{self.root}/cmd/"
        self.topic_serial_request = f"{self.root}/serials/request"
        self.topic_packml = f"{self.root}/packml/"
        self._packml_dirty = asyncio.Event()
        self.packml_published = 0
        self._backoff = Backoff(backoff_initial_s, backoff_max_s)
        self._stop = asyncio.Event()
        self._state_dirty = asyncio.Event()
        self._outgoing_wake = asyncio.Event()
        self._replies: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._requests: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._connected = False
        self._connected_since: float | None = None
        self._last_error: str | None = None
        self._running = False
        self.commands_accepted = 0
        self.commands_refused = 0
        self.commands_ignored = 0
        self.state_published = 0
        # namespaces a reply must never reach: the effective root and the line's default one
        self._own_roots = {self.root, cfg.line.topic_root}
        self.refusals = RefusalTally("commands_refused", store=store, interval_s=REFUSAL_INTERVAL_S)
        self._ignored = RefusalTally("commands_ignored", interval_s=REFUSAL_INTERVAL_S)  # not operator actions: log only

    # ---------------------------------------------------------------- public

    def state_changed(self, *_: Any, **__: Any) -> None:
        """The line's state changed: republish soon (coalesced, at most every STATE_MIN_INTERVAL_S)."""
        self._state_dirty.set()
        self._packml_dirty.set()

    def request_serials(self, gtin: str, count: int, format: str | None = None) -> str:
        """Ask L3 for `count` serials; returns the request_id at once (the line keeps running).

        Published on <root>/serials/request now if connected, else after the next
        connect; an unanswered request is published again after every reconnect
        (same request_id: L3 must treat it as one request). Answers are
        provision_pool commands with this request_id, in one or several pages.
        """
        rid = uuid.uuid4().hex
        self._requests[rid] = {
            "request_id": rid,
            "gtin": gtin,
            "count": int(count),
            "format": format,
            "requested_at": datetime.now(UTC).isoformat(),
            "received": 0,
            "pages": 0,
            "sent": False,
        }
        while len(self._requests) > MAX_PENDING_REQUESTS:
            old_id, old = self._requests.popitem(last=False)
            log.warning("serial_request_dropped", request_id=old_id, gtin=old["gtin"], why="too many pending requests")
        self._outgoing_wake.set()
        log.info("serials_requested", request_id=rid, gtin=gtin, count=count)
        return rid

    def pending_serial_requests(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._requests.values()]

    def status(self) -> dict[str, Any]:
        return {
            "connected": self._connected,
            "connected_since": self._connected_since,
            "last_error": self._last_error,
            "commands_accepted": self.commands_accepted,
            "commands_refused": self.commands_refused,
            "commands_ignored": self.commands_ignored,
        }

    async def stop(self, timeout: float = 1.5, sinks_timeout: float = 3.0) -> None:
        """Publish the last state and retained "offline", and disconnect cleanly (bounded wait).

        The sinks stop first (their stop is idempotent; the daemon stops them again after the bridge): they record the
        acknowledgements still on the way, so the last retained state shows the backlog that is really left, not the
        rows that were in flight when it was last counted."""
        stoppable = [s for s in self.sinks if isinstance(s, StoppableSink)]
        if stoppable and self._connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*(s.stop() for s in stoppable), return_exceptions=True), sinks_timeout)
            log.info("upstream_sinks_stopped_before_last_state", backlog={s.name: s.status().get("backlog_rows") for s in self.sinks})
        self._stop.set()
        deadline = time.monotonic() + timeout
        while self._running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def run(self) -> None:
        self._running = True
        try:
            await reconnect_loop(
                stop=self._stop,
                backoff=self._backoff,
                connect=self._connect_once,
                down=lambda reason: self._set_connected(False, reason),
                expected=(aiomqtt.MqttError,),
                error_event="mqtt_bridge_error",  # keep the line's MQTT face alive; log and reconnect
                logger=log,
            )
        finally:
            self._set_connected(False, "stopped")
            self._running = False
            with contextlib.suppress(Exception):
                await self.refusals.flush()
                await self._ignored.flush()

    async def _connect_once(self) -> None:
        will = aiomqtt.Will(self.topic_status, b"offline", qos=1, retain=True)
        client = aiomqtt.Client(**self._client_options(), will=will, timeout=10.0, max_queued_incoming_messages=1000)
        async with client:
            self._set_connected(True)
            await self._session(client)

    # ---------------------------------------------------------------- session

    @property
    def persistent_session(self) -> bool:
        """MQTT 5 with a session expiry: the broker queues commands while the bridge is away (bounded in time).

        Not with MQTT 3.1.1: its sessions never expire, so a command sent while the
        daemon was down for a day would run at the next start; there the session is clean.
        """
        return self.mqtt.protocol == "5" and self.mqtt.command_session_expiry_s > 0

    def _client_options(self) -> dict[str, Any]:
        opts = client_options(self.mqtt, self.client_id)
        if self.persistent_session:
            opts["clean_start"] = False
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.mqtt.command_session_expiry_s
            opts["properties"] = props
        return opts

    def _set_connected(self, up: bool, reason: str = "") -> None:
        track_link(self, up, reason, "mqtt", connect_ctx={"client_id": self.client_id, "root": self.root})

    async def _session(self, client: aiomqtt.Client) -> None:
        await client.publish(self.topic_status, b"online", qos=1, retain=True)
        if self.mqtt.protocol == "5":
            # no retained commands at subscribe; and the retain flag as published, so a command published retained
            # while we are connected is recognised (and ignored) too. MQTT 3.1.1 clears that flag on live delivery.
            opts = SubscribeOptions(qos=1, retainAsPublished=True, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
            await client.subscribe(f"{self.topic_cmd}+", options=opts)
        else:
            await client.subscribe(f"{self.topic_cmd}+", qos=1)
        await self._publish_state(client)
        for r in self._requests.values():
            if r["received"] == 0:
                r["sent"] = False
        self._outgoing_wake.set()
        self._backoff.reset()
        tasks = [
            asyncio.create_task(self._commands(client), name="mqtt.commands"),
            asyncio.create_task(self._state_loop(client), name="mqtt.state"),
            asyncio.create_task(self._packml_loop(client), name="mqtt.packml"),
            asyncio.create_task(self._outgoing(client), name="mqtt.outgoing"),
            asyncio.create_task(self._stop.wait(), name="mqtt.stop"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not tasks[-1] and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            if self._stop.is_set():
                with contextlib.suppress(Exception):
                    await self._publish_state(client)
                    await client.publish(self.topic_status, b"offline", qos=1, retain=True, timeout=2.0)
                log.info("mqtt_offline_published", root=self.root)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ---------------------------------------------------------------- state

    def state_payload(self) -> dict[str, Any]:
        """target.snapshot() (README "Operators' view: the state message") stamped for a consumer that must tell
        stale data: ts (now), interval_s (the longest gap between two messages while connected), seq (per message)."""
        snap = dict(self.target.snapshot())
        snap["ts"] = datetime.now(UTC).isoformat()
        snap["interval_s"] = self.mqtt.state_interval_s
        snap["seq"] = self.state_published + 1
        snap.setdefault("line", self.root)
        if self.forwarder is not None:
            up = self.forwarder.status()
            snap["upstream"] = {**up, "units": {"backlog_rows": "rows", "oldest_unforwarded_age_s": "s", "times": "epoch s"}}
        if self.sinks:  # every enabled upstream sink (mqtt, file, ...), each with its own cursor and backlog
            snap["upstream_sinks"] = {sink.name: sink.status() for sink in self.sinks}
        if self.sources:
            snap["serial_sources"] = {p.gtin: p.status() for p in self.sources}
        snap["mqtt"] = self.status()
        if self._requests:
            snap["serial_requests"] = self.pending_serial_requests()
        return snap

    async def _publish_state(self, client: aiomqtt.Client) -> None:
        try:
            payload = dumps(self.state_payload())
        except Exception as exc:  # noqa: BLE001 - a bad snapshot must not take the connection down
            log.error("state_snapshot_failed", error=str(exc))
            return
        await client.publish(self.topic_state, payload, qos=1, retain=True)
        self.state_published += 1

    async def _state_loop(self, client: aiomqtt.Client) -> None:
        interval = self.mqtt.state_interval_s
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._state_dirty.wait(), interval)
            self._state_dirty.clear()
            await self._publish_state(client)
            await asyncio.sleep(STATE_MIN_INTERVAL_S)

    def packml_payloads(self) -> dict[str, dict[str, Any]]:
        """PackTags by topic group (README "PackML"): the same numbers the OPC UA server and the PLC handshake show."""
        if not isinstance(self.target, PackmlTarget):
            return {}  # a target that is no PackML unit (a test double, a tool): no packml topics
        tags = self.target.packtags().to_json()
        admin = tags.pop("Admin")
        stop = tags.pop("StopReason")
        ts = tags["ts"]
        return {"status": tags, "admin": {"StopReason": stop, **admin, "ts": ts}}

    async def _packml_loop(self, client: aiomqtt.Client) -> None:
        """Publish each PackTags group, retained, when its content (not its timestamp) changed."""
        last: dict[str, bytes] = {}  # empty after every connect: the first round publishes every group
        interval = self.cfg.packml.publish_interval_s
        while True:
            try:
                groups = self.packml_payloads()
            except Exception as exc:  # noqa: BLE001 - a bad reading must not take the connection down
                log.error("packml_snapshot_failed", error=str(exc))
                groups = {}
            for name, body in groups.items():
                key = dumps({k: v for k, v in body.items() if k != "ts"})
                if last.get(name) != key:
                    await client.publish(self.topic_packml + name, dumps(body), qos=1, retain=True)
                    last[name] = key
                    self.packml_published += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._packml_dirty.wait(), interval)
            self._packml_dirty.clear()
            await asyncio.sleep(STATE_MIN_INTERVAL_S / 4)

    # ---------------------------------------------------------------- serial requests

    async def _outgoing(self, client: aiomqtt.Client) -> None:
        while True:
            await self._outgoing_wake.wait()
            self._outgoing_wake.clear()
            for r in list(self._requests.values()):
                if r["sent"]:
                    continue
                body = {k: r[k] for k in ("request_id", "gtin", "count", "format", "requested_at")}
                body["line"] = self.root
                body["reply_to"] = f"{self.topic_cmd}provision_pool"
                await client.publish(self.topic_serial_request, dumps(body), qos=1)
                r["sent"] = True

    def _note_provision(self, result: Any) -> None:
        if not isinstance(result, dict):
            return
        rid = result.get("request_id")
        r = self._requests.get(rid) if isinstance(rid, str) else None
        if r is None or not isinstance(rid, str):
            return
        r["received"] += int(result.get("accepted") or 0)
        r["pages"] += 1
        if r["received"] >= r["count"]:
            del self._requests[rid]
            log.info("serial_request_complete", request_id=rid, received=r["received"], pages=r["pages"])
        self._state_dirty.set()

    # ---------------------------------------------------------------- commands

    async def _commands(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = str(message.topic)
            if not topic.startswith(self.topic_cmd):
                continue
            name = topic[len(self.topic_cmd) :]
            if message.retain:
                self._ignore("retained", name)
                continue
            if message.payload is None or message.payload in (b"", ""):
                self._ignore("empty_payload", name)
                continue
            reply, reply_topic, props = await self.handle_command(name, message.payload, message.properties)
            try:
                await client.publish(reply_topic, dumps(reply), qos=1, properties=props)
            except aiomqtt.MqttError as exc:
                # the client retries with the same command_id and gets the cached reply
                log.warning("command_reply_failed", command=name, command_id=reply.get("command_id"), error=str(exc))
                raise

    async def handle_command(self, name: str, payload: Any, properties: Any = None) -> tuple[dict[str, Any], str, Properties | None]:
        """Validate, de-duplicate and execute one command; returns (reply, reply topic, reply properties)."""
        response_topic = getattr(properties, "ResponseTopic", None) if properties is not None else None
        correlation = getattr(properties, "CorrelationData", None) if properties is not None else None
        user_props = dict(getattr(properties, "UserProperty", None) or []) if properties is not None else {}
        origin = str(user_props.get("origin") or user_props.get("client_id") or "anonymous")[:128]
        default_topic = f"{self.topic_cmd}{name}/reply"
        topic_problem = None if response_topic is None else self.response_topic_problem(response_topic, name)
        reply_topic = default_topic if response_topic is None or topic_problem else response_topic
        props: Properties | None = None
        if self.mqtt.protocol == "5":
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = "application/json"
            if correlation is not None:
                props.CorrelationData = correlation
        command_id = None
        try:
            raw = _as_bytes(payload)
            offload = len(raw) > PARSE_IN_THREAD_BYTES
            obj = await asyncio.to_thread(self._decode, name, raw) if offload else self._decode(name, raw)
            command_id = obj.get("command_id") if isinstance(obj.get("command_id"), str) else None
            if topic_problem:
                raise CommandError("bad_response_topic", topic_problem)
            if self.mqtt.authorized_origins and origin not in self.mqtt.authorized_origins:
                raise CommandError("unauthorized", f"origin {origin!r} is not in mqtt.authorized_origins")
            envelope = {k: obj.pop(k) for k in ENVELOPE_KEYS if k in obj}
            if name in AUTH_COMMANDS:
                return await self._auth_command(name, obj, envelope, origin, command_id), reply_topic, props
            principal = None
            if self.access is not None:
                principal = await self._principal(obj, envelope, origin)
            cmd = await asyncio.to_thread(_validate, obj, principal is not None) if offload else _validate(obj, principal is not None)
            cached = await self._cached_reply(cmd.command_id, name)
            if cached is not None:
                log.info("command_repeated", command=name, command_id=cmd.command_id, origin=origin)
                return cached, reply_topic, props
            self._check_references(cmd)
            if principal is None:
                if any(k in envelope for k in SIGNATURE_KEYS):
                    raise CommandError("unsupported", "access control is off on this line: there are no users to sign")
                result = await self.target.execute(cmd, origin=f"mqtt:{origin}")
            else:
                assert self.access is not None
                self._l3_answer(cmd, principal, origin)
                signed = await sign(self.access, cmd, principal, envelope.get("signature"), envelope.get("second_signature"),
                                    channel="mqtt", origin=f"mqtt:{origin}")
                result = await self.target.execute(cmd, origin=f"mqtt:{origin}", principal=principal, signatures=signed)
        except CommandError as exc:
            return self._refused(name, command_id or exc.command_id, origin, exc.code, exc.message), reply_topic, props
        except CommandRejected as exc:
            return self._refused(name, command_id, origin, exc.code, exc.reason), reply_topic, props
        except Exception as exc:  # noqa: BLE001 - the caller gets an answer, the log gets the traceback (once per interval)
            if "internal" not in self.refusals.pending():
                log.exception("command_failed", command=name, command_id=command_id, origin=origin)
            return self._refused(name, command_id, origin, "internal", f"{type(exc).__name__}: {exc}"[:500]), reply_topic, props
        reply = {"ok": True, "command_id": cmd.command_id, "command": name, "result": result}
        if cmd.command_id:
            self._replies[cmd.command_id] = reply
            self._replies.move_to_end(cmd.command_id)
            while len(self._replies) > REPLY_CACHE_SIZE:
                self._replies.popitem(last=False)
        if name == "provision_pool":
            self._note_provision(result)
        self.commands_accepted += 1
        # reads (verify_code, request_state) may come by the thousand: they change nothing, so debug only
        (log.debug if name in READ_ONLY_COMMANDS else log.info)("command_accepted", command=name, command_id=cmd.command_id, origin=origin)
        self._state_dirty.set()
        return reply, reply_topic, props

    async def _principal(self, obj: dict[str, Any], envelope: dict[str, Any], origin: str) -> Any:
        """Who sends this command (from its auth block); its actor is set to that user, a different one refused."""
        assert self.access is not None
        if "auth" not in envelope:
            raise self.access.deny("unauthenticated", "the command needs auth: {token} (from login) or {username, password}", f"mqtt:{origin}")
        probe = _probe(obj)  # a one-shot credential may change its own expired password: it needs to see the command
        principal = await self.access.credential(envelope["auth"], channel="mqtt", client_id=origin, origin=f"mqtt:{origin}", command=probe)
        claimed = obj.get("actor")
        if claimed is not None and claimed != principal.name:
            raise self.access.deny("forged_actor", f"actor {str(claimed)[:64]!r} is not the authenticated user {principal.name!r} "
                                   "(leave actor out: linectl sets it)", f"mqtt:{origin}", principal.name)
        obj["actor"] = principal.name
        return principal

    def _l3_answer(self, cmd: Any, principal: Any, origin: str) -> None:
        """An L3 service account's (role l3) provision_pool that answers an outstanding request of this line, for its
        GTIN and with at most the serials still owed, is marked so no person's signature is asked (access.signing).

        Any other provision_pool of a service account is refused when access.signatures requires a signature (a
        service account cannot sign); a person's provision_pool keeps its signature rule, request_id or not."""
        if not isinstance(cmd, ProvisionPool) or SERVICE_ROLE not in principal.roles:
            return
        assert self.access is not None
        r = self._requests.get(cmd.request_id) if cmd.request_id else None
        if r is None:
            if requirement(self.access.cfg.signatures, cmd) is not None:
                raise self.access.deny("signature_required", f"request_id {cmd.request_id!r} is not an outstanding serial request of this "
                                       "line: a service account's provision_pool is accepted unsigned only as the answer to one "
                                       "(any other import needs a person's signature)", f"mqtt:{origin}", principal.name)
            return
        if r["gtin"] != cmd.gtin:
            raise CommandError("request_mismatch", f"request {cmd.request_id} asked for GTIN {r['gtin']}, not {cmd.gtin}")
        owed = int(r["count"]) - int(r["received"])
        if cmd.count() > owed:
            raise CommandError("request_exceeded", f"request {cmd.request_id} is owed {owed} serials; this page has {cmd.count()} "
                               "(send at most what is owed: more would be an import nobody decided)")
        cmd.mark_l3_answer()

    async def _auth_command(self, name: str, obj: dict[str, Any], envelope: dict[str, Any], origin: str, command_id: str | None) -> dict[str, Any]:
        """login / logout: answered by the access gate, never cached (a retried login opens a new session)."""
        if self.access is None:
            raise CommandError("unsupported", "access control is off on this line: commands need no login")
        body = {k: v for k, v in obj.items() if k not in ("name", "command_id")}
        if name == "login":
            extra = set(body) - {"username", "password"}
            if extra:
                raise CommandError("invalid", f"login takes username and password; unknown: {', '.join(sorted(extra))}")
            result = await self.access.login(body.get("username"), body.get("password"), channel="mqtt", client_id=origin, origin=f"mqtt:{origin}")
        else:
            if body:
                raise CommandError("invalid", f"logout takes only auth: {{token}}; unknown: {', '.join(sorted(body))}")
            auth = envelope.get("auth")
            token = auth.get("token") if isinstance(auth, dict) else None
            result = await self.access.logout(token, client_id=origin, origin=f"mqtt:{origin}")
        self.commands_accepted += 1
        log.info("command_accepted", command=name, command_id=command_id, origin=origin, user=result.get("username"))
        return {"ok": True, "command_id": command_id, "command": name, "result": result}

    def response_topic_problem(self, topic: Any, name: str) -> str | None:
        """Why a reply must not go to `topic` (None: it may). The command's own fallback reply topic is always fine."""
        if not isinstance(topic, str) or not topic:
            return "response topic must be a non-empty string"
        if len(topic.encode()) > MAX_RESPONSE_TOPIC_BYTES:
            return f"response topic is longer than {MAX_RESPONSE_TOPIC_BYTES} bytes"
        if "+" in topic or "#" in topic or "\0" in topic:
            return "response topic must not contain wildcards (+, #) or NUL"
        if topic.startswith("$"):
            return "response topic must not be a $-topic (reserved by the broker, e.g. $SYS)"
        if topic == f"{self.topic_cmd}{name}/reply":
            return None
        for root in self._own_roots:
            if topic == root or topic.startswith(root + "/"):
                return f"response topic must not be under linectl's own topic root {root}/"
        return None

    def _decode(self, name: str, payload: bytes) -> dict[str, Any]:
        """Size, then shape (depth, items) without recursion, then json.loads: nothing unbounded runs first."""
        if len(payload) > self.mqtt.max_command_bytes:
            raise CommandError("too_large", f"payload is {len(payload)} bytes; the limit is mqtt.max_command_bytes = {self.mqtt.max_command_bytes}")
        if name not in COMMAND_NAMES and name not in AUTH_COMMANDS:
            raise CommandError("unknown_command", f"unknown command {name[:100]!r}; known: {', '.join((*AUTH_COMMANDS, *COMMAND_NAMES))}")
        text = payload.strip()
        if not text:
            raise CommandError("empty_payload", "payload is empty (an empty message clears a retained one; it is never a command)")
        problem = json_shape_problem(text)
        if problem is not None:
            raise CommandError("too_complex", problem)
        try:
            obj = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CommandError("bad_json", f"payload is not JSON: {str(exc)[:200]}") from None
        if not isinstance(obj, dict):
            raise CommandError("bad_request", "payload must be a JSON object")
        given = obj.get("name")
        if given is None:
            obj["name"] = name
        elif given != name:
            raise CommandError("name_mismatch", f"payload names command {given!r} but was sent to cmd/{name}")
        return obj

    def _check_references(self, cmd: Any) -> None:
        gtin = getattr(cmd, "gtin", None)
        if gtin is not None:
            try:
                self.cfg.product(gtin)
            except Exception:  # noqa: BLE001 - KeyError, or a malformed GTIN
                raise CommandError("unknown_gtin", f"GTIN {gtin} is not configured on this line") from None

    async def _cached_reply(self, command_id: str | None, name: str) -> dict[str, Any] | None:
        if not command_id:
            return None
        reply = self._replies.get(command_id)
        if reply is None and self.store is not None:
            try:
                reply = await asyncio.to_thread(self.store.command_reply, command_id)
            except Exception as exc:  # noqa: BLE001 - cannot tell: refuse rather than risk running it twice
                raise CommandError("store_unavailable", f"cannot check command_id {command_id!r}: {exc}") from None
            if reply is not None:
                self._replies[command_id] = reply
        if reply is None:
            return None
        if reply.get("command") not in (None, name):
            raise CommandError("command_id_reused", f"command_id {command_id!r} was already used for {reply.get('command')}")
        return reply

    def _refused(self, name: str, command_id: str | None, origin: str, code: str, message: str) -> dict[str, Any]:
        self.commands_refused += 1
        if self.refusals.note(code, origin, f"{name[:64]}: {message[:120]}"):  # the first of its reason this interval
            log.warning("command_refused", command=name[:100], command_id=command_id, origin=origin, code=code, reason=message[:300])
        return {"ok": False, "command_id": command_id, "command": name, "error": {"code": code, "message": message}}

    def _ignore(self, reason: str, name: str) -> None:
        self.commands_ignored += 1
        if self._ignored.note(reason, "", name[:64]):
            log.warning("command_ignored", command=name[:100], reason=reason, why="never executed, not replied to")


def _as_bytes(payload: Any) -> bytes:
    if payload is None:
        return b""
    if isinstance(payload, str):
        return payload.encode()
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    return str(payload).encode()  # aiomqtt hands int/float payloads over already decoded


def _validate(obj: dict[str, Any], authenticated: bool = False) -> Any:
    try:
        return COMMAND_ADAPTER.validate_python(obj, context=AUTHENTICATED if authenticated else None)
    except ValidationError as exc:
        cid = obj.get("command_id") if isinstance(obj.get("command_id"), str) else None
        raise CommandError("invalid", _validation_message(exc), cid) from None


def _probe(obj: dict[str, Any]) -> Any:
    """The command if it validates as is (only to see whether a one-shot credential changes its own password), else None."""
    if obj.get("name") != "users_admin":
        return None
    try:
        return COMMAND_ADAPTER.validate_python(obj, context=AUTHENTICATED)
    except ValidationError:
        return None


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:10]:
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p in COMMAND_NAMES))
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
