"""Stored EPCIS 2.0 JSON-LD events -> EPCIS 1.2 XML and EPCIS 2.0 XML documents, and their XSD check.

Most L3/L4 repositories (QU4RTET, SAP ATTP/AII, TraceLink, Systech) capture EPCIS 1.2 XML, not JSON-LD. The
line renders every event once, as JSON-LD, when it is stored (linectl.epcis); this module translates those
stored bytes, never the domain events, so an XML document says exactly what the JSON-LD export and the MQTT
forwarder said, whenever it is made. The translation is a pure function of the JSON event (no config).

Mapping decisions (the README's table lists them per field):
- CBV standard vocabulary: the JSON-LD bare words become the CBV URNs in both XML versions (EPCIS 2.0 XML keeps
  the URN form): bizStep "commissioning" -> urn:epcglobal:cbv:bizstep:commissioning, disposition
  -> urn:epcglobal:cbv:disp:..., bizTransaction/source/destination types -> btt/sdt, error reasons -> er.
  A value that already is a URI is kept (a ref.gs1.org/cbv/ web URI is turned into the URN).
- 1.2: eventID and errorDeclaration go into <baseExtension>; quantityList, sourceList, destinationList and ilmd
  into the event's <extension> (in the XSD's order); childQuantityList into the AggregationEvent's <extension>.
  2.0: they are plain event children, in the XSD-2.0 order.
- ILMD and user extensions: a "prefix:name" key of the standard context (cbvmda:, gs1:, ...) becomes an element
  in that namespace (cbvmda -> urn:epcglobal:cbv:mda, which is the namespace EPCIS 1.2 uses for CBV master data
  attributes; gs1 -> https://gs1.org/voc/); nested objects become nested elements, lists repeated elements.
- Fields without an EPCIS 1.2 equivalent (certificationInfo, persistentDisposition) are written in 1.2 as
  elements in linectl's own namespace (LINECTL_NS), at the event's ##other wildcard, so a 1.2 reader ignores
  them and the XSD accepts them. Event kinds and fields neither version can carry as linectl emits them
  (AssociationEvent in 1.2, sensorElementList, TransformationEvent) raise XmlMappingError: linectl emits none of
  them today, and a silent drop would be a lie in an audit record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import escape, quoteattr

from linectl import epcis

XmlVersion = Literal["1.2", "2.0"]
VERSIONS: tuple[XmlVersion, ...] = ("1.2", "2.0")

EPCIS_NS: dict[XmlVersion, str] = {"1.2": "urn:epcglobal:epcis:xsd:1", "2.0": "urn:epcglobal:epcis:xsd:2"}
#: linectl's namespace for the few 2.0 fields that have no EPCIS 1.2 element (the ##other wildcard takes them)
LINECTL_NS = "urn:linectl:epcis:ext:1"
#: JSON-LD prefix -> XML namespace of the elements written for "prefix:name" keys; declared on the document root
NAMESPACES: dict[str, str] = {
    "cbvmda": "urn:epcglobal:cbv:mda",
    "gs1": "https://gs1.org/voc/",
    "linectl": LINECTL_NS,
}
_CBV_WEB = "https://ref.gs1.org/cbv/"
#: JSON field -> (CBV URN vocabulary, ref.gs1.org web vocabulary prefix)
_VOCAB = {
    "bizStep": ("urn:epcglobal:cbv:bizstep:", "BizStep-"),
    "disposition": ("urn:epcglobal:cbv:disp:", "Disp-"),
    "bizTransaction": ("urn:epcglobal:cbv:btt:", "BTT-"),
    "sourceDest": ("urn:epcglobal:cbv:sdt:", "SDT-"),
    "reason": ("urn:epcglobal:cbv:er:", "ER-"),
}
#: JSON fields of an event this module places itself; any other key must be a "prefix:name" extension
_KNOWN = frozenset({
    "type", "eventID", "eventTime", "recordTime", "eventTimeZoneOffset", "errorDeclaration", "certificationInfo",
    "epcList", "parentID", "childEPCs", "action", "bizStep", "disposition", "readPoint", "bizLocation",
    "bizTransactionList", "quantityList", "childQuantityList", "sourceList", "destinationList", "ilmd",
    "persistentDisposition",
})
_REFUSED = {
    "sensorElementList": "sensor data (sensorElementList) is not rendered to XML: linectl records none",
    "inputEPCList": "TransformationEvent is not rendered to XML: linectl emits none",
}


class XmlMappingError(ValueError):
    """A stored JSON-LD event has no faithful XML rendering in the asked version."""


# --------------------------------------------------------------------------- values


def vocab(kind: str, value: str) -> str:
    """A CBV standard-vocabulary value as its URN; user vocabulary (any other URI) unchanged."""
    urn, web = _VOCAB[kind]
    if value.startswith(_CBV_WEB + web):
        return urn + value[len(_CBV_WEB + web):]
    if ":" in value:
        return value
    return urn + value


def _t(s: Any) -> str:
    return escape(str(s))


def _el(name: str, text: Any) -> str:
    return f"<{name}>{_t(text)}</{name}>"


def _qname(key: str) -> str:
    prefix, sep, local = key.partition(":")
    if not sep or prefix not in NAMESPACES or not local.isidentifier():
        raise XmlMappingError(f"field {key!r} is neither an EPCIS field nor an extension of a known namespace ({', '.join(NAMESPACES)})")
    return key


def _ext(key: str, value: Any) -> str:
    """A "prefix:name" extension value as XML: text, nested elements for an object, repeated for a list."""
    name = _qname(key)
    if isinstance(value, list):
        return "".join(_ext(key, v) for v in value)
    if isinstance(value, dict):
        return f"<{name}>" + "".join(_ext(k, v) for k, v in value.items() if not k.startswith("@")) + f"</{name}>"
    if isinstance(value, bool):
        return _el(name, "true" if value else "false")
    if value is None:
        return f"<{name}/>"
    return _el(name, value)


def _epc_list(name: str, epcs: Iterable[str]) -> str:
    return f"<{name}>" + "".join(_el("epc", e) for e in epcs) + f"</{name}>"


def _id_type(name: str, value: dict[str, Any]) -> str:
    extra = "".join(_ext(k, v) for k, v in value.items() if k != "id")
    return f"<{name}>" + _el("id", value["id"]) + extra + f"</{name}>"


def _biz_transactions(items: list[dict[str, Any]]) -> str:
    out = []
    for bt in items:
        typ = f" type={quoteattr(vocab('bizTransaction', bt['type']))}" if bt.get("type") else ""
        out.append(f"<bizTransaction{typ}>{_t(bt['bizTransaction'])}</bizTransaction>")
    return "<bizTransactionList>" + "".join(out) + "</bizTransactionList>"


def _source_dest(list_name: str, item_name: str, key: str, items: list[dict[str, Any]]) -> str:
    out = [f"<{item_name} type={quoteattr(vocab('sourceDest', i['type']))}>{_t(i[key])}</{item_name}>" for i in items]
    return f"<{list_name}>" + "".join(out) + f"</{list_name}>"


def _quantities(name: str, items: list[dict[str, Any]]) -> str:
    out = []
    for q in items:
        body = _el("epcClass", q["epcClass"])
        if "quantity" in q:
            body += _el("quantity", q["quantity"]) + (_el("uom", q["uom"]) if q.get("uom") else "")
        out.append("<quantityElement>" + body + "</quantityElement>")
    return f"<{name}>" + "".join(out) + f"</{name}>"


def _ilmd(ilmd: dict[str, Any]) -> str:
    return "<ilmd>" + "".join(_ext(k, v) for k, v in ilmd.items()) + "</ilmd>"


def _error_declaration(ed: dict[str, Any]) -> str:
    body = _el("declarationTime", ed["declarationTime"])
    if ed.get("reason"):
        body += _el("reason", vocab("reason", ed["reason"]))
    if ed.get("correctiveEventIDs"):
        body += "<correctiveEventIDs>" + "".join(_el("correctiveEventID", i) for i in ed["correctiveEventIDs"]) + "</correctiveEventIDs>"
    body += "".join(_ext(k, v) for k, v in ed.items() if k not in ("declarationTime", "reason", "correctiveEventIDs"))
    return "<errorDeclaration>" + body + "</errorDeclaration>"


def _persistent_disposition(pd: dict[str, Any], prefix: str = "") -> str:
    """prefix "linectl:" in 1.2, which has no such element (the ##other wildcard takes linectl's own)."""
    body = "".join(_el(prefix + "unset", vocab("disposition", v)) for v in pd.get("unset", []))
    body += "".join(_el(prefix + "set", vocab("disposition", v)) for v in pd.get("set", []))
    return f"<{prefix}persistentDisposition>" + body + f"</{prefix}persistentDisposition>"


# --------------------------------------------------------------------------- events


def event_xml(event: dict[str, Any], version: XmlVersion) -> str:
    """One event element (unqualified, as EPCIS XML nests them) in the asked version."""
    kind = event.get("type")
    for key, why in _REFUSED.items():
        if key in event:
            raise XmlMappingError(why)
    extensions = [k for k in event if k not in _KNOWN and not k.startswith("@")]
    for k in extensions:
        _qname(k)
    if kind not in ("ObjectEvent", "AggregationEvent", "TransactionEvent"):
        raise XmlMappingError(f"{kind} is not rendered to EPCIS {version} XML: linectl emits only Object/Aggregation/Transaction events")
    g = event.get
    out = [_el("eventTime", event["eventTime"])]
    if g("recordTime"):
        out.append(_el("recordTime", event["recordTime"]))
    out.append(_el("eventTimeZoneOffset", event["eventTimeZoneOffset"]))
    if version == "1.2":
        base = (_el("eventID", event["eventID"]) if g("eventID") else "") + (_error_declaration(event["errorDeclaration"]) if g("errorDeclaration") else "")
        if base:
            out.append("<baseExtension>" + base + "</baseExtension>")
    else:
        if g("eventID"):
            out.append(_el("eventID", event["eventID"]))
        if g("errorDeclaration"):
            out.append(_error_declaration(event["errorDeclaration"]))
        if g("certificationInfo"):
            out.append(_el("certificationInfo", event["certificationInfo"]))

    what: list[str] = []
    if kind == "TransactionEvent":
        what.append(_biz_transactions(event.get("bizTransactionList") or []))
    if kind in ("AggregationEvent", "TransactionEvent") and g("parentID"):
        what.append(_el("parentID", event["parentID"]))
    if kind == "AggregationEvent":
        what.append(_epc_list("childEPCs", g("childEPCs") or []))
    elif g("epcList") is not None or version == "1.2":
        what.append(_epc_list("epcList", g("epcList") or []))
    what.append(_el("action", event["action"]))
    if g("bizStep"):
        what.append(_el("bizStep", vocab("bizStep", event["bizStep"])))
    if g("disposition"):
        what.append(_el("disposition", vocab("disposition", event["disposition"])))
    if g("readPoint"):
        what.append(_id_type("readPoint", event["readPoint"]))
    if g("bizLocation"):
        what.append(_id_type("bizLocation", event["bizLocation"]))
    if kind != "TransactionEvent" and g("bizTransactionList"):
        what.append(_biz_transactions(event["bizTransactionList"]))

    lists: list[str] = []  # quantities, sources, destinations (and ilmd): <extension> in 1.2, plain in 2.0
    qkey = "childQuantityList" if kind == "AggregationEvent" else "quantityList"
    if g(qkey):
        lists.append(_quantities(qkey, event[qkey]))
    if g("sourceList"):
        lists.append(_source_dest("sourceList", "source", "source", event["sourceList"]))
    if g("destinationList"):
        lists.append(_source_dest("destinationList", "destination", "destination", event["destinationList"]))
    if g("ilmd") and kind != "ObjectEvent":
        raise XmlMappingError(f"ilmd on a {kind}: EPCIS allows it on ObjectEvent only")
    other = "".join(_ext(k, event[k]) for k in extensions)
    if version == "1.2":
        if g("ilmd"):
            lists.append(_ilmd(event["ilmd"]))
        if lists:
            what.append("<extension>" + "".join(lists) + "</extension>")
        if g("persistentDisposition"):
            other += _persistent_disposition(event["persistentDisposition"], "linectl:")
        if g("certificationInfo"):
            other += _el("linectl:certificationInfo", event["certificationInfo"])
    else:
        what += lists
        if g("persistentDisposition"):
            what.append(_persistent_disposition(event["persistentDisposition"]))
        if g("ilmd"):
            what.append(_ilmd(event["ilmd"]))
    return f"<{kind}>" + "".join(out) + "".join(what) + other + f"</{kind}>"


# --------------------------------------------------------------------------- documents


def document_head(version: XmlVersion, creation_date: datetime | None = None) -> str:
    """The XML text of an EPCISDocument up to and including <EventList>: events follow, then DOCUMENT_TAIL."""
    ns = " ".join(f'xmlns:{p}="{u}"' for p, u in NAMESPACES.items())
    created = epcis.epcis_time(creation_date or datetime.now(UTC))
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<epcis:EPCISDocument xmlns:epcis="{EPCIS_NS[version]}" {ns} schemaVersion="{version}" creationDate="{created}">'
        "<EPCISBody><EventList>"
    )


DOCUMENT_TAIL = "</EventList></EPCISBody></epcis:EPCISDocument>"


def document_bytes(events: Iterable[dict[str, Any]], version: XmlVersion, creation_date: datetime | None = None) -> bytes:
    """A whole EPCISDocument from JSON events (as dicts)."""
    return (document_head(version, creation_date) + "".join(event_xml(e, version) for e in events) + DOCUMENT_TAIL).encode()


def document_from_encoded(encoded: Iterable[str], version: XmlVersion, creation_date: datetime | None = None) -> bytes:
    """A whole EPCISDocument from stored (encoded JSON) events."""
    return document_bytes((json.loads(e) for e in encoded), version, creation_date)


def xml_events(encoded: Iterable[str], version: XmlVersion) -> Iterator[str]:
    for e in encoded:
        yield event_xml(json.loads(e), version)


# --------------------------------------------------------------------------- validation


XSD_MAIN: dict[XmlVersion, str] = {"1.2": "xsd-1.2/EPCglobal-epcis-1_2.xsd", "2.0": "xsd-2.0/EPCglobal-epcis-2_0.xsd"}


class XsdValidator:
    """The official EPCIS XSD of one version, loaded from local files (lxml never fetches imports over the network
    here: every schemaLocation of the GS1 XSDs is relative)."""

    def __init__(self, version: XmlVersion, directory: str | Path | None = None) -> None:
        from lxml import etree

        d = Path(directory) if directory else epcis.schema_dir()
        path = d / XSD_MAIN[version]
        if not path.is_file():
            raise FileNotFoundError(f"EPCIS {version} XSD not found at {path}")
        parser = etree.XMLParser(no_network=True, resolve_entities=False)
        self.version = version
        self._schema = etree.XMLSchema(etree.parse(str(path), parser))
        self._parser = etree.XMLParser(no_network=True, resolve_entities=False, huge_tree=True)

    def problems(self, document: bytes) -> list[str]:
        from lxml import etree

        try:
            doc = etree.fromstring(document, self._parser)
        except etree.XMLSyntaxError as exc:
            return [f"not well-formed XML: {exc}"]
        if self._schema.validate(doc):
            return []
        return [f"line {e.line}: {e.message}" for e in self._schema.error_log]

    def validate(self, document: bytes) -> None:
        problems = self.problems(document)
        if problems:
            raise epcis.EpcisValidationError(problems)


@lru_cache(maxsize=2)
def default_validator(version: XmlVersion) -> XsdValidator:
    return XsdValidator(version)
