"""An L3/L4 that hands out serial numbers: serialbox REST and the three SOAP number-range shapes, with faults.

It answers as QU4RTET does (the same paths, the same JSON/XML, the reply shapes of the tests' QU4RTET templates,
the same errors: 401 without credentials, 404 for an unknown pool, 500 + JSON `detail` for a size above the
pool's request_threshold or an exhausted pool), and adds what a real L3 cannot be made to do on a desk: faults
set at run time, and the ground truth of every number it handed out, delivered or not.

    python -m linectl.simulators.l3_serials --port 8321 --pool 09506000134352:random --token s3cret

Endpoints: GET /serialbox/allocate/<pool>/<size>/?format=json|xml; POST /guardian/NumberRangeService/ (sap),
/unitrace/NumberRangeService/ (unitrace), /soap/snx/snrequest/ (tracelink). Control (no auth, bind it to
loopback): GET /_sim/state, GET /_sim/handed_out/<pool>, POST /_sim/faults {"kind", "count", "pool"},
DELETE /_sim/faults, POST /_sim/release, POST /_sim/pools {machine_name, kind, minimum, maximum,
request_threshold, element_strings}.

Faults (FAULTS), each for the next `count` requests (of `pool` if given):
  http_500_html  500 with an HTML error page; nothing allocated
  html_200       200 with an HTML login page (a proxy in the way); nothing allocated
  soap_fault     SOAP: 500 + SOAP Fault; REST: 400 + JSON detail (the L3 says no); nothing allocated
  hang           never answers (until release() or stop); nothing allocated
  drop           allocates, sends the headers and half the body, closes the connection
  truncated      allocates, answers half the body as a complete HTTP answer (malformed JSON/XML)
  short          allocates and answers half of what was asked
  duplicates     answers `n` (default: half) numbers it handed out before, in place of new ones
  bad_format     half of the numbers are not valid AI (21) serials
  foreign_gtin   SOAP: tracelink element strings of another GTIN for half; sap/unitrace: ObjectKey of another GTIN
  hold           allocates, then holds the answer until release() (kill the client in between)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import random
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

import structlog

from linectl import gs1

log = structlog.get_logger("linectl.simulators.l3")

FAULTS = (
    "http_500_html", "html_200", "soap_fault", "hang", "drop", "truncated", "short", "duplicates", "bad_format",
    "foreign_gtin", "hold",
)
SOAP_PATHS = {
    "/guardian/NumberRangeService/": "sap",
    "/unitrace/NumberRangeService/": "unitrace",
    "/soap/snx/snrequest/": "tracelink",
}
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
SAP_NS = "http://sap.com/xi/AIN"
TRACELINK_NS = "urn:tracelink:soap"
#: another product's GTIN, for foreign_gtin
OTHER_GTIN = "09506000000015"
MAX_REQUEST_BODY = 1_000_000
_ALLOCATE = re.compile(r"^/serialbox/allocate/([^/]+)/(\d{1,9})/?$")


class Exhausted(Exception):
    pass


@dataclass
class Pool:
    """One serialbox pool with one region: randomized (without repeats) or sequential, over [minimum, maximum]."""

    machine_name: str
    kind: str = "random"
    minimum: int = 1
    maximum: int = 999_999_999
    request_threshold: int = 50_000
    #: tracelink answers full element strings 01<machine_name>21<serial> (machine_name must be a GTIN)
    element_strings: bool = False
    next_number: int = 0
    used: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ("random", "sequential"):
            raise ValueError(f"pool kind {self.kind!r}: expected random or sequential")
        if self.maximum < self.minimum or self.minimum < 0:
            raise ValueError(f"pool range {self.minimum}..{self.maximum} is empty or negative")
        if self.element_strings and not gs1.is_valid_gtin(self.machine_name):
            raise ValueError("element_strings needs a pool named by its GTIN")
        self.next_number = self.next_number or self.minimum

    @property
    def left(self) -> int:
        if self.kind == "sequential":
            return self.maximum - self.next_number + 1
        return self.maximum - self.minimum + 1 - len(self.used)

    def allocate(self, size: int, rng: random.Random) -> list[int]:
        """Up to `size` new numbers (fewer when the region runs out); Exhausted when none are left."""
        n = min(size, self.left)
        if n <= 0:
            raise Exhausted(f"No active region in pool {self.machine_name}: all numbers were handed out")
        if self.kind == "sequential":
            out = list(range(self.next_number, self.next_number + n))
            self.next_number += n
            return out
        out = []
        span = self.maximum - self.minimum + 1
        if len(self.used) + n > span // 2:  # dense: draw from what is left
            free = [x for x in range(self.minimum, self.maximum + 1) if x not in self.used]
            out = rng.sample(free, n)
        else:
            while len(out) < n:
                x = rng.randint(self.minimum, self.maximum)
                if x not in self.used:
                    self.used.add(x)
                    out.append(x)
        self.used.update(out)
        return out


@dataclass
class Allocation:
    """Ground truth of one answer: what it carried and whether it reached the client."""

    seq: int
    pool: str
    endpoint: str  # "rest" | "sap" | "unitrace" | "tracelink"
    asked: int
    new: list[str]  # numbers allocated by this answer (handed out for good, delivered or not)
    resent: list[str]  # numbers handed out before, sent again (fault duplicates)
    fault: str | None
    request: dict[str, str]  # the SOAP request's fields as received
    delivered: bool | None = None  # None: held or being sent
    at: float = field(default_factory=time.time)


@dataclass
class Fault:
    kind: str
    count: int = 1
    pool: str | None = None
    n: int | None = None  # duplicates: how many

    def applies(self, endpoint: str, pool: str | None) -> bool:
        if self.pool is not None and pool != self.pool:
            return False
        return not (self.kind == "foreign_gtin" and endpoint == "rest")


@dataclass
class _Reply:
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


class _Refuse(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class L3SerialsSim:
    """The simulator; start() binds a real HTTP/1.1 server (keep-alive) on host:port (0: a free port)."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, users: dict[str, str] | None = None,
        tokens: set[str] | None = None, seed: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.users = dict(users or {})
        self.tokens = set(tokens or ())
        self.pools: dict[str, Pool] = {}
        self.faults: list[Fault] = []
        self.allocations: list[Allocation] = []
        self.requests = 0
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._release = asyncio.Event()
        self._stopping = asyncio.Event()
        self._held = 0
        self._writers: set[asyncio.StreamWriter] = set()

    # -- set-up and ground truth -----------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def add_pool(self, machine_name: str, kind: str = "random", **kw: Any) -> Pool:
        pool = Pool(machine_name, kind, **kw)
        self.pools[machine_name] = pool
        return pool

    def inject(self, kind: str, count: int = 1, pool: str | None = None, n: int | None = None) -> None:
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULTS)}")
        if count < 1:
            raise ValueError("count must be at least 1")
        self.faults.append(Fault(kind, count, pool, n))
        log.info("l3sim_fault_set", kind=kind, count=count, pool=pool)

    def clear_faults(self) -> None:
        self.faults.clear()

    def release(self) -> None:
        """Let every held (and hanging) answer go; later ones wait for the next release."""
        event, self._release = self._release, asyncio.Event()
        event.set()

    @property
    def held(self) -> int:
        return self._held

    def handed_out(self, pool: str) -> list[str]:
        """Every number allocated from `pool`, in order, whether its answer arrived or not."""
        return [s for a in self.allocations if a.pool == pool for s in a.new]

    def delivered(self, pool: str) -> list[str]:
        return [s for a in self.allocations if a.pool == pool and a.delivered for s in a.new + a.resent]

    def state(self) -> dict[str, Any]:
        return {
            "pools": {k: {"kind": p.kind, "left": p.left, "handed_out": len(self.handed_out(k))} for k, p in self.pools.items()},
            "faults": [asdict(f) for f in self.faults],
            "held": self._held,
            "requests": self.requests,
            "allocations": [
                {k: v for k, v in asdict(a).items() if k not in ("new", "resent")} | {"new": len(a.new), "resent": len(a.resent)}
                for a in self.allocations
            ],
        }

    # -- server ----------------------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("l3sim_listening", url=self.url)

    async def stop(self) -> None:
        self._stopping.set()
        self.release()
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while not self._stopping.is_set():
                request = await self._read_request(reader)
                if request is None:
                    break
                method, target, headers, body = request
                keep = await self._serve(reader, writer, method, target, headers, body)
                if not keep or headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
        line = await reader.readline()
        if not line:
            return None
        parts = line.decode("latin-1").split()
        if len(parts) != 3:
            raise ConnectionError("bad request line")
        headers: dict[str, str] = {}
        while True:
            h = await reader.readline()
            if h in (b"\r\n", b"\n", b""):
                break
            name, _, value = h.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        if length > MAX_REQUEST_BODY:
            raise ConnectionError("request body too large")
        body = await reader.readexactly(length) if length else b""
        return parts[0], parts[1], headers, body

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, target: str,
        headers: dict[str, str], body: bytes,
    ) -> bool:
        """Answer one request; False: the connection is closed after it."""
        parts = urlsplit(target)
        path = parts.path
        if path.startswith("/_sim/"):
            await self._send(writer, self._control(method, path, body))
            return True
        self.requests += 1
        refused = self._authorised(headers)
        if refused is not None:
            await self._send(writer, _json_reply(401, {"detail": refused}, {"WWW-Authenticate": 'Basic realm="api"'}))
            return True
        endpoint = "rest" if _ALLOCATE.match(path) else SOAP_PATHS.get(path if path.endswith("/") else path + "/")
        if endpoint is None:
            await self._send(writer, _json_reply(404, {"detail": "Not found."}))
            return True
        if (endpoint == "rest") != (method == "GET"):
            await self._send(writer, _json_reply(405, {"detail": f'Method "{method}" not allowed.'}))
            return True
        try:
            if endpoint == "rest":
                m = _ALLOCATE.match(path)
                assert m is not None
                fmt = parse_qs(parts.query).get("format", ["json"])[0]
                pool_name, size, fields = unquote(m.group(1)), int(m.group(2)), {"format": fmt}
                if fmt not in ("json", "xml"):
                    raise _Refuse(404, f"format {fmt!r} is not served")
            else:
                fields = _parse_soap(endpoint, body)
                pool_name, size = fields["object_key_value"], int(fields["size"])
        except _Refuse as exc:
            await self._send(writer, self._error(endpoint, exc.status, exc.detail, soap_client=True))
            return True
        fault = self._take_fault(endpoint, pool_name)
        return await self._allocate(reader, writer, endpoint, pool_name, size, fields, fault)

    def _authorised(self, headers: dict[str, str]) -> str | None:
        """None when the request may allocate, else DRF's detail."""
        if not self.users and not self.tokens:
            return None
        value = headers.get("authorization", "")
        scheme, _, cred = value.partition(" ")
        if not value:
            return "Authentication credentials were not provided."
        if scheme.lower() == "token" and cred.strip() in self.tokens:
            return None
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(cred.strip(), validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return "Invalid basic header. Credentials not correctly base64 encoded."
            if self.users.get(user) == password:
                return None
            return "Invalid username/password."
        return "Invalid token."

    def _take_fault(self, endpoint: str, pool: str) -> Fault | None:
        for f in self.faults:
            if f.applies(endpoint, pool):
                f.count -= 1
                if f.count <= 0:
                    self.faults.remove(f)
                return f
        return None

    async def _allocate(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, endpoint: str, pool_name: str, size: int, fields: dict[str, str], fault: Fault | None,
    ) -> bool:
        kind = fault.kind if fault else None
        if kind in ("http_500_html", "html_200"):
            status = 500 if kind == "http_500_html" else 200
            await self._send(writer, _Reply(status, _html(status).encode(), "text/html; charset=utf-8"))
            return True
        if kind == "soap_fault":
            await self._send(writer, self._error(endpoint, 400, "Number range request refused: fault injected"))
            return True
        if kind == "hang":
            await self._wait_release()
            return False
        pool = self.pools.get(pool_name)
        if pool is None:
            await self._send(writer, self._error(endpoint, 404, "Pool not found."))
            return True
        if size < 1:
            await self._send(writer, self._error(endpoint, 400, "size must be at least 1"))
            return True
        if pool.request_threshold > 0 and size > pool.request_threshold:
            detail = f"The request threshold of {pool.request_threshold} has been exceeded by the request size of {size}."
            await self._send(writer, self._error(endpoint, 500, detail))
            return True
        want = max(1, size // 2) if kind == "short" else size
        resent: list[str] = []
        if kind == "duplicates":
            before = self.handed_out(pool_name)
            k = min(len(before), fault.n if fault and fault.n is not None else max(1, size // 2), size)
            resent = self._rng.sample(before, k) if k else []
            want = size - len(resent)
        try:
            numbers = pool.allocate(want, self._rng) if want > 0 else []
        except Exhausted as exc:
            await self._send(writer, self._error(endpoint, 500, str(exc)))
            return True
        new = [str(x) for x in numbers]
        alloc = Allocation(len(self.allocations) + 1, pool_name, endpoint, size, new, resent, kind, fields)
        self.allocations.append(alloc)
        sent = resent + new if kind == "duplicates" else new
        if kind == "duplicates":
            self._rng.shuffle(sent)
        if kind == "bad_format":
            sent = [s if i % 2 else f"BAD SERIAL {s}" for i, s in enumerate(sent)]
        fulfilled = len(new) + len(resent) == size or kind == "short"
        reply = self._answer(endpoint, pool, sent, fields, fulfilled, kind)
        if kind == "hold":
            self._held += 1
            try:
                gone = await self._hold(reader)
            finally:
                self._held -= 1
            if gone:  # the client died while the answer was held: the numbers never reached it
                alloc.delivered = False
                return False
        if kind in ("drop", "truncated"):
            cut = reply.body[: len(reply.body) // 2]
            if kind == "truncated":
                reply.body = cut
            else:
                head = _head(reply, len(reply.body))
                writer.write(head + cut)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                alloc.delivered = False
                return False
        alloc.delivered = await self._send(writer, reply)
        return True

    async def _hold(self, reader: asyncio.StreamReader) -> bool:
        """Wait for release(); True if the client closed the connection first."""
        eof = asyncio.ensure_future(reader.read(1))
        released = asyncio.ensure_future(self._wait_release())
        try:
            await asyncio.wait({eof, released}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (eof, released):
                t.cancel()
        return eof.done() and not eof.cancelled() and eof.exception() is None and eof.result() == b""

    async def _wait_release(self) -> None:
        if not self._stopping.is_set():
            await self._release.wait()

    def _answer(self, endpoint: str, pool: Pool, serials: list[str], fields: dict[str, str], fulfilled: bool, fault: str | None) -> _Reply:
        sequential = pool.kind == "sequential" and fault not in ("duplicates", "bad_format")
        numbers_text = "[" + ", ".join(s if s.isdigit() else repr(s) for s in serials) + "]"
        if sequential and serials:
            numbers_text = f"[{serials[0]}, {serials[-1]}]" if len(serials) > 1 else f"[{serials[0]}]"
        if endpoint == "rest":
            doc: dict[str, Any] = {
                "numbers": numbers_text, "fulfilled": fulfilled, "type": pool.kind, "encoding": "decimal",
                "region": f"{pool.machine_name}-region", "size_granted": len(serials), "task_name": "", "response": None,
            }
            if fields.get("format") == "xml":
                inner = "".join(f"<{k}>{'' if v is None else escape(str(v))}</{k}>" for k, v in doc.items())
                return _Reply(200, f'<?xml version="1.0" encoding="utf-8"?>\n<root>{inner}</root>'.encode(), "application/xml; charset=utf-8")
            return _json_reply(200, doc)
        key_value = OTHER_GTIN if fault == "foreign_gtin" and endpoint != "tracelink" else pool.machine_name
        gs1_strings = endpoint == "tracelink" and (pool.element_strings or fault == "foreign_gtin")

        def shown(i: int, s: str) -> str:
            if not gs1_strings:
                return s
            gtin = OTHER_GTIN if fault == "foreign_gtin" and i % 2 == 0 else pool.machine_name
            return f"01{gtin}21{s}"

        if sequential and serials:
            numbers = f"<Interval><NumberFrom>{shown(1, serials[0])}</NumberFrom><NumberTo>{shown(1, serials[-1])}</NumberTo></Interval>"
        else:
            listed = "".join(f"<SerialNo>{escape(shown(i, s))}</SerialNo>" for i, s in enumerate(serials))
            numbers = f"<RandomizedNumberList>{listed}</RandomizedNumberList>"
        key = f"<ObjectKey><Name>{escape(fields.get('object_key_name', ''))}</Name><Value>{escape(key_value)}</Value></ObjectKey>"
        encoding = f"<EncodingType>{escape(fields.get('encoding_type', ''))}</EncodingType>"
        id_type = f"<IDType>{escape(fields.get('id_type', ''))}</IDType>"
        # element order of each shape: TraceLink's XSD has EncodingType before IDType, SAP the other way round
        common = "<ActionCode>C</ActionCode>" + (encoding + id_type if endpoint == "tracelink" else id_type + encoding)
        if endpoint == "tracelink":
            msg = (
                f'<ns2:serialNumbersRequestResponse xmlns:ns2="{TRACELINK_NS}"><SNResponse>'
                f"<ReceivingSystem>{escape(fields.get('sending_system', ''))}</ReceivingSystem>"
                f"<SendingSystem>{escape(fields.get('receiving_system', ''))}</SendingSystem>"
                f"{common}{numbers if sequential else ''}{key}{'' if sequential else numbers}</SNResponse></ns2:serialNumbersRequestResponse>"
            )
        else:
            root = "ain:NumberRangeConfirmationMessage" if endpoint == "sap" else "NumberRangeConfirmationMessage"
            ns = f' xmlns:ain="{SAP_NS}"' if endpoint == "sap" else ""
            msg = (
                f"<{root}{ns}><ReceivingSystem>{escape(fields.get('sending_system', ''))}</ReceivingSystem>"
                f"{common}{key}{numbers}</{root}>"
            )
        return _Reply(200, _envelope(msg).encode(), "text/xml; charset=utf-8")

    def _error(self, endpoint: str, status: int, detail: str, *, soap_client: bool = False) -> _Reply:
        """QU4RTET's error shapes: JSON detail on REST, `<root><detail>` on the SOAP views; a refusal on SOAP
        (fault injected, malformed request) is a SOAP Fault."""
        if endpoint == "rest":
            return _json_reply(status, {"detail": detail})
        if soap_client or status == 400:
            code = "soapenv:Client" if soap_client else "soapenv:Server"
            fault = f"<soapenv:Fault><faultcode>{code}</faultcode><faultstring>{escape(detail)}</faultstring></soapenv:Fault>"
            return _Reply(500, _envelope(fault, prefix="soapenv").encode(), "text/xml; charset=utf-8")
        body = f'<?xml version="1.0" encoding="utf-8"?>\n<root><detail>{escape(detail)}</detail></root>'
        return _Reply(status, body.encode(), "text/xml; charset=utf-8")

    async def _send(self, writer: asyncio.StreamWriter, reply: _Reply) -> bool:
        try:
            writer.write(_head(reply, len(reply.body)) + reply.body)
            await writer.drain()
        except (ConnectionError, RuntimeError):
            return False
        return not writer.is_closing()

    # -- control ---------------------------------------------------------------------------------

    def _control(self, method: str, path: str, body: bytes) -> _Reply:
        try:
            data = json.loads(body) if body else {}
            if method == "GET" and path == "/_sim/state":
                return _json_reply(200, self.state())
            if method == "GET" and path.startswith("/_sim/handed_out/"):
                return _json_reply(200, self.handed_out(unquote(path.rsplit("/", 1)[1])))
            if method == "POST" and path == "/_sim/faults":
                self.inject(data["kind"], int(data.get("count", 1)), data.get("pool"), data.get("n"))
                return _json_reply(200, {"faults": [asdict(f) for f in self.faults]})
            if method == "DELETE" and path == "/_sim/faults":
                self.clear_faults()
                return _json_reply(200, {"faults": []})
            if method == "POST" and path == "/_sim/release":
                self.release()
                return _json_reply(200, {"released": True})
            if method == "POST" and path == "/_sim/pools":
                pool = self.add_pool(**data)
                return _json_reply(200, {"pool": pool.machine_name, "left": pool.left})
        except (ValueError, KeyError, TypeError) as exc:
            return _json_reply(400, {"detail": f"{type(exc).__name__}: {exc}"})
        return _json_reply(404, {"detail": f"no control {method} {path}"})


# --------------------------------------------------------------------------- wire helpers


def _head(reply: _Reply, length: int) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}
    lines = [f"HTTP/1.1 {reply.status} {reason.get(reply.status, 'Status')}", f"Content-Type: {reply.content_type}", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in reply.headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _json_reply(status: int, doc: Any, headers: dict[str, str] | None = None) -> _Reply:
    return _Reply(status, json.dumps(doc).encode(), "application/json", headers or {})


def _envelope(inner: str, prefix: str = "soapenv") -> str:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<{prefix}:Envelope xmlns:{prefix}="{SOAP11}">'
        f"<{prefix}:Body>{inner}</{prefix}:Body></{prefix}:Envelope>"
    )


def _html(status: int) -> str:
    title = "500 Internal Server Error" if status == 500 else "Sign in"
    return f"<!DOCTYPE html>\n<html><head><title>{title}</title></head><body><h1>{title}</h1><p>nginx</p></body></html>\n"


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _parse_soap(flavour: str, body: bytes) -> dict[str, str]:
    """The request's fields; _Refuse(400) for what QU4RTET could not read (answered as a SOAP Client fault)."""
    if b"<!DOCTYPE" in body[:4096].upper():
        raise _Refuse(400, "DTD not allowed")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise _Refuse(400, f"request is not well-formed XML: {exc}") from None
    soap_body = next((c for c in root if _local(c.tag) == "Body"), None) if _local(root.tag) == "Envelope" else None
    msg = next(iter(soap_body), None) if soap_body is not None else None
    if msg is None:
        raise _Refuse(400, "request is not a SOAP envelope with a body")
    expected = {
        "sap": f"{{{SAP_NS}}}NumberRangeRequestMessage",
        "unitrace": "NumberRangeRequestMessage",
        "tracelink": f"{{{TRACELINK_NS}}}serialNumbersRequest",
    }[flavour]
    if msg.tag != expected:
        raise _Refuse(400, f"expected {expected}, got {msg.tag}")
    names = {
        "SendingSystem": "sending_system", "ReceivingSystem": "receiving_system", "IDType": "id_type",
        "IdType": "id_type", "EncodingType": "encoding_type", "Size": "size",
        "RequestRandomizedNumbers": "randomized", "RequestRandomizedNumber": "randomized", "SyncRequest": "sync",
    }
    fields: dict[str, str] = {}
    for child in msg:
        name = _local(child.tag)
        if name == "ObjectKey":
            for part in child:
                fields["object_key_" + _local(part.tag).lower()] = (part.text or "").strip()
        elif name in names:
            fields[names[name]] = (child.text or "").strip()
    if not fields.get("size", "").isdigit() or int(fields["size"]) < 1:
        raise _Refuse(400, f"Size {fields.get('size')!r} is not a positive number")
    if not fields.get("object_key_value"):
        raise _Refuse(400, "no ObjectKey/Value")
    return fields


# --------------------------------------------------------------------------- standalone


def _pool_arg(text: str) -> dict[str, Any]:
    """NAME[:random|sequential[:MIN:MAX[:THRESHOLD]]]"""
    parts = text.split(":")
    spec: dict[str, Any] = {"machine_name": parts[0]}
    if len(parts) > 1:
        spec["kind"] = parts[1]
    if len(parts) > 3:
        spec["minimum"], spec["maximum"] = int(parts[2]), int(parts[3])
    if len(parts) > 4:
        spec["request_threshold"] = int(parts[4])
    return spec


async def _run(args: argparse.Namespace) -> None:
    users = dict(u.split(":", 1) for u in args.user)
    sim = L3SerialsSim(args.host, args.port, users=users, tokens=set(args.token), seed=args.seed)
    for spec in args.pool:
        sim.add_pool(**_pool_arg(spec), element_strings=args.element_strings)
    await sim.start()
    print(f"L3 serials simulator at {sim.url} (pools: {', '.join(sim.pools) or 'none'}; control: {sim.url}/_sim/state)", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m linectl.simulators.l3_serials", description="L3 serial-number simulator (serialbox REST, SOAP number range).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8321)
    p.add_argument("--pool", action="append", default=[], metavar="NAME[:KIND[:MIN:MAX[:THRESHOLD]]]", help="a pool (repeatable)")
    p.add_argument("--user", action="append", default=[], metavar="USER:PASSWORD", help="HTTP Basic user (repeatable)")
    p.add_argument("--token", action="append", default=[], help="accepted API token (repeatable); no user and no token: no auth")
    p.add_argument("--element-strings", action="store_true", help="tracelink answers 01<GTIN>21<serial>")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    try:
        asyncio.run(_run(args))
    except KeyboardInterrupt:
        pass
    except (ValueError, OSError) as exc:
        print(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
