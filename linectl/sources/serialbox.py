"""QU4RTET serialbox REST as a serial source: `GET <url>/serialbox/allocate/<pool>/<size>/?format=json|xml`.

Also the HTTP plumbing the SOAP number-range source shares (HttpSource): one place decides what is transient
(SourceUnavailable: retried) and what is the L3 saying no or answering garbage it will give again (SourceRefused:
parked for an operator). The split matters because a retried refusal loops for ever and a parked blip stops a line:

- no connection, timeout, connection dropped mid-answer, HTTP 502/503/504, any 5xx without an application
  message (an HTML error page of a proxy or of a crashed L3)          -> SourceUnavailable
- HTTP 4xx (401 bad credentials, 404 unknown pool), HTTP 500 carrying the L3's own message (serialbox answers
  500 + JSON `detail` for a size above the pool's request_threshold: it will answer it again), SOAP Fault,
  a 2xx body that is HTML, truncated, not the expected JSON/XML, or whose numbers do not add up -> SourceRefused

Serialbox has no request key: a request repeated after a restart allocates new numbers; the first allocation is
lost at the L3 (the provisioner's record shows which request never got its answer). It has no return either.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import ssl
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import structlog

from linectl import gs1
from linectl.config import SerialboxSourceConfig, SourceAuth, SourceTls
from linectl.sources.base import SerialPage, SerialRequest, SourceRefused, SourceUnavailable

log = structlog.get_logger("linectl.sources")

#: a single answer may expand to at most this many serials (an interval 1..10^12 is an L3 defect, not a page)
MAX_PAGE = 1_000_000
#: the most bytes read of one answer (100,000 element strings in SOAP are ~6 MB)
MAX_BODY = 64 * 1024 * 1024
#: how much of a refused body an operator sees in the reason
_EXCERPT = 200


def excerpt(text: str) -> str:
    """One line of a body for a reason: an HTML page's title, else its first characters."""
    title = re.search(r"<title[^>]*>(.*?)</title>", text, re.I | re.S)
    if title:
        return "HTML page " + repr(" ".join(title.group(1).split())[:_EXCERPT])
    flat = " ".join(text.split())
    return repr(flat[:_EXCERPT] + ("..." if len(flat) > _EXCERPT else ""))


def looks_html(text: str) -> bool:
    head = text.lstrip()[:200].lower()
    return head.startswith(("<!doctype html", "<html")) or "<html" in head


def _read_secret(env: str | None, file: str | None, what: str) -> str:
    """A secret named in the config, read when used (a rotated token file is picked up at the next request)."""
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise SourceRefused(f"{what}: environment variable {env} is not set")
        return value
    assert file is not None  # the config model requires one of the two
    try:
        value = Path(file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SourceRefused(f"{what}: cannot read {file}: {exc.strerror or exc}") from None
    if not value:
        raise SourceRefused(f"{what}: {file} is empty")
    return value


def auth_headers(auth: SourceAuth) -> dict[str, str]:
    if auth.type == "basic":
        assert auth.username is not None
        password = _read_secret(auth.password_env, auth.password_file, "auth password")
        token = base64.b64encode(f"{auth.username}:{password}".encode()).decode("ascii")
        return {"Authorization": "Basic " + token}
    if auth.type == "token":
        # DRF authtoken spelling ("Token <key>"), which QU4RTET uses
        return {"Authorization": "Token " + _read_secret(auth.token_env, auth.token_file, "auth token")}
    return {}


def tls_context(tls: SourceTls | None) -> ssl.SSLContext | bool:
    if tls is None:
        return True
    ctx = ssl.create_default_context(cafile=tls.ca_file)
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.client_cert is not None:
        ctx.load_cert_chain(tls.client_cert, tls.client_key)
    return ctx


#: letters and digits, 1-20: always a valid AI (21) (a subset of GS1 character set 82); the common case, checked
#: without building a GS1 message (100,000 serials a minute must not cost seconds of parsing)
_PLAIN_SERIAL = re.compile(r"[0-9A-Za-z]{1,20}")


def check_serial(gtin: str, serial: str) -> str | None:
    """Why `serial` cannot be an AI (21) of `gtin`, or None."""
    if _PLAIN_SERIAL.fullmatch(serial):
        return None
    try:
        gs1.compose([("01", gtin), ("21", serial)])
    except gs1.GS1Error as exc:
        return f"not a valid serial: {exc.reason}"
    return None


def sort_serials(gtin: str, candidates: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Valid serials in the L3's order, and the rest (format, repeated in this answer) with why."""
    good: list[str] = []
    bad: list[tuple[str, str]] = []
    seen: set[str] = set()
    for s in candidates:
        why = check_serial(gtin, s)
        if why is None and s in seen:
            why = "repeated in this answer"
        if why is None:
            seen.add(s)
            good.append(s)
        else:
            bad.append((s, why))
    return good, bad


def expand_interval(first: str, last: str, asked: int) -> list[str]:
    """The serials first..last; zero padding of `first` is kept. Refused when the interval is absurd."""
    if not (first.isascii() and first.isdigit() and last.isascii() and last.isdigit()):
        raise SourceRefused(f"interval {first!r}..{last!r} is not numeric")
    lo, hi = int(first), int(last)
    if hi < lo:
        raise SourceRefused(f"interval {first}..{last} runs backwards")
    count = hi - lo + 1
    if count > asked or count > MAX_PAGE:
        raise SourceRefused(f"interval {first}..{last} holds {count} serials, more than the {asked} asked")
    width = len(first) if first.startswith("0") and len(first) > 1 else 0
    if width and len(last) != width:
        raise SourceRefused(f"interval {first}..{last}: zero-padded bounds of different widths")
    return [str(n).zfill(width) for n in range(lo, hi + 1)]


def page_size_for(req: SerialRequest, continuation: str | None, page_size: int) -> int:
    """Serials still wanted for `req` (from the continuation), capped at one page."""
    if continuation is None:
        remaining = req.size
    else:
        m = re.fullmatch(r"remaining=(\d{1,9})", continuation)
        if m is None or not 0 < int(m.group(1)) <= req.size:
            raise SourceRefused(f"continuation {continuation!r} was not made by this source for a request of {req.size}")
        remaining = int(m.group(1))
    if remaining <= 0:
        raise SourceRefused(f"request size {req.size} is not positive")
    return min(remaining, page_size)


def finish_page(
    req: SerialRequest, continuation: str | None, asked: int, serials: list[str], foreign: list[tuple[str, str]],
    raw: str, exhausted: bool,
) -> SerialPage:
    """The page, with `more` while the request is not yet filled and the L3 still gives numbers."""
    remaining = (req.size if continuation is None else int(continuation.partition("=")[2])) - len(serials)
    more = remaining > 0 and not exhausted and bool(serials)
    return SerialPage(
        serials=serials, raw=raw, foreign=foreign, more=more, continuation=f"remaining={remaining}" if more else None
    )


@dataclass
class _Answer:
    status: int
    text: str
    content_type: str


class HttpSource:
    """HTTP plumbing of the sources: client, auth, TLS, bounded body, error classification and status."""

    name: str
    #: neither serialbox nor the SOAP number-range request carries a request key: a repeat allocates new numbers
    idempotent = False

    def __init__(
        self, name: str, *, auth: SourceAuth, tls: SourceTls | None, timeout_s: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self._auth = auth
        self._tls = tls
        self._timeout = timeout_s
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._connected = False
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._requests = 0
        self._failures = 0
        self._serials = 0

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            try:
                verify = tls_context(self._tls)
            except (OSError, ssl.SSLError) as exc:  # a missing or unreadable CA/certificate/key file
                raise SourceRefused(f"TLS setup: {exc}") from None
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self._timeout), verify=verify, transport=self._transport,
                follow_redirects=False, trust_env=False,
            )
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        self._connected = False

    async def give_back(self, gtin: str, serials: list[str], key: str) -> bool:
        """Neither serialbox nor the SOAP number-range request has a return: the provisioner reports them."""
        return False

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name, "connected": self._connected, "last_error": self._last_error,
            "last_error_at": self._last_error_at, "requests": self._requests, "failures": self._failures,
            "serials": self._serials,
        }

    def _failed(self, exc: SourceUnavailable | SourceRefused) -> None:
        if exc.reason != self._last_error:
            log.warning("source_failed", source=self.name, kind=type(exc).__name__, reason=exc.reason)
        self._failures += 1
        self._last_error = exc.reason
        self._last_error_at = time.time()

    def _ok(self, page: SerialPage) -> None:
        if not self._connected or self._last_error is not None:
            log.info("source_ok", source=self.name)
        self._connected = True
        self._last_error = None
        self._serials += len(page.serials)

    async def _exchange(self, method: str, url: str, *, content: bytes | None = None, headers: dict[str, str]) -> _Answer:
        """One request, the whole body read (bounded); transport trouble raised as SourceUnavailable."""
        self._requests += 1
        try:
            async with self._http().stream(method, url, content=content, headers=headers) as resp:
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size > MAX_BODY:
                        raise SourceRefused(f"answer larger than {MAX_BODY} bytes")
                    chunks.append(chunk)
                body = b"".join(chunks)
                status, ctype, charset = resp.status_code, resp.headers.get("content-type", ""), resp.charset_encoding
        except httpx.TimeoutException:
            self._connected = False
            raise SourceUnavailable(f"no answer within {self._timeout:g} s from {url}") from None
        except httpx.ConnectError as exc:
            self._connected = False
            if _cert_rejected(exc):  # the L3's certificate is not the one configured: a retry cannot fix it
                raise SourceRefused(f"TLS: the L3's certificate at {url} is not trusted: {exc}") from None
            raise SourceUnavailable(f"cannot connect to {url}: {exc}") from None
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            self._connected = False
            raise SourceUnavailable(f"connection dropped mid-answer from {url}: {exc}") from None
        except httpx.TransportError as exc:
            self._connected = False
            raise SourceUnavailable(f"{type(exc).__name__} talking to {url}: {exc}") from None
        except ssl.SSLError as exc:
            raise SourceRefused(f"TLS setup: {exc}") from None
        self._connected = True
        try:
            text = body.decode(charset or "utf-8")
        except (UnicodeDecodeError, LookupError):
            raise SourceRefused(f"HTTP {status}: answer is not {charset or 'utf-8'} text") from None
        return _Answer(status, text, ctype.split(";")[0].strip().lower())

    @staticmethod
    def http_error(ans: _Answer, detail: str | None) -> SourceUnavailable | SourceRefused:
        """The exception for a non-2xx answer; `detail` is the L3's own message when the body carried one."""
        said = f": {detail}" if detail else (f": {excerpt(ans.text)}" if ans.text.strip() else "")
        if ans.status in (502, 503, 504) or (ans.status >= 500 and detail is None):
            return SourceUnavailable(f"HTTP {ans.status}{said}")
        if ans.status == 401:
            return SourceRefused(f"HTTP 401 (credentials missing or wrong){said}")
        if ans.status == 403:
            return SourceRefused(f"HTTP 403 (the user may not allocate from this pool){said}")
        if ans.status == 404:
            return SourceRefused(f"HTTP 404 (unknown pool or endpoint){said}")
        return SourceRefused(f"HTTP {ans.status}{said}")


def _cert_rejected(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def json_detail(text: str) -> str | None:
    """The `detail` of a DRF error body (JSON or XML `<root><detail>`), if it is one."""
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("detail"), str):
        return str(doc["detail"])
    if text.lstrip().startswith("<") and "<!doctype" not in text[:200].lower():
        try:
            root = ET.fromstring(text)
        except ET.ParseError:
            return None
        d = root.find("detail")
        if root.tag == "root" and d is not None and d.text:
            return d.text.strip()
    return None


def parse_number_list(value: str) -> list[str]:
    """serialbox's `numbers`: a string holding a Python/JSON list literal of ints (decimal) or strings."""
    if len(value) > MAX_BODY:
        raise SourceRefused("numbers field too large")
    try:
        items = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise SourceRefused(f"numbers {excerpt(value)} is not a list literal") from None
    if not isinstance(items, list):
        raise SourceRefused(f"numbers {excerpt(value)} is not a list")
    out: list[str] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | str):
            raise SourceRefused(f"numbers holds {item!r}, neither a number nor a string")
        if isinstance(item, int) and item < 0:
            raise SourceRefused(f"numbers holds the negative number {item}")
        out.append(str(item))
    return out


def serialbox_numbers(
    req: SerialRequest, asked: int, numbers: str, kind: str, size_granted: int | None, fulfilled: bool | None,
) -> tuple[list[str], list[tuple[str, str]], bool]:
    """serials, rejected, exhausted from the fields of a serialbox answer (JSON or generic XML)."""
    values = parse_number_list(numbers)
    if kind == "sequential":
        if len(values) not in (1, 2):
            raise SourceRefused(f"sequential answer with {len(values)} numbers: expected first and last")
        candidates = expand_interval(values[0], values[-1], asked)
    elif kind in ("random", "list"):
        if len(values) > asked:
            raise SourceRefused(f"answer holds {len(values)} numbers, more than the {asked} asked")
        candidates = values
    else:
        raise SourceRefused(f"answer type {kind!r}: expected sequential, random or list")
    if size_granted is not None and size_granted != len(candidates):
        raise SourceRefused(f"size_granted {size_granted} but the numbers hold {len(candidates)}")
    good, bad = sort_serials(req.gtin, candidates)
    return good, bad, fulfilled is False


class SerialboxSource(HttpSource):
    """Numbers from a serialbox pool; one allocate call per page of at most `page_size`."""

    def __init__(
        self, url: str, *, pool: str | None = None, fmt: str = "json", page_size: int = 1000, auth: SourceAuth | None = None,
        tls: SourceTls | None = None, timeout_s: float = 30.0, transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            f"serialbox:{pool or url}", auth=auth or SourceAuth(), tls=tls, timeout_s=timeout_s, transport=transport
        )
        self.url = url.rstrip("/")
        self.pool = pool
        self.format = fmt
        self.page_size = page_size

    @classmethod
    def from_config(cls, cfg: SerialboxSourceConfig, **kw: Any) -> SerialboxSource:
        return cls(
            cfg.url, pool=cfg.pool, fmt=cfg.format, page_size=cfg.page_size, auth=cfg.auth, tls=cfg.tls,
            timeout_s=cfg.timeout_s, **kw,
        )

    async def request(self, req: SerialRequest, continuation: str | None = None) -> SerialPage:
        try:
            asked = page_size_for(req, continuation, self.page_size)
            pool = self.pool or req.gtin
            url = f"{self.url}/serialbox/allocate/{quote(pool, safe='')}/{asked}/?format={self.format}"
            ans = await self._exchange("GET", url, headers={"Accept": _ACCEPT[self.format], **auth_headers(self._auth)})
            if not 200 <= ans.status < 300:
                raise self.http_error(ans, json_detail(ans.text))
            good, bad, exhausted = self._parse(req, asked, ans)
            page = finish_page(req, continuation, asked, good, bad, ans.text, exhausted)
        except (SourceUnavailable, SourceRefused) as exc:
            self._failed(exc)
            raise
        self._ok(page)
        return page

    def _parse(self, req: SerialRequest, asked: int, ans: _Answer) -> tuple[list[str], list[tuple[str, str]], bool]:
        if looks_html(ans.text):
            raise SourceRefused(f"HTTP {ans.status}: answer is {excerpt(ans.text)}, not {self.format.upper()}")
        if self.format == "json":
            try:
                doc = json.loads(ans.text)
            except json.JSONDecodeError as exc:
                raise SourceRefused(f"answer is not JSON ({exc.msg} at {exc.pos}; truncated?): {excerpt(ans.text)}") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("numbers"), str):
                raise SourceRefused(f"answer has no string field 'numbers': {excerpt(ans.text)}")
            granted = doc.get("size_granted")
            fulfilled = doc.get("fulfilled")
            if granted is not None and (isinstance(granted, bool) or not isinstance(granted, int)):
                raise SourceRefused(f"size_granted {granted!r} is not a number")
            if fulfilled is not None and not isinstance(fulfilled, bool):
                raise SourceRefused(f"fulfilled {fulfilled!r} is not true/false")
            return serialbox_numbers(req, asked, doc["numbers"], str(doc.get("type")), granted, fulfilled)
        root = parse_xml(ans.text)
        inner = (root.text or "").strip()
        if local(root.tag) == "root" and len(root) == 0 and inner.startswith("<"):
            # QU4RTET renders a pool's reply template on REST as the text of DRF's <root>: the document inside
            root = parse_xml(inner)
        if local(root.tag) == "Envelope":
            # a pool with a reply template answers ?format=xml with it (QU4RTET): the number-range shapes
            from linectl.sources.number_range import soap_numbers

            return soap_numbers(root, ans.text, req, asked, self.pool or req.gtin, element_strings=True)
        return generic_xml_numbers(req, asked, ans.text)


_ACCEPT = {"json": "application/json", "xml": "application/xml"}


def generic_xml_numbers(req: SerialRequest, asked: int, text: str) -> tuple[list[str], list[tuple[str, str]], bool]:
    """serialbox's answer in DRF's XML rendering: <root><numbers>[..]</numbers><type>..</type>..</root>."""
    root = parse_xml(text)
    if local(root.tag) != "root":
        raise SourceRefused(f"XML answer's root is <{local(root.tag)}>, expected <root>")
    fields = {local(c.tag): (c.text or "").strip() for c in root}
    if "numbers" not in fields:
        raise SourceRefused(f"XML answer has no <numbers>: {excerpt(text)}")
    granted_text = fields.get("size_granted")
    if granted_text and not granted_text.isdigit():
        raise SourceRefused(f"size_granted {granted_text!r} is not a number")
    fulfilled_text = fields.get("fulfilled", "").lower()
    fulfilled = {"true": True, "false": False}.get(fulfilled_text)
    return serialbox_numbers(
        req, asked, fields["numbers"], fields.get("type", ""), int(granted_text) if granted_text else None, fulfilled
    )


def local(tag: str) -> str:
    """An element's name without its namespace: the L3s differ in prefixes and namespaces, not in names."""
    return tag.rpartition("}")[2]


def parse_xml(text: str) -> ET.Element:
    """A well-formed XML answer without a DTD (no entity expansion from an L3's answer)."""
    if "<!DOCTYPE" in text[:4096].upper() and not looks_html(text):
        raise SourceRefused("XML answer carries a DTD: refused")
    if looks_html(text):
        raise SourceRefused(f"answer is {excerpt(text)}, not XML")
    try:
        return ET.fromstring(text)
    except ET.ParseError as exc:
        raise SourceRefused(f"answer is not well-formed XML ({exc}; truncated?): {excerpt(text)}") from None


__all__ = ["HttpSource", "SerialboxSource"]
