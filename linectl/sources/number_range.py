"""The SOAP number-range request as a serial source, in the three shapes L3s speak it.

- `sap`: SAP AII/ATTP, also Systech Guardian: `NumberRangeRequestMessage` in namespace http://sap.com/xi/AIN
  (QU4RTET: /guardian/NumberRangeService/);
- `unitrace`: Systech UniTrace, the same message without a namespace (QU4RTET: /unitrace/NumberRangeService/);
- `tracelink`: TraceLink SNX `serialNumbersRequest` in namespace urn:tracelink:soap, fields as its WSDL's XSD
  (IdType GS1_SER, EncodingType SGTIN|SSCC, ObjectKey Name GTIN|COMPANY_PREFIX, RequestRandomizedNumber,
  SyncRequest) (QU4RTET: /soap/snx/snrequest/).

Every answer is read the same way, tolerant of prefixes, namespaces and the response element's name (each L3 and
each QU4RTET template names it differently) and strict on content: exactly one of a `SerialNo` list
(randomised) or an `Interval` NumberFrom/NumberTo (sequential, expanded here, bounded by what was asked); an
`ObjectKey` in the answer must be the one asked; a SOAP Fault or TraceLink `RfidException` is the L3 saying no.
TraceLink may answer full element strings `01<gtin>21<serial>`: when every SerialNo is one, they are split and
those of another GTIN go to `foreign`. A QU4RTET pool without a response template answers serialbox's generic
`<root><numbers>`: that is read too. Transport and HTTP status are judged as in linectl.sources.serialbox.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any
from xml.sax.saxutils import escape

import httpx

from linectl import gs1
from linectl.config import NumberRangeSourceConfig, SourceAuth, SourceTls
from linectl.sources.base import SerialPage, SerialRequest, SourceRefused, SourceUnavailable
from linectl.sources.serialbox import (
    HttpSource,
    _Answer,
    auth_headers,
    excerpt,
    expand_interval,
    finish_page,
    generic_xml_numbers,
    json_detail,
    local,
    looks_html,
    page_size_for,
    parse_xml,
    sort_serials,
)

SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
SAP_NS = "http://sap.com/xi/AIN"
TRACELINK_NS = "urn:tracelink:soap"
FLAVOURS = ("sap", "unitrace", "tracelink")
_ELEMENT_STRING = re.compile(r"^(\(01\)|01)\d{14}")


def _el(name: str, value: str | None) -> str:
    return "" if value is None else f"<{name}>{escape(value)}</{name}>"


def build_request(
    flavour: str, *, sending_system: str, receiving_system: str | None, id_type: str, encoding_type: str,
    size: int, object_key_name: str, object_key_value: str, randomized: bool,
) -> str:
    """The SOAP 1.1 envelope of one number-range request."""
    if flavour == "tracelink":
        body = (
            f'<snx:serialNumbersRequest xmlns:snx="{TRACELINK_NS}">'
            + _el("SendingSystem", sending_system) + _el("ReceivingSystem", receiving_system)
            # TraceLink's IdType says which numbering scheme; GTIN and SSCC are both GS1 serials
            + _el("IdType", "GS1_SER") + _el("EncodingType", encoding_type) + _el("Size", str(size))
            + "<ObjectKey>" + _el("Name", object_key_name) + _el("Value", object_key_value) + "</ObjectKey>"
            + _el("RequestRandomizedNumber", "X" if randomized else None) + _el("SyncRequest", "true")
            + "</snx:serialNumbersRequest>"
        )
    else:
        open_tag = f'<ain:NumberRangeRequestMessage xmlns:ain="{SAP_NS}">' if flavour == "sap" else "<NumberRangeRequestMessage>"
        close_tag = "</ain:NumberRangeRequestMessage>" if flavour == "sap" else "</NumberRangeRequestMessage>"
        body = (
            open_tag + _el("SendingSystem", sending_system) + _el("ReceivingSystem", receiving_system)
            + _el("IDType", id_type) + _el("EncodingType", encoding_type) + _el("Size", str(size))
            + "<ObjectKey>" + _el("Name", object_key_name) + _el("Value", object_key_value) + "</ObjectKey>"
            # SAP flags: "X" is true, absent is false
            + _el("RequestRandomizedNumbers", "X" if randomized else None) + close_tag
        )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="{SOAP11}">'
        f"<soapenv:Header/><soapenv:Body>{body}</soapenv:Body></soapenv:Envelope>"
    )


def _children(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el.iter() if local(c.tag) == name]


def _text(el: ET.Element | None) -> str:
    return "" if el is None else "".join(el.itertext()).strip()


def _child(el: ET.Element, name: str) -> ET.Element | None:
    for c in el:
        if local(c.tag) == name:
            return c
    return None


def soap_fault(text: str) -> str | None:
    """'<code>: <string>' of a SOAP 1.1/1.2 Fault, if the body is one."""
    if "Fault" not in text or looks_html(text):
        return None
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return None
    for fault in _children(root, "Fault"):
        code = _text(_child(fault, "faultcode")) or _text(_child(fault, "Code"))
        string = _text(_child(fault, "faultstring")) or _text(_child(fault, "Reason"))
        detail = _text(_child(fault, "detail")) or _text(_child(fault, "Detail"))
        parts = [p for p in (code, string) if p]
        reason = ": ".join(parts) or "no faultstring"
        return reason + (f" ({detail[:200]})" if detail and detail not in reason else "")
    return None


def split_element_strings(gtin: str, values: list[str]) -> tuple[list[str], list[tuple[str, str]]] | None:
    """serial parts of element strings 01<gtin>21<serial> and those of another GTIN; None: not element strings."""
    if not values or not all(_ELEMENT_STRING.match(v) for v in values):
        return None
    parsed: list[gs1.ParsedCode] = []
    for v in values:
        try:
            code = gs1.parse(v)
        except gs1.GS1Error:
            return None
        if code.gtin is None or code.serial is None:
            return None
        parsed.append(code)
    serials: list[str] = []
    foreign: list[tuple[str, str]] = []
    for v, code in zip(values, parsed, strict=True):
        others = sorted({ai for ai, _ in code.ais} - {"01", "21"})
        if code.gtin != gtin:
            foreign.append((v, f"for GTIN {code.gtin}, not {gtin}"))
        elif others:
            foreign.append((v, f"element string carries AIs {', '.join(others)} besides (01)(21)"))
        else:
            assert code.serial is not None
            serials.append(code.serial)
    return serials, foreign


class NumberRangeSource(HttpSource):
    """Numbers from an L3 over the SOAP number-range request; one request per page of at most `page_size`."""

    def __init__(
        self, url: str, *, flavour: str, sending_system: str, receiving_system: str | None = None,
        id_type: str = "GTIN", encoding_type: str | None = None, object_key_name: str | None = None,
        object_key_value: str | None = None, randomized: bool = True, page_size: int = 1000,
        auth: SourceAuth | None = None, tls: SourceTls | None = None, timeout_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if flavour not in FLAVOURS:
            raise ValueError(f"flavour {flavour!r}: expected one of {', '.join(FLAVOURS)}")
        super().__init__(
            f"number_range:{flavour}:{object_key_value or url}", auth=auth or SourceAuth(), tls=tls,
            timeout_s=timeout_s, transport=transport,
        )
        tracelink = flavour == "tracelink"
        self.url = url
        self.flavour = flavour
        self.sending_system = sending_system
        self.receiving_system = receiving_system
        self.id_type = id_type
        self.encoding_type = encoding_type or (
            ("SGTIN" if id_type == "GTIN" else "SSCC") if tracelink else ("SGTIN-198" if id_type == "GTIN" else "SSCC-96")
        )
        self.object_key_name = object_key_name or (
            "GTIN" if id_type == "GTIN" else ("COMPANY_PREFIX" if tracelink else "GCP")
        )
        self.object_key_value = object_key_value
        self.randomized = randomized
        self.page_size = page_size

    @classmethod
    def from_config(cls, cfg: NumberRangeSourceConfig, **kw: Any) -> NumberRangeSource:
        return cls(
            cfg.url, flavour=cfg.flavour, sending_system=cfg.sending_system, receiving_system=cfg.receiving_system,
            id_type=cfg.id_type, encoding_type=cfg.encoding_type, object_key_name=cfg.object_key_name,
            object_key_value=cfg.object_key_value, randomized=cfg.randomized, page_size=cfg.page_size,
            auth=cfg.auth, tls=cfg.tls, timeout_s=cfg.timeout_s, **kw,
        )

    def envelope(self, req: SerialRequest, size: int) -> str:
        return build_request(
            self.flavour, sending_system=self.sending_system, receiving_system=self.receiving_system,
            id_type=self.id_type, encoding_type=self.encoding_type, size=size, object_key_name=self.object_key_name,
            object_key_value=self.object_key_value or req.gtin, randomized=self.randomized,
        )

    async def request(self, req: SerialRequest, continuation: str | None = None) -> SerialPage:
        try:
            asked = page_size_for(req, continuation, self.page_size)
            headers = {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""', **auth_headers(self._auth)}
            ans = await self._exchange("POST", self.url, content=self.envelope(req, asked).encode(), headers=headers)
            fault = soap_fault(ans.text)
            if fault is not None:
                raise SourceRefused(f"SOAP Fault (HTTP {ans.status}): {fault}")
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
        if not ans.text.strip():
            raise SourceRefused(f"HTTP {ans.status} with an empty body")
        root = parse_xml(ans.text)
        if local(root.tag) == "root":
            return generic_xml_numbers(req, asked, ans.text)
        return soap_numbers(
            root, ans.text, req, asked, self.object_key_value or req.gtin, element_strings=self.flavour == "tracelink"
        )


def soap_numbers(
    root: ET.Element, text: str, req: SerialRequest, asked: int, expected_key: str, *, element_strings: bool,
) -> tuple[list[str], list[tuple[str, str]], bool]:
    """serials, rejected, exhausted of a number-range answer envelope (any of the three shapes)."""
    if local(root.tag) != "Envelope":
        raise SourceRefused(f"answer's root is <{local(root.tag)}>, not a SOAP Envelope: {excerpt(text)}")
    body = _child(root, "Body")
    message = next(iter(body), None) if body is not None else None
    if message is None:
        raise SourceRefused("SOAP answer has an empty or no Body")
    for exc_el in _children(message, "RfidException"):
        code, msg = _text(_child(exc_el, "ErrorCode")), _text(_child(exc_el, "ErrorMessage"))
        if code or msg:
            raise SourceRefused(f"L3 error {code or '-'}: {msg or '(no message)'}")
    for key in _children(message, "ObjectKey"):
        value = _text(_child(key, "Value"))
        if value and value != expected_key:
            raise SourceRefused(f"answer is for ObjectKey {value!r}, asked {expected_key!r}")
    serial_els = _children(message, "SerialNo")
    intervals = _children(message, "Interval")
    if serial_els and intervals:
        raise SourceRefused("answer holds both a SerialNo list and an Interval")
    if len(intervals) > 1:
        raise SourceRefused(f"answer holds {len(intervals)} Intervals, expected one")
    if intervals:
        first, last = _text(_child(intervals[0], "NumberFrom")), _text(_child(intervals[0], "NumberTo"))
        if not first or not last:
            raise SourceRefused("Interval without NumberFrom or NumberTo")
        if element_strings:
            pair = split_element_strings(req.gtin, [first, last])
            if pair is not None:
                if pair[1]:
                    raise SourceRefused(f"Interval {first}..{last}: {pair[1][0][1]}")
                first, last = pair[0]
        good, bad = sort_serials(req.gtin, expand_interval(first, last, asked))
        return good, bad, len(good) + len(bad) < asked
    if not serial_els:
        raise SourceRefused(f"answer holds neither SerialNo nor Interval: {excerpt(text)}")
    if len(serial_els) > asked:
        raise SourceRefused(f"answer holds {len(serial_els)} serials, more than the {asked} asked")
    values = [_text(e) for e in serial_els]
    foreign: list[tuple[str, str]] = []
    split = split_element_strings(req.gtin, values) if element_strings else None
    if split is not None:
        values, foreign = split
    good, bad = sort_serials(req.gtin, values)
    return good, foreign + bad, False


__all__ = ["NumberRangeSource", "build_request", "soap_fault", "soap_numbers"]
