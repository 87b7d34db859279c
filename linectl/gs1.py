"""GS1 identity layer: the one place where linectl decides whether a code is right.

Everything that reaches the line (a camera read, an HRI string typed by an
operator, an EPC URN from L3, a Digital Link from a QR code) is turned into the
same validated form here, so that the print-and-verify cycle, the serial pool
and the EPCIS layer never have to re-interpret GS1 syntax themselves.

Where the rules come from, and why:

* Every AI rule (format, which AIs need FNC1, the content checks called
  "linters", mandatory associations ``req=``, invalid pairs ``ex=``, Digital
  Link primary keys and qualifiers ``dlpkey=``) is read from GS1's own Barcode
  Syntax Dictionary, shipped unmodified in ``linectl/standards/gs1/`` and
  loaded by :mod:`linectl.gs1_dictionary`.  A hand-made table missed rules
  ((716) without (01), (03) as a key, single-country (423)); the file does not.
* This module adds what the dictionary cannot say and a line needs: a reason
  an operator can act on, the symbology identifier (only GS1 symbologies carry
  element strings), a leading GS from a misconfigured printer, serial-line
  noise, duplicates, and expiry before production.
* biip and epcpy are *not* used at run time; they are independent oracles in
  the tests.  zxing-cpp (writer backed by zint) renders GS1 DataMatrix for
  simulators; its GS1 mode does not check check digits, dates or set 82, so
  only validated codes are rendered by default.
"""

from __future__ import annotations

import calendar
import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from linectl import gs1_dictionary as _gsd
from linectl.gs1_dictionary import CSET39, CSET82, AIEntry, LintError

if TYPE_CHECKING:
    import numpy

__all__ = [
    "AI_NAMES",
    "BATCH_SOURCES",
    "CSET82",
    "DATE_AIS",
    "GS",
    "GS1_SYMBOLOGIES",
    "ILMD_KEYS",
    "SYMBOLOGY_DM",
    "SYMBOLOGY_GS1_DM",
    "SYMBOLOGY_GS1_DMRE",
    "CodeTemplate",
    "GS1Error",
    "Identity",
    "ParsedCode",
    "compose",
    "compose_unit",
    "digital_link",
    "gtin_check_digit",
    "identify",
    "is_valid_gtin",
    "is_valid_sscc",
    "make_sscc",
    "mismatches",
    "normalize_gtin",
    "parse",
    "parse_uri",
    "render_datamatrix",
    "render_plain_datamatrix",
    "sgtin_urn",
    "sscc_digital_link",
    "sscc_urn",
    "wrong_value",
]

SYMBOLOGY_GS1_DM = "]d2"
#: GS1 data in a DMRE (rectangular extension, ISO/IEC 21471) DataMatrix, as zxing-cpp reports it.
SYMBOLOGY_GS1_DMRE = "]d8"
SYMBOLOGY_DM = "]d1"
GS = "\x1d"

#: Symbology identifiers (ISO/IEC 15424) whose data is a GS1 element string.
GS1_SYMBOLOGIES: dict[str, str] = {
    "]d2": "GS1 DataMatrix",
    SYMBOLOGY_GS1_DMRE: "GS1 DataMatrix (DMRE)",
    "]C1": "GS1-128",
    "]e0": "GS1 DataBar / GS1 Composite",
    "]Q3": "GS1 QR Code",
    "]J1": "GS1 DotCode",
}
#: EAN/UPC symbols carry a bare GTIN, never AIs: data length per identifier.
_EAN_UPC = {"]E0": 13, "]E4": 8}
_SYMBOLOGY_NAMES = {
    "A": "Code 39", "C": "Code 128", "d": "Data Matrix", "E": "EAN/UPC", "e": "GS1 DataBar",
    "F": "Codabar", "G": "Code 93", "I": "Interleaved 2 of 5", "J": "DotCode", "L": "PDF417",
    "Q": "QR Code", "z": "Aztec Code", "X": "other",
}

_CHARSET_NAMES = {
    "N": "a digit (numeric-only field)",
    "X": "in GS1 character set 82",
    "Y": "in GS1 character set 39",
    "Z": "in GS1 character set 64",
}

# EPC TDS Table A-1: the set-82 characters that must be %-escaped in an EPC URI.
_EPC_ESCAPE = {c: f"%{ord(c):02X}" for c in "\"%&/<>?"}


class GS1Error(ValueError):
    """A code, key or URI that linectl must not accept.

    ``reason`` is written for the operator's screen and the batch record, so it
    always names the AI and the exact problem; ``ai`` lets callers map the
    failure to a reject reason without parsing text.
    """

    def __init__(self, reason: str, ai: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.ai = ai


# --------------------------------------------------------------------------
# AI rules: GS1 Barcode Syntax Dictionary
# --------------------------------------------------------------------------


def _entry(ai: str) -> AIEntry | None:
    return _gsd.load().entries.get(ai)


def _ai_at(s: str, pos: int) -> str | None:
    entry = _gsd.load().ai_at(s, pos)
    return entry.ai if entry is not None else None


def _predefined_len(entry: AIEntry) -> int | None:
    """Length of an AI that needs no FNC1 after it (``*`` flag), else None."""
    return None if entry.fnc1 else entry.fixed_len


# --------------------------------------------------------------------------
# value checks
# --------------------------------------------------------------------------


def _century_year(yy: int, today: dt.date | None = None) -> int:
    """Full year for a YY field, sliding window of GS1 General Specifications 7.12."""
    return _gsd.century_year(yy, (today or dt.date.today()).year)


def _resolve_date(value: str, *, last_day: bool = True) -> dt.date:
    """YYMMDD to a date; DD=00 means the whole month (its last or first day)."""
    year = _century_year(int(value[0:2]))
    month, day = int(value[2:4]), int(value[4:6])
    if day == 0:
        day = calendar.monthrange(year, month)[1] if last_day else 1
    return dt.date(year, month, day)


def _describe_char(ch: str) -> str:
    if ch == " ":
        return "' ' (space)"
    if ch == GS:
        return "GS (0x1D)"
    return repr(ch) if ch.isascii() else f"{ch!r} (U+{ord(ch):04X})"


def _components(entry: AIEntry, value: str) -> list[tuple[int, _gsd.Component, str]]:
    """Split a value into its dictionary components: (offset, component, data)."""
    out, pos = [], 0
    for comp in entry.components:
        if pos >= len(value) and comp.optional:
            break
        n = comp.max_len if comp.fixed else len(value) - pos
        out.append((pos, comp, value[pos:pos + n]))
        pos += n
    return out


def _check_value(ai: str, value: str, *, element_string: bool = False) -> None:
    """Raise GS1Error with a precise reason if ``value`` is not valid for ``ai``."""
    entry = _entry(ai)
    if entry is None:
        raise GS1Error(f"unknown AI ({ai})", ai)
    if value == "":
        raise GS1Error(f"AI ({ai}): empty value", ai)
    comps = entry.components
    unit = "digits" if value.isdigit() and all(c.cset == "N" for c in comps) else "characters"
    fixed, max_len = entry.fixed_len, entry.max_len
    if fixed is not None and len(value) != fixed:
        raise GS1Error(f"AI ({ai}): value {value!r} has {len(value)} {unit}, expected {fixed}", ai)
    if len(value) > max_len:
        hint = " (missing GS separator?)" if element_string and fixed is None else ""
        raise GS1Error(f"AI ({ai}): value {value!r} has {len(value)} {unit}, maximum is {max_len}{hint}", ai)
    if len(value) < entry.min_len:
        raise GS1Error(f"AI ({ai}): value {value!r} has {len(value)} {unit}, minimum is {entry.min_len}", ai)
    parts = _components(entry, value)
    for i, (offset, comp, data) in enumerate(parts):
        if comp.fixed and len(data) != comp.max_len:
            raise GS1Error(
                f"AI ({ai}): value {value!r} has {len(value)} {unit}, which does not fit the format "
                f"{entry.spec}: component {i + 1} needs {comp.max_len}",
                ai,
            )
        if comp.cset != "Z":  # set 64 has padding rules: judged by its own test below
            allowed = _ALLOWED[comp.cset]
            for j, ch in enumerate(data):
                if ch not in allowed:
                    raise GS1Error(
                        f"AI ({ai}): character {_describe_char(ch)} at position {offset + j + 1} "
                        f"is not {_CHARSET_NAMES[comp.cset]}",
                        ai,
                    )
        try:
            if comp.cset == "Z":
                _gsd.lint_cset64(data)
            for name in comp.linters:
                _gsd.LINTERS[name](data)
        except LintError as exc:
            where = f" (component {i + 1} of {entry.spec})" if len(parts) > 1 and exc.code not in (
                "INCORRECT_CHECK_DIGIT", "ILLEGAL_MONTH", "ILLEGAL_DAY") else ""
            raise GS1Error(f"AI ({ai}): {exc.message}{where}", ai) from None


_ALLOWED = {"N": frozenset("0123456789"), "X": CSET82, "Y": CSET39}


def _show(pattern: str) -> str:
    return f"AI ({pattern})"


def _check_message(pairs: list[tuple[str, str]]) -> None:
    """Rules that need the whole message: duplicates, ex=, req=, date order."""
    seen: dict[str, str] = {}
    for ai, value in pairs:
        if ai in seen:
            if seen[ai] == value:
                raise GS1Error(f"AI ({ai}) appears twice (same value {value!r})", ai)
            raise GS1Error(f"AI ({ai}) appears twice with different values {seen[ai]!r} and {value!r}", ai)
        seen[ai] = value
    order = [ai for ai, _ in pairs]
    # ex=: report every clashing pair, each once, in the order of the message.
    clashes: list[tuple[str, str]] = []
    for ai in order:
        entry = _entry(ai)
        assert entry is not None
        for pattern in entry.ex:
            for other in order:
                if other != ai and _gsd.matches(pattern, other):
                    pair = (ai, other) if order.index(ai) < order.index(other) else (other, ai)
                    if pair not in clashes:
                        clashes.append(pair)
    if clashes:
        raise GS1Error(
            "; ".join(f"AI ({a}) and AI ({b}) must not appear together" for a, b in clashes), clashes[0][0]
        )
    # req=: each attribute needs one of its groups wholly present (never counting the AI itself).
    for ai in order:
        entry = _entry(ai)
        assert entry is not None
        for groups in entry.req:
            if any(all(_gsd.present(p, order, ignore=ai) for p in group) for group in groups):
                continue
            need = " or ".join(" with ".join(_show(p) for p in group) for group in groups)
            raise GS1Error(f"AI ({ai}) requires {need} in the same code", ai)
    # A digital signature covers a serialised key only (GS1 Syntax Engine rule).
    if "8030" in seen:
        for ai in ("253", "255", "8003"):
            entry = _entry(ai)
            if ai in seen and entry is not None and len(seen[ai]) == entry.min_len:
                raise GS1Error(f"AI (8030) requires the serial component of AI ({ai})", "8030")
    for late, what in (("17", "expiry"), ("15", "best-before"), ("16", "sell-by")):
        if late not in seen:
            continue
        for early, ewhat in (("11", "production"), ("13", "packaging")):
            if early in seen:
                late_d = _resolve_date(seen[late], last_day=True)
                early_d = _resolve_date(seen[early], last_day=False)
                if late_d < early_d:
                    raise GS1Error(
                        f"AI ({late}): {what} date {late_d.isoformat()} is earlier than "
                        f"{ewhat} date AI ({early}) {early_d.isoformat()}: contradictory dates",
                        late,
                    )


# --------------------------------------------------------------------------
# ParsedCode
# --------------------------------------------------------------------------


def _canonical(ais: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Predefined-length AIs first: they need no FNC1, so the symbol is smallest."""
    ais = list(ais)
    is_fixed = [bool((e := _entry(ai)) and not e.fnc1) for ai, _ in ais]
    return [p for p, f in zip(ais, is_fixed) if f] + [p for p, f in zip(ais, is_fixed) if not f]


@dataclass(frozen=True)
class ParsedCode:
    """A validated GS1 message; the common currency of printer, camera and pool.

    ``kind`` is ``"gs1"`` for GS1 element strings and ``"ean_upc"`` for an
    EAN-13/UPC-A/EAN-8 scan, which carries a bare GTIN (reported as AI (01))
    and nothing else.
    """

    symbology: str | None
    ais: tuple[tuple[str, str], ...]
    kind: Literal["gs1", "ean_upc"] = "gs1"

    def get(self, ai: str) -> str | None:
        for key, value in self.ais:
            if key == ai:
                return value
        return None

    @property
    def gtin(self) -> str | None:
        return self.get("01")

    @property
    def serial(self) -> str | None:
        return self.get("21")

    @property
    def lot(self) -> str | None:
        return self.get("10")

    @property
    def sscc(self) -> str | None:
        return self.get("00")

    @property
    def expiry_raw(self) -> str | None:
        return self.get("17")

    @property
    def expiry(self) -> dt.date | None:
        raw = self.expiry_raw
        return None if raw is None else _resolve_date(raw)

    @property
    def hri(self) -> str:
        return "".join(f"({ai}){value}" for ai, value in _canonical(self.ais))

    @property
    def element_string(self) -> str:
        parts: list[str] = []
        ordered = _canonical(self.ais)
        for i, (ai, value) in enumerate(ordered):
            parts.append(ai + value)
            entry = _entry(ai)
            if i < len(ordered) - 1 and not (entry and not entry.fnc1):
                parts.append(GS)
        return "".join(parts)

    @property
    def scan_string(self) -> str:
        """What a reader with symbology identifiers on would transmit."""
        if self.kind == "ean_upc" and self.symbology in _EAN_UPC and self.gtin:
            return self.symbology + self.gtin[-_EAN_UPC[self.symbology]:]
        return (self.symbology or "") + self.element_string


# --------------------------------------------------------------------------
# parse
# --------------------------------------------------------------------------

_SYMBOLOGY_RE = re.compile(r"\][A-Za-z][0-9A-Za-z]")
_HRI_MARK_RE = re.compile(r"\((\d{2,4})\)")
#: How many readings of an ambiguous HRI text are tried before giving up.
_HRI_MAX_READINGS = 256


def _decode_input(raw: str | bytes) -> str:
    if isinstance(raw, (bytes, bytearray, memoryview)):
        text = bytes(raw).decode("latin-1")
    elif isinstance(raw, str):
        text = raw
    else:
        raise TypeError(f"expected str or bytes, got {type(raw).__name__}")
    for i, ch in enumerate(text):
        o = ord(ch)
        if (o < 0x20 and ch != GS) or o == 0x7F:
            raise GS1Error(
                f"non-printable character 0x{o:02X} at position {i} in the scanned data "
                "(line noise, wrong baud rate or an untrimmed terminator?)"
            )
    return text


def _split_symbology(text: str) -> tuple[str | None, str]:
    if not text.startswith("]"):
        return None, text
    if not _SYMBOLOGY_RE.match(text):
        raise GS1Error(f"malformed symbology identifier {text[:3]!r}")
    return text[:3], text[3:]


def _symbology_name(symbology: str) -> str:
    return GS1_SYMBOLOGIES.get(symbology) or _SYMBOLOGY_NAMES.get(symbology[1], "unknown symbology")


@lru_cache(maxsize=1)
def _longest_value() -> int:
    return max(e.max_len for e in _gsd.load().entries.values())


def _hri_unescape(value: str) -> str:
    # The GS1 Syntax Engine's bracketed syntax writes a literal '(' in data as '\('.
    return value.replace("\\(", "(").replace("\\)", ")")


def _hri_marks(body: str) -> list[re.Match[str]]:
    """Every '(AI)' with a known AI that is not escaped as '\\('."""
    return [
        m for m in _HRI_MARK_RE.finditer(body)
        if _entry(m.group(1)) is not None and (m.start() == 0 or body[m.start() - 1] != "\\")
    ]


def _tokenize_hri_naive(body: str) -> list[tuple[str, str]]:
    """Split at every known '(AI)' mark; used for the reason when no reading is valid."""
    out: list[tuple[str, str]] = []
    marks = _hri_marks(body)
    starts = {m.start(): m for m in marks}
    pos = 0
    while pos < len(body):
        m = starts.get(pos) or _HRI_MARK_RE.match(body, pos)
        if m is None:
            raise GS1Error(f"HRI: expected '(AI)' at position {pos}, found {body[pos:pos + 8]!r}")
        ai = m.group(1)
        entry = _entry(ai)
        if entry is None:
            raise GS1Error(f"unknown AI ({ai}) at position {pos}", ai)
        end = next((k.start() for k in marks if k.start() >= m.end()), len(body))
        value = body[m.end():end]
        if GS in value:
            raise GS1Error(f"AI ({ai}): GS separator inside HRI text", ai)
        fixed = _predefined_len(entry)
        if fixed is not None and len(value) > fixed and value[:fixed].isdigit():
            extra = value[fixed:]
            unknown = _HRI_MARK_RE.match(extra)
            if unknown:
                raise GS1Error(f"unknown AI ({unknown.group(1)}) after AI ({ai})", unknown.group(1))
            if end == len(body):
                raise GS1Error(f"trailing garbage {extra!r} after AI ({ai})", ai)
        out.append((ai, _hri_unescape(value)))
        pos = end
    return out


def _tokenize_hri(body: str) -> list[tuple[str, str]]:
    """HRI text to AI/value pairs, resolving '(NN)' inside values by the dictionary.

    HRI has no separator but the brackets, and a value may contain '(10)'
    itself.  Each known '(AI)' mark is a possible split; the first reading
    (nearest split first) in which every value has a length its AI allows by
    the dictionary is taken, and then validated in full.  So '(10)L(17)X' is
    one lot, since '(17)' takes exactly six digits, while '(21)S1(10)L1'
    stays two AIs and '(3910)999100' stays an AI with a bad currency code.
    A value that would fit both ways needs the Syntax Engine's escape '\\('.
    """
    if not body.startswith("("):
        raise GS1Error(f"HRI: expected '(AI)' at position 0, found {body[:8]!r}")
    marks = _hri_marks(body)
    if not marks or marks[0].start() != 0:
        return _tokenize_hri_naive(body)
    budget = [_HRI_MAX_READINGS]
    longest = 2 * _longest_value()  # an escape '\\(' takes two characters for one
    # A mark followed by nothing or by another mark can only be an AI (with an
    # empty value, an error), as in the Syntax Engine: it never joins a value.
    forced = [
        m.end() == len(body) or (k + 1 < len(marks) and marks[k + 1].start() == m.end())
        for k, m in enumerate(marks)
    ]

    def value_ok(ai: str, value: str) -> bool:
        # Lengths only: a value of the right length but bad content (a wrong
        # check digit, currency or date) is a real AI with an error to report,
        # never a reason to read its mark as text of the previous value.
        entry = _entry(ai)
        value = _hri_unescape(value)
        if entry is None or GS in value or not entry.min_len <= len(value) <= entry.max_len:
            return False
        return all(not comp.fixed or len(data) == comp.max_len for _, comp, data in _components(entry, value))

    def solve(i: int, acc: list[tuple[str, str]]) -> list[tuple[str, str]] | None:
        m = marks[i]
        ai = m.group(1)
        ends = [i + 1] if forced[i] else list(range(i + 1, len(marks) + 1))
        for j in ends:
            if budget[0] <= 0 or (j - 1 > i and forced[j - 1]):
                return None
            end = marks[j].start() if j < len(marks) else len(body)
            value = body[m.end():end]
            if len(value) > longest:
                break  # later ends only make it longer (escapes at most halve it)
            if not value_ok(ai, value):
                continue
            budget[0] -= 1
            pairs = acc + [(ai, _hri_unescape(value))]
            if j == len(marks):
                return pairs
            found = solve(j, pairs)
            if found is not None:
                return found
        return None

    return solve(0, []) or _tokenize_hri_naive(body)


def _tokenize_element_string(body: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(body):
        if body[pos] == GS:
            # A GS after a predefined-length AI is tolerated (GenSpecs 7.8.6),
            # but never two in a row nor one at the very end.
            prev = out[-1][0] if out else None
            if pos + 1 == len(body):
                raise GS1Error(f"trailing GS after the last AI ({prev})", prev)
            if body[pos + 1] == GS or (pos > 0 and body[pos - 1] == GS):
                raise GS1Error(f"two GS separators in a row at position {pos} after AI ({prev})", prev)
            pos += 1
            continue
        ai = _ai_at(body, pos)
        if ai is None:
            rest = body[pos:]
            if out:
                prev = out[-1][0]
                if rest[:2].isdigit():
                    raise GS1Error(
                        f"unknown AI at position {pos} (data {rest[:12]!r}) after AI ({prev})", prev
                    )
                raise GS1Error(f"trailing garbage {rest[:20]!r} at position {pos} after AI ({prev})", prev)
            raise GS1Error(f"data does not start with a known GS1 AI: {rest[:12]!r}")
        entry = _entry(ai)
        assert entry is not None
        start = pos + len(ai)
        fixed = _predefined_len(entry)
        if fixed is not None:
            end = start + fixed
            value = body[start:end]
            if GS in value:
                cut = value.index(GS)
                raise GS1Error(
                    f"AI ({ai}): value {value[:cut]!r} has {cut} characters before GS, expected {fixed}", ai
                )
        else:
            gs = body.find(GS, start)
            end = len(body) if gs == -1 else gs
            value = body[start:end]
        out.append((ai, value))
        pos = end
    return out


def _validate(pairs: list[tuple[str, str]], *, element_string: bool = False) -> None:
    for ai, value in pairs:
        _check_value(ai, value, element_string=element_string)
    _check_message(pairs)


def _parse_ean_upc(symbology: str, body: str) -> ParsedCode:
    n = _EAN_UPC[symbology]
    name = "EAN-8" if n == 8 else "EAN-13/UPC-A"
    if len(body) != n or not body.isdigit() or not body.isascii():
        raise GS1Error(f"{name} ({symbology}): expected {n} digits, got {body[:20]!r}", "01")
    expected = _gsd.check_digit(body[:-1])
    if body[-1] != expected:
        raise GS1Error(f"{name} ({symbology}): check digit is {body[-1]}, expected {expected}", "01")
    return ParsedCode(symbology=symbology, ais=(("01", body.zfill(14)),), kind="ean_upc")


def parse(raw: str | bytes, *, require_gs1: bool = False, allow_dmre: bool = False) -> ParsedCode:
    """Parse and fully validate one scan, HRI string or element string.

    Only GS1 symbologies (``]d2``, ``]C1``, ``]e0``, ``]Q3``, ``]J1`` and
    zxing-cpp's ``]d8`` for GS1 DMRE) carry element strings; an EAN/UPC scan
    (``]E0``/``]E4``) is a bare GTIN; any other identifier is not GS1.  Data
    without an identifier is taken as an element string or HRI text.

    ``require_gs1`` is for verification: a code whose data is right but whose
    symbol is a plain DataMatrix (``]d1``) or carries no symbology identifier
    cannot be proven to be GS1 DataMatrix and is rejected; ``allow_dmre``
    also accepts GS1 DataMatrix in a DMRE symbol (``]d8``).
    """
    text = _decode_input(raw)
    symbology, body = _split_symbology(text)
    accepted = (SYMBOLOGY_GS1_DM, SYMBOLOGY_GS1_DMRE) if allow_dmre else (SYMBOLOGY_GS1_DM,)
    if require_gs1 and symbology not in accepted:
        if body.startswith(GS):
            raise GS1Error(
                "GS in first position, printer sent literal GS instead of FNC1 "
                f"(symbology {symbology or 'not reported'})"
            )
        if symbology is None:
            raise GS1Error("not GS1 DataMatrix: no symbology identifier in the data (enable ]d2 on the reader)")
        if symbology == SYMBOLOGY_GS1_DMRE:
            raise GS1Error("not GS1 DataMatrix: symbology ]d8 (GS1 DataMatrix DMRE) is not allowed for this product")
        raise GS1Error(f"not GS1 DataMatrix: symbology {symbology}")
    if body == "":
        raise GS1Error("empty code: no data" + (f" after symbology {symbology}" if symbology else ""))
    if body.startswith(GS):
        raise GS1Error("GS in first position, printer sent literal GS instead of FNC1")
    low = body[:8].lower()
    if low.startswith(("http://", "https://", "urn:")):
        raise GS1Error("input is a URI, not a GS1 element string: use parse_uri() or identify()")
    if symbology in _EAN_UPC:
        return _parse_ean_upc(symbology, body)
    if symbology is not None and symbology not in GS1_SYMBOLOGIES:
        if symbology == SYMBOLOGY_DM:
            raise GS1Error("not GS1 DataMatrix: symbology ]d1")
        raise GS1Error(
            f"not GS1: symbology {symbology} ({_symbology_name(symbology)}) does not carry GS1 element strings"
        )
    if symbology is None and body.startswith("("):
        pairs = _tokenize_hri(body)
        try:
            _validate(pairs)
        except GS1Error:
            # The reason given is that of the plain reading (split at every
            # mark), which is what an operator meant when neither is valid.
            naive = _tokenize_hri_naive(body)
            if naive == pairs:
                raise
            _validate(naive)
            pairs = naive
    else:
        pairs = _tokenize_element_string(body)
        _validate(pairs, element_string=True)
    return ParsedCode(symbology=symbology, ais=tuple(pairs))


def compose(ais: Mapping[str, str] | Iterable[tuple[str, str]]) -> ParsedCode:
    """Build a code to print; AIs are put in encoding order (predefined lengths first)."""
    items = list(ais.items()) if isinstance(ais, Mapping) else [tuple(p) for p in ais]
    pairs: list[tuple[str, str]] = []
    for item in items:
        if len(item) != 2:
            raise GS1Error(f"expected (ai, value) pairs, got {item!r}")
        ai, value = item
        if not isinstance(ai, str) or not isinstance(value, str):
            raise GS1Error(f"AI and value must be strings, got {item!r}")
        ai = ai.strip("()")
        if _entry(ai) is None:
            raise GS1Error(f"unknown AI ({ai})", ai)
        if GS in value:
            raise GS1Error(f"AI ({ai}): value contains a GS character", ai)
        pairs.append((ai, value))
    if not pairs:
        raise GS1Error("empty code: no AIs given")
    _validate(pairs)
    return ParsedCode(symbology=SYMBOLOGY_GS1_DM, ais=tuple(_canonical(pairs)))


def _yymmdd(value: str | dt.date) -> str:
    return value.strftime("%y%m%d") if isinstance(value, dt.date) else value


def compose_unit(
    gtin: str,
    serial: str,
    lot: str | None = None,
    expiry: str | dt.date | None = None,
    extra: Mapping[str, str] | None = None,
) -> ParsedCode:
    """The pharma unit code: (01)(17)(10)(21) plus e.g. a national NHRN in ``extra``."""
    pairs: list[tuple[str, str]] = [("01", normalize_gtin(gtin))]
    if expiry is not None:
        pairs.append(("17", _yymmdd(expiry)))
    if lot is not None:
        pairs.append(("10", lot))
    pairs.append(("21", serial))
    pairs.extend((extra or {}).items())
    return compose(pairs)




# --------------------------------------------------------------------------
# CodeTemplate: what a product's unit code carries, and where each value comes from
# --------------------------------------------------------------------------

#: the batch attribute that gives each per-batch AI its value (CLI --production-date, MQTT "production_date" ...)
BATCH_SOURCES: dict[str, str] = {
    "10": "lot",
    "17": "expiry",
    "11": "production_date",
    "13": "packaging_date",
    "15": "best_before",
    "16": "sell_by",
}
#: the date AIs among them (YYMMDD, DD=00 allowed by the dictionary's yymmd0 linter)
DATE_AIS: tuple[str, ...] = ("11", "13", "15", "16", "17")
#: words for an operator's screen and a reject reason
AI_NAMES: dict[str, str] = {
    "01": "GTIN",
    "21": "serial",
    "10": "lot",
    "17": "expiry",
    "11": "production date",
    "13": "packaging date",
    "15": "best before date",
    "16": "sell by date",
}
#: EPCIS 2.0 ILMD key of each per-batch AI. lotNumber, itemExpirationDate, bestBeforeDate and sellByDate are
#: CBV 2.0 master data attributes (prefix cbvmda: of the official EPCIS 2.0 context); CBV has no production or
#: packaging date, so those use the GS1 Web Vocabulary terms GS1 Digital Link gives AI (11) and (13)
#: (prefix gs1: of the same official context).
ILMD_KEYS: dict[str, str] = {
    "10": "cbvmda:lotNumber",
    "17": "cbvmda:itemExpirationDate",
    "15": "cbvmda:bestBeforeDate",
    "16": "cbvmda:sellByDate",
    "11": "gs1:productionDate",
    "13": "gs1:packagingDate",
}
#: AIs that identify one unit or container: never a per-product constant
_NOT_CONSTANT = frozenset({"00", "01", "21", "235", "250", "251", "253", "254", "255", "8003", "8004", "8006", "8010", "8011", "8017", "8018"})


def ai_name(ai: str) -> str:
    """'production date (11)', or the dictionary's title for an AI linectl has no word for."""
    if ai in AI_NAMES:
        return f"{AI_NAMES[ai]} ({ai})"
    entry = _entry(ai)
    return f"{entry.title if entry is not None and entry.title else 'AI'} ({ai})"


def date_of(value: str, *, last_day: bool = True) -> dt.date:
    """A YYMMDD value of a date AI as a calendar day (DD=00: the month's last day, or first with last_day=False)."""
    return _resolve_date(value, last_day=last_day)


def _sample(ai: str) -> str:
    """A valid stand-in value, to check the message rules (req=, ex=) of a template before any batch exists."""
    return {"10": "LOT1", "21": "1"}.get(ai, "250101" if ai in DATE_AIS else "")


@dataclass(frozen=True)
class CodeTemplate:
    """The unit code of one product: which AIs, in which order, and where each value comes from.

    Printing (`compose`), verification (`expected`, `mismatches`), the EPCIS ILMD (`ilmd`) and the simulators'
    data defects (`data_ais`) all read the one template, so an AI the template allows is printed, checked and
    reported everywhere or nowhere. Sources: (01) the product, (21) the serial, (10) the lot, the date AIs the
    batch (`BATCH_SOURCES`), every other AI a constant of the product (`extra_ais`), validated against the GS1
    Barcode Syntax Dictionary with the whole-message rules (req=, ex=) when the template is built.
    """

    ais: tuple[str, ...]
    constants: tuple[tuple[str, str], ...] = ()

    @classmethod
    def build(cls, code_template: Iterable[str], extra_ais: Mapping[str, str] | None = None) -> CodeTemplate:
        """Validate a product's `code_template` and `extra_ais`; GS1Error names the first problem."""
        ais = [str(a).strip("()") for a in code_template]
        extra = {str(k).strip("()"): v for k, v in (extra_ais or {}).items()}
        if len(set(ais)) != len(ais):
            twice = sorted({a for a in ais if ais.count(a) > 1})
            raise GS1Error(f"code_template lists AI(s) {twice} twice")
        for ai in ais:
            if _entry(ai) is None:
                raise GS1Error(f"code_template: ({ai}) is not an AI of the GS1 Barcode Syntax Dictionary", ai)
        if "01" not in ais or "21" not in ais:
            raise GS1Error("code_template must contain AI 01 (GTIN) and AI 21 (serial)")
        for ai in ais:
            if ai not in ("01", "21") and ai not in BATCH_SOURCES and ai not in extra:
                raise GS1Error(
                    f"code_template: AI ({ai}) has no source: linectl fills (01), (21), (10) and the dates "
                    f"{', '.join(f'({d})' for d in DATE_AIS)} from the product and batch; give any other AI a value in extra_ais",
                    ai,
                )
        for ai, value in extra.items():
            if _entry(ai) is None:
                raise GS1Error(f"extra_ais: ({ai}) is not an AI of the GS1 Barcode Syntax Dictionary", ai)
            if ai in _NOT_CONSTANT or ai in BATCH_SOURCES:
                src = f"the batch's {BATCH_SOURCES[ai]}" if ai in BATCH_SOURCES else "each unit or container"
                raise GS1Error(f"extra_ais: AI ({ai}) cannot be a constant of the product: its value comes from {src}", ai)
            if not isinstance(value, str):
                raise GS1Error(f"extra_ais: AI ({ai}) value must be a string, got {value!r}", ai)
            _check_value(ai, value)
        constants = tuple((ai, extra[ai]) for ai in ais if ai in extra) + tuple(
            (ai, v) for ai, v in extra.items() if ai not in ais
        )
        tpl = cls(tuple(ais), constants)
        const = dict(constants)
        _check_message([(ai, const.get(ai) or _sample(ai)) for ai in tpl.all_ais])
        return tpl

    @property
    def all_ais(self) -> tuple[str, ...]:
        """Every AI on the code: the template's, then constants not listed in it."""
        return self.ais + tuple(ai for ai, _ in self.constants if ai not in self.ais)

    @property
    def batch_fields(self) -> tuple[str, ...]:
        """Batch attributes this template needs (lot, expiry, production_date ...), in template order."""
        return tuple(BATCH_SOURCES[ai] for ai in self.ais if ai in BATCH_SOURCES)

    @property
    def data_ais(self) -> tuple[str, ...]:
        """The per-batch AIs on the code (lot first, then the dates in template order): what a data mismatch alters."""
        rest = tuple(ai for ai in self.ais if ai in BATCH_SOURCES and ai != "10")
        return (("10",) if "10" in self.ais else ()) + rest

    def missing(self, batch: Mapping[str, str | None]) -> list[str]:
        """The batch attributes the template needs but `batch` does not give (field names)."""
        return [f for f in self.batch_fields if not batch.get(f)]

    def batch_values(self, batch: Mapping[str, str | None]) -> tuple[tuple[str, str], ...]:
        """(AI, value) of every per-batch AI; GS1Error if one has no value (never printed empty) or a bad one."""
        missing = self.missing(batch)
        if missing:
            need = ", ".join(f"{f} for {ai_name(ai)}" for ai, f in BATCH_SOURCES.items() if f in missing)
            raise GS1Error(f"the code template needs {need}: the batch does not give it", None)
        out = []
        for ai in self.ais:
            if ai in BATCH_SOURCES:
                value = batch[BATCH_SOURCES[ai]]
                assert value is not None
                try:
                    _check_value(ai, value)
                except GS1Error as exc:
                    raise GS1Error(f"{BATCH_SOURCES[ai]} {value!r}: {exc.reason}", ai) from None
                out.append((ai, value))
        return tuple(out)

    def check_batch(self, gtin: str, batch: Mapping[str, str | None]) -> ParsedCode:
        """Refuse a batch whose values cannot make a valid code (missing or bad date, expiry before production):
        composes the code of a stand-in serial, so the batch fails at creation, never at the first print."""
        return self.compose(gtin, "1", batch)

    def pairs(self, gtin: str, serial: str, batch: Mapping[str, str | None]) -> list[tuple[str, str]]:
        """Every (AI, value) of one unit's code, in template order (constants not listed: at the end)."""
        values = dict(self.batch_values(batch))
        values["01"] = normalize_gtin(gtin)
        values["21"] = serial
        values.update(self.constants)
        return [(ai, values[ai]) for ai in self.all_ais]

    def compose(self, gtin: str, serial: str, batch: Mapping[str, str | None]) -> ParsedCode:
        """The code to print: validated, predefined-length AIs first (its element_string has FNC1/GS as printers need)."""
        return compose(self.pairs(gtin, serial, batch))

    def expected(self, code: ParsedCode) -> tuple[tuple[str, str], ...]:
        """What verification checks besides GTIN and serial: every other AI of a composed code, in template order."""
        return tuple((ai, v) for ai, v in ((a, code.get(a)) for a in self.all_ais if a not in ("01", "21")) if v is not None)

    def ilmd(self, batch: Mapping[str, str | None], *, today: dt.date | None = None) -> dict[str, str]:
        """EPCIS 2.0 ILMD of a unit: lot and dates as ISO dates (DD=00: the month's last day), keyed by ILMD_KEYS."""
        out: dict[str, str] = {}
        for ai in self.ais:
            if ai in ILMD_KEYS and batch.get(BATCH_SOURCES[ai]):
                value = str(batch[BATCH_SOURCES[ai]])
                out[ILMD_KEYS[ai]] = value if ai == "10" else _resolve_date(value, last_day=ai != "11" and ai != "13").isoformat()
        return out


def mismatches(expected: Iterable[tuple[str, str]], read: ParsedCode) -> list[str]:
    """Each AI of `expected` the read code carries with another value (or not at all), worded for an operator."""
    out = []
    for ai, want in expected:
        got = read.get(ai)
        if got != want:
            out.append(f"{ai_name(ai)} {got!r}, expected {want!r}" if got is not None else f"{ai_name(ai)} missing, expected {want!r}")
    return out


def wrong_value(ai: str, value: str) -> str:
    """A different value, still valid for `ai` (a date moves one day): the simulators' data defect."""
    if ai in DATE_AIS:
        day = _resolve_date(value, last_day=False) + dt.timedelta(days=1)
        return day.strftime("%y%m%d")
    ch = value[-1]
    bumped = str((int(ch) + 1) % 10) if ch.isdigit() else ("B" if ch == "A" else "A")
    return value[:-1] + bumped


# --------------------------------------------------------------------------
# keys: GTIN, SSCC
# --------------------------------------------------------------------------


def gtin_check_digit(body: str) -> str:
    """GS1 mod-10 check digit (weights 3,1,3,... from the right) for any key body."""
    if not body or not body.isdigit() or not body.isascii():
        raise GS1Error(f"check digit: body {body!r} must be a non-empty string of digits")
    return _gsd.check_digit(body)


def normalize_gtin(gtin: str) -> str:
    """GTIN-8/12/13/14 to the 14 digits that AI (01) and EPC conversions need."""
    if not isinstance(gtin, str) or not gtin.isdigit() or not gtin.isascii():
        raise GS1Error(f"GTIN {gtin!r} must consist of digits only", "01")
    if len(gtin) not in (8, 12, 13, 14):
        raise GS1Error(f"GTIN {gtin!r} has {len(gtin)} digits, expected 8, 12, 13 or 14", "01")
    g = gtin.zfill(14)
    expected = gtin_check_digit(g[:-1])
    if g[-1] != expected:
        raise GS1Error(f"AI (01): check digit is {g[-1]}, expected {expected}", "01")
    return g


def is_valid_gtin(gtin: str) -> bool:
    try:
        normalize_gtin(gtin)
    except GS1Error:
        return False
    return True


def make_sscc(extension: int | str, company_prefix: str, serial_ref: int | str) -> str:
    """SSCC for a new case/pallet; refuses rather than truncates a serial reference."""
    ext = str(extension)
    if len(ext) != 1 or not ext.isdigit():
        raise GS1Error(f"SSCC extension digit must be a single digit 0-9, got {extension!r}", "00")
    if (
        not isinstance(company_prefix, str)
        or not (company_prefix.isdigit() and company_prefix.isascii())
        or not 6 <= len(company_prefix) <= 12
    ):
        raise GS1Error(f"GS1 company prefix {company_prefix!r} must be 6 to 12 digits", "00")
    room = 16 - len(company_prefix)
    if isinstance(serial_ref, int):
        if serial_ref < 0:
            raise GS1Error(f"SSCC serial reference must not be negative, got {serial_ref}", "00")
        ref = str(serial_ref)
    else:
        ref = serial_ref
        if not ref.isdigit() or not ref.isascii():
            raise GS1Error(f"SSCC serial reference {ref!r} must be digits", "00")
    if len(ref) > room:
        raise GS1Error(
            f"SSCC serial reference {ref} has {len(ref)} digits but only {room} fit after a "
            f"{len(company_prefix)}-digit company prefix",
            "00",
        )
    body = ext + company_prefix + ref.zfill(room)
    return body + gtin_check_digit(body)


def is_valid_sscc(s: str) -> bool:
    return (
        isinstance(s, str) and len(s) == 18 and s.isdigit() and s.isascii()
        and gtin_check_digit(s[:-1]) == s[-1]
    )


def _require_sscc(sscc: str) -> str:
    if not isinstance(sscc, str) or len(sscc) != 18 or not sscc.isdigit():
        raise GS1Error(f"SSCC {sscc!r} must be 18 digits", "00")
    _check_value("00", sscc)
    return sscc


# --------------------------------------------------------------------------
# EPC URNs and Digital Link
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """What a code identifies, independent of how it was written (scan, URN, DL)."""

    kind: Literal["sgtin", "sscc"]
    gtin: str | None
    serial: str | None
    sscc: str | None
    lot: str | None = None
    expiry: str | None = None
    #: the other batch dates the code carries, by batch attribute name (BATCH_SOURCES): (production_date, YYMMDD) ...
    dates: tuple[tuple[str, str], ...] = ()


def _company_prefix_len(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 6 <= n <= 12:
        raise GS1Error(f"GS1 company prefix length must be 6 to 12 (EPC TDS), got {n!r}")
    return n


def _epc_escape(serial: str) -> str:
    return "".join(_EPC_ESCAPE.get(c, c) for c in serial)


def _epc_unescape(component: str) -> str:
    out, i = [], 0
    while i < len(component):
        ch = component[i]
        if ch == "%":
            hx = component[i + 1 : i + 3]
            if len(hx) != 2 or not all(c in "0123456789abcdefABCDEF" for c in hx):
                raise GS1Error(f"EPC URI: malformed escape {component[i:i + 3]!r} in serial", "21")
            out.append(chr(int(hx, 16)))
            i += 3
            continue
        if ch in _EPC_ESCAPE:
            raise GS1Error(f"EPC URI: character {ch!r} in serial must be escaped as {_EPC_ESCAPE[ch]}", "21")
        out.append(ch)
        i += 1
    return "".join(out)


def sgtin_urn(gtin: str, serial: str, company_prefix_len: int) -> str:
    """EPC pure identity for EPCIS; the prefix length is per-product master data."""
    g = normalize_gtin(gtin)
    cpl = _company_prefix_len(company_prefix_len)
    _check_value("21", serial)
    return f"urn:epc:id:sgtin:{g[1:1 + cpl]}.{g[0]}{g[1 + cpl:13]}.{_epc_escape(serial)}"


def sscc_urn(sscc: str, company_prefix_len: int) -> str:
    s = _require_sscc(sscc)
    cpl = _company_prefix_len(company_prefix_len)
    return f"urn:epc:id:sscc:{s[1:1 + cpl]}.{s[0]}{s[1 + cpl:17]}"


def _dl_base(base: str) -> str:
    if not isinstance(base, str) or not base.lower().startswith(("http://", "https://")):
        raise GS1Error(f"Digital Link base must be an http(s) URI, got {base!r}")
    base = base.rstrip("/")
    if not urlsplit(base).netloc:
        raise GS1Error(f"Digital Link base {base!r} has no host")
    return base


def _dl_quote(value: str) -> str:
    # Everything but RFC 3986 unreserved is escaped, as the GS1 Syntax Engine does.
    return quote(value, safe="")


def digital_link(
    gtin: str,
    serial: str | None = None,
    *,
    lot: str | None = None,
    expiry: str | dt.date | None = None,
    base: str = "https://id.gs1.org",
) -> str:
    """GS1 Digital Link URI: key qualifiers 10, 21 in the path, expiry in the query."""
    b = _dl_base(base)
    pairs: list[tuple[str, str]] = [("01", normalize_gtin(gtin))]
    if lot is not None:
        pairs.append(("10", lot))
    if serial is not None:
        pairs.append(("21", serial))
    if expiry is not None:
        pairs.append(("17", _yymmdd(expiry)))
    _validate(pairs)
    path = "".join(f"/{ai}/{_dl_quote(v)}" for ai, v in pairs if ai != "17")
    query = f"?17={_dl_quote(_yymmdd(expiry))}" if expiry is not None else ""
    return b + path + query


def sscc_digital_link(sscc: str, base: str = "https://id.gs1.org") -> str:
    return f"{_dl_base(base)}/00/{_require_sscc(sscc)}"


# Convenience alphas of Digital Link 1.1 (deprecated later, still seen on old packs).
_DL_ALIASES = {"gtin": "01", "sscc": "00", "cpv": "22", "lot": "10", "ser": "21"}


def _dl_path_ok(qualifiers: list[str], sequences: tuple[tuple[str, ...], ...]) -> bool:
    """Qualifiers must follow one alternative's order, without mixing alternatives."""
    for seq in sequences:
        idx = -1
        for q in qualifiers:
            if q not in seq or seq.index(q) <= idx:
                break
            idx = seq.index(q)
        else:
            return True
    return False


def _parse_digital_link(uri: str) -> list[tuple[str, str]]:
    """GS1 Digital Link URI to AI/value pairs, keys and qualifiers by the dictionary's ``dlpkey``."""
    parts = urlsplit(uri)
    # Lower or upper case scheme only, and a plain host: as the GS1 Syntax Engine.
    scheme = uri.split(":", 1)[0]  # urlsplit lower-cases it
    if scheme not in ("http", "https", "HTTP", "HTTPS") or not parts.netloc or "%" in parts.netloc:
        raise GS1Error(f"Digital Link: {uri!r} is not an http(s) URI with a host")
    segs = parts.path.split("/")[1:]
    if segs and segs[-1] == "":
        segs = segs[:-1]

    def key(seg: str) -> str:
        return _DL_ALIASES.get(seg, seg)

    def is_ai(seg: str) -> bool:
        k = key(seg)
        return k.isdigit() and k.isascii() and _entry(k) is not None

    # Walk back from the end in AI/value pairs to the rightmost primary key,
    # like the GS1 Syntax Engine, so any path prefix on a custom domain is allowed.
    j = len(segs) - 2
    root = None
    while j >= 0 and is_ai(segs[j]):
        entry = _entry(key(segs[j]))
        if entry is not None and entry.dlpkey is not None:
            root = j
            break
        j -= 2
    if root is None:
        raise GS1Error("Digital Link: no GS1 primary key (such as (01) or (00)) found in the path")
    pk = key(segs[root])
    pk_entry = _entry(pk)
    assert pk_entry is not None and pk_entry.dlpkey is not None
    sequences = pk_entry.dlpkey
    allowed = {q for seq in sequences for q in seq}  # qualifiers of any alternative
    pairs: list[tuple[str, str]] = []
    qualifiers: list[str] = []
    for i in range(root, len(segs), 2):
        ai, raw = key(segs[i]), segs[i + 1]
        try:
            value = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise GS1Error(f"Digital Link: AI ({ai}) value {raw!r} is not valid percent-encoded UTF-8", ai) from None
        if value == "":
            raise GS1Error(f"Digital Link: AI ({ai}) has an empty value", ai)
        if i > root:
            if ai not in allowed:
                raise GS1Error(f"Digital Link: AI ({ai}) is not a key qualifier of AI ({pk})", ai)
            qualifiers.append(ai)
            if not _dl_path_ok(qualifiers, sequences):
                expected = " | ".join(", ".join(seq) for seq in sequences)
                raise GS1Error(
                    f"Digital Link: qualifier AI ({ai}) is out of order; expected order {expected} after AI ({pk})",
                    ai,
                )
        if ai == "01" and value.isdigit() and len(value) in (8, 12, 13):
            value = value.zfill(14)
        pairs.append((ai, value))
    # A qualifier of the key's chosen sequence belongs in the path; another key
    # (e.g. ?01= after /8004/) or the qualifier of an unused alternative
    # (?10= after /01/../235/..) is an ordinary data attribute.
    in_path = {q for seq in sequences if _dl_path_ok(qualifiers, (seq,)) for q in seq}
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        k = key(k)
        if not k.isdigit():
            continue  # linkType, context etc. are not GS1 data
        entry = _entry(k)
        if entry is None:
            raise GS1Error(f"Digital Link: unknown AI ({k}) in query string", k)
        if k == pk or k in in_path:
            raise GS1Error(f"Digital Link: AI ({k}) is a key or key qualifier and belongs in the path", k)
        if not entry.dl_data_attribute:
            raise GS1Error(f"Digital Link: AI ({k}) is not permitted as a data attribute in the query string", k)
        if v == "":
            raise GS1Error(f"Digital Link: AI ({k}) has an empty value in the query string", k)
        pairs.append((k, v))
    _validate(pairs)
    return pairs


def _identity_from_pairs(pairs: Iterable[tuple[str, str]]) -> Identity:
    d = dict(pairs)
    if "00" in d:
        if "21" in d:
            raise GS1Error("ambiguous identity: both SSCC AI (00) and serial AI (21) present", "00")
        return Identity(kind="sscc", gtin=None, serial=None, sscc=d["00"])
    if "01" in d:
        if "21" not in d:
            raise GS1Error("AI (01) without AI (21): a GTIN alone names a product, not a unit", "21")
        dates = tuple((BATCH_SOURCES[ai], d[ai]) for ai in DATE_AIS if ai != "17" and ai in d)
        return Identity(kind="sgtin", gtin=d["01"], serial=d["21"], sscc=None,
                        lot=d.get("10"), expiry=d.get("17"), dates=dates)
    raise GS1Error("no identity: neither SSCC AI (00) nor GTIN AI (01) with serial AI (21) present")


def parse_uri(uri: str) -> Identity:
    """EPC pure identity URN (sgtin, sscc) or GS1 Digital Link on any host."""
    if not isinstance(uri, str):
        raise GS1Error(f"URI must be a string, got {type(uri).__name__}")
    low = uri.lower()
    if low.startswith("urn:epc:id:sgtin:"):
        body = uri[len("urn:epc:id:sgtin:"):]
        parts = body.split(".", 2)
        if len(parts) != 3:
            raise GS1Error(f"EPC URI {uri!r}: expected CompanyPrefix.IndicatorItemRef.Serial")
        cp, item, serial_raw = parts
        if not (cp.isdigit() and item.isdigit() and cp.isascii() and item.isascii()):
            raise GS1Error(f"EPC URI {uri!r}: company prefix and item reference must be digits")
        if not 6 <= len(cp) <= 12:
            raise GS1Error(f"EPC URI {uri!r}: company prefix has {len(cp)} digits, expected 6 to 12")
        if len(cp) + len(item) != 13:
            raise GS1Error(
                f"EPC URI {uri!r}: company prefix + indicator/item reference have "
                f"{len(cp) + len(item)} digits, expected 13"
            )
        serial = _epc_unescape(serial_raw)
        _check_value("21", serial)
        body13 = item[0] + cp + item[1:]
        return Identity(kind="sgtin", gtin=body13 + gtin_check_digit(body13), serial=serial, sscc=None)
    if low.startswith("urn:epc:id:sscc:"):
        parts = uri[len("urn:epc:id:sscc:"):].split(".")
        if len(parts) != 2 or not all(p.isdigit() and p.isascii() for p in parts):
            raise GS1Error(f"EPC URI {uri!r}: expected CompanyPrefix.ExtensionSerialRef, digits only")
        cp, ref = parts
        if not 6 <= len(cp) <= 12:
            raise GS1Error(f"EPC URI {uri!r}: company prefix has {len(cp)} digits, expected 6 to 12")
        if len(cp) + len(ref) != 17:
            raise GS1Error(
                f"EPC URI {uri!r}: company prefix + extension/serial reference have "
                f"{len(cp) + len(ref)} digits, expected 17"
            )
        body17 = ref[0] + cp + ref[1:]
        return Identity(kind="sscc", gtin=None, serial=None, sscc=body17 + gtin_check_digit(body17))
    if low.startswith("urn:epc:id:"):
        scheme = uri.split(":")[3]
        raise GS1Error(f"unsupported EPC scheme {scheme!r}: only sgtin and sscc identify line items")
    if low.startswith(("http://", "https://")):
        return _identity_from_pairs(_parse_digital_link(uri))
    raise GS1Error(f"not an EPC URN or GS1 Digital Link URI: {uri[:40]!r}")


def identify(code: str | bytes, *, require_gs1: bool = False, allow_dmre: bool = False) -> Identity:
    """Whatever arrives (scan, HRI, URN, Digital Link, from a QR too) -> its identity."""
    text = _decode_input(code)
    symbology, body = _split_symbology(text)
    if body.lower().startswith(("http://", "https://", "urn:epc:")):
        if require_gs1:
            raise GS1Error(f"not GS1 DataMatrix: a URI was read (symbology {symbology or 'not reported'})")
        return parse_uri(body)
    return _identity_from_pairs(parse(text, require_gs1=require_gs1, allow_dmre=allow_dmre).ais)


# --------------------------------------------------------------------------
# rendering (zxing-cpp writer, zint inside)
# --------------------------------------------------------------------------


def _zx_hri(ais: Iterable[tuple[str, str]]) -> str:
    # zint's bracketed-AI input treats '(' and ')' in data as delimiters unless escaped.
    return "".join(f"({ai})" + v.replace("(", "\\(").replace(")", "\\)") for ai, v in ais)


def _to_array(barcode: object, module_px: int, quiet_zone: int) -> numpy.ndarray:
    import numpy as np

    if module_px < 1 or quiet_zone < 0:
        raise ValueError("module_px must be >= 1 and quiet_zone >= 0")
    img = np.asarray(barcode.to_image(scale=module_px, add_quiet_zones=False))  # type: ignore[attr-defined]
    # np.pad copies, so the result owns its memory independent of zxing's Image.
    return np.pad(img, quiet_zone * module_px, constant_values=255)


def render_datamatrix(
    code: ParsedCode,
    module_px: int = 6,
    quiet_zone: int = 2,
    *,
    square: bool = True,
    validate: bool = True,
) -> numpy.ndarray:
    """Grayscale uint8 image of a GS1 DataMatrix (FNC1 first) for printer simulators.

    ``quiet_zone`` is in modules.  zxing-cpp's GS1 writer does not check check
    digits, dates or set 82, so the code is re-validated unless a simulator
    deliberately wants to print a bad code (``validate=False``).
    """
    import zxingcpp

    if validate:
        _validate(list(code.ais))
    try:
        barcode = zxingcpp.create_barcode(
            _zx_hri(_canonical(code.ais)), zxingcpp.BarcodeFormat.DataMatrix, gs1=True, forceSquare=square
        )
    except ValueError as exc:
        raise GS1Error(f"zxing-cpp refused to encode the code: {exc}") from None
    # zxing-cpp ignores unknown options silently; make sure GS1 mode really took.
    if barcode.symbology_identifier != SYMBOLOGY_GS1_DM:
        raise RuntimeError(f"zxing-cpp produced {barcode.symbology_identifier}, not GS1 DataMatrix")
    return _to_array(barcode, module_px, quiet_zone)


def render_plain_datamatrix(
    text: str | bytes, module_px: int = 6, quiet_zone: int = 2, *, square: bool = True
) -> numpy.ndarray:
    """A non-GS1 DataMatrix (``]d1``), the classic misconfigured-printer failure."""
    import zxingcpp

    barcode = zxingcpp.create_barcode(text, zxingcpp.BarcodeFormat.DataMatrix, forceSquare=square)
    if barcode.symbology_identifier != SYMBOLOGY_DM:
        raise RuntimeError(f"zxing-cpp produced {barcode.symbology_identifier}, not plain DataMatrix")
    return _to_array(barcode, module_px, quiet_zone)
