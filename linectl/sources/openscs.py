"""OPEN-SCS (OPC 30260) serial source: SNRequestAllocated / SNReturnAllocated on an L3 pool manager over OPC UA.

Why the request token is the request's key: OPEN-SCS pages an answer by RequestToken / ReturnedRequestToken.
Sending the stored idempotency key as the first RequestToken lets an L3 that keys requests by token answer
the numbers it already allocated when linectl repeats a request after a restart or a lost answer, instead of
allocating a second lot. (An L3 that refuses unknown tokens answers InvalidRequestToken: SourceRefused, named.)

Why the SN collection type is patched here: the official nodeset declares OPENSCSSNCollectionDataType
(ns;i=15008) as a subtype of OPENSCSCollectionDataType without a field definition, so asyncua has no class to
decode the answer. When the server does not advertise a definition of its own, the source registers one with
the parent's fields for the type's DefaultBinary encoding (ns;i=15191): a subtype that adds no fields.

Errors: no connection, timeouts, dropped sessions and the Bad status codes of a server in trouble are
SourceUnavailable (the provisioner retries); a ReturnStatus other than NoError, a refused user or certificate,
an argument the L3 rejects and an answer without a collection are SourceRefused, with the L3's words.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from asyncua import Client, Node, ua
from asyncua.common.structures104 import make_structure
from asyncua.crypto import security_policies
from cryptography import x509

from linectl import gs1
from linectl.sources.base import SerialPage, SerialRequest, SourceRefused, SourceUnavailable

if TYPE_CHECKING:
    from linectl.config import OpenScsSecurityConfig, OpenScsSourceConfig

log = structlog.get_logger("linectl.sources.openscs")

OPENSCS_URI = "http://opcfoundation.org/UA/OPENSCS-SER/"
#: numeric ids in the OPENSCS namespace (OPENSCS.NodeIds.csv of the official model)
POOL_MANAGER_TYPE = 15032
COLLECTION_TYPE = 15005
SN_COLLECTION_TYPE = 15008
SN_COLLECTION_BINARY = 15191
KEY_VALUE_TYPE = 15010
ALLOCATED = 2  # OPENSCSSerialNumberStateEnum.Allocated2

#: OPENSCSReturnEnum (Types.bsd): value -> (name, what it means for an operator)
RETURN_STATUS: dict[int, tuple[str, str]] = {
    0: ("Undefined0", "the L3 gave no status"),
    1: ("NoError1", "no error"),
    2: ("InvalidSerialNumberCollection2", "the L3 does not accept this serial number collection"),
    3: ("InsufficientSerialNumbers3", "the pool has not enough serial numbers"),
    4: ("InvalidSerialNumbersFormat4", "the L3 does not know this SNFormat"),
    5: ("InvalidRequestToken5", "the L3 does not accept this request token"),
    6: ("InvalidSelectionCriteria6", "no pool matches the selection criteria"),
    7: ("UnableToAcceptSerialNumberEvents7", "the L3 cannot accept serial number events"),
    8: ("UnableToAcceptLabelEvents8", "the L3 cannot accept label events"),
    9: ("UnableToAcceptSIDEvents9", "the L3 cannot accept SID events"),
    10: ("UnknownAggregationSID10", "unknown aggregation SID"),
    11: ("InsufficientPrivilegeToExecute11", "the user may not call this method"),
}

#: Bad status codes of a server or channel in trouble: worth a retry, not an operator's attention
TRANSIENT_CODES = frozenset(
    getattr(ua.StatusCodes, name)
    for name in (
        "BadSessionClosed", "BadSessionIdInvalid", "BadSessionNotActivated", "BadSecureChannelClosed",
        "BadSecureChannelIdInvalid", "BadConnectionClosed", "BadServerNotConnected", "BadCommunicationError",
        "BadTimeout", "BadRequestTimeout", "BadServerHalted", "BadShutdown", "BadTooManySessions",
        "BadTooManyOperations", "BadResourceUnavailable", "BadNoCommunication", "BadDisconnect",
        "BadTcpInternalError", "BadNotConnected", "BadInternalError", "BadUnexpectedError", "BadOutOfMemory",
        "BadServerTooBusy", "BadConnectionRejected",
    )
    if hasattr(ua.StatusCodes, name)
)


def _status_name(code: int) -> str:
    try:
        return str(ua.StatusCode(code).name)
    except Exception:  # an unknown code: show the number
        return f"0x{code:08X}"


def _uri_of(cert_path: str) -> str | None:
    """The application URI in the certificate's SubjectAltName: OPC UA servers check it against the client's."""
    data = Path(cert_path).read_bytes()
    cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def _struct_class(datatype: ua.NodeId) -> Any:
    for nodeid, cls in ua.extension_objects_by_datatype.items():
        if nodeid.Identifier == datatype.Identifier and nodeid.NamespaceIndex == datatype.NamespaceIndex:
            return cls
    return None


class OpenScsSource:
    """One OPC UA session to an OPEN-SCS pool manager, opened on demand and dropped on any transport trouble."""

    #: SNRequestAllocated is paged by a request token: the same token answers the same numbers again
    idempotent = True

    def __init__(
        self,
        endpoint: str,
        *,
        policy: str = "None",
        mode: str = "SignAndEncrypt",
        certificate: str | None = None,
        private_key: str | None = None,
        server_certificate: str | None = None,
        username: str | None = None,
        password_env: str | None = None,
        password_file: str | None = None,
        timeout_s: float = 10.0,
        pool_manager: str | None = None,
        sn_format: str = "SERIALONLY",
        collection_id: str = "{gtin}",
        selection_criteria: dict[str, str] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.name = f"openscs:{endpoint}"
        self.policy = policy
        self.mode = mode
        self.certificate = certificate
        self.private_key = private_key
        self.server_certificate = server_certificate
        self.username = username
        self.password_env = password_env
        self.password_file = password_file
        self.timeout_s = timeout_s
        self.pool_manager = pool_manager
        self.sn_format = sn_format
        self.collection_id = collection_id
        self.selection_criteria = dict(selection_criteria) if selection_criteria is not None else {"GTIN": "{gtin}"}
        self._client: Client | None = None
        self._pm: Node | None = None
        self._methods: dict[str, Node] = {}
        self._ns = 0
        self._sn_collection: Any = None
        self._key_value: Any = None
        self.max_requestable: int | None = None
        self.max_returnable: int | None = None
        self._lock = asyncio.Lock()
        self._connected = False
        self.last_error: str | None = None
        self.requests = 0
        self.returns = 0

    @classmethod
    def from_config(cls, cfg: OpenScsSourceConfig) -> OpenScsSource:
        sec: OpenScsSecurityConfig = cfg.security
        return cls(
            cfg.endpoint,
            policy=sec.policy,
            mode=sec.mode,
            certificate=sec.certificate,
            private_key=sec.private_key,
            server_certificate=sec.server_certificate,
            username=cfg.username,
            password_env=cfg.password_env,
            password_file=cfg.password_file,
            timeout_s=cfg.timeout_s,
            pool_manager=cfg.pool_manager,
            sn_format=cfg.sn_format,
            collection_id=cfg.collection_id,
            selection_criteria=cfg.selection_criteria,
        )

    # ------------------------------------------------------------------ connection

    def _password(self) -> str:
        if self.password_env:
            value = os.environ.get(self.password_env)
            if not value:
                raise SourceRefused(f"OPEN-SCS: environment variable {self.password_env} (password of {self.username!r}) is not set")
            return value
        if self.password_file:
            try:
                lines = Path(self.password_file).read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise SourceRefused(f"OPEN-SCS: password file {self.password_file}: {exc.strerror or exc}") from None
            if not lines or not lines[0]:
                raise SourceRefused(f"OPEN-SCS: password file {self.password_file} is empty")
            return lines[0]
        return ""

    def _mark(self, connected: bool, error: str | None = None) -> None:
        if connected != self._connected:
            if connected:
                log.info("openscs source connected", endpoint=self.endpoint, policy=self.policy)
            else:
                log.warning("openscs source disconnected", endpoint=self.endpoint, error=error)
        self._connected = connected
        if error is not None:
            self.last_error = error

    async def _drop(self, error: str | None = None) -> None:
        client, self._client, self._pm = self._client, None, None
        self._methods = {}
        self._mark(False, error)
        if client is not None:
            try:
                await asyncio.wait_for(client.disconnect(), timeout=min(self.timeout_s, 5.0))
            except Exception as exc:  # the transport is gone already: nothing to close cleanly
                log.debug("openscs disconnect after failure", error=str(exc))

    async def _connect(self) -> None:
        # asyncua's supervisor reads ServerState every watchdog interval and gives up the session when one read
        # takes longer than the interval (1 s by default): an L3 busy allocating a large request for a second
        # would cost the session. The probe gets the same patience as a method call.
        client = Client(self.endpoint, timeout=self.timeout_s, watchdog_intervall=self.timeout_s)
        if self.policy == "Basic256Sha256":
            assert self.certificate is not None and self.private_key is not None
            try:
                uri = _uri_of(self.certificate)
            except (OSError, ValueError) as exc:
                raise SourceRefused(f"OPEN-SCS: client certificate {self.certificate}: {exc}") from None
            if uri:
                client.application_uri = uri
            try:
                await asyncio.wait_for(
                    client.set_security(
                        security_policies.SecurityPolicyBasic256Sha256,
                        certificate=self.certificate,
                        private_key=self.private_key,
                        server_certificate=self.server_certificate,
                        mode=getattr(ua.MessageSecurityMode, self.mode),
                    ),
                    timeout=self.timeout_s,
                )
            except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
                raise SourceRefused(f"OPEN-SCS: {exc.filename}: {exc.strerror}") from None
            except ua.UaError as exc:
                if "No matching endpoints" in str(exc) or "endpoint" in str(exc).lower():
                    raise SourceRefused(f"OPEN-SCS: the L3 offers no Basic256Sha256 {self.mode} endpoint: {exc}") from None
                raise
        if self.username:
            client.set_user(self.username)
            client.set_password(self._password())
        self._client = client
        await asyncio.wait_for(client.connect(), timeout=self.timeout_s)
        await asyncio.wait_for(client.load_data_type_definitions(), timeout=self.timeout_s * 3)
        try:
            self._ns = await client.get_namespace_index(OPENSCS_URI)
        except ValueError:
            raise SourceRefused(f"OPEN-SCS: {self.endpoint} has no OPEN-SCS namespace ({OPENSCS_URI})") from None
        self._key_value = _struct_class(ua.NodeId(KEY_VALUE_TYPE, self._ns))
        self._sn_collection = _struct_class(ua.NodeId(SN_COLLECTION_TYPE, self._ns))
        if self._sn_collection is None:
            self._sn_collection = await self._patch_sn_collection(client)
        self._pm = await self._find_pool_manager(client)
        for method in ("SNRequestAllocated", "SNReturnAllocated"):
            try:
                self._methods[method] = await self._pm.get_child(ua.QualifiedName(method, self._ns))
            except ua.UaStatusCodeError:
                continue
        if "SNRequestAllocated" not in self._methods:
            raise SourceRefused(f"OPEN-SCS: the pool manager {self._pm.nodeid.to_string()} has no SNRequestAllocated")
        for prop in ("MaxSNRequestable", "MaxSNReturnable"):
            try:
                value = await (await self._pm.get_child(ua.QualifiedName(prop, self._ns))).read_value()
            except ua.UaStatusCodeError:
                value = None
            limit = int(value) if isinstance(value, int) and value > 0 else None
            if prop == "MaxSNRequestable":
                self.max_requestable = limit
            else:
                self.max_returnable = limit
        self._mark(True)

    async def _patch_sn_collection(self, client: Client) -> Any:
        """The class the official nodeset leaves out: OPENSCSCollectionDataType's fields, encoded as ns;i=15191."""
        parent = client.get_node(ua.NodeId(COLLECTION_TYPE, self._ns))
        try:
            sdef = await parent.read_data_type_definition()
        except ua.UaStatusCodeError as exc:
            raise SourceRefused(f"OPEN-SCS: the L3 does not define OPENSCSCollectionDataType ({_status_name(exc.code)})") from None
        if self._key_value is None or not isinstance(sdef, ua.StructureDefinition):
            raise SourceRefused("OPEN-SCS: the L3 does not define OPENSCSCollectionDataType/OPENSCSKeyValueDataType")
        sdef.DefaultEncodingId = ua.NodeId(SN_COLLECTION_BINARY, self._ns)
        sdef.BaseDataType = ua.NodeId(COLLECTION_TYPE, self._ns)
        sdef.StructureType = ua.StructureType.Structure
        datatype = ua.NodeId(SN_COLLECTION_TYPE, self._ns)
        cls = make_structure(datatype, "OPENSCSSNCollectionDataType", sdef)["OPENSCSSNCollectionDataType"]
        ua.register_extension_object("OPENSCSSNCollectionDataType", sdef.DefaultEncodingId, cls, datatype)
        log.info("openscs: OPENSCSSNCollectionDataType has no definition on the L3; the parent's fields are used", endpoint=self.endpoint)
        return cls

    async def _find_pool_manager(self, client: Client) -> Node:
        objects = client.nodes.objects
        if self.pool_manager:
            node = objects
            for part in self.pool_manager.split("/"):
                children = await node.get_children(refs=ua.ObjectIds.HierarchicalReferences)
                names = [(await c.read_browse_name()).Name for c in children]
                if part not in names:
                    raise SourceRefused(f"OPEN-SCS: pool_manager {self.pool_manager!r}: no {part!r} below {node.nodeid.to_string()}")
                node = children[names.index(part)]
            return node
        pm_type = ua.NodeId(POOL_MANAGER_TYPE, self._ns)
        found: list[Node] = []
        level = [objects]
        for _ in range(3):
            nxt: list[Node] = []
            for parent in level:
                for child in await parent.get_children(refs=ua.ObjectIds.HierarchicalReferences, nodeclassmask=ua.NodeClass.Object):
                    td = await child.read_type_definition()
                    if td is not None and td.Identifier == pm_type.Identifier and td.NamespaceIndex == pm_type.NamespaceIndex:
                        found.append(child)
                    else:
                        nxt.append(child)
            level = nxt
        if not found:
            raise SourceRefused("OPEN-SCS: no object of OPENSCSPoolManagerObjectType within three levels below Objects (set pool_manager)")
        if len(found) > 1:
            paths = ", ".join(n.nodeid.to_string() for n in found)
            raise SourceRefused(f"OPEN-SCS: several pool managers ({paths}): set pool_manager")
        return found[0]

    async def _ensure(self) -> None:
        if self._client is not None and self._pm is not None:
            return
        try:
            await self._connect()
        except SourceRefused as exc:
            await self._drop(exc.reason)
            raise
        except asyncio.CancelledError:
            await self._drop("cancelled while connecting")
            raise
        except Exception as exc:
            reason = self._reason(exc, "connect")
            await self._drop(reason)
            if isinstance(exc, ua.UaStatusCodeError) and exc.code not in TRANSIENT_CODES:
                raise SourceRefused(reason) from None
            raise SourceUnavailable(reason) from None

    def _reason(self, exc: BaseException, what: str) -> str:
        if isinstance(exc, ua.UaStatusCodeError):
            return f"OPEN-SCS {what}: {_status_name(exc.code)} ({exc})"
        if isinstance(exc, TimeoutError | asyncio.TimeoutError):
            return f"OPEN-SCS {what}: no answer from {self.endpoint} within {self.timeout_s:g} s"
        text = str(exc) or type(exc).__name__
        return f"OPEN-SCS {what}: {type(exc).__name__}: {text}"

    async def _call(self, method: str, *args: Any) -> list[Any]:
        """One method call; transport trouble drops the session (the next call reconnects)."""
        await self._ensure()
        assert self._pm is not None
        node = self._methods.get(method)
        if node is None:
            raise SourceRefused(f"OPEN-SCS: the pool manager has no {method}")
        try:
            out = await asyncio.wait_for(self._pm.call_method(node, *args), timeout=self.timeout_s)
        except ua.UaStatusCodeError as exc:
            reason = self._reason(exc, method)
            if exc.code in TRANSIENT_CODES:
                await self._drop(reason)
                raise SourceUnavailable(reason) from None
            self.last_error = reason
            raise SourceRefused(reason) from None
        except asyncio.CancelledError:
            await self._drop("cancelled mid-call")
            raise
        except Exception as exc:
            reason = self._reason(exc, method)
            await self._drop(reason)
            raise SourceUnavailable(reason) from None
        return out if isinstance(out, list) else [out]

    def _fill(self, template: str, gtin: str, lot: str | None) -> str:
        return template.format(gtin=gtin, lot=lot or "")

    def _criteria(self, gtin: str, lot: str | None) -> list[Any]:
        return [self._key_value(Key=k, Value=self._fill(v, gtin, lot)) for k, v in self.selection_criteria.items()]

    # ------------------------------------------------------------------ SerialSource

    @staticmethod
    def _gtin(gtin: str) -> str:
        try:
            return gs1.normalize_gtin(gtin)
        except gs1.GS1Error as exc:
            raise SourceRefused(f"OPEN-SCS: GTIN {gtin!r}: {exc.reason}") from None

    async def request(self, req: SerialRequest, continuation: str | None = None) -> SerialPage:
        gtin = self._gtin(req.gtin)
        token = continuation or req.key
        async with self._lock:
            await self._ensure()
            if self.max_requestable is not None and req.size > self.max_requestable:
                raise SourceRefused(f"OPEN-SCS: {req.size} serials asked, the L3's MaxSNRequestable is {self.max_requestable}")
            collection_id = self._fill(self.collection_id, gtin, req.lot)
            criteria = self._criteria(gtin, req.lot)
            out = await self._call(
                "SNRequestAllocated",
                ua.Variant(collection_id, ua.VariantType.String),
                ua.Variant(req.size, ua.VariantType.UInt32),
                ua.Variant(self.sn_format, ua.VariantType.String),
                ua.Variant(criteria, ua.VariantType.ExtensionObject),
                ua.Variant(token, ua.VariantType.String),
            )
            self.requests += 1
        sent = {"SNCollectionID": collection_id, "Count": req.size, "SNFormat": self.sn_format,
                "PoolSelectionCriteria": {kv.Key: kv.Value for kv in criteria}, "RequestToken": token}
        raw, status, coll, next_token = self._render_answer(sent, out)
        if status != 1:
            name, meaning = RETURN_STATUS.get(status, (f"status {status}", "unknown ReturnStatus"))
            detail = f" ({coll.Description})" if coll is not None and getattr(coll, "Description", None) else ""
            reason = f"OPEN-SCS SNRequestAllocated: {name}: {meaning}{detail} [GTIN {gtin}, token {token!r}]"
            self.last_error = reason
            raise SourceRefused(reason)
        if coll is None:
            reason = f"OPEN-SCS SNRequestAllocated: NoError without a serial number collection [token {token!r}]"
            self.last_error = reason
            raise SourceRefused(reason)
        serials, foreign = self._serials(gtin, list(getattr(coll, "SerialNumbers", None) or []))
        self.last_error = None
        return SerialPage(serials=serials, raw=raw, more=bool(next_token), continuation=next_token or None, foreign=foreign)

    def _render_answer(self, sent: dict[str, Any], out: list[Any]) -> tuple[str, int, Any, str]:
        """The answer as text for the record (every field the L3 sent), and its parts."""
        status_raw = out[0] if out else None
        coll = out[1] if len(out) > 1 else None
        next_token = out[2] if len(out) > 2 and isinstance(out[2], str) else ""
        try:
            status = int(status_raw) if status_raw is not None else 0
        except (TypeError, ValueError):
            status = 0
        answer: dict[str, Any] = {
            "ReturnStatus": f"{RETURN_STATUS.get(status, (str(status_raw), ''))[0]}",
            "SNCollection": None,
            "ReturnedRequestToken": out[2] if len(out) > 2 else None,
        }
        if coll is not None:
            state = getattr(coll, "State", None)
            answer["SNCollection"] = {
                "ID": getattr(coll, "ID", None),
                "Description": getattr(coll, "Description", None),
                "State": getattr(state, "name", state),
                "AssociatedPoolID": getattr(coll, "AssociatedPoolID", None),
                "SerialNumbers": list(getattr(coll, "SerialNumbers", None) or []),
            }
            if not hasattr(coll, "SerialNumbers"):
                answer["SNCollection"] = {"unexpected": repr(coll)}
                coll = None
        doc = {"protocol": "OPEN-SCS OPC UA", "endpoint": self.endpoint, "method": "SNRequestAllocated",
               "request": sent, "answer": answer}
        return json.dumps(doc, ensure_ascii=False), status, coll, next_token

    def _serials(self, gtin: str, values: list[Any]) -> tuple[list[str], list[tuple[str, str]]]:
        """Serial values for this GTIN in the L3's order; the rest (malformed, another GTIN, repeats) with why."""
        serials: list[str] = []
        foreign: list[tuple[str, str]] = []
        seen: set[str] = set()
        for value in values:
            if not isinstance(value, str):
                foreign.append((repr(value), "not a string"))
                continue
            if self.sn_format == "EPCURI":
                try:
                    ident = gs1.parse_uri(value)
                except gs1.GS1Error as exc:
                    foreign.append((value, f"malformed EPC URI: {exc.reason}"))
                    continue
                if ident.kind != "sgtin" or ident.serial is None:
                    foreign.append((value, f"not an SGTIN ({ident.kind})"))
                    continue
                if ident.gtin != gtin:
                    foreign.append((value, f"serial of GTIN {ident.gtin}, not {gtin}"))
                    continue
                serial = ident.serial
            else:
                serial = value
                try:
                    gs1.compose([("01", gtin), ("21", serial)])
                except gs1.GS1Error as exc:
                    foreign.append((value, f"malformed serial: {exc.reason}"))
                    continue
            if serial in seen:
                foreign.append((value, "repeated in this answer"))
                continue
            seen.add(serial)
            serials.append(serial)
        return serials, foreign

    async def give_back(self, gtin: str, serials: list[str], key: str) -> bool:
        """SNReturnAllocated in SERIALONLY (the format every pool manager must take), in MaxSNReturnable chunks."""
        gtin = self._gtin(gtin)
        async with self._lock:
            await self._ensure()
            if "SNReturnAllocated" not in self._methods:
                return False
            step = self.max_returnable or max(1, len(serials))
            for start in range(0, len(serials), step):
                chunk = serials[start:start + step]
                coll = self._sn_collection(
                    ID=self._fill(self.collection_id, gtin, None),
                    Description=f"unused serials of request {key}",
                    State=ALLOCATED,
                    AssociatedPoolID="",
                    SerialNumbers=chunk,
                )
                out = await self._call(
                    "SNReturnAllocated",
                    ua.Variant(coll, ua.VariantType.ExtensionObject),
                    ua.Variant(self._criteria(gtin, None), ua.VariantType.ExtensionObject),
                    ua.Variant("SERIALONLY", ua.VariantType.String),
                )
                status = int(out[0]) if out and out[0] is not None else 0
                if status != 1:
                    name, meaning = RETURN_STATUS.get(status, (f"status {status}", "unknown ReturnStatus"))
                    reason = f"OPEN-SCS SNReturnAllocated: {name}: {meaning} [GTIN {gtin}, {len(chunk)} serials, key {key!r}]"
                    self.last_error = reason
                    raise SourceRefused(reason)
                self.returns += len(chunk)
        return True

    async def aclose(self) -> None:
        async with self._lock:
            await self._drop()

    def status(self) -> dict[str, Any]:
        return {
            "type": "openscs",
            "endpoint": self.endpoint,
            "connected": self._connected,
            "security": self.policy if self.policy == "None" else f"{self.policy}/{self.mode}",
            "user": self.username,
            "sn_format": self.sn_format,
            "max_requestable": self.max_requestable,
            "max_returnable": self.max_returnable,
            "requests": self.requests,
            "returned": self.returns,
            "last_error": self.last_error,
        }
