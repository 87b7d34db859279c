"""MQTT connection plumbing shared by the upstream forwarder (linectl.upstream.mqtt) and the command bridge
(linectl.upstream.bridge): client options from the config, a client that reports PUBACK reason codes, link
tracking that logs transitions (not every retry), and the reconnect loop with capped jittered backoff.

Why not aiomqtt's `await client.publish(qos=1)` for the forwarder: in aiomqtt 2.5.1 it does wait for the PUBACK
(paho 2.2 calls on_publish when the PUBACK arrives), but it drops the MQTT 5 PUBACK reason code (Mosquitto
answers an ACL-denied publish with 0x87 "not authorized", which would look delivered) and its wait is a plain
timeout that a dropped connection does not end. AckingClient keeps paho's message id and resolves a future with
the reason code, and exposes the connection's end so the forwarder's window can watch it.

Sessions: the forwarder's are always clean (the outbox, not the session, resends); the bridge asks for a
persistent command session on MQTT 5 (see linectl.upstream.bridge).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt
import paho.mqtt.client as paho
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from linectl.drivers.base import Backoff

if TYPE_CHECKING:  # pragma: no cover
    from linectl.config import LineConfig, MqttConfig

log = structlog.get_logger("linectl.forwarder")


class PublishRefused(aiomqtt.MqttError):
    """The broker answered a PUBLISH with a failure reason code (MQTT 5): the message is not delivered."""

    def __init__(self, reason: ReasonCode, topic: str) -> None:
        super().__init__(f"broker refused publish to {topic}: {reason} (0x{reason.value:02x})")
        self.reason = reason


class AckingClient(aiomqtt.Client):
    """aiomqtt.Client plus publish_nowait(): a future per QoS 1 message resolved by its PUBACK reason code.

    Touches aiomqtt internals (`_client`, `_on_publish`, `_disconnected`), which
    is why aiomqtt is pinned below 3 and tests exercise this class against a real
    broker.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks: dict[int, asyncio.Future[ReasonCode]] = {}

    def publish_nowait(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, properties: Properties | None = None
    ) -> asyncio.Future[ReasonCode]:
        info = self._client.publish(topic, payload, qos, retain, properties)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, f"could not publish to {topic}")
        fut: asyncio.Future[ReasonCode] = self._loop.create_future()
        if qos == 0 or info.is_published():
            fut.set_result(ReasonCode(PacketTypes.PUBACK, "Success"))
        else:
            self._acks[info.mid] = fut
        return fut

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: ReasonCode, properties: Any) -> None:
        super()._on_publish(client, userdata, mid, reason_code, properties)
        fut = self._acks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(reason_code)

    @property
    def disconnected(self) -> asyncio.Future[None]:
        """Done (usually with an exception) once the connection is gone."""
        return self._disconnected

    def abandon_pending(self) -> None:
        for fut in self._acks.values():
            if not fut.done():
                fut.cancel()
        self._acks.clear()


def client_options(mqtt: MqttConfig, client_id: str, *, max_inflight: int | None = None) -> dict[str, Any]:
    """aiomqtt.Client keyword arguments from the config: protocol, clean session, TLS, credentials.

    Sessions are always clean: a persistent session lives in paho's memory and
    dies with the process, so the outbox, not the session, is what resends.
    """
    v5 = mqtt.protocol == "5"
    opts: dict[str, Any] = {
        "hostname": mqtt.host,
        "port": mqtt.port,
        "identifier": client_id,
        "protocol": aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        "keepalive": mqtt.keepalive_s,
        "username": mqtt.username,
        "password": broker_password(mqtt),
    }
    if v5:
        opts["clean_start"] = paho.MQTT_CLEAN_START_FIRST_ONLY  # a fresh Client per connection: always clean
    else:
        opts["clean_session"] = True
    if max_inflight is not None:
        opts["max_inflight_messages"] = max_inflight
        opts["max_queued_outgoing_messages"] = max_inflight + 8
    if mqtt.tls is not None:
        opts["tls_params"] = aiomqtt.TLSParameters(ca_certs=mqtt.tls.ca_file, certfile=mqtt.tls.cert_file, keyfile=mqtt.tls.key_file)
        if mqtt.tls.insecure:
            opts["tls_insecure"] = True
    return opts


class SecretRefused(ValueError):
    """A secret the config names cannot be used (unset variable, unreadable or too open file): the message says which."""


def broker_password(mqtt: MqttConfig) -> str | None:
    """The broker password from `password`, `password_env` or `password_file`, read at each connect (a rotated file
    is picked up). A file group or others may read is refused: a secret on a shared line PC is the owner's alone."""
    if mqtt.password_env is not None:
        value = os.environ.get(mqtt.password_env)
        if not value:
            raise SecretRefused(f"mqtt.password_env: environment variable {mqtt.password_env} is not set")
        return value
    if mqtt.password_file is not None:
        return read_secret_file(mqtt.password_file, "mqtt.password_file")
    return mqtt.password


def read_secret_file(path: str, what: str) -> str:
    """The first line of a secret file that only its owner may read (mode 0600 or 0400); SecretRefused otherwise."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SecretRefused(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if st.st_mode & 0o077:
        raise SecretRefused(f"{what}: {path} may be read by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                            f"make it the owner's alone: chmod 600 {path}")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretRefused(f"{what}: cannot read {path}: {exc}") from None
    if not lines or not lines[0].strip():
        raise SecretRefused(f"{what}: {path} is empty")
    return lines[0].strip()


def default_client_id(cfg: LineConfig) -> str:
    """linectl-<topic root with dashes>: unique per line on a shared broker (a duplicate client id makes
    the broker drop the other connection, and the two would take turns for ever)."""
    return "linectl-" + cfg.topic_root.replace("/", "-")


def track_link(owner: Any, up: bool, reason: str, event: str, *, connect_ctx: dict[str, Any] | None = None, **ctx: Any) -> None:
    """Track an MQTT link on `owner` (its _connected, _connected_since, _last_error) and log transitions:
    a connect, a drop, a clean stop, and a failed (re)connect only when its reason changes, so a broker
    that is away for a night leaves a handful of lines, not one per retry."""
    was = owner._connected
    owner._connected = up
    if up:
        owner._last_error = None
        if not was:
            owner._connected_since = time.time()
            log.info(f"{event}_connected", broker=f"{owner.mqtt.host}:{owner.mqtt.port}", **(connect_ctx or {}), **ctx)
        return
    owner._connected_since = None
    changed = reason != owner._last_error
    if reason != "stopped" or was:
        owner._last_error = reason
    if was and reason == "stopped":
        log.info(f"{event}_stopped", **ctx)
    elif was:
        log.warning(f"{event}_disconnected", reason=reason, **ctx)
    elif changed and reason != "stopped":
        log.warning(f"{event}_connect_failed", reason=reason, **ctx)



async def reconnect_loop(
    *,
    stop: asyncio.Event,
    backoff: Backoff,
    connect: Callable[[], Awaitable[None]],
    down: Callable[[str], None],
    expected: tuple[type[BaseException], ...],
    error_event: str,
    logger: Any = log,
) -> None:
    """Run `connect()` (one connection's whole life) again and again until `stop` is set.

    An `expected` exception (broker gone, network cut, a session that gave up) is a link down with its
    reason; anything else is logged with its traceback and treated the same, so the link never dies
    silently. Between attempts: capped exponential backoff with full jitter (the caller resets it once a
    connection proves useful), cut short by `stop`.
    """
    while not stop.is_set():
        try:
            await connect()
        except expected as exc:
            down(str(exc) or type(exc).__name__)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - keep the link alive; log and reconnect
            logger.exception(error_event, error=str(exc))
            down(f"{type(exc).__name__}: {exc}")
        if stop.is_set():
            break
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), backoff.next_delay())
