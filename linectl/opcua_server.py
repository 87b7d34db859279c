"""The line as a PackML unit on OPC UA (OPC 30050, the official nodeset), for SCADA and MES clients.

A packaging line is integrated through PackML: a SCADA tool browses Objects/PackMLObjects/<line>, finds a
PackMLBaseObjectType instance, reads its state machines, Status and Admin, and drives it with the state-machine
methods (Start, Stop, Hold, ...). Every method goes through `line.execute` like an MQTT command or a PLC tag, so
it is validated the same way and audited with the OPC UA session's user; PackML's "not in this state" comes back
as BadInvalidState. With access control on (linectl/access) a session logs in as a user of the line's store (its
password, lockout, deactivation and password age: one login for every channel; opcua_server.users is then refused),
and each call is checked again: active, not locked, the command one its roles allow; otherwise BadUserAccessDenied.

asyncua instantiates a type only from the instance declarations it finds directly below the type: the children
of nested objects' own types (Admin's counters, the state machines' methods) are not created, whatever
`instantiate_optional` says. `_complete()` adds the optional children this server fills, from the nodeset's own
declarations (same browse names, data types and InputArguments), so a client sees the PackML model, not a guess.

Secure by default: no anonymous session, no endpoint without security, users from the store (access: on) or from
the config with argon2 hashes,
client certificates trusted only when their file is in `trusted_clients_dir`, and a server certificate generated
on first start with its private key written 0600 (an existing key readable by others is refused).
"""

from __future__ import annotations

import asyncio
import contextvars
import csv
import hashlib
import hmac
import os
import secrets
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from linectl.config import LineConfig, OpcuaServerConfig, OpcuaUser

log = structlog.get_logger("linectl.opcua_server")

PACKML_URI = "http://opcfoundation.org/UA/PackML/"
#: this server's own namespace: the line object and what is not PackML's (StateCurrent as a number)
LINECTL_URI = "urn:linectl:packml"
NODESET = "Opc.Ua.PackML.NodeSet2.xml"
NODEIDS = "PackML.NodeIds.csv"

#: the state-machine methods, by the object that holds them (OPC 30050 puts each on the machine it changes), and the
#: PackML command (TR88 CntrlCmd name) each one is; ToComplete is the nodeset's name for Complete
METHODS: dict[str, dict[str, str]] = {
    "BaseStateMachine": {"Abort": "Abort", "Clear": "Clear"},
    "MachineState": {"Stop": "Stop", "Reset": "Reset"},
    "ExecuteState": {
        "Start": "Start", "Hold": "Hold", "Unhold": "Unhold", "Suspend": "Suspend", "Unsuspend": "Unsuspend",
        "Reset": "Reset", "ToComplete": "Complete",
    },
}
#: the optional Admin members this server fills (the others would stay empty: not created, rather than faked)
ADMIN_CHILDREN = ("ProdProcessedCount", "ProdDefectiveCount", "ProdConsumedCount", "StopReason")
#: calls waiting for the line beyond this are refused at once (BadTooManyOperations) instead of queueing without end
MAX_PENDING_CALLS = 16
#: a method the line does not answer within this long returns BadTimeout (the command may still complete)
CALL_TIMEOUT_S = 30.0
#: argon2 verifications per second over all sessions (burst twice that): each costs ~20-50 ms of the event loop,
#: so a client guessing passwords must not stall the line; above the rate a login is refused without a check
VERIFY_RATE = 5.0
#: the session user of the request being processed; set by the permission ruleset, which asyncua calls with the
#: user before it dispatches each request, in the task that then runs the method (one task per connection)
NULL_TIME = datetime(1601, 1, 1, tzinfo=UTC)
_CALLER: contextvars.ContextVar[Any] = contextvars.ContextVar("opcua_caller", default=None)
#: set when the connection's secure channel was opened with one of the configured policies. asyncua answers an
#: OpenSecureChannel with policy None even when no None endpoint exists (GetEndpoints needs it), and then lets a
#: session be created and activated on that channel: without this mark, a client that skips the endpoint list would
#: read the line, password included, over an unsecured channel
_SECURED: contextvars.ContextVar[bool] = contextvars.ContextVar("opcua_secured_channel", default=False)


class OpcuaServerError(Exception):
    """The server cannot start as configured (a key readable by others, a nodeset that does not match)."""


def standards_dir() -> Path:
    return Path(str(resources.files("linectl") / "standards" / "opcua"))


def packml_nodeids() -> dict[str, int]:
    """Symbol -> numeric id in the PackML namespace, from the official PackML.NodeIds.csv."""
    out: dict[str, int] = {}
    with open(standards_dir() / NODEIDS, encoding="utf-8") as fh:
        for row in csv.reader(fh):
            if len(row) >= 2 and row[1].isdigit():
                out[row[0]] = int(row[1])
    return out


# --------------------------------------------------------------------------- passwords


def hash_password(password: str) -> str:
    """An argon2id hash with OWASP's minimum parameters (m=19 MiB, t=2): ~20-30 ms to verify on a line PC."""
    from argon2 import PasswordHasher

    return str(PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1).hash(password))


class PasswordCheck:
    """Users and their argon2 hashes; a verified password is remembered (HMAC with a per-process key) so a SCADA
    client that reconnects does not pay argon2 again, and verifications are rate limited (VERIFY_RATE)."""

    def __init__(self, users: list[OpcuaUser], rate: float = VERIFY_RATE) -> None:
        from argon2 import PasswordHasher

        self.users = {u.name: u for u in users}
        self._ph = PasswordHasher()
        self._key = secrets.token_bytes(32)
        self._ok: dict[str, bytes] = {}
        self._rate = rate
        self._tokens = 2 * rate
        self._last = time.monotonic()

    def _mac(self, name: str, password: str) -> bytes:
        return hmac.new(self._key, f"{name}\0{password}".encode(), hashlib.sha256).digest()

    def _take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(2 * self._rate, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def check(self, name: str | None, password: str | None) -> OpcuaUser | None:
        from argon2.exceptions import InvalidHashError, VerificationError

        user = self.users.get(name or "")
        if user is None or password is None:
            log.warning("opcua_login_refused", user=(name or "")[:64], reason="unknown user" if user is None else "no password")
            return None
        mac = self._mac(user.name, password)
        if hmac.compare_digest(self._ok.get(user.name, b""), mac):
            return user
        if not self._take():
            log.warning("opcua_login_refused", user=user.name, reason="too many password checks; try again later")
            return None
        try:
            self._ph.verify(user.password_hash, password)
        except (VerificationError, InvalidHashError):
            log.warning("opcua_login_refused", user=user.name, reason="wrong password")
            return None
        self._ok[user.name] = mac
        return user


# --------------------------------------------------------------------------- certificates


def ensure_certificate(cert_path: Path, key_path: Path, app_uri: str, hostname: str) -> bool:
    """The server's certificate and key, generated when either is missing (True then); the key is written 0600.

    An existing key that group or others may read is refused rather than used: the fix (chmod 600) is the
    operator's to make, as ssh does."""
    from asyncua.crypto.cert_gen import dump_private_key_as_pem, generate_private_key, generate_self_signed_app_certificate
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import ExtendedKeyUsageOID

    if key_path.exists():
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:
            raise OpcuaServerError(f"{key_path}: private key readable by group/others (mode {mode:o}); chmod 600 it")
        if cert_path.exists():
            return False
    for d in {cert_path.parent, key_path.parent}:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = generate_private_key()
    tmp = key_path.with_name(key_path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may not widen it, but an existing tmp file keeps its mode otherwise
        os.write(fd, dump_private_key_as_pem(key))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, key_path)
    names: set[Any] = {x509.UniformResourceIdentifier(app_uri), x509.DNSName(hostname), x509.DNSName(socket.gethostname())}
    cert = generate_self_signed_app_certificate(
        key, "linectl OPC UA server", {}, sorted(names, key=str), extended=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], days=3650,
    )
    cert_path.write_bytes(cert.public_bytes(Encoding.DER))
    log.info("opcua_certificate_generated", certificate=str(cert_path), private_key=str(key_path), application_uri=app_uri)
    return True


def load_trusted(directory: Path) -> dict[bytes, str]:
    """The client certificates in the trust directory (DER or PEM), as DER -> file name."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    out: dict[bytes, str] = {}
    for p in sorted(directory.iterdir()):
        if not p.is_file() or p.suffix.lower() not in (".der", ".pem", ".crt", ".cer"):
            continue
        data = p.read_bytes()
        try:
            cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
        except ValueError as exc:
            log.warning("opcua_trusted_certificate_unreadable", file=str(p), error=str(exc))
            continue
        out[cert.public_bytes(Encoding.DER)] = p.name
    return out


# --------------------------------------------------------------------------- the server


class PackmlServer:
    """asyncua Server with the PackML nodeset and one PackMLBaseObjectType instance: the line."""

    def __init__(self, cfg: LineConfig, line: Any, base_dir: Path | None = None, access: Any = None) -> None:
        self.cfg: OpcuaServerConfig = cfg.opcua_server
        #: linectl.access.Access when access control is on: a method's caller must be an active store user
        self.access = access if access is not None and access.enabled else None
        if self.access is None and cfg.access.enabled:
            raise OpcuaServerError("access control is on (access:) but the OPC UA server was given no access gate")
        self.line_name = cfg.line.name
        self.line = line
        base = base_dir if base_dir is not None else Path(cfg.store.path).resolve().parent
        self.cert_path = self._path(base, self.cfg.certificate)
        self.key_path = self._path(base, self.cfg.private_key)
        self.trusted_dir = self._path(base, self.cfg.trusted_clients_dir)
        self.server: Any = None
        self.passwords = PasswordCheck(self.cfg.users)
        self.nodes: dict[str, Any] = {}  # path below the line object ("Status/MachSpeed") -> NodeId
        self.line_node: Any = None
        self.ns = 0
        self.my_ns = 0
        self._state_ids: dict[int, tuple[str, Any]] = {}  # StateNumber -> (machine, state NodeId in the type)
        self._last: dict[str, Any] = {}
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pending = 0
        self._inflight: dict[asyncio.Task[Any], tuple[str, str | None, bool]] = {}  # also keeps them referenced
        self._defect_ids: dict[str, int] = {}
        self.calls = 0

    @staticmethod
    def _path(base: Path, p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else base / q

    @property
    def endpoint(self) -> str:
        return self.cfg.endpoint

    # ----------------------------------------------------------------- start / stop

    async def start(self) -> None:
        from asyncua import Server, ua
        from asyncua.crypto.permission_rules import User, UserRole

        cfg = self.cfg
        url = urlsplit(cfg.endpoint)
        host = url.hostname or "localhost"
        ensure_certificate(self.cert_path, self.key_path, cfg.application_uri, host if host not in ("0.0.0.0", "::") else socket.gethostname())
        self.trusted_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        trusted = load_trusted(self.trusted_dir)
        passwords, access = self.passwords, self.access

        class Users:
            def get_user(self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None) -> Any:
                if not _SECURED.get():
                    log.warning("opcua_login_refused", user=(username or "")[:64], reason="channel not opened with a configured security policy")
                    return None
                if username is None and password is None:
                    # asyncua refuses an anonymous token itself unless allow_anonymous put it in the identity tokens
                    return User(role=UserRole.Anonymous, name=None) if cfg.allow_anonymous else None
                if access is not None:  # access: on: the store's users, its lockout, deactivation and password age
                    from linectl.control import CommandRejected

                    try:
                        principal = access.authenticate_now(username, password, channel="opcua", origin="opcua")
                    except CommandRejected as exc:
                        log.warning("opcua_login_refused", user=(username or "")[:64], reason=f"{exc.code}: {exc.reason}"[:300])
                        return None
                    return User(role=UserRole.User, name=principal.name)
                found = passwords.check(username, password)
                return None if found is None else User(role=UserRole.User, name=found.name)

        server = Server(user_manager=Users())
        await server.init()
        server.set_endpoint(cfg.endpoint)
        server.set_server_name(f"linectl {self.line_name} (PackML)")
        await server.set_application_uri(cfg.application_uri)
        policies = [getattr(ua.SecurityPolicyType, p) for p in cfg.security]
        if cfg.allow_unsecured:
            policies.append(ua.SecurityPolicyType.NoSecurity)
        server.set_security_policy(policies, permission_ruleset=_Ruleset())
        tokens = [ua.UserNameIdentityToken] + ([ua.AnonymousIdentityToken] if cfg.allow_anonymous else [])
        server.set_identity_tokens(tokens)
        await server.load_certificate(str(self.cert_path))
        await server.load_private_key(str(self.key_path))
        server.set_certificate_validator(_validator(trusted, cfg.application_uri))
        await server.import_xml(str(standards_dir() / NODESET))
        await server.load_data_type_definitions()
        self.ns = await server.get_namespace_index(PACKML_URI)
        self.my_ns = await server.register_namespace(LINECTL_URI)
        self.server = server
        await self._build()
        await server.start()
        # mark the channels opened with a configured policy (in place: the listener holds this list; a connection
        # accepted before the swap is merely refused at activation)
        server._policies[:] = [_MarkingFactory(f) for f in server._policies]
        self._task = asyncio.create_task(self._publisher(), name="opcua_server.publisher")
        self.line.on_state_change(self._dirty.set)
        log.info(
            "opcua_server_started", endpoint=cfg.endpoint, security=list(cfg.security), unsecured=cfg.allow_unsecured,
            anonymous=cfg.allow_anonymous, users="the store's (access:)" if access is not None else [u.name for u in cfg.users],
            trusted_clients=sorted(trusted.values()),
        )

    async def stop(self, timeout: float = 3.0) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping: its error was logged when it happened
                pass
            self._task = None
        if self.server is not None:
            try:
                await asyncio.wait_for(self.server.stop(), timeout)
            except Exception as exc:  # noqa: BLE001
                log.warning("opcua_server_stop_failed", error=str(exc))
            self.server = None
            log.info("opcua_server_stopped")

    # ----------------------------------------------------------------- address space

    async def _build(self) -> None:
        from asyncua import ua
        from asyncua.common.instantiate_util import instantiate

        server, ns = self.server, self.ns
        ids = packml_nodeids()
        base_type = server.get_node(ua.NodeId(ids["PackMLBaseObjectType"], ns))
        folder = server.get_node(ua.NodeId(ids["PackMLObjects"], ns))
        # mandatory children only: the optional ones asyncua would add (RemoteCommand, SetInterlock) have nothing
        # behind them here; what is filled is added explicitly below
        bname = ua.QualifiedName(self.line_name, self.my_ns)
        nodes = await instantiate(folder, base_type, nodeid=ua.NodeId(self.line_name, self.my_ns), bname=bname,
                                  dname=ua.LocalizedText(self.line_name), instantiate_optional=False)
        self.line_node = nodes[0]
        await self._complete(self.line_node, base_type, ("TagID", "PackMLVersion"))
        admin = await self._child(self.line_node, "Admin")
        await self._complete(admin, server.get_node(ua.NodeId(ids["PackMLAdminObjectType"], ns)), ADMIN_CHILDREN)
        bsm = await self._child(self.line_node, "BaseStateMachine")
        msm = await self._child(bsm, "MachineState")
        esm = await self._child(msm, "ExecuteState")
        machines = {"BaseStateMachine": (bsm, "PackMLBaseStateMachineType"), "MachineState": (msm, "PackMLMachineStateMachineType"),
                    "ExecuteState": (esm, "PackMLExecuteStateMachineType")}
        for machine, (obj, tname) in machines.items():
            mtype = server.get_node(ua.NodeId(ids[tname], ns))
            await self._complete(obj, mtype, tuple(METHODS[machine]))
            states = await self._states(mtype)
            for number, nid in states.items():
                self._state_ids[number] = (machine, nid)
            await self._write_node(await self._child(obj, "AvailableStates", ns=0), ua.Variant(list(states.values()), ua.VariantType.NodeId))
            for mname, command in METHODS[machine].items():
                server.link_method(await self._child(obj, mname), self._method(command, obj.nodeid, mname))
        status = await self._child(self.line_node, "Status")
        state_current = await status.add_variable(ua.NodeId(f"{self.line_name}.Status.StateCurrent", self.my_ns),
                                                  ua.QualifiedName("StateCurrent", self.my_ns), ua.Variant(0, ua.VariantType.Int32))
        server.link_method(await self._child(self.line_node, "SetUnitMode"), self._set_unit_mode)
        for unsupported in ("SetMachSpeed", "SetParameter", "SetProduct"):
            server.link_method(await self._child(self.line_node, unsupported), self._not_supported(unsupported))
        await self._write_node(await self._child(self.line_node, "TagID"), ua.Variant(self.line_name, ua.VariantType.String))
        await self._write_node(await self._child(self.line_node, "PackMLVersion"), ua.Variant("OPC 30050 v1.01", ua.VariantType.String))
        await self._write_node(await self._child(status, "UnitSupportedModes"),
                               ua.Variant(ua.NodeId(ids["ProductionMaintenanceModeEnum"], ns), ua.VariantType.NodeId))
        paths = {
            "StateCurrent": state_current,
            "Status/UnitModeCurrent": await self._child(status, "UnitModeCurrent"),
            "Status/MachSpeed": await self._child(status, "MachSpeed"),
            "Status/CurMachSpeed": await self._child(status, "CurMachSpeed"),
            "Status/EquipmentBlocked": await self._child(status, "EquipmentBlocked"),
            "Status/EquipmentStarved": await self._child(status, "EquipmentStarved"),
            **{f"Admin/{c}": await self._child(admin, c) for c in ADMIN_CHILDREN},
        }
        for machine, (obj, _t) in machines.items():
            cs = await self._child(obj, "CurrentState", ns=0)
            paths[f"{machine}/CurrentState"] = cs
            paths[f"{machine}/CurrentState/Id"] = await self._child(cs, "Id", ns=0)
        self.nodes = {k: v.nodeid for k, v in paths.items()}
        missing = [s for s in range(1, 20) if s not in self._state_ids]
        if missing:
            raise OpcuaServerError(f"{NODESET}: no state object with StateNumber {missing}: not the nodeset this server maps")
        await self._refresh()

    async def _child(self, node: Any, name: str, ns: int | None = None) -> Any:
        from asyncua import ua

        return await node.get_child(ua.QualifiedName(name, self.ns if ns is None else ns))

    async def _complete(self, obj: Any, objtype: Any, names: tuple[str, ...]) -> None:
        """Add the named children of `objtype` that `obj` lacks, from the type's own declarations."""
        from asyncua import ua
        from asyncua.common.instantiate_util import _instantiate_node
        from asyncua.common.ua_utils import get_node_supertypes

        have = {d.BrowseName.Name for d in await obj.get_children_descriptions()}
        decls: dict[str, Any] = {}
        for t in await get_node_supertypes(objtype, includeitself=True):
            for d in await t.get_children_descriptions():
                decls.setdefault(d.BrowseName.Name, d)
        for name in names:
            if name in have:
                continue
            d = decls.get(name)
            if d is None:
                raise OpcuaServerError(f"{NODESET}: {await objtype.read_browse_name()} has no {name}")
            nid = ua.NodeId(f"{obj.nodeid.Identifier}.{name}", self.my_ns) if isinstance(obj.nodeid.Identifier, str) else ua.NodeId(NamespaceIndex=self.my_ns)
            await _instantiate_node(self.server.iserver.isession, self.server.get_node(d.NodeId), obj.nodeid, d, nid, d.BrowseName)

    async def _states(self, mtype: Any) -> dict[int, Any]:
        """StateNumber -> NodeId of the state objects a state machine type declares (its CurrentState.Id values)."""
        from asyncua import ua

        out: dict[int, Any] = {}
        for d in await mtype.get_children_descriptions(refs=ua.ObjectIds.HasComponent):
            if d.NodeClass != ua.NodeClass.Object or d.TypeDefinition.Identifier not in (ua.ObjectIds.StateType, ua.ObjectIds.InitialStateType):
                continue
            num = await self.server.get_node(d.NodeId).get_child(ua.QualifiedName("StateNumber", 0))
            out[int(await num.read_value())] = d.NodeId
        return out

    # ----------------------------------------------------------------- values

    async def _write_node(self, node: Any, value: Any) -> None:
        from asyncua import ua

        await self.server.write_attribute_value(node.nodeid, ua.DataValue(value))

    async def _write(self, path: str, value: Any) -> None:
        from asyncua import ua

        if self._last.get(path) == value:
            return
        self._last[path] = value
        await self.server.write_attribute_value(self.nodes[path], ua.DataValue(value))

    async def _publisher(self) -> None:
        """PackTags into the address space: at once on a state change, else every publish_interval_s; at most
        every 50 ms however often the line changes (a busy line must not turn into a busy server)."""
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), self.cfg.publish_interval_s)
            except TimeoutError:
                pass
            self._dirty.clear()
            try:
                await self._refresh()
            except Exception as exc:  # noqa: BLE001 - one bad reading must not end the publishing
                log.warning("opcua_refresh_failed", error=str(exc))
            await asyncio.sleep(0.05)

    async def _refresh(self) -> None:
        from asyncua import ua

        tags = self.line.packtags()
        state = int(tags.state)
        await self._write("StateCurrent", ua.Variant(state, ua.VariantType.Int32))
        machine_of: dict[str, tuple[str, Any] | None] = {"BaseStateMachine": None, "MachineState": None, "ExecuteState": None}
        if state in self._state_ids:
            m, nid = self._state_ids[state]
            machine_of[m] = (tags.state.name, nid)
            # the enclosing machines are in the composite state that holds the sub-machine (Cleared, Running)
            if m in ("MachineState", "ExecuteState"):
                machine_of["BaseStateMachine"] = ("Cleared", self._state_ids[19][1])
            if m == "ExecuteState":
                machine_of["MachineState"] = ("Running", self._state_ids[18][1])
        for m, cur in machine_of.items():
            text, nid = cur if cur is not None else ("", ua.NodeId())
            await self._write(f"{m}/CurrentState", ua.Variant(ua.LocalizedText(text, "en") if text else ua.LocalizedText(), ua.VariantType.LocalizedText))
            await self._write(f"{m}/CurrentState/Id", ua.Variant(nid, ua.VariantType.NodeId))
        await self._write("Status/UnitModeCurrent", ua.Variant(int(tags.unit_mode), ua.VariantType.Int32))
        await self._write("Status/MachSpeed", ua.Variant(float(tags.mach_speed), ua.VariantType.Float))
        await self._write("Status/CurMachSpeed", ua.Variant(float(tags.cur_mach_speed), ua.VariantType.Float))
        await self._write("Status/EquipmentBlocked", ua.Variant(bool(tags.blocked), ua.VariantType.Boolean))
        await self._write("Status/EquipmentStarved", ua.Variant(bool(tags.starved), ua.VariantType.Boolean))
        a = tags.admin
        unit = ua.EUInformation(DisplayName=ua.LocalizedText("units", "en"), Description=ua.LocalizedText("packs", "en"))
        count_cls = ua.PackMLCountDataType
        lot = a.lot or ""
        processed = [count_cls(ID=1, Name=lot, Unit=unit, Count=int(a.processed), AccCount=int(a.processed))]
        consumed = [count_cls(ID=1, Name=lot, Unit=ua.EUInformation(DisplayName=ua.LocalizedText("serials", "en")),
                              Count=int(a.consumed_serials), AccCount=int(a.consumed_serials))]
        defective = []
        for reason in sorted(a.defective):
            rid = self._defect_ids.setdefault(reason, len(self._defect_ids) + 1)
            defective.append(count_cls(ID=rid, Name=reason, Unit=unit, Count=int(a.defective[reason]), AccCount=int(a.defective[reason])))
        defective.sort(key=lambda c: c.ID)
        await self._write("Admin/ProdProcessedCount", ua.Variant(processed, ua.VariantType.ExtensionObject))
        await self._write("Admin/ProdConsumedCount", ua.Variant(consumed, ua.VariantType.ExtensionObject))
        await self._write("Admin/ProdDefectiveCount", ua.Variant(defective, ua.VariantType.ExtensionObject))
        sr = tags.stop_reason
        # OPC UA's null time (1601-01-01) where there is no time: asyncua's default would be "now", a new value each cycle
        alarm = ua.PackMLAlarmDataType(ID=0, Value=0, Message="", Category=0, DateTime=NULL_TIME, AckDateTime=NULL_TIME)
        if sr is not None:
            at = datetime.fromtimestamp(sr.at, UTC) if sr.at else NULL_TIME
            alarm = ua.PackMLAlarmDataType(ID=int(sr.id), Value=int(sr.id), Message=f"{sr.code}: {sr.message}"[:500], Category=0,
                                           DateTime=at, AckDateTime=NULL_TIME)
        await self._write("Admin/StopReason", ua.Variant(alarm, ua.VariantType.ExtensionObject))

    # ----------------------------------------------------------------- methods

    def _caller(self) -> str | None:
        user = _CALLER.get()
        if user is None or user.name is None:
            return None
        if self.access is not None:  # a store user, checked again (active, unlocked, roles) at each call
            return str(user.name)
        found = self.passwords.users.get(user.name)
        return None if found is None else found.name

    async def _call(self, what: str, parent: Any, expected: Any, args: tuple[Any, ...],
                    run: Callable[[str, Any], Coroutine[Any, Any, None]]) -> Any:
        """The common path of every method: who calls, on which object, how many waiting, then the engine."""
        from asyncua import ua

        from linectl.control import CommandRejected

        def bad(code: int, reason: str, user: str | None = None) -> Any:
            log.warning("opcua_method_refused", method=what, user=user, status=ua.StatusCode(code).name, reason=reason)
            return ua.StatusCode(code)

        name = self._caller()
        if name is None:
            return bad(ua.StatusCodes.BadUserAccessDenied, "anonymous sessions may not call methods")
        if self.access is None and self.passwords.users[name].role != "operator":
            return bad(ua.StatusCodes.BadUserAccessDenied, "role viewer may not call methods", name)
        principal = None
        if self.access is not None:
            try:
                principal = await self.access.user_principal(name, "opcua", "opcua")
            except CommandRejected as exc:
                return bad(ua.StatusCodes.BadUserAccessDenied, f"{exc.code}: {exc.reason}", name)
        if expected is not None and parent != expected:
            return bad(ua.StatusCodes.BadMethodInvalid, f"{what} is not a method of {parent}", name)
        if self._pending >= MAX_PENDING_CALLS:
            return bad(ua.StatusCodes.BadTooManyOperations, f"{self._pending} method calls already wait for the line", name)
        # no lock of this server's own: the engine orders commands, and refuses at once one that the state forbids
        # (a Stop during Starting is taken, a second Start is not) instead of queueing it. The command runs as its
        # own task, shielded: a client that times out or drops its connection must not cancel a stop half-way
        self._pending += 1
        self.calls += 1
        task = asyncio.create_task(run(name, principal), name=f"opcua_server.{what}")
        task.add_done_callback(self._call_done)
        self._inflight[task] = (what, name, False)
        try:
            await asyncio.wait_for(asyncio.shield(task), CALL_TIMEOUT_S)
        except CommandRejected as exc:
            code = {"invalid_state": ua.StatusCodes.BadInvalidState, "forbidden": ua.StatusCodes.BadUserAccessDenied}.get(
                exc.code, ua.StatusCodes.BadRequestNotAllowed)
            return bad(code, exc.reason, name)
        except ValueError as exc:  # pydantic's ValidationError is one: a malformed argument
            return bad(ua.StatusCodes.BadInvalidArgument, str(exc).splitlines()[0][:300], name)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if task in self._inflight:
                self._inflight[task] = (what, name, True)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return bad(ua.StatusCodes.BadTimeout, f"the line did not answer within {CALL_TIMEOUT_S:.0f} s; the command goes on", name)
        except Exception as exc:  # noqa: BLE001 - an engine error is the client's BadInternalError, not a dropped reply
            log.exception("opcua_method_failed", method=what, user=name)
            return bad(ua.StatusCodes.BadInternalError, str(exc)[:300], name)
        self._dirty.set()
        await self._refresh()
        log.info("opcua_method_called", method=what, user=name)
        return []

    def _call_done(self, task: asyncio.Task[Any]) -> None:
        self._pending -= 1
        what, name, late = self._inflight.pop(task, ("?", None, False))
        if late:  # nobody waits for it any more: say how it ended
            exc = None if task.cancelled() else task.exception()
            log.warning("opcua_method_finished_late", method=what, user=name, outcome="done" if exc is None else str(exc)[:300])

    def _method(self, command: str, owner: Any, mname: str) -> Callable[..., Awaitable[Any]]:
        from asyncua import ua

        from linectl.control import PackmlCmd

        async def call(parent: Any, *args: Any) -> Any:
            # Start declares one optional input (Parameter: PackMLDescriptorDataType[]); the line takes none, so
            # only an empty list is accepted: a parameter would otherwise be accepted and ignored
            if mname == "Start" and len(args) == 1:
                v = args[0]
                if not isinstance(v, ua.Variant) or v.VariantType != ua.VariantType.ExtensionObject or not isinstance(v.Value, list | type(None)):
                    return ua.CallMethodResult(StatusCode=ua.StatusCode(ua.StatusCodes.BadInvalidArgument),
                                               InputArgumentResults=[ua.StatusCode(ua.StatusCodes.BadTypeMismatch)])
                if v.Value:
                    log.warning("opcua_method_refused", method=mname, reason="Start parameters are not supported by this line")
                    return ua.CallMethodResult(StatusCode=ua.StatusCode(ua.StatusCodes.BadInvalidArgument),
                                               InputArgumentResults=[ua.StatusCode(ua.StatusCodes.BadNotSupported)])
            elif args:
                log.warning("opcua_method_refused", method=mname, reason=f"{len(args)} arguments given, none taken")
                return ua.StatusCode(ua.StatusCodes.BadTooManyArguments)

            async def run(user: str, principal: Any) -> None:
                await self.line.execute(PackmlCmd(command=command, actor=user), origin="opcua", principal=principal)

            return await self._call(mname, parent, owner, args, run)

        return call

    async def _set_unit_mode(self, parent: Any, *args: Any) -> Any:
        from asyncua import ua

        from linectl.control import SetUnitMode

        if len(args) != 1:
            return ua.StatusCode(ua.StatusCodes.BadArgumentsMissing if not args else ua.StatusCodes.BadTooManyArguments)
        v = args[0]
        if not isinstance(v, ua.Variant) or v.VariantType != ua.VariantType.Int32 or not isinstance(v.Value, int):
            return ua.CallMethodResult(StatusCode=ua.StatusCode(ua.StatusCodes.BadInvalidArgument),
                                       InputArgumentResults=[ua.StatusCode(ua.StatusCodes.BadTypeMismatch)])

        async def run(user: str, principal: Any) -> None:
            await self.line.execute(SetUnitMode(mode=int(v.Value), actor=user), origin="opcua", principal=principal)

        return await self._call("SetUnitMode", parent, self.line_node.nodeid, args, run)

    def _not_supported(self, mname: str) -> Callable[..., Awaitable[Any]]:
        from asyncua import ua

        async def call(parent: Any, *args: Any) -> Any:
            log.warning("opcua_method_refused", method=mname, reason="not supported by this line")
            return ua.StatusCode(ua.StatusCodes.BadNotSupported)

        return call


class _MarkingFactory:
    """asyncua's SecurityPolicyFactory, marking the connection's task when a configured policy opens its channel."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def matches(self, uri: str, mode: Any = None) -> bool:
        return bool(self._inner.matches(uri, mode))

    def create(self, peer_certificate: Any) -> Any:
        _SECURED.set(True)
        return self._inner.create(peer_certificate)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Ruleset:
    """asyncua's permission hook, called with the session user before each request: remembers the user for the
    method handlers (asyncua does not pass it to them) and never allows address-space changes (AddNodes...)."""

    def __init__(self) -> None:
        from asyncua import ua
        from asyncua.crypto.permission_rules import USER_TYPES

        self._allowed = {ua.NodeId(t) for t in USER_TYPES}

    def check_validity(self, user: Any, action_type_id: Any, body: Any) -> bool:
        _CALLER.set(user)
        return action_type_id in self._allowed


def _validator(trusted: dict[bytes, str], app_uri: str) -> Callable[[Any, Any], Awaitable[None]]:
    """Client certificates: only those whose file is in trusted_clients_dir (pinned), and within their validity."""

    async def validate(cert: Any, app: Any) -> None:
        from asyncua import ua
        from cryptography.hazmat.primitives.serialization import Encoding

        der = cert.public_bytes(Encoding.DER)
        now = datetime.now(UTC)
        if der not in trusted:
            log.warning("opcua_certificate_refused", subject=cert.subject.rfc4514_string()[:200], reason="not in trusted_clients_dir")
            raise ua.UaStatusCodeError(ua.StatusCodes.BadCertificateUntrusted)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            log.warning("opcua_certificate_refused", subject=cert.subject.rfc4514_string()[:200], reason="expired or not yet valid")
            raise ua.UaStatusCodeError(ua.StatusCodes.BadCertificateTimeInvalid)

    return validate
