"""GS1 identity layer: the one place where linectl decides whether a code is right.

Everything that reaches the line (a camera read, an HRI string typed by an
operator, an EPC URN from L3, a Digital Link from a QR code) is turned into the
same validated form here, so that the print-and-verify cycle, the serial pool
and the EPCIS layer never have to re-interpret GS1 syntax themselves.

Library use, and why (details in docs_gs1.md):

* biip supplies the AI table (formats, which AIs need a separator) and is the
  last safety net on every value (its per-AI regex and date parser).  It does
  not raise on bad check digits, does not check duplicates, pairings, the
  symbology identifier or a leading GS, and its error messages do not say what
  is wrong, so the checks that produce a reason are done here first.
* epcpy is *not* used at run time: it silently recomputes a wrong GTIN check
  digit, does not escape serials itself and leaves unknown %-escapes undecoded.
  The EPC pure-identity URIs are built and parsed here (TDS Table A-1 escapes)
  and epcpy only serves as an independent oracle in the tests.
* zxing-cpp (writer backed by zint) renders GS1 DataMatrix for simulators.  Its
  GS1 mode does not check check digits, dates or character set 82, so only
  validated codes are rendered by default.
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

from biip import ParseError as _BiipParseError
from biip.checksums import gs1_standard_check_digit as _biip_check_digit
from biip.gs1_application_identifiers import GS1ApplicationIdentifier
from biip.gs1_element_strings import GS1ElementString

if TYPE_CHECKING:
    import numpy

__all__ = [
    "CSET82",
    "GS",
    "SYMBOLOGY_DM",
    "SYMBOLOGY_GS1_DM",
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
    "normalize_gtin",
    "parse",
    "parse_uri",
    "render_datamatrix",
    "render_plain_datamatrix",
    "sgtin_urn",
    "sscc_digital_link",
    "sscc_urn",
]

SYMBOLOGY_GS1_DM = "]d2"
SYMBOLOGY_DM = "]d1"
GS = "\x1d"

#: GS1 AI encodable character set 82 (GS1 General Specifications fig. 7.11-1).
CSET82 = frozenset(
    "!\"%&'()*+,-./0123456789:;<=>?ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
)
#: Character set 39 (AI 8010 and friends).
CSET39 = frozenset("#-/0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
#: Character set 64 (AI 8030 digital signature), base64url plus padding.
CSET64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")
_DIGITS = frozenset("0123456789")
_CHARSETS = {"N": _DIGITS, "X": CSET82, "Y": CSET39, "Z": CSET64}
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
# AI table (from biip) and per-AI rules (from the GS1 Syntax Dictionary)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Component:
    kind: str  # N, X, Y or Z
    min_len: int
    max_len: int
    optional: bool


@dataclass(frozen=True)
class _AISpec:
    ai: str
    title: str
    format: str
    predefined_fixed: bool  # in the GS1 table of predefined lengths: no FNC1 needed
    components: tuple[_Component, ...] | None  # None: format too irregular, biip regex only
    needs_biip: bool  # our checks do not cover everything biip's regex/date parser knows

    @property
    def min_len(self) -> int:
        return sum(c.min_len for c in self.components or () if not c.optional)

    @property
    def max_len(self) -> int | None:
        if self.components is None:
            return None
        return sum(c.max_len for c in self.components)

    @property
    def fixed_len(self) -> int | None:
        if self.components is None or any(
            c.optional or c.min_len != c.max_len for c in self.components
        ):
            return None
        return self.max_len


_COMPONENT_RE = re.compile(r"(\[)?\+([NXYZ])(\.\.)?(\d+)(\])?")


def _components(fmt: str) -> tuple[_Component, ...] | None:
    m = re.match(r"N\d", fmt)
    if not m:
        return None
    pos, out = m.end(), []
    while pos < len(fmt):
        c = _COMPONENT_RE.match(fmt, pos)
        if c is None or bool(c.group(1)) != bool(c.group(5)):
            return None
        n = int(c.group(4))
        out.append(_Component(c.group(2), 1 if c.group(3) else n, n, bool(c.group(1))))
        pos = c.end()
    # A variable component anywhere but last would make the split ambiguous.
    if any(c.min_len != c.max_len for c in out[:-1]):
        return None
    return tuple(out)


@lru_cache(maxsize=None)
def _spec(ai: str) -> _AISpec | None:
    """Look up an AI in biip's bundled table, None if it is not a known AI."""
    try:
        entry = GS1ApplicationIdentifier.extract(ai)
    except _BiipParseError:
        return None
    if entry.ai != ai:
        return None
    comps = _components(entry.format)
    return _AISpec(
        ai=entry.ai,
        title=entry.data_title,
        format=entry.format,
        predefined_fixed=not entry.separator_required,
        components=comps,
        needs_biip=not _fully_checked_here(entry.ai, entry.pattern, comps),
    )


_SIMPLE_PATTERNS = {"N": r"\d", "X": r"[!%-?A-Z_a-z\x22]"}


def _fully_checked_here(ai: str, pattern: str, comps: tuple[_Component, ...] | None) -> bool:
    """True when biip's regex for the AI says no more than our own checks.

    Skipping biip there keeps a full parse near 30 us instead of 130 us; for
    every irregular AI (extra constraints in biip's regex) biip still runs.
    """
    if comps is None or len(comps) != 1 or comps[0].kind not in _SIMPLE_PATTERNS:
        return False
    c = comps[0]
    if ai in _DATES:
        return ai in ("11", "12", "13", "15", "16", "17")  # date logic fully done here
    rep = f"{{{c.max_len}}}" if c.min_len == c.max_len else f"{{{c.min_len},{c.max_len}}}"
    return pattern == f"^{ai}({_SIMPLE_PATTERNS[c.kind]}{rep})$"


def _ai_at(s: str, pos: int) -> str | None:
    for n in (2, 3, 4):
        cand = s[pos : pos + n]
        if len(cand) == n and cand.isdigit() and cand.isascii() and _spec(cand):
            return cand
    return None


# Check digit position (start, length of the digits incl. check digit) per AI.
_CSUM: dict[str, tuple[int, int]] = {
    "00": (0, 18),
    "01": (0, 14),
    "02": (0, 14),
    "03": (0, 14),
    "253": (0, 13),
    "255": (0, 13),
    "402": (0, 17),
    "8003": (1, 13),
    "8006": (0, 14),
    "8017": (0, 18),
    "8018": (0, 18),
    "8026": (0, 14),
    **{f"41{i}": (0, 13) for i in range(8)},
}

# Date fields: AI -> ((offset, day 00 allowed), ...).  yymmd0 vs yymmdd as in
# the GS1 Syntax Dictionary; biip lets DD=00 through for every date AI.
_DATES: dict[str, tuple[tuple[int, bool], ...]] = {
    "11": ((0, True),),
    "12": ((0, True),),
    "13": ((0, True),),
    "15": ((0, True),),
    "16": ((0, True),),
    "17": ((0, True),),
    "4324": ((0, True),),
    "4325": ((0, True),),
    "4326": ((0, False),),
    "7003": ((0, False),),
    "7006": ((0, False),),
    "7007": ((0, False), (6, False)),
    "7011": ((0, False),),
    "8008": ((0, False),),
}

# Mandatory associations ("req", each tuple: one of) and invalid pairs ("ex"),
# transcribed from the GS1 Syntax Dictionary for the AIs a packaging line meets.
_TRADE = ("01", "02", "8006", "8026")
_REQ: dict[str, tuple[tuple[str, ...], ...]] = {
    "02": (("37",),),
    **{ai: (_TRADE,) for ai in ("10", "11", "13", "15", "16", "20", "240", "241", "242", "422", "7001")},
    "12": (("8020",),),
    "17": (("01", "02", "255", "8006", "8026"),),
    "21": (("01", "8006"),),
    **{ai: (("01",),) for ai in ("22", "235", "243", "8001", "8200", "710", "711", "712", "713", "714", "715")},
    "250": (("01", "8006"), ("21",)),
    "251": (("01", "8006"),),
    "254": (("414",),),
    "30": (("01", "02"),),
    "37": (("00",), ("02", "8026")),
    "403": (("00",),),
    "415": (("8020",),),
    **{ai: (("01", "02"),) for ai in ("423", "424", "425", "426", "7002", "7003", "7005", "7006",
                                      "7007", "7008", "7009", "7010", "7011", "8005", "8008")},
    "427": (("01", "02"), ("422",)),
    "7004": (("01",), ("10",)),
    "7020": (("01", "8006"), ("416",)),
    "7021": (("01", "8006"),),
    "7022": (("7021",),),
    "7240": (("01", "8006"),),
    "8007": (("415",),),
    "8009": (("00", "01"),),
    "8011": (("8010",),),
    "8012": (("01", "8006"),),
    "8019": (("8017", "8018"),),
    "8020": (("415",),),
    "8026": (("37",),),
    "8111": (("255",),),
    **{f"43{i:02d}": (("00",),) for i in range(27) if i not in (3, 13)},
    "4303": (("4302",),),
    "4313": (("4312",),),
}
_EX: dict[str, tuple[str, ...]] = {
    "01": ("02", "255", "37"),
    "21": ("235",),
    "255": ("01", "02", "415", "8006", "8020", "8026"),
    "420": ("421",),
    "421": ("4307",),
    **{ai: ("426",) for ai in ("422", "423", "424", "425")},
    "4330": ("4331",),
    "4331": ("4330",),
    "4332": ("4333",),
    "4333": ("4332",),
    "8006": ("01", "37"),
    "8017": ("8018",),
    "8018": ("8017",),
    "8026": ("02", "8006"),
}
# Measures 31nn-36nn: which key they need (by 3-digit prefix).
_MEASURE_LOGISTIC = {"330", "331", "332", "333", "334", "335", "336", "340", "341", "342",
                     "343", "344", "345", "346", "347", "348", "349", "353", "354", "355",
                     "362", "363", "367", "368", "369"}


def _requirements(ai: str) -> tuple[tuple[str, ...], ...]:
    if ai in _REQ:
        return _REQ[ai]
    if len(ai) == 4 and ai[:2] in ("31", "32", "33", "34", "35", "36"):
        if ai[:3] == "337":
            return (("01",),)
        return (("00", "01"),) if ai[:3] in _MEASURE_LOGISTIC else (("01", "02"),)
    return ()


# --------------------------------------------------------------------------
# value checks
# --------------------------------------------------------------------------


def _century_year(yy: int, today: dt.date | None = None) -> int:
    """Full year for a YY field, sliding window of GS1 General Specifications 7.12."""
    current = (today or dt.date.today()).year
    century, cur_yy = current - current % 100, current % 100
    diff = yy - cur_yy
    if 51 <= diff <= 99:
        return century - 100 + yy
    if -99 <= diff <= -50:
        return century + 100 + yy
    return century + yy


def _resolve_date(value: str, *, last_day: bool = True) -> dt.date:
    """YYMMDD to a date; DD=00 means the whole month (its last or first day)."""
    year = _century_year(int(value[0:2]))
    month, day = int(value[2:4]), int(value[4:6])
    if day == 0:
        day = calendar.monthrange(year, month)[1] if last_day else 1
    return dt.date(year, month, day)


def _check_date(ai: str, value: str, allow_day_zero: bool) -> None:
    if len(value) < 6 or not value[:6].isdigit():
        return  # length/charset errors are reported elsewhere
    yy, mm, dd = int(value[0:2]), int(value[2:4]), int(value[4:6])
    if not 1 <= mm <= 12:
        raise GS1Error(f"AI ({ai}): invalid date {value[:6]!r}: month {mm:02d} does not exist", ai)
    year = _century_year(yy)
    if dd == 0:
        if not allow_day_zero:
            raise GS1Error(f"AI ({ai}): invalid date {value[:6]!r}: day 00 is not allowed for this AI", ai)
        return
    last = calendar.monthrange(year, mm)[1]
    if dd > last:
        raise GS1Error(
            f"AI ({ai}): invalid date {value[:6]!r}: day {dd:02d} does not exist in "
            f"{calendar.month_name[mm]} {year} (last day is {last})",
            ai,
        )


def _describe_char(ch: str) -> str:
    if ch == " ":
        return "' ' (space)"
    if ch == GS:
        return "GS (0x1D)"
    return repr(ch) if ch.isascii() else f"{ch!r} (U+{ord(ch):04X})"


def _check_value(ai: str, value: str, *, element_string: bool = False) -> None:
    """Raise GS1Error with a precise reason if ``value`` is not valid for ``ai``.

    Our own checks run first because they can name the problem; biip's regex
    and date parser run last so that nothing it knows about slips through.
    """
    spec = _spec(ai)
    if spec is None:
        raise GS1Error(f"unknown AI ({ai})", ai)
    if value == "":
        raise GS1Error(f"AI ({ai}): empty value", ai)
    comps = spec.components
    if comps is not None:
        unit = "digits" if value.isdigit() and all(c.kind == "N" for c in comps) else "characters"
        fixed, max_len = spec.fixed_len, spec.max_len
        if fixed is not None and len(value) != fixed:
            raise GS1Error(f"AI ({ai}): value {value!r} has {len(value)} {unit}, expected {fixed}", ai)
        if max_len is not None and len(value) > max_len:
            hint = " (missing GS separator?)" if element_string and fixed is None else ""
            raise GS1Error(
                f"AI ({ai}): value {value!r} has {len(value)} {unit}, maximum is {max_len}{hint}", ai
            )
        if len(value) < spec.min_len:
            raise GS1Error(
                f"AI ({ai}): value {value!r} has {len(value)} {unit}, minimum is {spec.min_len}", ai
            )
        pos = 0
        for comp in comps:
            part = value[pos : pos + comp.max_len]
            allowed = _CHARSETS[comp.kind]
            for i, ch in enumerate(part):
                if ch not in allowed:
                    raise GS1Error(
                        f"AI ({ai}): character {_describe_char(ch)} at position {pos + i + 1} "
                        f"is not {_CHARSET_NAMES[comp.kind]}",
                        ai,
                    )
            pos += len(part)
    if ai in _CSUM:
        start, n = _CSUM[ai]
        digits = value[start : start + n]
        if len(digits) == n and digits.isdigit():
            expected = _biip_check_digit(digits[:-1])
            if int(digits[-1]) != expected:
                raise GS1Error(f"AI ({ai}): check digit is {digits[-1]}, expected {expected}", ai)
    for offset, zero_ok in _DATES.get(ai, ()):
        if len(value) >= offset + 6:
            _check_date(ai, value[offset : offset + 6], zero_ok)
    if not spec.needs_biip:
        return
    try:
        GS1ElementString.parse(ai + value)
    except _BiipParseError as exc:
        raise GS1Error(f"AI ({ai}): value {value!r} does not match format {spec.format} ({exc})", ai) from None


def _check_message(pairs: list[tuple[str, str]]) -> None:
    """Rules that need the whole message: duplicates, pairings, date order."""
    seen: dict[str, str] = {}
    for ai, value in pairs:
        if ai in seen:
            if seen[ai] == value:
                raise GS1Error(f"AI ({ai}) appears twice (same value {value!r})", ai)
            raise GS1Error(f"AI ({ai}) appears twice with different values {seen[ai]!r} and {value!r}", ai)
        seen[ai] = value
    present = set(seen)
    for ai, _ in pairs:
        for other in _EX.get(ai, ()):
            if other in present:
                raise GS1Error(f"AI ({ai}) and AI ({other}) must not appear together", ai)
        if ai[:2] in ("31", "32", "33", "34", "35", "36") and len(ai) == 4:
            clash = [o for o in present if o != ai and o[:3] == ai[:3]]
            if clash:
                raise GS1Error(f"AI ({ai}) and AI ({clash[0]}) must not appear together", ai)
        for alternatives in _requirements(ai):
            if not present.intersection(alternatives):
                need = " or ".join(f"AI ({a})" for a in alternatives)
                raise GS1Error(f"AI ({ai}) requires {need} in the same code", ai)
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
    is_fixed = [bool((s := _spec(ai)) and s.predefined_fixed) for ai, _ in ais]
    return [p for p, f in zip(ais, is_fixed) if f] + [p for p, f in zip(ais, is_fixed) if not f]


@dataclass(frozen=True)
class ParsedCode:
    """A validated GS1 message; the common currency of printer, camera and pool."""

    symbology: str | None
    ais: tuple[tuple[str, str], ...]

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
            spec = _spec(ai)
            if i < len(ordered) - 1 and not (spec and spec.predefined_fixed):
                parts.append(GS)
        return "".join(parts)

    @property
    def scan_string(self) -> str:
        """What a reader with symbology identifiers on would transmit."""
        return (self.symbology or "") + self.element_string


# --------------------------------------------------------------------------
# parse
# --------------------------------------------------------------------------

_SYMBOLOGY_RE = re.compile(r"\][A-Za-z][0-9A-Za-z]")
_HRI_MARK_RE = re.compile(r"\((\d{2,4})\)")


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


def _next_hri_mark(body: str, start: int) -> int:
    """Position of the next '(AI)' with a known AI; values may contain '(' themselves."""
    for m in _HRI_MARK_RE.finditer(body, start):
        if _spec(m.group(1)):
            return m.start()
    return len(body)


def _tokenize_hri(body: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(body):
        m = _HRI_MARK_RE.match(body, pos)
        if m is None:
            raise GS1Error(f"HRI: expected '(AI)' at position {pos}, found {body[pos:pos + 8]!r}")
        ai = m.group(1)
        spec = _spec(ai)
        if spec is None:
            raise GS1Error(f"unknown AI ({ai}) at position {pos}", ai)
        end = _next_hri_mark(body, m.end())
        value = body[m.end() : end]
        if GS in value:
            raise GS1Error(f"AI ({ai}): GS separator inside HRI text", ai)
        fixed = spec.fixed_len if spec.predefined_fixed else None
        if fixed is not None and len(value) > fixed and value[:fixed].isdigit():
            extra = value[fixed:]
            unknown = _HRI_MARK_RE.match(extra)
            if unknown:
                raise GS1Error(f"unknown AI ({unknown.group(1)}) after AI ({ai})", unknown.group(1))
            if end == len(body):
                raise GS1Error(f"trailing garbage {extra!r} after AI ({ai})", ai)
        out.append((ai, value))
        pos = end
    return out


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
        spec = _spec(ai)
        assert spec is not None
        start = pos + len(ai)
        if spec.predefined_fixed and spec.fixed_len is not None:
            end = start + spec.fixed_len
            value = body[start:end]
            if GS in value:
                cut = value.index(GS)
                raise GS1Error(
                    f"AI ({ai}): value {value[:cut]!r} has {cut} characters before GS, expected {spec.fixed_len}",
                    ai,
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


def parse(raw: str | bytes, *, require_gs1: bool = False) -> ParsedCode:
    """Parse and fully validate one scan, HRI string or element string.

    ``require_gs1`` is for verification: a code whose data is right but whose
    symbol is a plain DataMatrix (``]d1``) or carries no symbology identifier
    cannot be proven to be GS1 DataMatrix and is rejected.
    """
    text = _decode_input(raw)
    symbology, body = _split_symbology(text)
    if require_gs1 and symbology != SYMBOLOGY_GS1_DM:
        if body.startswith(GS):
            raise GS1Error(
                "GS in first position, printer sent literal GS instead of FNC1 "
                f"(symbology {symbology or 'not reported'})"
            )
        if symbology is None:
            raise GS1Error("not GS1 DataMatrix: no symbology identifier in the data (enable ]d2 on the reader)")
        raise GS1Error(f"not GS1 DataMatrix: symbology {symbology}")
    if body == "":
        raise GS1Error("empty code: no data" + (f" after symbology {symbology}" if symbology else ""))
    if body.startswith(GS):
        raise GS1Error("GS in first position, printer sent literal GS instead of FNC1")
    low = body[:8].lower()
    if low.startswith(("http://", "https://", "urn:")):
        raise GS1Error("input is a URI, not a GS1 element string: use parse_uri() or identify()")
    if body.startswith("("):
        pairs = _tokenize_hri(body)
        _validate(pairs)
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
        if _spec(ai) is None:
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
# keys: GTIN, SSCC
# --------------------------------------------------------------------------


def gtin_check_digit(body: str) -> str:
    """GS1 mod-10 check digit (weights 3,1,3,... from the right) for any key body."""
    if not body or not body.isdigit() or not body.isascii():
        raise GS1Error(f"check digit: body {body!r} must be a non-empty string of digits")
    return str(_biip_check_digit(body))


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
_DL_QUALIFIERS = {"01": ("22", "10", "21"), "00": ()}


def _parse_digital_link(uri: str) -> list[tuple[str, str]]:
    parts = urlsplit(uri)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise GS1Error(f"Digital Link: {uri!r} is not an http(s) URI with a host")
    segs = parts.path.split("/")[1:]
    if segs and segs[-1] == "":
        segs = segs[:-1]

    def key(seg: str) -> str:
        return _DL_ALIASES.get(seg, seg)

    # Walk back from the end in AI/value pairs until the primary key, like the
    # GS1 Syntax Engine, so any path prefix on a custom domain is allowed.
    j = len(segs) - 2
    root = None
    while j >= 0:
        k = key(segs[j])
        if not (k.isdigit() and _spec(k)):
            break
        if k in _DL_QUALIFIERS:
            root = j
            break
        j -= 2
    if root is None:
        raise GS1Error("Digital Link: no GS1 primary key (01) or (00) found in the path")
    pk = key(segs[root])
    allowed = _DL_QUALIFIERS[pk]
    pairs: list[tuple[str, str]] = []
    last_idx = -1
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
            idx = allowed.index(ai)
            if idx <= last_idx:
                raise GS1Error(
                    f"Digital Link: qualifier AI ({ai}) is out of order; expected order "
                    + ", ".join(allowed) + f" after AI ({pk})",
                    ai,
                )
            last_idx = idx
        if ai == "01" and value.isdigit() and len(value) in (8, 12, 13):
            value = value.zfill(14)
        pairs.append((ai, value))
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        k = key(k)
        if not k.isdigit():
            continue  # linkType, context etc. are not GS1 data
        if _spec(k) is None:
            raise GS1Error(f"Digital Link: unknown AI ({k}) in query string", k)
        if k in _DL_QUALIFIERS or any(k in q for q in _DL_QUALIFIERS.values()):
            raise GS1Error(f"Digital Link: AI ({k}) is a key or key qualifier and belongs in the path", k)
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
        return Identity(kind="sgtin", gtin=d["01"], serial=d["21"], sscc=None,
                        lot=d.get("10"), expiry=d.get("17"))
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


def identify(code: str | bytes, *, require_gs1: bool = False) -> Identity:
    """Whatever arrives (scan, HRI, URN, Digital Link, from a QR too) -> its identity."""
    text = _decode_input(code)
    symbology, body = _split_symbology(text)
    if body.lower().startswith(("http://", "https://", "urn:epc:")):
        if require_gs1:
            raise GS1Error(f"not GS1 DataMatrix: a URI was read (symbology {symbology or 'not reported'})")
        return parse_uri(body)
    return _identity_from_pairs(parse(text, require_gs1=require_gs1).ais)


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
