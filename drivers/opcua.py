"""OPC UA PLC driver (asyncua client): the logical tag map of the Modbus/S7 drivers, addressed by NodeId or browse path.

Why it looks like this:
- Namespace indexes are the server's to assign and change (a PLC download,
  another companion spec loaded): a tag may name its namespace by URI
  (`nsu=<uri>;s=...`, or an alias from `namespaces` in a browse path), and
  every node is resolved once per session, never cached across sessions.
- Poll tags come by subscription (publishing interval = poll_interval_s); the
  poll loop reads the wire only when no notification (of a tag, or of the
  server's CurrentTime, which ticks while a stopped line's tags stand still)
  has come for `stale_after_s`: a subscription the server dropped silently
  must not freeze the engine's view of the gate. Explicit `read_tags([...])`
  always reads. When that wire read succeeds the session is fine and the
  subscription is what died (a server deletes subscriptions without a word
  when short of resources or after a download, and asyncua's client then
  stops publishing): the driver creates a new one in the same session, and
  says so in its health (degraded) until the new one delivers.
- Array writes carry an IndexRange (OPC UA Part 4, NumericRange), so a verdict
  slot [seq, verdict] is one atomic write and never rewrites its neighbours.
  Every write's StatusCode is checked, and with confirm=readback the value is
  read back and compared (a server may accept and clamp, or a PLC program may
  own the variable).
- Restart detection: ServerStatus.StartTime is read at every connect and
  watched; without a `plc_epoch` tag in the map it stands in for the PLC's
  boot counter (milliseconds since 1970), so the engine sees a server restart
  as a new epoch exactly as on Modbus/S7.
- asyncua's own reconnect is not used: PolledPlc's supervisor reconnects with
  linectl's capped jittered backoff and logs state changes once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import os
import re
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from linectl.drivers.base import DeviceError, HealthState, TagError, register_driver
from linectl.drivers.plc_tags import (
    ConnectionLost,
    PlcConfigBase,
    PolledPlc,
    _check_scalar,
    _Model,
    polled,
)

logging.getLogger("asyncua").setLevel(logging.CRITICAL)  # it logs every reconnect/keepalive; we log state changes once

OpcuaType = Literal["Boolean", "Byte", "Int16", "UInt16", "Int32", "UInt32", "Float", "Double", "String", "DateTime"]
#: the scalar checker's name for each OPC UA type (shared range rules with Modbus/S7)
_CHECK_AS = {"Boolean": "bool", "Byte": "Byte", "Int16": "Int16", "UInt16": "UInt16", "Int32": "Int32", "UInt32": "UInt32",
             "Float": "float32"}
_ID_RE = re.compile(r"^(?:(?:ns=(\d+)|nsu=([^;]+));)?([isgb])=(.+)$", re.S)
_ALIAS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
#: ServerStatus.StartTime and .CurrentTime (OPC UA Part 6 NodeIds.csv: Server_ServerStatus_StartTime / _CurrentTime)
START_TIME_NODE = "i=2257"
CURRENT_TIME_NODE = "i=2258"


@dataclass(frozen=True)
class NodeRef:
    """A parsed `node`: a NodeId (namespace by index or URI) or a browse path from the Objects folder."""

    ns_index: int | None = None
    ns_uri: str | None = None
    ident: str = ""  # "s=Line.Ring", "i=1234" ...
    path: tuple[tuple[str, str], ...] = ()  # ((namespace prefix: "" / index / alias, name), ...)

    @property
    def is_path(self) -> bool:
        return bool(self.path)


def parse_node(text: str, aliases: dict[str, str] | None = None) -> NodeRef:
    """Parse a tag's `node`; ValueError names what is wrong (config load shows it with the tag's path)."""
    text = text.strip()
    m = _ID_RE.match(text)
    if m:
        ns, nsu, kind, rest = m.groups()
        if kind == "i" and not rest.isdigit():
            raise ValueError(f"node {text!r}: a numeric identifier i= takes digits")
        return NodeRef(ns_index=int(ns) if ns is not None else (None if nsu else 0), ns_uri=nsu, ident=f"{kind}={rest}")
    if "/" not in text and not text.startswith("Objects"):
        raise ValueError(
            f"node {text!r} is neither a NodeId (ns=2;s=Line.Ring, nsu=<uri>;s=..., i=2258) "
            "nor a browse path (Objects/2:Line/2:Ring)"
        )
    segs = [s for s in text.split("/")]
    if any(not s for s in segs):
        raise ValueError(f"browse path {text!r} has an empty segment")
    if segs[0] not in ("Objects", "0:Objects"):
        raise ValueError(f"browse path {text!r} must start at Objects")
    out: list[tuple[str, str]] = []
    for seg in segs[1:]:
        prefix, sep, name = seg.partition(":")
        if not sep:
            prefix, name = "", seg
        elif not prefix.isdigit() and prefix not in (aliases or {}):
            raise ValueError(
                f"browse path {text!r}: segment {seg!r} names namespace {prefix!r}, which is neither an index "
                "nor an alias in namespaces"
            )
        if not name:
            raise ValueError(f"browse path {text!r}: segment {seg!r} has no name")
        out.append((prefix, name))
    if not out:
        raise ValueError(f"browse path {text!r} names no node below Objects")
    return NodeRef(path=tuple(out))


class OpcuaTagSpec(_Model):
    """Where one logical tag lives in an OPC UA server: a Variable node and its built-in type."""

    node: str = Field(description='NodeId ("ns=2;s=Line.Ring", "nsu=urn:plc;s=Line.Ring") or browse path ("Objects/2:Line/2:Ring")')
    type: OpcuaType
    count: int = Field(1, ge=1, le=4096, description="> 1: a one-dimensional array variable of this length (value is a list)")
    writable: bool = Field(False, description="linectl may write it (tags linectl writes must say so)")
    poll: bool | None = Field(None, description="subscribe/poll; default: yes, except tags only linectl writes")

    @model_validator(mode="after")
    def _check(self) -> OpcuaTagSpec:
        if self.type == "DateTime" and self.writable:
            raise ValueError("a DateTime tag is read-only here (it reads as milliseconds since 1970)")
        return self

    def check_value(self, v: Any) -> Any:
        if self.type == "String":
            if not isinstance(v, str):
                raise TagError(f"a String tag takes text, not {type(v).__name__}")
            return v
        if self.type == "Double":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TagError(f"a Double tag takes a number, not {v!r}")
            return float(v)
        if self.type == "DateTime":
            raise TagError("a DateTime tag is read-only")
        return _check_scalar(_CHECK_AS[self.type], v)

    def describe(self) -> str:
        return f"node {self.node} {self.type}" + (f"[{self.count}]" if self.count > 1 else "")


class OpcuaConfig(PlcConfigBase):
    driver: Literal["opcua"]
    url: str = Field(description="endpoint URL, opc.tcp://host:4840[/path]")
    tags: dict[str, OpcuaTagSpec] = Field(default_factory=dict)
    namespaces: dict[str, str] = Field(
        default_factory=dict, description="alias -> namespace URI, for browse path segments (plc:Line); resolved per session"
    )
    subscribe: bool = Field(True, description="poll tags by subscription (publishing interval poll_interval_s); false: read each cycle")
    stale_after_s: float = Field(
        2.0, gt=0, description="no notification (tags or the server's CurrentTime) for this long: read the poll tags from the wire"
    )
    confirm: Literal["readback", "status"] = Field(
        "readback", description="status: the write's StatusCode confirms; readback: also read the value back and compare"
    )
    security_policy: Literal["None", "Basic256Sha256"] = "None"
    security_mode: Literal["Sign", "SignAndEncrypt"] | None = Field(None, description="required with Basic256Sha256")
    certificate: Path | None = Field(None, description="client application instance certificate (DER or PEM)")
    private_key: Path | None = Field(None, description="its private key (PEM)")
    server_certificate: Path | None = Field(None, description="the server's certificate: pins which server linectl trusts")
    application_uri: str = Field("urn:linectl:client", description="must match the URI in the client certificate's subjectAltName")
    username: str | None = None
    password_env: str | None = Field(None, description="environment variable holding the password (never the password in YAML)")
    password_file: Path | None = Field(None, description="file holding the password (first line)")

    def tag_specs(self) -> dict[str, Any]:
        return dict(self.tags)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^opc\.tcp://[^/:\s]+(:\d{1,5})?(/\S*)?$", v):
            raise ValueError(f"url {v!r} is not opc.tcp://host[:port][/path]")
        return v

    @field_validator("namespaces")
    @classmethod
    def _aliases(cls, v: dict[str, str]) -> dict[str, str]:
        for alias, uri in v.items():
            if not _ALIAS_RE.match(alias) or alias.isdigit():
                raise ValueError(f"namespace alias {alias!r} must be a name (letters, digits, _ . -), not a number")
            if not uri.strip():
                raise ValueError(f"namespace alias {alias!r} has an empty URI")
        return v

    @model_validator(mode="after")
    def _opcua(self) -> OpcuaConfig:
        seen: dict[tuple[Any, ...], str] = {}
        for name, spec in self.tags.items():
            try:
                ref = parse_node(spec.node, self.namespaces)
            except ValueError as exc:
                raise ValueError(f"tag {name}: {exc}") from None
            key = (ref.ns_index, ref.ns_uri, ref.ident, ref.path)
            if key in seen:
                raise ValueError(f"tags {seen[key]} and {name} name the same node {spec.node}")
            seen[key] = name
        if self.security_policy == "None":
            extra = [k for k in ("security_mode", "certificate", "private_key", "server_certificate") if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"{', '.join(extra)} given but security_policy is None (set security_policy: Basic256Sha256)")
        else:
            missing = [k for k in ("security_mode", "certificate", "private_key", "server_certificate") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"security_policy {self.security_policy} needs {', '.join(missing)}")
            for k in ("certificate", "private_key", "server_certificate"):
                p = getattr(self, k)
                if not p.is_file():
                    raise ValueError(f"{k} {p}: no such file")
        if self.username is None:
            if self.password_env or self.password_file:
                raise ValueError("password_env / password_file given without username")
        else:
            if bool(self.password_env) == bool(self.password_file):
                raise ValueError("username needs exactly one of password_env or password_file (a password never sits in the YAML)")
            if self.password_file is not None and not self.password_file.is_file():
                raise ValueError(f"password_file {self.password_file}: no such file")
        return self

    def password(self) -> str:
        """The password from its environment variable or file; DeviceError when it is not there (a health reason)."""
        if self.password_env:
            pw = os.environ.get(self.password_env)
            if pw is None:
                raise DeviceError(f"password_env {self.password_env} is not set")
            return pw
        assert self.password_file is not None
        try:
            return self.password_file.read_text(encoding="utf-8").splitlines()[0] if self.password_file.stat().st_size else ""
        except OSError as exc:
            raise DeviceError(f"password_file {self.password_file}: {exc.strerror or exc}") from None


class _Handler:
    """asyncua data change handler: values into the driver's cache, stamped with arrival time."""

    def __init__(self, plc: OpcuaPlc) -> None:
        self._plc = plc

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        self._plc._notified(node, val)

    def status_change_notification(self, status: Any) -> None:
        self._plc._subscription_status(status)

    def event_notification(self, event: Any) -> None:  # pragma: no cover - no event subscriptions
        pass


@register_driver
class OpcuaPlc(PolledPlc):
    config_class = OpcuaConfig
    config: OpcuaConfig
    #: why the health reads degraded after a re-subscription ("" otherwise); class default: set_health may run early
    _sub_note = ""

    def __init__(self, name: str, config: OpcuaConfig) -> None:
        super().__init__(name, config)
        self._client: Any = None
        self._nodes: dict[str, Any] = {}  # logical tag -> asyncua Node, this session
        self._by_nodeid: dict[Any, str] = {}
        self._sub: Any = None
        self._cache: dict[str, Any] = {}
        self._cache_at = 0.0
        self._sub_broken = ""
        self._start_time: dt.datetime | None = None
        self._start_node: Any = None
        self._clock_node: Any = None
        #: ServerStatus.StartTime stands in for the boot counter when the map has none (see the module docstring)
        self._virtual_epoch = "plc_epoch" not in self._tags
        self.server_restarts = 0
        #: subscriptions re-created in a live session after going silent (the server dropped them)
        self.resubscriptions = 0
        self._resubscribed_at = 0.0
        self._sub_note = ""

    def _where(self) -> str:
        return self.config.url

    @property
    def tag_names(self) -> list[str]:
        return list(self._tags) + (["plc_epoch"] if self._virtual_epoch else [])

    # -- connection -----------------------------------------------------------------

    async def _open(self) -> None:
        from asyncua import Client, ua
        from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

        await self._close()
        cfg = self.config
        # asyncua's own bound covers the session set-up (a secured CreateSession is slow on a busy PLC); every
        # request after it is bounded by reply_timeout_s in _call
        client = Client(cfg.url, timeout=cfg.connect_timeout_s)
        client.application_uri = cfg.application_uri
        client.name = client.description = f"linectl {self.name}"
        client.session_timeout = max(10_000, int(cfg.heartbeat_timeout_s * 4000))
        if cfg.username is not None:
            client.set_user(cfg.username)
            client.set_password(cfg.password())
        if cfg.security_policy == "Basic256Sha256":
            mode = ua.MessageSecurityMode.Sign if cfg.security_mode == "Sign" else ua.MessageSecurityMode.SignAndEncrypt
            await client.set_security(
                SecurityPolicyBasic256Sha256, str(cfg.certificate), str(cfg.private_key),
                server_certificate=str(cfg.server_certificate), mode=mode,
            )
        self._client = client
        if cfg.security_policy == "Basic256Sha256":
            await self._check_pinned()
        try:
            await client.connect()
        except Exception as exc:  # noqa: BLE001 - refused session, bad certificate, socket error: one health reason
            raise DeviceError(_ua_why(exc)) from None
        await self._resolve(client)
        start = await self._read_start_time()
        if self._start_time is not None and start != self._start_time:
            self.server_restarts += 1
            self.log.warning("plc_server_restarted", was=self._start_time.isoformat(), now=start.isoformat())
        self._start_time = start
        self._cache = {}
        self._cache_at = 0.0
        self._sub_broken = ""
        self._sub_note = ""
        self._resubscribed_at = 0.0
        if cfg.subscribe:
            await self._subscribe(client)

    async def _check_pinned(self) -> None:
        """The certificate the server presents (its endpoint list, asked before the secured channel) must be the pinned
        server_certificate. asyncua would encrypt to the pinned key regardless, and a server that cannot decrypt it
        simply does not answer: the health would say "timed out" instead of naming the certificate."""
        from asyncua import Client
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.serialization import Encoding

        cfg = self.config
        assert cfg.server_certificate is not None
        data = cfg.server_certificate.read_bytes()
        pinned = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
        try:
            endpoints = await Client(cfg.url, timeout=cfg.connect_timeout_s).connect_and_get_server_endpoints()
        except Exception as exc:  # noqa: BLE001 - unreachable: the connect below says so the usual way
            self.log.debug("plc_endpoints_unreadable", error=_ua_why(exc))
            return
        presented = {e.ServerCertificate for e in endpoints if e.SecurityPolicyUri.endswith("#Basic256Sha256") and e.ServerCertificate}
        if presented and pinned.public_bytes(Encoding.DER) not in presented:
            other = x509.load_der_x509_certificate(next(iter(presented)))
            raise DeviceError(
                f"the server's certificate is not the pinned server_certificate {cfg.server_certificate} (presented: "
                f"{other.subject.rfc4514_string()[:80]}, sha256 {other.fingerprint(hashes.SHA256()).hex()[:16]}..., pinned sha256 "
                f"{pinned.fingerprint(hashes.SHA256()).hex()[:16]}...): another server, or the PLC's certificate was renewed")

    async def _resolve(self, client: Any) -> None:
        from asyncua import ua

        nsidx: dict[str, int] = {}

        async def index_of(uri: str) -> int:
            if uri not in nsidx:
                try:
                    nsidx[uri] = await client.get_namespace_index(uri)
                except ValueError:
                    raise DeviceError(f"the server has no namespace {uri}") from None
            return nsidx[uri]

        nodes: dict[str, Any] = {}
        for name, spec in self._tags.items():
            ref = parse_node(spec.node, self.config.namespaces)
            if ref.is_path:
                qnames = [ua.QualifiedName("Objects", 0)]
                for prefix, bname in ref.path:
                    if prefix == "":
                        idx = 0
                    elif prefix.isdigit():
                        idx = int(prefix)
                    else:
                        idx = await index_of(self.config.namespaces[prefix])
                    qnames.append(ua.QualifiedName(bname, idx))
                try:
                    node = await client.nodes.root.get_child(qnames)
                except Exception as exc:  # noqa: BLE001 - BadNoMatch and friends
                    raise DeviceError(f"tag {name}: browse path {spec.node} not found ({_ua_why(exc)})") from None
            else:
                nsi = ref.ns_index if ref.ns_uri is None else await index_of(ref.ns_uri)
                node = client.get_node(f"ns={nsi};{ref.ident}")
            nodes[name] = node
        # one read proves every node exists and has the configured shape
        names = list(nodes)
        dvs = await client.read_attributes([nodes[n] for n in names], ua.AttributeIds.Value)
        for n, dv in zip(names, dvs):
            if dv.StatusCode is not None and not dv.StatusCode.is_good():
                raise DeviceError(f"tag {n}: node {self._tags[n].node}: {dv.StatusCode.name}")
            self._decode(n, dv)
        self._nodes = nodes
        self._by_nodeid = {node.nodeid: n for n, node in nodes.items()}

    async def _read_start_time(self) -> dt.datetime:
        node = self._client.get_node(START_TIME_NODE)
        self._start_node = node
        try:
            value = await node.read_value()
        except Exception as exc:  # noqa: BLE001
            raise DeviceError(f"cannot read ServerStatus.StartTime: {_ua_why(exc)}") from None
        if not isinstance(value, dt.datetime):
            raise DeviceError(f"ServerStatus.StartTime is {value!r}, not a time")
        return value

    async def _subscribe(self, client: Any) -> None:
        period_ms = self.config.poll_interval_s * 1000
        self._sub = await client.create_subscription(period_ms, _Handler(self))
        nodes = [self._nodes[n] for n in self._poll_names if n in self._nodes]
        # the server clock ticks while the PLC's tags stand still: its notifications prove the subscription lives
        self._clock_node = client.get_node(CURRENT_TIME_NODE)
        nodes += [self._start_node, self._clock_node]
        await self._sub.subscribe_data_change(nodes)

    async def _close(self) -> None:
        client, self._client = self._client, None
        self._sub = None
        self._nodes = {}
        if client is not None:
            try:
                await asyncio.wait_for(client.disconnect(), 1.0)
            except Exception:  # noqa: BLE001 - closing a dead session must not fail the supervisor
                try:
                    client.disconnect_socket()
                except Exception:  # noqa: BLE001
                    pass

    # -- subscription ---------------------------------------------------------------

    def _notified(self, node: Any, val: Any) -> None:
        nodeid = getattr(node, "nodeid", None)
        now = time.monotonic()
        if self._clock_node is not None and nodeid == self._clock_node.nodeid:
            self._cache_at = now
        if self._start_node is not None and nodeid == self._start_node.nodeid:
            if isinstance(val, dt.datetime) and self._start_time is not None and val != self._start_time:
                # the server restarted under a live session (it kept the session): a new epoch all the same
                self.server_restarts += 1
                self.log.warning("plc_server_restarted", was=self._start_time.isoformat(), now=val.isoformat())
                self._start_time = val
            self._cache_at = now
        name = self._by_nodeid.get(nodeid)  # (a tag may name a server node too: i=2257 as a DateTime tag)
        if name is None:
            return
        try:
            self._cache[name] = self._shape(name, val)
        except DeviceError as exc:
            self._sub_broken = exc.reason
            return
        self._cache_at = now

    def _subscription_status(self, status: Any) -> None:
        code = getattr(status, "Status", status)
        self._sub_broken = f"connection lost: subscription ended ({getattr(code, 'name', code)})"
        if self._broken is not None:
            self._mark_broken(self._sub_broken)

    async def read_tags(self, names: list[str] | None = None) -> dict[str, Any]:
        epoch = self._virtual_epoch and (names is None or "plc_epoch" in names)
        real = None if names is None else [n for n in names if not (self._virtual_epoch and n == "plc_epoch")]
        values: dict[str, Any] | None = None
        if real is None and self.config.subscribe and self._session_ok and not self._sub_broken and self._cache_at:
            fresh = time.monotonic() - self._cache_at < self.config.stale_after_s
            if fresh and all(n in self._cache for n in self._poll_names):
                values = {n: self._cache[n] for n in self._poll_names}
        stale = values is None and real is None and self.config.subscribe and self._session_ok and self._sub is not None
        if values is None:
            values = await super().read_tags(real) if real is None or real else {}
        if stale and not self._sub_broken:
            await self._resubscribe()
        if epoch:
            self._require_session()
            values["plc_epoch"] = self._epoch_value()
        self._latest.update(values)
        return values

    async def _resubscribe(self) -> None:
        """The wire answered but the subscription said nothing for stale_after_s: replace it (at most once per
        stale_after_s), in this session; a failure to do so breaks the session (the supervisor reconnects)."""
        now = time.monotonic()
        if now - self._resubscribed_at < self.config.stale_after_s or self._client is None:
            return
        self._resubscribed_at = now
        silent = now - self._cache_at if self._cache_at else float("nan")
        old, self._sub = self._sub, None
        try:
            await asyncio.wait_for(old.delete(), self.config.reply_timeout_s)
        except Exception:  # noqa: BLE001, S110 - the server dropped it already: BadSubscriptionIdInvalid is the usual answer
            pass
        try:
            async with self._io:
                await asyncio.wait_for(self._subscribe(self._client), self.config.reply_timeout_s * 4)
        except Exception as exc:  # noqa: BLE001 - cannot subscribe any more: the session is no good
            self._mark_broken(f"subscription lost and not re-created: {_ua_why(exc)}")
            return
        self.resubscriptions += 1
        self._sub_note = (f"subscription silent for {silent:.1f} s while the server answers reads (dropped by the server?): "
                          "re-subscribed, reading the wire until it delivers")
        self.log.warning("plc_resubscribed", silent_s=round(silent, 2), resubscriptions=self.resubscriptions)
        self.set_health(HealthState.DEGRADED, self._sub_note)

    def _watch_heartbeat(self, first: bool) -> None:
        if self._sub_note and self._cache_at > self._resubscribed_at:  # the new subscription delivered
            self.log.info("plc_subscription_back", resubscriptions=self.resubscriptions)
            self._sub_note = ""
        super()._watch_heartbeat(first)

    def set_health(self, state: HealthState, reason: str = "") -> None:
        """As any driver's, except that "connected" reads degraded (with the reason) while a re-created
        subscription has not delivered yet: said once, not flipped back and forth at every poll."""
        if state == HealthState.CONNECTED and self._sub_note:
            state, reason = HealthState.DEGRADED, self._sub_note
        super().set_health(state, reason)

    def _epoch_value(self) -> int:
        assert self._start_time is not None
        return _ms(self._start_time)

    # -- reads ----------------------------------------------------------------------

    async def _call(self, what: str, request: Callable[[], Awaitable[Any]]) -> Any:
        """One request, bounded by reply_timeout_s, serialized with this device's other requests."""
        async with self._io:
            if self._client is None:
                raise ConnectionLost("connection lost")
            try:
                return await asyncio.wait_for(request(), self.config.reply_timeout_s)
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                raise ConnectionLost(f"no reply within {self.config.reply_timeout_s:g} s") from None
            except (ConnectionError, OSError) as exc:
                self.log.debug("plc_request_failed", request=what, error=str(exc) or type(exc).__name__)
                raise ConnectionLost(f"connection lost: {_ua_why(exc)}") from None
            except Exception as exc:  # noqa: BLE001 - a Bad... service result: the session itself is gone
                from asyncua.ua import UaStatusCodeError

                if isinstance(exc, UaStatusCodeError):
                    raise ConnectionLost(f"{what}: {_ua_why(exc)}") from None
                raise ConnectionLost(f"connection lost: {_ua_why(exc)}") from None

    async def _read(self, names: list[str]) -> dict[str, Any]:
        from asyncua import ua

        out: dict[str, Any] = {}
        client = self._client
        if client is None or not self._nodes:
            raise ConnectionLost("connection lost")
        dvs = await self._call("read", lambda: client.read_attributes([self._nodes[n] for n in names], ua.AttributeIds.Value))
        for n, dv in zip(names, dvs):
            if dv.StatusCode is not None and not dv.StatusCode.is_good():
                raise DeviceError(f"read {n}: {dv.StatusCode.name}")
            out[n] = self._decode(n, dv)
        return out

    def _decode(self, name: str, dv: Any) -> Any:
        return self._shape(name, dv.Value.Value if dv.Value is not None else None)

    def _shape(self, name: str, val: Any) -> Any:
        spec: OpcuaTagSpec = self._tags[name]
        if spec.count > 1:
            if not isinstance(val, list) or len(val) != spec.count:
                got = f"{len(val)} elements" if isinstance(val, list) else type(val).__name__
                raise DeviceError(f"tag {name}: node {spec.node} holds {got}, the tag map says {spec.type}[{spec.count}]")
            return [_conv(spec.type, v) for v in val]
        if isinstance(val, list):
            raise DeviceError(f"tag {name}: node {spec.node} holds an array, the tag map says a scalar {spec.type}")
        return _conv(spec.type, val)

    # -- writes ---------------------------------------------------------------------

    async def _write(self, name: str, spec: OpcuaTagSpec, values: list[Any], index: int) -> None:
        from asyncua import ua

        vtype = getattr(ua.VariantType, spec.type)
        node = self._nodes.get(name)
        client = self._client
        if node is None or client is None:
            raise ConnectionLost("connection lost")
        wv = ua.WriteValue()
        wv.NodeId = node.nodeid
        wv.AttributeId = ua.AttributeIds.Value
        if spec.count > 1:
            wv.Value = ua.DataValue(ua.Variant(values, vtype))
            if index != 0 or len(values) != spec.count:
                wv.IndexRange = f"{index}:{index + len(values) - 1}" if len(values) > 1 else str(index)
        else:
            wv.Value = ua.DataValue(ua.Variant(values[0], vtype))
        params = ua.WriteParameters()
        params.NodesToWrite = [wv]
        results = await self._call(f"write {name}", lambda: node.write_params(params))
        status = results[0]
        if not status.is_good():
            raise DeviceError(f"write {name}: the server refused it: {status.name}")
        if self.config.confirm == "readback":
            dvs = await self._call(f"read back {name}", lambda: client.read_attributes([node], ua.AttributeIds.Value))
            dv = dvs[0]
            if dv.StatusCode is not None and not dv.StatusCode.is_good():
                raise DeviceError(f"read back {name}: {dv.StatusCode.name}")
            got = self._decode(name, dv)
            got_l = got[index : index + len(values)] if spec.count > 1 else [got]
            if not _same(spec.type, got_l, values):
                raise DeviceError(f"write {name}: not confirmed, read back {got_l} instead of {values}")
        if polled(name, spec) and name in self._cache and spec.count > 1:
            cur = list(self._cache[name])
            cur[index : index + len(values)] = values
            self._cache[name] = cur
        elif polled(name, spec):
            self._cache[name] = values[0]


def _conv(typ: str, v: Any) -> Any:
    if typ == "DateTime":
        return _ms(v) if isinstance(v, dt.datetime) else None
    if typ == "Boolean":
        return bool(v)
    return v


def _ms(t: dt.datetime) -> int:
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return int(t.timestamp() * 1000)


def _same(typ: str, got: list[Any], want: list[Any]) -> bool:
    if len(got) != len(want):
        return False
    if typ == "Float":
        return [struct.pack(">f", g) for g in got] == [struct.pack(">f", w) for w in want]
    if typ == "Double":
        return all(g == w or (math.isnan(g) and math.isnan(w)) for g, w in zip(got, want))
    return bool(got == want)


def _ua_why(exc: BaseException) -> str:
    if isinstance(exc, DeviceError):
        return exc.reason
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    name = type(exc).__name__
    text = str(exc).strip()
    if name.startswith("Bad"):
        return f"{name}: {text}" if text and name not in text else (text or name)
    return text or name
