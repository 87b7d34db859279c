"""Domain events -> EPCIS 2.0 JSON events and documents, and an offline schema check.

The line speaks in its own words (linectl.events); upstream repositories speak
EPCIS 2.0 / CBV 2.0. This module is the one place where the translation lives,
so the forwarder, `linectl export` and the tests all produce the same JSON.

Choices that matter upstream:
- `eventID` is the domain event's `event_id`, so a re-sent event is a duplicate
  upstream (EPCIS `POST /events` answers 409), never a second event. An event
  too big for one EPCIS event (voiding or packing thousands of serials) is split
  into chunks of EPCS_PER_EVENT EPCs with eventIDs derived deterministically
  (uuid5) from the original, so the chunks are as stable as the original.
- bizStep/disposition use the bare CBV 2.0 short names ("commissioning"), which
  the official JSON schema enumerates and the JSON-LD context expands; the
  schema refuses `urn:epcglobal:cbv:` URIs there.
- ILMD uses the CBV 2.0 master data attributes under the context's `cbvmda:` prefix (lotNumber,
  itemExpirationDate, bestBeforeDate, sellByDate); CBV has none for a production or packaging date, so AI (11)
  and (13) use the GS1 Web Vocabulary terms GS1 Digital Link maps them to, under the context's `gs1:` prefix
  (gs1:productionDate, gs1:packagingDate). The names live in gs1.ILMD_KEYS, next to the CodeTemplate.
- An event is rendered once, when it is stored (Store.append -> outbox.epcis), with the context in force
  then: the station's readPoint, the time zone offset at that instant, the EPC form and prefix lengths. The
  forwarder publishes those bytes and `linectl export epcis` writes them, so an event means the same
  whenever it is rendered and a config change never rewrites history.
- Nothing asserts a state change of an object upstream never saw commissioned: a serial rejected before
  commissioning follows `epcis.rejected_serials` (nothing, or a commissioning + decommissioning pair), and
  serials never printed (voided, returned, sent but not printed) are no EPCIS event at all.
- An SGTIN needs the GS1 company prefix length of its GTIN. When it is not known
  (a GTIN no longer configured) the EPC is written as a GS1 Digital Link URI,
  which EPCIS 2.0 accepts and needs no prefix length, rather than blocking the
  outbox behind an event that cannot be mapped.
"""

from __future__ import annotations

import calendar
import json
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo

import structlog

from linectl import events as ev
from linectl import gs1

if TYPE_CHECKING:  # pragma: no cover
    from linectl.config import LineConfig

log = structlog.get_logger("linectl.epcis")

EPCIS_CONTEXT_URL = "https://ref.gs1.org/standards/epcis/2.0.0/epcis-context.jsonld"
#: at most this many EPCs in one EPCIS event; bigger domain events are split (stable derived eventIDs)
EPCS_PER_EVENT = 1000
_SPLIT_NS = uuid.UUID("3b0f6a3e-5f0c-4d49-9c55-6f0b3c1d2a11")  # namespace of derived chunk eventIDs

EpcFormat = Literal["urn", "digital_link"]
_PLAIN_SERIAL = re.compile(r"^[A-Za-z0-9]{1,20}$")  # set-82 subset that no EPC/Digital Link form escapes


class EpcisMappingError(ValueError):
    """A domain event cannot be expressed in EPCIS (bad identifier data)."""


# --------------------------------------------------------------------------- small helpers


def epcis_time(t: datetime) -> str:
    """UTC with a Z suffix and millisecond precision; naive datetimes are taken as UTC."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


#: ILMD key of each batch date besides expiry, in the order they are written (gs1.ILMD_KEYS by gs1.BATCH_SOURCES)
_DATE_KEYS: tuple[tuple[str, str], ...] = tuple(
    (name, gs1.ILMD_KEYS[ai]) for name in ("production_date", "packaging_date", "best_before", "sell_by")
    for ai, src in gs1.BATCH_SOURCES.items() if src == name
)
#: dates whose DD=00 means the month's first day in ILMD (a production or packaging month began then);
#: best before and sell by, like expiry, mean its last day
_FIRST_DAY = ("production_date", "packaging_date")


def ilmd_dates(dates: dict[str, str] | None, reference: date) -> list[tuple[str, str]]:
    """(ILMD key, ISO date) of a unit's batch dates besides expiry; an unknown name is a mapping error."""
    if not dates:
        return []
    unknown = sorted(set(dates) - {n for n, _ in _DATE_KEYS})
    if unknown:
        raise EpcisMappingError(f"batch date(s) {unknown} have no EPCIS ILMD attribute")
    out = []
    for name, key in _DATE_KEYS:
        if name in dates:
            iso = expiry_to_date(dates[name], reference, what=name)
            if name in _FIRST_DAY and dates[name][4:6] == "00":
                iso = iso[:8] + "01"
            out.append((key, iso))
    return out


@lru_cache(maxsize=4096)
def expiry_to_date(yymmdd: str, reference: date | None = None, what: str = "expiry") -> str:
    """GS1 AI (17) YYMMDD -> ISO YYYY-MM-DD.

    The century follows the GS1 General Specifications (7.12) sliding window
    around the reference year (the event's year), and DD=00 means the last day
    of the month.
    """
    if not re.fullmatch(r"\d{6}", yymmdd or ""):
        raise EpcisMappingError(f"{what} {yymmdd!r} is not YYMMDD")
    yy, mm, dd = int(yymmdd[:2]), int(yymmdd[2:4]), int(yymmdd[4:6])
    ref = (reference or datetime.now(UTC).date()).year
    century = ref - ref % 100
    diff = yy - ref % 100
    if 51 <= diff <= 99:
        century -= 100
    elif -99 <= diff <= -50:
        century += 100
    year = century + yy
    if not 1 <= mm <= 12:
        raise EpcisMappingError(f"{what} {yymmdd!r}: month {mm:02d} is invalid")
    last = calendar.monthrange(year, mm)[1]
    if dd == 0:
        dd = last
    elif dd > last:
        raise EpcisMappingError(f"expiry {yymmdd!r}: day {dd:02d} does not exist in {year}-{mm:02d}")
    return f"{year:04d}-{mm:02d}-{dd:02d}"


def chunk_event_id(event_id: str, index: int) -> str:
    """eventID of chunk `index` (>0) of a split event; chunk 0 keeps the original id."""
    if index == 0:
        return event_id
    return f"urn:uuid:{uuid.uuid5(_SPLIT_NS, f'{event_id}#{index}')}"


def _chunks(items: Sequence[str], size: int = EPCS_PER_EVENT) -> list[Sequence[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)] or [items]


# --------------------------------------------------------------------------- mapper


RejectedSerials = Literal["omit", "commission_then_decommission"]
#: reasons for which the serial was sent to a printer but never printed on a pack (engine: seq=None, nothing on a unit)
NOT_PRINTED = frozenset({ev.RejectReason.LINE_STOPPED, ev.RejectReason.PRINT_FAILED})
#: first character of a stored rendering that records a mapping failure instead of events
RENDER_FAILED = "!"


def fixed_offset(zone: str) -> str | None:
    """"+HH:MM" when `zone` is a fixed offset, else None (an IANA name)."""
    return zone if re.fullmatch(r"[+-]\d\d:\d\d", zone) else None


@dataclass
class EpcisMapper:
    """Maps linectl domain events to EPCIS 2.0 event dicts for one line."""

    read_point: str
    biz_location: str
    #: IANA zone ("Europe/Berlin": eventTimeZoneOffset follows summer time) or a fixed "+01:00"
    timezone: str = "+00:00"
    epc_format: EpcFormat = "urn"
    #: GTIN-14 -> GS1 company prefix length
    cp_lengths: dict[str, int] = field(default_factory=dict)
    #: known company prefixes (digits), used to find the prefix length of an SSCC
    company_prefixes: tuple[str, ...] = ()
    #: station name -> SGLN of its readPoint; events of other stations (or none) use read_point
    read_points: dict[str, str] = field(default_factory=dict)
    #: a serial printed on a rejected pack, never commissioned: no EPCIS event, or a commissioning/decommissioning pair
    rejected_serials: RejectedSerials = "omit"
    _sgtin_prefix: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    _zone: ZoneInfo | None = field(default=None, repr=False, compare=False)
    _offsets: dict[int, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if fixed_offset(self.timezone) is None:
            self._zone = ZoneInfo(self.timezone)

    @classmethod
    def from_config(cls, cfg: LineConfig) -> EpcisMapper:
        cp_lengths = {p.gtin: p.company_prefix_length for p in cfg.products}
        prefixes = {p.gtin[1 : 1 + p.company_prefix_length] for p in cfg.products}
        prefixes.add(cfg.line.gln[: cfg.line.company_prefix_length])
        sgln = cfg.line.sgln
        return cls(
            read_point=sgln,
            biz_location=sgln,
            timezone=cfg.line.zone,
            epc_format=cfg.mqtt.epc_format,
            cp_lengths=cp_lengths,
            company_prefixes=tuple(sorted(prefixes, key=len, reverse=True)),
            read_points=cfg.station_read_points(),
            rejected_serials=cfg.epcis.rejected_serials,
        )

    def offset_at(self, t: datetime) -> str:
        """The UTC offset in force at `t` where the line is (eventTimeZoneOffset)."""
        if self._zone is None:
            return self.timezone
        if t.tzinfo is None:
            t = t.replace(tzinfo=UTC)
        # Offsets change only on quarter hours (tzdata): one look-up per 15 minutes of event time.
        bucket = int(t.timestamp()) // 900
        cached = self._offsets.get(bucket)
        if cached is not None:
            return cached
        off = t.astimezone(self._zone).utcoffset()
        minutes = int(off.total_seconds() // 60) if off is not None else 0
        sign = "-" if minutes < 0 else "+"
        text = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
        if len(self._offsets) > 4096:
            self._offsets.clear()
        self._offsets[bucket] = text
        return text

    # identifiers ---------------------------------------------------------------

    def sgtin(self, gtin: str, serial: str) -> str:
        # Serials are almost always plain alphanumerics, which neither the EPC URI nor the
        # Digital Link escapes: those take a cached per-GTIN prefix (the full gs1 path costs
        # ~70 us per EPC, which alone would cap forwarding well below 20,000 events/s).
        prefix = self._sgtin_prefix.get(gtin)
        if prefix is None:
            prefix = self._sgtin_prefix[gtin] = self._slow_sgtin(gtin, "0")[:-1]
        if _PLAIN_SERIAL.match(serial):
            return prefix + serial
        return self._slow_sgtin(gtin, serial)

    def _slow_sgtin(self, gtin: str, serial: str) -> str:
        from linectl import gs1

        try:
            g = gs1.normalize_gtin(gtin)
        except gs1.GS1Error as exc:
            raise EpcisMappingError(f"GTIN {gtin!r}: {exc.reason}") from exc
        cp_len = None if self.epc_format == "digital_link" else (self.cp_lengths.get(g) or self._prefix_len(g[1:13]))
        try:
            if cp_len is None:
                if self.epc_format != "digital_link" and serial == "0":
                    log.warning("epc_as_digital_link", gtin=g, why="company prefix length unknown for this GTIN")
                return gs1.digital_link(g, serial)
            return gs1.sgtin_urn(g, serial, cp_len)
        except gs1.GS1Error as exc:
            raise EpcisMappingError(f"GTIN {g} serial {serial!r}: {exc.reason}") from exc

    def sscc(self, sscc: str) -> str:
        from linectl import gs1

        if not re.fullmatch(r"\d{18}", sscc or ""):
            raise EpcisMappingError(f"SSCC {sscc!r} is not 18 digits")
        cp_len = None if self.epc_format == "digital_link" else self._prefix_len(sscc[1:17])
        try:
            if cp_len is None:
                if self.epc_format != "digital_link":
                    log.warning("epc_as_digital_link", sscc=sscc, why="company prefix of this SSCC is not configured")
                return gs1.sscc_digital_link(sscc)
            return gs1.sscc_urn(sscc, cp_len)
        except gs1.GS1Error as exc:
            raise EpcisMappingError(f"SSCC {sscc}: {exc.reason}") from exc

    def _prefix_len(self, digits: str) -> int | None:
        for cp in self.company_prefixes:  # longest first: a longer matching prefix is the more specific one
            if digits.startswith(cp):
                return len(cp)
        return None

    def child_epc(self, child: ev.ChildRef) -> str:
        if child.sscc:
            return self.sscc(child.sscc)
        if child.gtin and child.serial is not None:
            return self.sgtin(child.gtin, child.serial)
        raise EpcisMappingError(f"child {child!r} has neither an SSCC nor GTIN + serial")

    # events --------------------------------------------------------------------

    def _base(self, e: ev.Event, etype: str, event_id: str | None = None) -> dict[str, Any]:
        return {
            "type": etype,
            "eventID": event_id or e.event_id,
            "eventTime": epcis_time(e.event_time),
            "eventTimeZoneOffset": self.offset_at(e.event_time),
        }

    def _where(self, d: dict[str, Any], e: ev.Event) -> dict[str, Any]:
        d["readPoint"] = {"id": self.read_points.get(e.station, self.read_point) if e.station else self.read_point}
        d["bizLocation"] = {"id": self.biz_location}
        return d

    def _object(
        self,
        e: ev.Event,
        epcs: Sequence[str],
        action: str,
        biz_step: str,
        disposition: str | None,
        ilmd: dict[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        if len(epcs) == 1:  # the common case, without the chunking machinery
            d = self._base(e, "ObjectEvent")
            d["epcList"] = list(epcs)
            d["action"] = action
            d["bizStep"] = biz_step
            if disposition:
                d["disposition"] = disposition
            self._where(d, e)
            if ilmd:
                d["ilmd"] = ilmd
            return [d]
        out = []
        for i, part in enumerate(_chunks(epcs)):
            d = self._base(e, "ObjectEvent", chunk_event_id(e.event_id, i))
            d["epcList"] = list(part)
            d["action"] = action
            d["bizStep"] = biz_step
            if disposition:
                d["disposition"] = disposition
            self._where(d, e)
            if ilmd:
                d["ilmd"] = dict(ilmd)
            out.append(d)
        return out

    def _aggregation(self, e: ev.Event, parent: str, children: Sequence[str], action: str, biz_step: str, disposition: str | None) -> list[dict[str, Any]]:
        out = []
        for i, part in enumerate(_chunks(children)):
            d = self._base(e, "AggregationEvent", chunk_event_id(e.event_id, i))
            d["parentID"] = parent
            if part:
                d["childEPCs"] = list(part)
            d["action"] = action
            d["bizStep"] = biz_step
            if disposition:
                d["disposition"] = disposition
            out.append(self._where(d, e))
        return out

    def map(self, e: ev.Event, *, commissioned: bool = True) -> list[dict[str, Any]]:
        """EPCIS events for one domain event: [] when it has no EPCIS meaning, >1 when split.

        `commissioned` (UnitDecommissioned only): whether the serial had been commissioned. EPCIS must
        never decommission an object it never saw commissioned; such a serial follows `rejected_serials`.
        """
        if isinstance(e, ev.UnitDecommissioned) and not commissioned:
            return self._never_commissioned(e)
        if isinstance(e, ev.UnitCommissioned):
            ilmd: dict[str, str] = {}
            if e.lot:
                ilmd["cbvmda:lotNumber"] = e.lot
            if e.expiry:
                ilmd["cbvmda:itemExpirationDate"] = expiry_to_date(e.expiry, e.event_time.date())
            ilmd.update(ilmd_dates(e.dates, e.event_time.date()))
            return self._object(e, [self.sgtin(e.gtin, e.serial)], "ADD", "commissioning", "active", ilmd or None)
        if isinstance(e, ev.UnitDecommissioned):
            step, disp = ("destroying", "destroyed") if e.destroyed else ("decommissioning", "inactive")
            return self._object(e, [self.sgtin(e.gtin, e.serial)], "DELETE", step, disp)
        if isinstance(e, ev.SerialsVoided):
            # never printed, never commissioned: no object upstream knows of, so no EPCIS event (a record)
            return []
        if isinstance(e, ev.UnitInspected):
            return self._object(e, [self.sgtin(e.gtin, e.serial)], "OBSERVE", e.biz_step, None)
        if isinstance(e, ev.ContainerCommissioned):
            return self._object(e, [self.sscc(e.sscc)], "ADD", "commissioning", "active")
        if isinstance(e, ev.ContainerDecommissioned):
            if not e.commissioned:  # the SSCC never existed upstream: nothing to delete there
                return []
            return self._object(e, [self.sscc(e.sscc)], "DELETE", "decommissioning", "inactive")
        if isinstance(e, ev.Packed):
            if not e.children:
                return []
            return self._aggregation(e, self.sscc(e.parent), [self.child_epc(c) for c in e.children], "ADD", "packing", "in_progress")
        if isinstance(e, ev.Unpacked):
            # no children = the whole content: an AggregationEvent DELETE without childEPCs says exactly that
            return self._aggregation(e, self.sscc(e.parent), [self.child_epc(c) for c in e.children], "DELETE", "unpacking", None)
        return []


    def _never_commissioned(self, e: ev.UnitDecommissioned) -> list[dict[str, Any]]:
        """A serial taken out before it was ever commissioned (a rejected pack, or sent but not printed).

        omit: no EPCIS event; the row still reaches upstream as a record with its reason.
        commission_then_decommission: when the code was printed on a pack (it physically exists), a
        commissioning ADD (active) then a decommissioning DELETE (inactive; destroying/destroyed if
        destroyed), both at the rejection time, so upstream knows the code and that it is dead.
        Never a bare decommissioning, and nothing at all for a serial that was never printed.
        """
        if self.rejected_serials == "omit" or e.reason in NOT_PRINTED:
            return []
        epc = self.sgtin(e.gtin, e.serial)
        add = self._base(e, "ObjectEvent", f"urn:uuid:{uuid.uuid5(_SPLIT_NS, f'{e.event_id}#commissioning')}")
        add.update(epcList=[epc], action="ADD", bizStep="commissioning", disposition="active")
        self._where(add, e)
        if e.lot:
            add["ilmd"] = {"cbvmda:lotNumber": e.lot}
        step, disp = ("destroying", "destroyed") if e.destroyed else ("decommissioning", "inactive")
        return [add] + self._object(e, [epc], "DELETE", step, disp)

    def render(self, e: ev.Event, *, commissioned: bool = True) -> str:
        """The stored form of an event's EPCIS rendering: its encoded events joined by newlines ('' = none),
        or RENDER_FAILED + the reason when the event cannot be expressed in EPCIS."""
        try:
            return "\n".join(map(encode_event, self.map(e, commissioned=commissioned)))
        except (EpcisMappingError, ValueError) as exc:
            return RENDER_FAILED + (str(exc) or type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - a mapping bug must not keep the event itself out of the store
            log.exception("epcis_render_bug", event_id=e.event_id, event=type(e).__name__)
            return RENDER_FAILED + f"internal error while rendering: {exc!r}"

    def render_commissioned(self, e: ev.UnitCommissioned) -> str:
        """render() of a UnitCommissioned, the bulk of a line's events, without building and encoding a dict:
        the same bytes (tests/test_epcis_record.py compares both paths), at about half the cost, which the
        line pays on every append."""
        try:
            q = _json_str
            t = e.event_time
            expiry = expiry_to_date(e.expiry, t.date()) if e.expiry else None  # first, as map() does: same error first
            dates = ilmd_dates(e.dates, t.date())
            out = [
                '{"type":"ObjectEvent","eventID":', q(e.event_id), ',"eventTime":', q(epcis_time(t)),
                ',"eventTimeZoneOffset":', q(self.offset_at(t)), ',"epcList":[', q(self.sgtin(e.gtin, e.serial)),
                '],"action":"ADD","bizStep":"commissioning","disposition":"active","readPoint":{"id":',
                q(self.read_points.get(e.station, self.read_point) if e.station else self.read_point),
                '},"bizLocation":{"id":', q(self.biz_location), "}",
            ]
            if e.lot or e.expiry or dates:
                ilmd = []
                if e.lot:
                    ilmd.append('"cbvmda:lotNumber":' + q(e.lot))
                if expiry:
                    ilmd.append('"cbvmda:itemExpirationDate":' + q(expiry))
                ilmd += [q(k) + ":" + q(v) for k, v in dates]
                out += [',"ilmd":{', ",".join(ilmd), "}"]
            out.append("}")
            return "".join(out)
        except (EpcisMappingError, ValueError) as exc:
            return RENDER_FAILED + (str(exc) or type(exc).__name__)
        except Exception:  # noqa: BLE001 - let the generic path report it the same way
            return self.render(e)

    def renderings(self, e: ev.Event) -> str | tuple[str, str] | None:
        """What Store.append hands the writer: None (no EPCIS meaning), one rendering, or for a
        UnitDecommissioned (rendering if the serial was commissioned, rendering if it never was):
        only the writer knows the serial's state at that instant."""
        if not e.epcis:
            return None
        if type(e) is ev.UnitCommissioned:
            return self.render_commissioned(e)
        if isinstance(e, ev.UnitDecommissioned):
            return (self.render(e), self.render(e, commissioned=False))
        return self.render(e)


def stored_events(rendering: str) -> list[str]:
    """The encoded EPCIS events of a stored rendering (not a failed one)."""
    return rendering.split("\n") if rendering else []


# --------------------------------------------------------------------------- documents


_ENCODER = json.JSONEncoder(separators=(",", ":"))
# how _ENCODER writes a string (ensure_ascii); one encoder: json.dumps builds a new one per call with these args
_json_str = json.encoder.encode_basestring_ascii


def _dumps(obj: Any) -> str:
    return _ENCODER.encode(obj)  # ASCII only (ensure_ascii): len() is the byte size


def encode_event(event: dict[str, Any]) -> str:
    """Compact JSON of one EPCIS event, as it is placed in a document."""
    return _dumps(event)


def document_head(creation_date: datetime | None = None) -> str:
    """The JSON text of an EPCISDocument up to the opening bracket of its eventList."""
    head = {
        "@context": [EPCIS_CONTEXT_URL],
        "type": "EPCISDocument",
        "schemaVersion": "2.0",
        "creationDate": epcis_time(creation_date or datetime.now(UTC)),
    }
    return _dumps(head)[:-1] + ',"epcisBody":{"eventList":['


DOCUMENT_TAIL = "]}}"


def document_bytes(encoded_events: Iterable[str], creation_date: datetime | None = None) -> bytes:
    """An EPCISDocument from already-encoded events (no re-serialisation: the forwarder sizes events once)."""
    return (document_head(creation_date) + ",".join(encoded_events) + DOCUMENT_TAIL).encode()


def build_document(events: Iterable[dict[str, Any]], creation_date: datetime | None = None) -> dict[str, Any]:
    """An EPCISDocument as a dict (for tests and small exports)."""
    return {
        "@context": [EPCIS_CONTEXT_URL],
        "type": "EPCISDocument",
        "schemaVersion": "2.0",
        "creationDate": epcis_time(creation_date or datetime.now(UTC)),
        "epcisBody": {"eventList": list(events)},
    }


# --------------------------------------------------------------------------- validation

SCHEMA_FILE = "EPCIS-JSON-Schema.json"
#: context files shipped next to the schema, and the URLs documents and contexts refer to them by
CONTEXT_FILES = {
    "epcis-context.jsonld": (EPCIS_CONTEXT_URL, "https://ref.gs1.org/standards/epcis/epcis-context.jsonld", "https://gs1.github.io/EPCIS/epcis-context.jsonld"),
    "cbv-context-bizstep.jsonld": ("https://gs1.github.io/EPCIS/cbv-context-bizstep.jsonld",),
    "cbv-context-disposition.jsonld": ("https://gs1.github.io/EPCIS/cbv-context-disposition.jsonld",),
}


class EpcisValidationError(ValueError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""))
        self.problems = problems


def schema_dir() -> Path:
    """Where the official schema lives: $LINECTL_EPCIS_SCHEMA_DIR, package data, or the shared standards folder."""
    candidates = []
    if os.environ.get("LINECTL_EPCIS_SCHEMA_DIR"):
        candidates.append(Path(os.environ["LINECTL_EPCIS_SCHEMA_DIR"]))
    here = Path(__file__).resolve().parent
    candidates += [here / "standards" / "epcis", here.parent.parent / "shared" / "standards" / "epcis"]
    for c in candidates:
        if (c / SCHEMA_FILE).is_file():
            return c
    raise FileNotFoundError(f"{SCHEMA_FILE} not found in {', '.join(map(str, candidates))}; set LINECTL_EPCIS_SCHEMA_DIR")


_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:[^\s<>\"{}|\\^`]*$")
_BAD_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_DATETIME = re.compile(
    r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])[Tt]([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d+)?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)$"
)


def _format_checker() -> Any:
    """jsonschema's own uri/date-time checks need optional packages; without them those formats
    pass unchecked, so the two formats EPCIS relies on are checked here (RFC 3986 / RFC 3339)."""
    from jsonschema import FormatChecker

    checker = FormatChecker()

    @checker.checks("uri")
    def _uri(value: object) -> bool:
        return not isinstance(value, str) or (bool(_URI.match(value)) and not _BAD_PCT.search(value) and value.isascii())

    @checker.checks("date-time")
    def _dt(value: object) -> bool:
        if not isinstance(value, str):
            return True
        if not _DATETIME.match(value):
            return False
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00").replace("t", "T"))
        except ValueError:
            return False
        return True

    return checker


class EpcisValidator:
    """The official EPCIS 2.0 JSON schema (draft-07), resolved from local files only: never the network."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        from jsonschema import Draft7Validator
        from referencing import Registry
        from referencing.exceptions import NoSuchResource
        from referencing.jsonschema import DRAFT7

        d = Path(directory) if directory else schema_dir()
        schema = json.loads((d / SCHEMA_FILE).read_text(encoding="utf-8"))
        resources = [(schema["$id"], DRAFT7.create_resource(schema))]
        for name, urls in CONTEXT_FILES.items():
            p = d / name
            if p.is_file():
                res = DRAFT7.create_resource(json.loads(p.read_text(encoding="utf-8")))
                resources += [(u, res) for u in urls]

        def offline(uri: str) -> Any:
            raise NoSuchResource(ref=uri)  # type: ignore[call-arg]  # attrs-made __init__ mypy does not see; no network: anything not registered is unresolvable

        self.registry = Registry(retrieve=offline).with_resources(resources)  # type: ignore[call-arg]  # attrs-made __init__
        self._validator = Draft7Validator(schema, registry=self.registry, format_checker=_format_checker())

    def problems(self, document: Any) -> list[str]:
        out = []
        for err in sorted(self._validator.iter_errors(document), key=lambda e: list(e.absolute_path)):
            where = "/".join(str(p) for p in err.absolute_path) or "(document)"
            # if/then/anyOf errors hide the real cause in their context; report the deepest ones
            leaves = _leaf_errors(err)
            for leaf in leaves[:3]:
                lw = "/".join(str(p) for p in leaf.absolute_path) or where
                out.append(f"{lw}: {leaf.message}")
        return out

    def validate(self, document: Any) -> None:
        problems = self.problems(document)
        if problems:
            raise EpcisValidationError(problems)


def _leaf_errors(err: Any) -> list[Any]:
    if not err.context:
        return [err]
    out: list[Any] = []
    for sub in err.context:
        out += _leaf_errors(sub)
    return out


@lru_cache(maxsize=1)
def default_validator() -> EpcisValidator:
    return EpcisValidator()


def validate_document(document: Any) -> None:
    """Raise EpcisValidationError listing the problems when `document` does not follow the EPCIS 2.0 schema."""
    default_validator().validate(document)
