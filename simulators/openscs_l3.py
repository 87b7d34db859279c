"""An OPEN-SCS (OPC 30260) L3 serial-number pool manager: an OPC UA server built from the official nodesets.

Why it exists: no open-source OPEN-SCS server exists, and linectl's OPEN-SCS source must be proven against a
real OPC UA server whose address space is the OPC Foundation's, not against a mock of our own idea of it. The
server imports the official DI and OPENSCS nodesets (standards/opcua), instantiates an
OPENSCSPoolManagerObjectType object and implements SNRequestAllocated and SNReturnAllocated on it, with one pool
of random serials per GTIN.

Request tokens: an unknown non-empty RequestToken starts a new request under that token (Count serials are
allocated at once and answered page by page); the same token again answers the first page again (idempotent);
the ReturnedRequestToken of a page asks for the next page, again idempotently. An empty token is the spec's
"initial request": the server makes up a token (not idempotent, as the spec has it).

The official nodeset gives OPENSCSSNCollectionDataType (ns;i=15008) no field definition (it is a subtype of the
abstract OPENSCSCollectionDataType without fields of its own), so no client could decode it. The server
advertises the parent's fields as its DataTypeDefinition (encoding ns;i=15191) unless started with
--bare-nodeset, which serves the nodeset as published (the encoding on the wire is the same).

Faults (queued with the simulator's own InjectFault method, each for the next `times` SNRequestAllocated calls):
short, duplicate, malformed, foreign, status (a ReturnStatus), bad_status (a Call StatusCode), drop (connection
closed without an answer), delay (seconds before the answer), stall (the whole server blocked that long); "clear" drops the faults still queued. Ground
truth (what was handed out, to which request, what came back, which faults were injected) is read with the
GroundTruth method (JSON) and kept in --state across restarts, so a request repeated after an L3 restart gets
the same numbers.

Run: `python -m linectl.simulators.openscs_l3 --port 4841` (no security, anonymous: for a desk), or with
--security Basic256Sha256 --mode SignAndEncrypt --certificate C --private-key K [--trust CLIENT_CERT] --user U
--password-env VAR.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import string
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.common.structures104 import make_structure
from asyncua.crypto.permission_rules import User, UserRole
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from linectl import gs1

OPENSCS_URI = "http://opcfoundation.org/UA/OPENSCS-SER/"
SIM_URI = "urn:linectl:simulators:openscs-l3"
#: numeric ids in the OPENSCS namespace (OPENSCS.NodeIds.csv)
POOL_MANAGER_TYPE = 15032
SN_COLLECTION_TYPE = 15008
COLLECTION_TYPE = 15005
SN_COLLECTION_BINARY = 15191
KEY_VALUE_TYPE = 15010
SN_FORMATS = ("SERIALONLY", "EPCURI")
FAULT_KINDS = ("short", "duplicate", "malformed", "foreign", "status", "bad_status", "drop", "delay", "stall")

# OPENSCSReturnEnum values (Types.bsd)
NO_ERROR = 1
INVALID_SN_COLLECTION = 2
INSUFFICIENT_SNS = 3
INVALID_SN_FORMAT = 4
INVALID_REQUEST_TOKEN = 5
INVALID_SELECTION_CRITERIA = 6
ALLOCATED_STATE = 2  # OPENSCSSerialNumberStateEnum.Allocated2

log = logging.getLogger("openscs_l3")


def nodeset_dir() -> Path:
    """The official nodesets, shipped unchanged with linectl (OPC Foundation MIT licence, in each file's header)."""
    return Path(str(resources.files("linectl") / "standards" / "opcua"))


@dataclass
class Fault:
    kind: str
    times: int
    arg: str = ""


@dataclass
class Allocation:
    """One request: its serials are fixed when it is first seen, then answered page by page."""

    token: str
    gtin: str
    count: int
    sn_format: str
    serials: list[str]  # as answered (a fault may have changed them)


@dataclass
class PoolState:
    """Everything the L3 knows; written to --state after every change."""

    pools: dict[str, list[str]] = field(default_factory=dict)  # gtin -> serials back in the pool, reused first
    issued: dict[str, list[str]] = field(default_factory=dict)  # gtin -> every serial ever made for it, in order
    allocations: dict[str, Allocation] = field(default_factory=dict)  # request token -> allocation
    continuations: dict[str, list[Any]] = field(default_factory=dict)  # continuation token -> [request token, page]
    handed_out: dict[str, list[str]] = field(default_factory=dict)  # gtin -> serials answered, in order, repeats kept
    returned: dict[str, list[str]] = field(default_factory=dict)  # gtin -> serials given back
    injected: dict[str, list[str]] = field(default_factory=dict)  # fault kind -> serials it planted
    calls: dict[str, int] = field(default_factory=dict)  # method name -> calls answered

    def to_json(self) -> dict[str, Any]:
        return {
            "pools": self.pools,
            "issued": self.issued,
            "allocations": {k: vars(a) for k, a in self.allocations.items()},
            "continuations": self.continuations,
            "handed_out": self.handed_out,
            "returned": self.returned,
            "injected": self.injected,
            "calls": self.calls,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PoolState:
        st = cls()
        st.pools = data.get("pools", {})
        st.issued = data.get("issued", {})
        st.allocations = {k: Allocation(**a) for k, a in data.get("allocations", {}).items()}
        st.continuations = data.get("continuations", {})
        st.handed_out = data.get("handed_out", {})
        st.returned = data.get("returned", {})
        st.injected = data.get("injected", {})
        st.calls = data.get("calls", {})
        return st


class PasswordUsers:
    """One user/password; anything else is refused (asyncua's default lets everyone in)."""

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self.password = password

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None) -> User | None:
        if username == self.username and password is not None and secrets.compare_digest(password, self.password):
            return User(role=UserRole.User, name=username)
        return None


def load_der(path: Path) -> bytes:
    """A certificate file (PEM or DER) as DER bytes."""
    data = path.read_bytes()
    cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    return cert.public_bytes(serialization.Encoding.DER)


def registered_struct(datatype: ua.NodeId) -> Any:
    """The class asyncua made for a DataType node (looked up by id: browse names collide, see the module doc)."""
    for nodeid, cls in ua.extension_objects_by_datatype.items():
        if nodeid.Identifier == datatype.Identifier and nodeid.NamespaceIndex == datatype.NamespaceIndex:
            return cls
    return None


class OpenScsL3:
    """The pool manager: pools, requests, returns, faults."""

    def __init__(
        self,
        *,
        page_size: int = 500,
        max_requestable: int = 100_000,
        max_returnable: int = 100_000,
        pool_size: int = 1_000_000,
        gtins: list[str] | None = None,
        company_prefix_length: int = 7,
        serial_length: int = 12,
        seed: int | None = None,
        state_path: Path | None = None,
    ) -> None:
        self.page_size = page_size
        self.max_requestable = max_requestable
        self.max_returnable = max_returnable
        self.pool_size = pool_size
        self.gtins = {gs1.normalize_gtin(g) for g in gtins} if gtins else None
        self.cpl = company_prefix_length
        self.serial_length = serial_length
        self.rng = random.Random(seed)
        self.state_path = state_path
        self.state = PoolState()
        if state_path is not None and state_path.exists():
            self.state = PoolState.from_json(json.loads(state_path.read_text()))
        self.faults: list[Fault] = []
        self._issued_sets: dict[str, set[str]] = {}
        self.server: Server | None = None
        self.ns = 0
        self.sn_collection: Any = None
        self.key_value: Any = None

    # ------------------------------------------------------------------ pool logic (no OPC UA here)

    def _save(self) -> None:
        if self.state_path is None:
            return
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state.to_json()))
        os.replace(tmp, self.state_path)

    def _fault(self, *kinds: str) -> Fault | None:
        for f in self.faults:
            if f.kind in kinds:
                f.times -= 1
                if f.times <= 0:
                    self.faults.remove(f)
                return f
        return None

    def _new_serial(self, gtin: str) -> str:
        issued = self.state.issued.setdefault(gtin, [])
        seen = self._issued_sets.get(gtin)
        if seen is None:
            seen = self._issued_sets[gtin] = set(issued)
        alphabet = string.digits + string.ascii_uppercase
        while True:
            s = "".join(self.rng.choice(alphabet) for _ in range(self.serial_length))
            if s not in seen:
                issued.append(s)
                seen.add(s)
                return s

    def _take(self, gtin: str, count: int) -> list[str] | None:
        pool = self.state.pools.setdefault(gtin, [])
        fresh_left = self.pool_size - len(self.state.issued.get(gtin, []))
        if len(pool) + fresh_left < count:
            return None
        out = pool[:count]
        del pool[: len(out)]
        out.extend(self._new_serial(gtin) for _ in range(count - len(out)))
        return out

    def render(self, gtin: str, serial: str, sn_format: str) -> str:
        if sn_format == "EPCURI":
            try:
                return gs1.sgtin_urn(gtin, serial, self.cpl)
            except gs1.GS1Error:  # a planted malformed serial: render it raw, as a broken L3 would
                return f"urn:epc:id:sgtin:{gtin[1:1 + self.cpl]}.{gtin[0]}{gtin[1 + self.cpl:13]}.{serial}"
        return serial

    def _other_gtin(self, gtin: str) -> str:
        body = str((int(gtin[:13]) + 1) % 10**13).zfill(13)
        return body + gs1.gtin_check_digit(body)

    def _plant(self, kind: str, serials: list[str], gtin: str) -> None:
        """Spoil a fresh allocation as a faulty L3 would; what was planted goes to the ground truth."""
        planted = self.state.injected.setdefault(kind, [])
        if kind == "short":
            del serials[max(1, len(serials) // 2):]
        elif kind == "duplicate":
            earlier = [s for s in self.state.handed_out.get(gtin, []) if s not in serials]
            dup = earlier[0] if earlier else serials[0]
            serials[-1] = dup  # one serial of an earlier request (or of this one) ...
            if len(serials) > 2:
                serials[-2] = serials[0]  # ... and one repeated inside this answer
                planted.append(serials[0])
            planted.append(dup)
        elif kind == "malformed":
            serials[0] = "BAD SERIAL/" + "Ä" * 3  # a space and non-CSET82 characters
            planted.append(serials[0])

    def request_allocated(
        self, collection_id: str, count: int, sn_format: str, criteria: dict[str, str], token: str
    ) -> tuple[int, dict[str, Any] | None, str]:
        """SNRequestAllocated without the wire: (ReturnStatus, collection fields or None, ReturnedRequestToken)."""
        self.state.calls["SNRequestAllocated"] = self.state.calls.get("SNRequestAllocated", 0) + 1
        if sn_format not in SN_FORMATS:
            return INVALID_SN_FORMAT, None, ""
        gtin_raw = criteria.get("GTIN", "")
        try:
            gtin = gs1.normalize_gtin(gtin_raw)
        except gs1.GS1Error:
            return INVALID_SELECTION_CRITERIA, None, ""
        if self.gtins is not None and gtin not in self.gtins:
            return INVALID_SELECTION_CRITERIA, None, ""
        page = 0
        if token in self.state.continuations:
            base, page = self.state.continuations[token]
            alloc = self.state.allocations[base]
        elif token in self.state.allocations:
            alloc = self.state.allocations[token]
            if alloc.count != count or alloc.gtin != gtin or alloc.sn_format != sn_format:
                return INVALID_REQUEST_TOKEN, None, ""
        else:
            if not token:
                token = "L3-" + secrets.token_hex(8)
            taken = self._take(gtin, count)
            if taken is None:
                return INSUFFICIENT_SNS, None, ""
            fault = self._fault("short", "duplicate", "malformed")
            if fault is not None:
                self._plant(fault.kind, taken, gtin)
            alloc = Allocation(token=token, gtin=gtin, count=count, sn_format=sn_format, serials=taken)
            self.state.allocations[token] = alloc
            self.state.handed_out.setdefault(gtin, []).extend(taken)
        chunk = alloc.serials[page * self.page_size:(page + 1) * self.page_size]
        rendered = [self.render(alloc.gtin, s, alloc.sn_format) for s in chunk]
        if self._fault("foreign") is not None and rendered:
            other = self._other_gtin(alloc.gtin)
            # SERIALONLY answers name no GTIN: a serial of the other GTIN's pool, which no client can tell apart
            rendered[0] = self.render(other, chunk[0], "EPCURI") if alloc.sn_format == "EPCURI" else self._new_serial(other)
            self.state.injected.setdefault("foreign", []).append(rendered[0])
        more = (page + 1) * self.page_size < len(alloc.serials)
        next_token = ""
        if more:
            next_token = f"{alloc.token}~p{page + 1}"
            self.state.continuations[next_token] = [alloc.token, page + 1]
        self._save()
        pages = max(1, -(-len(alloc.serials) // self.page_size))
        coll = {
            "ID": collection_id,
            "Description": f"request {alloc.token}: page {page + 1} of {pages}, {len(alloc.serials)} serials for GTIN {alloc.gtin}",
            "State": ALLOCATED_STATE,
            "AssociatedPoolID": f"GTIN-{alloc.gtin}",
            "SerialNumbers": rendered,
        }
        return NO_ERROR, coll, next_token

    def _parse(self, value: str, sn_format: str) -> tuple[str | None, str]:
        if sn_format == "EPCURI":
            try:
                ident = gs1.parse_uri(value)
            except gs1.GS1Error:
                return None, value
            return ident.gtin, ident.serial or ""
        return None, value

    def return_allocated(self, serials: list[str], criteria: dict[str, str], sn_format: str) -> int:
        """SNReturnAllocated without the wire: all or nothing; a serial already back in the pool is no error."""
        self.state.calls["SNReturnAllocated"] = self.state.calls.get("SNReturnAllocated", 0) + 1
        if sn_format not in SN_FORMATS:
            return INVALID_SN_FORMAT
        try:
            gtin = gs1.normalize_gtin(criteria.get("GTIN", ""))
        except gs1.GS1Error:
            return INVALID_SELECTION_CRITERIA
        handed = set(self.state.handed_out.get(gtin, []))
        pool = self.state.pools.setdefault(gtin, [])
        back: list[str] = []
        for value in serials:
            g, s = self._parse(value, sn_format)
            if (g is not None and g != gtin) or s not in handed:
                return INVALID_SN_COLLECTION
            back.append(s)
        in_pool = set(pool)
        for s in back:
            if s not in in_pool:
                pool.append(s)
                in_pool.add(s)
                self.state.returned.setdefault(gtin, []).append(s)
        self._save()
        return NO_ERROR

    def ground_truth(self) -> str:
        data = self.state.to_json()
        data["faults_pending"] = [vars(f) for f in self.faults]
        return json.dumps(data)

    # ------------------------------------------------------------------ OPC UA

    async def _sn_request_allocated(self, parent: ua.NodeId, *args: ua.Variant) -> Any:
        if len(args) != 5:
            return ua.StatusCode(ua.StatusCodes.BadArgumentsMissing if len(args) < 5 else ua.StatusCodes.BadTooManyArguments)
        collection_id, count, sn_format, criteria, token = (a.Value for a in args)
        if not isinstance(count, int) or count <= 0 or count > self.max_requestable:
            return ua.StatusCode(ua.StatusCodes.BadInvalidArgument)
        bad = self._fault("bad_status", "drop", "delay", "stall", "status")
        if bad is not None:
            if bad.kind == "bad_status":
                return ua.StatusCode(getattr(ua.StatusCodes, bad.arg or "BadInternalError"))
            if bad.kind == "drop":
                assert self.server is not None
                for transport in list(self.server.iserver.asyncio_transports):
                    transport.abort()
                await asyncio.sleep(3600)  # the answer never leaves
            if bad.kind == "delay":
                await asyncio.sleep(float(bad.arg or "10"))
            if bad.kind == "stall":  # a server busy in one thread (a synchronous database allocation): nothing answers
                time.sleep(float(bad.arg or "3"))
            if bad.kind == "status":
                return [
                    ua.Variant(int(bad.arg or INSUFFICIENT_SNS), ua.VariantType.Int32),
                    ua.Variant(None, ua.VariantType.ExtensionObject),
                    ua.Variant("", ua.VariantType.String),
                ]
        crit = {kv.Key: kv.Value for kv in (criteria or [])}
        status, coll, next_token = self.request_allocated(collection_id or "", count, sn_format or "", crit, token or "")
        value: Any = None
        if coll is not None:
            assert self.sn_collection is not None
            value = self.sn_collection(**coll)
        log.info("SNRequestAllocated token=%r count=%d -> status %d, %d serials, next %r", token, count, status,
                 len(coll["SerialNumbers"]) if coll else 0, next_token)
        return [
            ua.Variant(status, ua.VariantType.Int32),
            ua.Variant(value, ua.VariantType.ExtensionObject),
            ua.Variant(next_token, ua.VariantType.String),
        ]

    async def _sn_return_allocated(self, parent: ua.NodeId, *args: ua.Variant) -> Any:
        if len(args) != 3:
            return ua.StatusCode(ua.StatusCodes.BadArgumentsMissing if len(args) < 3 else ua.StatusCodes.BadTooManyArguments)
        coll, criteria, sn_format = (a.Value for a in args)
        serials = list(getattr(coll, "SerialNumbers", None) or [])
        if coll is None or len(serials) > self.max_returnable:
            return ua.StatusCode(ua.StatusCodes.BadInvalidArgument)
        crit = {kv.Key: kv.Value for kv in (criteria or [])}
        status = self.return_allocated(serials, crit, sn_format or "")
        log.info("SNReturnAllocated %d serials -> status %d", len(serials), status)
        return [ua.Variant(status, ua.VariantType.Int32)]

    async def _inject(self, parent: ua.NodeId, *args: ua.Variant) -> Any:
        kind, times, arg = (a.Value for a in args)
        if kind == "clear":
            self.faults.clear()
            return []
        if kind not in FAULT_KINDS:
            return ua.StatusCode(ua.StatusCodes.BadInvalidArgument)
        self.faults.append(Fault(kind, int(times or 1), arg or ""))
        return []

    async def _ground_truth(self, parent: ua.NodeId, *args: ua.Variant) -> Any:
        return [ua.Variant(self.ground_truth(), ua.VariantType.String)]

    async def _sn_collection_definition(self, server: Server) -> Any:
        """OPENSCSSNCollectionDataType as a subtype adding no field: its parent's fields, its own encoding id."""
        parent = await server.get_node(ua.NodeId(COLLECTION_TYPE, self.ns)).read_data_type_definition()
        return ua.StructureDefinition(
            DefaultEncodingId=ua.NodeId(SN_COLLECTION_BINARY, self.ns),
            BaseDataType=ua.NodeId(COLLECTION_TYPE, self.ns),
            StructureType=ua.StructureType.Structure,
            Fields=list(parent.Fields),
        )

    async def _patch_sn_collection(self, server: Server) -> None:
        """Give OPENSCSSNCollectionDataType the field definition the official nodeset lacks."""
        sdef = await self._sn_collection_definition(server)
        await server.write_attribute_value(
            ua.NodeId(SN_COLLECTION_TYPE, self.ns), ua.DataValue(ua.Variant(sdef)), ua.AttributeIds.DataTypeDefinition
        )

    async def build(
        self,
        endpoint: str,
        *,
        policy: str = "None",
        mode: str = "SignAndEncrypt",
        certificate: Path | None = None,
        private_key: Path | None = None,
        username: str | None = None,
        password: str | None = None,
        bare_nodeset: bool = False,
        trusted: list[Path] | None = None,
    ) -> Server:
        server = Server()
        await server.init()
        server.set_endpoint(endpoint)
        server.set_server_name("linectl OPEN-SCS L3 simulator")
        await server.set_application_uri("urn:linectl:simulators:openscs-l3")
        if policy == "None":
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        else:
            if certificate is None or private_key is None:
                raise ValueError("--security Basic256Sha256 needs --certificate and --private-key")
            server.set_security_policy([getattr(ua.SecurityPolicyType, f"Basic256Sha256_{mode}")])
            await server.load_certificate(str(certificate))
            await server.load_private_key(str(private_key))
            if trusted:
                pinned = {load_der(p) for p in trusted}

                async def only_trusted(cert: x509.Certificate, app: Any) -> None:
                    if cert.public_bytes(serialization.Encoding.DER) not in pinned:
                        raise ua.UaStatusCodeError(ua.StatusCodes.BadCertificateUntrusted)

                server.set_certificate_validator(only_trusted)
        if username is not None:
            server.iserver.user_manager = PasswordUsers(username, password or "")
            server.set_identity_tokens([ua.UserNameIdentityToken])
        else:
            server.set_identity_tokens([ua.AnonymousIdentityToken])
        d = nodeset_dir()
        await server.import_xml(str(d / "Opc.Ua.Di.NodeSet2.xml"))
        await server.import_xml(str(d / "Opc.Ua.OPENSCS.NodeSet2.xml"))
        self.ns = await server.get_namespace_index(OPENSCS_URI)
        if not bare_nodeset:
            await self._patch_sn_collection(server)
        await server.load_data_type_definitions()
        self.sn_collection = registered_struct(ua.NodeId(SN_COLLECTION_TYPE, self.ns))
        self.key_value = registered_struct(ua.NodeId(KEY_VALUE_TYPE, self.ns))
        if self.sn_collection is None:
            # served bare: the server still needs a class to encode answers (the wire layout of the patch)
            sdef = await self._sn_collection_definition(server)
            datatype = ua.NodeId(SN_COLLECTION_TYPE, self.ns)
            self.sn_collection = make_structure(datatype, "OPENSCSSNCollectionDataType", sdef)["OPENSCSSNCollectionDataType"]
            ua.register_extension_object("OPENSCSSNCollectionDataType", sdef.DefaultEncodingId, self.sn_collection, datatype)
        assert self.key_value is not None
        sim_ns = await server.register_namespace(SIM_URI)
        objects = server.nodes.objects
        pm = await objects.add_object(ua.NodeId("PoolManager", sim_ns), ua.QualifiedName("PoolManager", sim_ns),
                                      objecttype=ua.NodeId(POOL_MANAGER_TYPE, self.ns))
        for prop, value, vtype in (
            ("MaxSNRequestable", self.max_requestable, ua.VariantType.UInt32),
            ("MaxSNReturnable", self.max_returnable, ua.VariantType.UInt32),
            ("MaxSNPushable", 0, ua.VariantType.UInt32),  # SNto* methods are not served
            ("SNFormat", list(SN_FORMATS), ua.VariantType.String),
        ):
            node = await pm.get_child(ua.QualifiedName(prop, self.ns))
            await node.write_value(ua.Variant(value, vtype))
        kv = self.key_value
        crit = await pm.get_child(ua.QualifiedName("PoolSelectionCriteria", self.ns))
        await crit.write_value(ua.Variant([kv(Key="GTIN", Value=g) for g in sorted(self.gtins or [])] or [kv(Key="GTIN", Value="")],
                                          ua.VariantType.ExtensionObject))
        served = {"SNRequestAllocated": self._sn_request_allocated, "SNReturnAllocated": self._sn_return_allocated}
        for method in await pm.get_children(refs=ua.ObjectIds.HasComponent, nodeclassmask=ua.NodeClass.Method):
            name = (await method.read_browse_name()).Name
            if name in served:
                server.link_method(method, served[name])
        sim = await objects.add_object(ua.NodeId("Simulator", sim_ns), ua.QualifiedName("Simulator", sim_ns))
        await sim.add_method(sim_ns, "InjectFault", self._inject,
                             [ua.VariantType.String, ua.VariantType.UInt32, ua.VariantType.String], [])
        await sim.add_method(sim_ns, "GroundTruth", self._ground_truth, [], [ua.VariantType.String])
        self.server = server
        return server


async def serve(args: argparse.Namespace) -> None:
    password = None
    if args.user:
        password = os.environ.get(args.password_env, "") if args.password_env else None
        if args.password_file:
            password = Path(args.password_file).read_text().strip()
        if not password:
            raise SystemExit("--user needs a password: --password-env VAR or --password-file FILE")
    l3 = OpenScsL3(page_size=args.page_size, max_requestable=args.max_requestable, max_returnable=args.max_returnable,
                   pool_size=args.pool_size,
                   gtins=args.gtin or None, company_prefix_length=args.company_prefix_length, seed=args.seed,
                   state_path=Path(args.state) if args.state else None)
    server = await l3.build(
        f"opc.tcp://{args.host}:{args.port}/openscs", policy=args.security, mode=args.mode,
        certificate=Path(args.certificate) if args.certificate else None,
        private_key=Path(args.private_key) if args.private_key else None,
        username=args.user, password=password, bare_nodeset=args.bare_nodeset,
        trusted=[Path(t) for t in args.trust or []],
    )
    async with server:
        print(f"openscs-l3 listening on opc.tcp://{args.host}:{args.port}/openscs", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="openscs_l3", description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4841)
    p.add_argument("--security", choices=("None", "Basic256Sha256"), default="None")
    p.add_argument("--mode", choices=("Sign", "SignAndEncrypt"), default="SignAndEncrypt")
    p.add_argument("--certificate", help="server certificate (PEM or DER), with --security Basic256Sha256")
    p.add_argument("--private-key", help="server private key (PEM)")
    p.add_argument("--trust", action="append", help="a client certificate let in (repeat); none given: any client certificate")
    p.add_argument("--user", help="the one user allowed in (anonymous is refused then)")
    p.add_argument("--password-env", help="environment variable holding --user's password")
    p.add_argument("--password-file", help="file holding --user's password")
    p.add_argument("--page-size", type=int, default=500, help="serials per answer; more come by ReturnedRequestToken")
    p.add_argument("--max-requestable", type=int, default=100_000, help="MaxSNRequestable: largest Count accepted")
    p.add_argument("--max-returnable", type=int, default=100_000, help="MaxSNReturnable: most serials one return may carry")
    p.add_argument("--pool-size", type=int, default=1_000_000, help="serials a GTIN's pool holds in all")
    p.add_argument("--gtin", action="append", help="a GTIN the L3 has a pool for (repeat); none: any valid GTIN")
    p.add_argument("--company-prefix-length", type=int, default=7, help="for EPCURI answers")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--state", help="JSON file keeping pools, requests and ground truth across restarts")
    p.add_argument("--bare-nodeset", action="store_true", help="serve OPENSCSSNCollectionDataType without a field definition, as published")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(serve(args))
    except (OSError, ValueError, FileNotFoundError) as exc:
        print(f"openscs-l3: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
