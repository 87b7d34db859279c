"""EPC binary encodings of the GS1 EPC Tag Data Standard: SGTIN-96, SGTIN-198, SSCC-96.

The RFID label printer writes these bits into a tag's EPC bank and the RFID
reader stations turn what a reader reports back into the GTIN + serial or the
SSCC the rest of linectl speaks.  Pure functions, no I/O.

Why our own code and not epcpy (which the tests use as the independent oracle):
epcpy 0.1.8 encodes an SGTIN-96 serial with a leading zero (``0123`` comes back
as ``123``) and one above 2^38-1 (the EPC grows past 96 bits) without a word,
recomputes a wrong GTIN check digit instead of refusing it, refuses valid
serials where ``/ < > ?`` comes first or right after an escaped ``" % &``
(an empty exception), and decodes bits that
TDS says are invalid (characters after the 7-bit terminator, non-zero
reserved bits of an SSCC-96, trailing words).  A label printer must refuse all
of these with a reason, so the encoder is ours; README "RFID: EPC encodings".

Where the rules come from: TDS 1.13/2.x section 14 (coding tables 14-2, 14-5,
"Integer", "String" and "Partition Table" methods), section 15.1.1 (EPC bank:
PC word, padding to whole 16-bit words), Table A-1 (the URI form of
character set 82), section 10 (filter values).  URIs come from
:mod:`linectl.gs1`, so an EPC decoded here reads exactly like the EPC the
EPCIS layer writes for the same unit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, get_args

from linectl import gs1
from linectl.gs1_dictionary import CSET82

__all__ = [
    "SCHEMES",
    "SGTIN96_MAX_SERIAL",
    "SGTIN198_MAX_SERIAL_CHARS",
    "SGTIN_FILTER_VALUES",
    "SSCC_FILTER_VALUES",
    "EpcError",
    "EpcValue",
    "Scheme",
    "choose_scheme",
    "decode_epc",
    "encode_epc",
    "encode_sgtin96",
    "encode_sgtin198",
    "encode_sscc96",
    "make_epc",
    "parse_tag_uri",
    "pc_word",
    "pure_identity_uri",
    "tag_uri",
]

Scheme = Literal["sgtin-96", "sgtin-198", "sscc-96"]
SCHEMES: Final[tuple[Scheme, ...]] = get_args(Scheme)

#: The largest serial an SGTIN-96 holds (38 bits); TDS 14.5.1.1.
SGTIN96_MAX_SERIAL: Final = 2**38 - 1  # 274877906943
#: SGTIN-198: 140 bits of 7-bit characters.
SGTIN198_MAX_SERIAL_CHARS: Final = 20

#: TDS Table 10-1; reserved values may still be written (TDS's own examples use 3).
SGTIN_FILTER_VALUES: Final[dict[int, str]] = {
    0: "all others",
    1: "point of sale (POS) trade item",
    2: "full case for transport",
    3: "reserved",
    4: "inner pack trade item grouping for handling",
    5: "reserved",
    6: "unit load",
    7: "unit inside trade item or component not for individual sale",
}
#: TDS Table 10-2.
SSCC_FILTER_VALUES: Final[dict[int, str]] = {
    0: "all others", 1: "reserved", 2: "full case for transport", 3: "reserved",
    4: "reserved", 5: "reserved", 6: "unit load", 7: "reserved",
}

_HEADER: Final[dict[Scheme, int]] = {"sgtin-96": 0x30, "sgtin-198": 0x36, "sscc-96": 0x31}
_SCHEME_OF_HEADER: Final[dict[int, Scheme]] = {h: s for s, h in _HEADER.items()}
_BITS: Final[dict[Scheme, int]] = {"sgtin-96": 96, "sgtin-198": 198, "sscc-96": 96}
# Other TDS headers (Table 14-1), named in the refusal so a reader's report is recognisable.
_OTHER_HEADERS: Final[dict[int, str]] = {
    0x00: "unprogrammed tag", 0x2C: "gdti-96", 0x2D: "gsrn-96", 0x2E: "gsrnp-96", 0x2F: "usdod-96",
    0x32: "sgln-96", 0x33: "grai-96", 0x34: "giai-96", 0x35: "gid-96", 0x37: "grai-170", 0x38: "giai-202",
    0x39: "sgln-195", 0x3A: "gdti-113", 0x3B: "adi-var", 0x3C: "cpi-96", 0x3D: "cpi-var", 0x3E: "gdti-174",
    0x3F: "sgcn-96", 0x40: "itip-110", 0x41: "itip-212", 0xF7: "sgtin+ (TDS 2.0 +AIDC)",
}

# Partition tables: partition value -> (company prefix bits M, digits L, other field bits N, digits K).
# SGTIN: TDS Table 14-2 (other field = indicator + item reference); SSCC: Table 14-5 (extension + serial reference).
_Row = tuple[int, int, int, int]
_SGTIN_PARTITIONS: Final[dict[int, _Row]] = {
    0: (40, 12, 4, 1), 1: (37, 11, 7, 2), 2: (34, 10, 10, 3), 3: (30, 9, 14, 4),
    4: (27, 8, 17, 5), 5: (24, 7, 20, 6), 6: (20, 6, 24, 7),
}
_SSCC_PARTITIONS: Final[dict[int, _Row]] = {
    0: (40, 12, 18, 5), 1: (37, 11, 21, 6), 2: (34, 10, 24, 7), 3: (30, 9, 28, 8),
    4: (27, 8, 31, 9), 5: (24, 7, 34, 10), 6: (20, 6, 38, 11),
}
_SSCC_RESERVED_BITS: Final = 24
_SGTIN96_SERIAL_BITS: Final = 38
_SGTIN198_SERIAL_BITS: Final = 140

_TAG_URI = re.compile(r"urn:epc:tag:([a-z0-9-]+):(.*)", re.IGNORECASE)


class EpcError(ValueError):
    """A value an EPC scheme cannot hold, or bits that are no valid EPC; the message says which and why."""


@dataclass(frozen=True)
class EpcValue:
    """One EPC in every form the line needs: the tag's hex, the URIs, and the GS1 keys behind them."""

    scheme: Scheme
    filter_value: int
    company_prefix_length: int
    gtin: str | None
    sscc: str | None
    #: the GS1 AI (21) value, unescaped; None for an SSCC
    serial: str | None
    pure_uri: str
    tag_uri: str
    #: uppercase hex of the EPC bank from word 2 on: the EPC bits, zero-padded to whole 16-bit words
    #: (TDS Table 15-1): 24 digits for the 96-bit schemes, 52 for SGTIN-198
    epc_hex: str

    @property
    def pc_word(self) -> str:
        """The Protocol Control word a printer writes with the EPC (length in words, UMI off, toggle 0)."""
        return pc_word(self.epc_hex)


# --------------------------------------------------------------------------
# validation of inputs
# --------------------------------------------------------------------------


def _scheme(scheme: object) -> Scheme:
    for s in SCHEMES:
        if scheme == s:
            return s
    raise EpcError(f"EPC scheme {scheme!r} is not one linectl encodes: expected one of {', '.join(SCHEMES)}")


def _filter(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 7:
        raise EpcError(f"filter value must be an integer 0 to 7 (3 bits), got {value!r}")
    return value


def _cp_length(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 6 <= value <= 12:
        raise EpcError(f"GS1 company prefix length must be 6 to 12 digits (TDS partition tables), got {value!r}")
    return value


def _gtin14(gtin: object) -> str:
    if not isinstance(gtin, str):
        raise EpcError(f"GTIN must be a string of digits, got {type(gtin).__name__}")
    try:
        return gs1.normalize_gtin(gtin)
    except gs1.GS1Error as e:
        raise EpcError(str(e)) from None


def _sscc18(sscc: object) -> str:
    if not isinstance(sscc, str) or len(sscc) != 18 or not (sscc.isdigit() and sscc.isascii()):
        raise EpcError(f"SSCC {sscc!r} must be 18 digits")
    expected = gs1.gtin_check_digit(sscc[:17])
    if sscc[17] != expected:
        raise EpcError(f"SSCC {sscc}: check digit is {sscc[17]}, expected {expected}")
    return sscc


def _sgtin96_serial_problem(serial: str) -> str | None:
    if not serial:
        return "serial is empty"
    if not (serial.isdigit() and serial.isascii()):
        return f"serial {serial!r} is not numeric: SGTIN-96 holds numeric serials only; use sgtin-198"
    if len(serial) > 1 and serial[0] == "0":
        return f"serial {serial!r} has a leading zero, which SGTIN-96 cannot keep (it would decode as {str(int(serial))!r}); use sgtin-198"
    if int(serial) > SGTIN96_MAX_SERIAL:
        return f"serial {serial} exceeds {SGTIN96_MAX_SERIAL} (2^38-1), the largest SGTIN-96 serial; use sgtin-198"
    return None


def _sgtin198_serial_problem(serial: str) -> str | None:
    if not serial:
        return "serial is empty: SGTIN-198 holds 1 to 20 characters"
    bad = [c for c in serial if c not in CSET82]
    if bad:
        return f"serial {serial!r} has {bad[0]!r}, which is not in GS1 character set 82: no SGTIN can hold it"
    if len(serial) > SGTIN198_MAX_SERIAL_CHARS:
        return f"serial {serial!r} has {len(serial)} characters: SGTIN-198 holds at most {SGTIN198_MAX_SERIAL_CHARS}"
    return None


def _serial(scheme: Scheme, serial: object) -> str:
    if not isinstance(serial, str):
        raise EpcError(f"serial must be a string, got {type(serial).__name__}")
    problem = _sgtin96_serial_problem(serial) if scheme == "sgtin-96" else _sgtin198_serial_problem(serial)
    if problem is not None:
        raise EpcError(problem)
    return serial


def choose_scheme(serial: str) -> Literal["sgtin-96", "sgtin-198"]:
    """The smaller SGTIN that holds ``serial`` (a product's ``scheme: auto``); EpcError if neither can."""
    if not isinstance(serial, str):
        raise EpcError(f"serial must be a string, got {type(serial).__name__}")
    if _sgtin96_serial_problem(serial) is None:
        return "sgtin-96"
    problem = _sgtin198_serial_problem(serial)
    if problem is not None:
        raise EpcError(problem)
    return "sgtin-198"


# --------------------------------------------------------------------------
# bits
# --------------------------------------------------------------------------


def _partition_of(table: dict[int, _Row], cp_length: int) -> tuple[int, _Row]:
    for p, row in table.items():
        if row[1] == cp_length:
            return p, row
    raise AssertionError(cp_length)  # _cp_length admits 6..12 only, all in the tables


def _words_hex(value: int, nbits: int) -> str:
    pad = -nbits % 16
    return f"{value << pad:0{(nbits + pad) // 4}X}"


def _sgtin_bits(scheme: Scheme, filter_value: int, cp_length: int, gtin14: str, serial: str) -> str:
    p, (m, _l, n, _k) = _partition_of(_SGTIN_PARTITIONS, cp_length)
    v = _HEADER[scheme]
    v = (v << 3) | filter_value
    v = (v << 3) | p
    v = (v << m) | int(gtin14[1:1 + cp_length])
    v = (v << n) | int(gtin14[0] + gtin14[1 + cp_length:13])
    if scheme == "sgtin-96":
        v = (v << _SGTIN96_SERIAL_BITS) | int(serial)
    else:
        chars = 0
        for c in serial:
            chars = (chars << 7) | ord(c)
        v = (v << _SGTIN198_SERIAL_BITS) | (chars << (_SGTIN198_SERIAL_BITS - 7 * len(serial)))
    return _words_hex(v, _BITS[scheme])


def _sscc_bits(filter_value: int, cp_length: int, sscc18: str) -> str:
    p, (m, _l, n, _k) = _partition_of(_SSCC_PARTITIONS, cp_length)
    v = _HEADER["sscc-96"]
    v = (v << 3) | filter_value
    v = (v << 3) | p
    v = (v << m) | int(sscc18[1:1 + cp_length])
    v = (v << n) | int(sscc18[0] + sscc18[1 + cp_length:17])
    v <<= _SSCC_RESERVED_BITS
    return _words_hex(v, 96)


def pc_word(epc_hex: str, *, user_memory: bool = False) -> str:
    """The PC word (EPC bank bits 10h-1Fh, TDS Table 15-1) for an EPC of this hex: length in words, UMI, toggle 0.

    A printer that writes an SGTIN-198 must write this too, or readers report only the first 96 bits.
    """
    if not isinstance(epc_hex, str) or not epc_hex or len(epc_hex) % 4 or not _is_hex(epc_hex):
        raise EpcError(f"EPC hex {epc_hex!r} must be hex digits in whole 16-bit words (a multiple of 4 digits)")
    words = len(epc_hex) // 4
    if words > 31:
        raise EpcError(f"EPC of {words} words does not fit the 5-bit PC length field (at most 31)")
    return f"{(words << 11) | (int(user_memory) << 10):04X}"


def _is_hex(text: str) -> bool:
    return text.isascii() and all(c in "0123456789abcdefABCDEF" for c in text)


# --------------------------------------------------------------------------
# building, encoding
# --------------------------------------------------------------------------


def make_epc(
    scheme: Scheme,
    *,
    gtin: str | None = None,
    serial: str | None = None,
    sscc: str | None = None,
    company_prefix_length: int,
    filter_value: int,
) -> EpcValue:
    """Validate and encode one EPC: SGTIN schemes take ``gtin`` + ``serial``, SSCC-96 takes ``sscc``."""
    s = _scheme(scheme)
    f = _filter(filter_value)
    cpl = _cp_length(company_prefix_length)
    if s == "sscc-96":
        if gtin is not None or serial is not None:
            raise EpcError("an SSCC-96 EPC holds an SSCC only: give sscc=, not gtin=/serial=")
        if sscc is None:
            raise EpcError("SSCC-96 needs sscc=")
        code = _sscc18(sscc)
        pure = gs1.sscc_urn(code, cpl)
        return EpcValue(
            scheme=s, filter_value=f, company_prefix_length=cpl, gtin=None, sscc=code, serial=None,
            pure_uri=pure, tag_uri=_tag_uri_of(s, f, pure), epc_hex=_sscc_bits(f, cpl, code),
        )
    if sscc is not None:
        raise EpcError(f"an {s.upper()} EPC holds a GTIN and a serial: give gtin= and serial=, not sscc=")
    if gtin is None or serial is None:
        raise EpcError(f"{s.upper()} needs gtin= and serial=")
    g = _gtin14(gtin)
    ser = _serial(s, serial)
    pure = gs1.sgtin_urn(g, ser, cpl)
    return EpcValue(
        scheme=s, filter_value=f, company_prefix_length=cpl, gtin=g, sscc=None, serial=ser,
        pure_uri=pure, tag_uri=_tag_uri_of(s, f, pure), epc_hex=_sgtin_bits(s, f, cpl, g, ser),
    )


def _tag_uri_of(scheme: Scheme, filter_value: int, pure: str) -> str:
    body = pure.split(":", 4)[4]  # urn:epc:id:<kind>:<body>
    return f"urn:epc:tag:{scheme}:{filter_value}.{body}"


def encode_epc(
    scheme: Scheme,
    *,
    gtin: str | None = None,
    serial: str | None = None,
    sscc: str | None = None,
    company_prefix_length: int,
    filter_value: int,
) -> str:
    """:func:`make_epc`'s hex, for callers that hold the scheme as data (a product's config)."""
    return make_epc(
        scheme, gtin=gtin, serial=serial, sscc=sscc, company_prefix_length=company_prefix_length, filter_value=filter_value,
    ).epc_hex


def encode_sgtin96(gtin: str, serial: str, *, company_prefix_length: int, filter_value: int) -> str:
    """24 uppercase hex digits; numeric serials without leading zeros up to 2^38-1 only."""
    return make_epc("sgtin-96", gtin=gtin, serial=serial, company_prefix_length=company_prefix_length, filter_value=filter_value).epc_hex


def encode_sgtin198(gtin: str, serial: str, *, company_prefix_length: int, filter_value: int) -> str:
    """52 uppercase hex digits: the 198 EPC bits followed by 10 zero bits to fill 13 whole 16-bit words.

    That is the EPC bank from word 2 on, as TDS Table 15-1 has it written (and as TDS 1.13 Appendix E.3
    prints the example); the matching PC word is 6800 (13 words), see :func:`pc_word`.  The serial is
    1 to 20 characters of GS1 character set 82, 7 bits each (ISO 646), unescaped (``32a/b``, not ``32a%2Fb``).
    """
    return make_epc("sgtin-198", gtin=gtin, serial=serial, company_prefix_length=company_prefix_length, filter_value=filter_value).epc_hex


def encode_sscc96(sscc: str, *, company_prefix_length: int, filter_value: int) -> str:
    """24 uppercase hex digits; the SSCC's check digit must be right (it is not encoded, only recomputed)."""
    return make_epc("sscc-96", sscc=sscc, company_prefix_length=company_prefix_length, filter_value=filter_value).epc_hex


def pure_identity_uri(
    *, gtin: str | None = None, serial: str | None = None, sscc: str | None = None, company_prefix_length: int,
) -> str:
    """``urn:epc:id:sgtin:CP.IR.SER`` (serial escaped per TDS Table A-1) or ``urn:epc:id:sscc:CP.SR``."""
    cpl = _cp_length(company_prefix_length)
    if sscc is not None:
        if gtin is not None or serial is not None:
            raise EpcError("give either sscc= or gtin= with serial=, not both")
        return gs1.sscc_urn(_sscc18(sscc), cpl)
    if gtin is None or serial is None:
        raise EpcError("an SGTIN pure identity needs gtin= and serial=")
    g = _gtin14(gtin)
    if not isinstance(serial, str):
        raise EpcError(f"serial must be a string, got {type(serial).__name__}")
    problem = _sgtin198_serial_problem(serial)  # the pure identity holds what AI (21) holds, as SGTIN-198 does
    if problem is not None:
        raise EpcError(problem.replace("SGTIN-198 holds", "AI (21) holds"))
    return gs1.sgtin_urn(g, serial, cpl)


def tag_uri(
    scheme: Scheme,
    *,
    gtin: str | None = None,
    serial: str | None = None,
    sscc: str | None = None,
    company_prefix_length: int,
    filter_value: int,
) -> str:
    """``urn:epc:tag:<scheme>:F.…``; refuses what the scheme's binary form cannot hold, as the encoders do."""
    return make_epc(
        scheme, gtin=gtin, serial=serial, sscc=sscc, company_prefix_length=company_prefix_length, filter_value=filter_value,
    ).tag_uri


def parse_tag_uri(uri: str) -> EpcValue:
    """An EPC tag URI (``urn:epc:tag:sgtin-96:3.0614141.812345.6789``) back to its value and hex."""
    if not isinstance(uri, str):
        raise EpcError(f"EPC tag URI must be a string, got {type(uri).__name__}")
    m = _TAG_URI.fullmatch(uri.strip())
    if m is None:
        raise EpcError(f"not an EPC tag URI (urn:epc:tag:<scheme>:<filter>.…): {uri[:60]!r}")
    name, rest = m.group(1).lower(), m.group(2)
    scheme = _scheme(name)
    f_text, _, body = rest.partition(".")
    if len(f_text) != 1 or not f_text.isdigit() or not body:
        raise EpcError(f"EPC tag URI {uri!r}: expected a filter value 0-7 then '.' after the scheme")
    kind = "sscc" if scheme == "sscc-96" else "sgtin"
    try:
        ident = gs1.parse_uri(f"urn:epc:id:{kind}:{body}")
    except gs1.GS1Error as e:
        raise EpcError(f"EPC tag URI {uri!r}: {e}") from None
    cpl = len(body.split(".", 1)[0])
    return make_epc(
        scheme, gtin=ident.gtin, serial=ident.serial, sscc=ident.sscc, company_prefix_length=cpl, filter_value=int(f_text),
    )


# --------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------


class _Bits:
    """Reads fixed-width fields from the top of an integer of known width."""

    def __init__(self, value: int, nbits: int) -> None:
        self.value, self.left = value, nbits

    def take(self, n: int) -> int:
        self.left -= n
        return (self.value >> self.left) & ((1 << n) - 1)


def _hex_text(epc: str | bytes) -> str:
    if isinstance(epc, bytes | bytearray):
        return bytes(epc).hex().upper()
    if not isinstance(epc, str):
        raise EpcError(f"EPC must be hex text or bytes, got {type(epc).__name__}")
    text = epc.strip()
    if not text:
        raise EpcError("EPC is empty")
    if not _is_hex(text):
        bad = next(c for c in text if not (c.isascii() and c in "0123456789abcdefABCDEF"))
        raise EpcError(f"EPC {text[:60]!r} is not hex: character {bad!r}")
    return text.upper()


def decode_epc(epc: str | bytes) -> EpcValue:
    """A tag's EPC (hex, or the bytes a reader reports) to its value; EpcError names what is wrong.

    Accepts exactly the 24 hex digits of a 96-bit EPC, and for SGTIN-198 the 52 digits of the EPC
    bank words or the 50 digits of the bare 198 bits; padding bits must be zero.
    """
    text = _hex_text(epc)
    header = int(text[:2], 16) if len(text) >= 2 else -1
    scheme = _SCHEME_OF_HEADER.get(header)
    if scheme is None:
        name = _OTHER_HEADERS.get(header)
        what = f"header {text[:2]} ({name})" if name else f"header {text[:2]}"
        raise EpcError(f"EPC {text[:60]}: {what} is not a scheme linectl decodes ({', '.join(SCHEMES)})")
    nbits = _BITS[scheme]
    allowed = sorted({-(-nbits // 4), -(-nbits // 16) * 4})
    if len(text) not in allowed:
        digits = " or ".join(str(a) for a in allowed)
        raise EpcError(f"EPC {text[:60]}: {scheme.upper()} is {nbits} bits ({digits} hex digits), got {len(text)} digits")
    value = int(text, 16)
    pad = len(text) * 4 - nbits
    if value & ((1 << pad) - 1):
        raise EpcError(f"EPC {text}: the {pad} padding bits after the {nbits} EPC bits must be zero")
    bits = _Bits(value >> pad, nbits)
    bits.take(8)
    f = bits.take(3)
    p = bits.take(3)
    table = _SSCC_PARTITIONS if scheme == "sscc-96" else _SGTIN_PARTITIONS
    if p not in table:
        raise EpcError(f"EPC {text}: partition value {p} is invalid (TDS defines 0 to 6)")
    m, cpl, n, k = table[p]
    cp, other = bits.take(m), bits.take(n)
    if cp >= 10**cpl:
        raise EpcError(f"EPC {text}: company prefix field {cp} has more than the {cpl} digits partition {p} allows")
    if other >= 10**k:
        field = "extension + serial reference" if scheme == "sscc-96" else "indicator + item reference"
        raise EpcError(f"EPC {text}: {field} field {other} has more than the {k} digits partition {p} allows")
    cp_s, other_s = str(cp).zfill(cpl), str(other).zfill(k)
    body = other_s[0] + cp_s + other_s[1:]
    key = body + gs1.gtin_check_digit(body)
    if scheme == "sscc-96":
        if bits.take(_SSCC_RESERVED_BITS):
            raise EpcError(f"EPC {text}: the 24 reserved bits of an SSCC-96 must be zero")
        return make_epc(scheme, sscc=key, company_prefix_length=cpl, filter_value=f)
    if scheme == "sgtin-96":
        serial = str(bits.take(_SGTIN96_SERIAL_BITS))
    else:
        serial = _decode_string(text, bits.take(_SGTIN198_SERIAL_BITS))
    return make_epc(scheme, gtin=key, serial=serial, company_prefix_length=cpl, filter_value=f)


def _decode_string(text: str, field: int) -> str:
    """TDS 14.4.2: 7-bit characters of set 82 up to the first all-zero one, nothing but zeros after it."""
    chars: list[str] = []
    for i in range(_SGTIN198_SERIAL_BITS // 7):
        code = (field >> (_SGTIN198_SERIAL_BITS - 7 * (i + 1))) & 0x7F
        if code == 0:
            if field & ((1 << (_SGTIN198_SERIAL_BITS - 7 * (i + 1))) - 1):
                raise EpcError(f"EPC {text}: serial has non-zero bits after its terminating all-zero character")
            break
        c = chr(code)
        if c not in CSET82:
            raise EpcError(f"EPC {text}: serial character {i + 1} is 0x{code:02X}, which is not in GS1 character set 82")
        chars.append(c)
    if not chars:
        raise EpcError(f"EPC {text}: serial is empty (its first 7-bit character is zero)")
    return "".join(chars)
