"""The GS1 Barcode Syntax Dictionary, loaded from GS1's own file, and its linters.

Why a loader and not a table in code: the AI rules (formats, which AIs need
FNC1, mandatory associations ``req=``, invalid pairs ``ex=``, Digital Link
primary keys ``dlpkey=``) change with every GSCN.  Shipping GS1's file
unmodified (``linectl/standards/gs1/gs1-syntax-dictionary.txt``, Apache-2.0)
means an update is a file copy that the tests check against GS1's own test
vectors, instead of a hand transcription that silently misses rules.

The linters are a transliteration of GS1's reference implementations in C
(gs1/gs1-syntax-dictionary, ``src/lint_*.c``), which that project publishes
for exactly this purpose.  Each raises :class:`LintError` with the reference
error code (``GS1_LINTER_<code>`` there), the position and length of the
offending part, so callers can say precisely what is wrong.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

__all__ = [
    "AIEntry",
    "Component",
    "Dictionary",
    "LINTERS",
    "LintError",
    "load",
    "matches",
]

DICTIONARY_RESOURCE = "standards/gs1/gs1-syntax-dictionary.txt"


class LintError(ValueError):
    """A component failed a GS1 syntax test.

    ``code`` is the reference error name without the ``GS1_LINTER_`` prefix,
    ``pos``/``length`` locate the offending characters in the component.
    """

    def __init__(self, code: str, pos: int, length: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.pos = pos
        self.length = length
        self.message = message


# --------------------------------------------------------------------------
# lookup tables (from the reference linters, see NOTICE)
# --------------------------------------------------------------------------

_ISO3166 = frozenset(int(c) for c in """
    004 008 010 012 016 020 024 028 031 032 036 040 044 048 050 051 052 056 060 064 068 070 072 074
    076 084 086 090 092 096 100 104 108 112 116 120 124 132 136 140 144 148 152 156 158 162 166 170
    174 175 178 180 184 188 191 192 196 203 204 208 212 214 218 222 226 231 232 233 234 238 239 242
    246 248 250 254 258 260 262 266 268 270 275 276 288 292 296 300 304 308 312 316 320 324 328 332
    334 336 340 344 348 352 356 360 364 368 372 376 380 384 388 392 398 400 404 408 410 414 417 418
    422 426 428 430 434 438 440 442 446 450 454 458 462 466 470 474 478 480 484 492 496 498 499 500
    504 508 512 516 520 524 528 531 533 534 535 540 548 554 558 562 566 570 574 578 580 581 583 584
    585 586 591 598 600 604 608 612 616 620 624 626 630 634 638 642 643 646 652 654 659 660 662 663
    666 670 674 678 682 686 688 690 694 702 703 704 705 706 710 716 724 728 729 732 740 744 748 752
    756 760 762 764 768 772 776 780 784 788 792 795 796 798 800 804 807 818 826 831 832 833 834 840
    850 854 858 860 862 876 882 887 894
""".split())
_ISO4217 = frozenset(int(c) for c in """
    008 012 032 036 044 048 050 051 052 060 064 068 072 084 090 096 104 108 116 124 132 136 144 152
    156 170 174 188 192 203 208 214 222 230 232 238 242 262 270 292 320 324 328 332 340 344 348 352
    356 360 364 368 376 388 392 396 398 400 404 408 410 414 417 418 422 426 430 434 446 454 458 462
    480 484 496 498 504 512 516 524 532 533 548 554 558 566 578 586 590 598 600 604 608 634 643 646
    654 682 690 702 704 706 710 728 748 752 756 760 764 776 780 784 788 800 807 818 826 834 840 858
    860 882 886 901 924 925 926 927 928 929 930 933 934 936 938 940 941 943 944 946 947 948 949 950
    951 952 953 955 956 957 958 959 960 961 962 963 964 965 967 968 969 970 971 972 973 975 976 977
    978 979 980 981 984 985 986 990 994 997 999
""".split())
_ISO3166_ALPHA2 = frozenset("""
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS
    BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE
    EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM
    HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC
    LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA
    NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW
    SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO
    TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW
""".split())
_PACKAGE_TYPES = frozenset("""
    1A 1B 1D 1F 1G 1W 200 201 202 203 204 205 206 210 211 212 2C 3A 3H 43 44 4A 4B 4C 4D 4F 4G 4H 5H
    5L 5M 6H 6P 7A 7B 8 8A 8B 8C 9 AA AB AC AD AF AG AH AI AJ AL AM AP APE AT AV B4 BB BC BD BE BF
    BG BGE BH BI BJ BK BL BM BME BN BO BP BQ BR BRI BS BT BU BV BW BX BY BZ CA CB CBL CC CCE CD CE
    CF CG CH CI CJ CK CL CM CN CO CP CQ CR CS CT CU CV CW CX CY CZ DA DB DC DG DH DI DJ DK DL DM DN
    DP DPE DR DS DT DU DV DW DX DY E1 E2 E3 EC ED EE EF EG EH EI EN FB FC FD FE FI FL FO FOB FP FPE
    FR FT FW FX GB GI GL GR GU GY GZ HA HB HC HG HN HR IA IB IC ID IE IF IG IH IK IL IN IZ JB JC JG
    JR JT JY KG KI LAB LE LG LT LU LV LZ MA MB MC ME MPE MR MS MT MW MX NA NE NF NG NS NT NU NV OA
    OB OC OD OE OF OK OPE OT OU P2 PA PAE PB PC PD PE PF PG PH PI PJ PK PL PLP PN PO POP PP PPE PR
    PT PU PUE PV PX PY PZ QA QB QC QD QF QG QH QJ QK QL QM QN QP QQ QR QS RB1 RB2 RB3 RCB RD RG RJ
    RK RL RO RT RZ S1 SA SB SC SD SE SEC SH SI SK SL SM SO SP SS ST STL SU SV SW SX SY SZ T1 TB TC
    TD TE TEV TG THE TI TK TL TN TO TR TRE TS TT TTE TU TV TW TWE TY TZ UC UN UUE VA VG VI VK VL VN
    VO VP VQ VR VS VY WA WB WC WD WF WG WH WJ WK WL WM WN WP WQ WR WRP WS WT WU WV WW WX WY WZ X11
    X12 X15 X16 X17 X18 X19 X20 X3 XA XB XC XD XF XG XH XJ XK YA YB YC YD YF YG YH YJ YK YL YM YN YP
    YQ YR YS YT YV YW YX YY YZ ZA ZB ZC ZD ZF ZG ZH ZJ ZK ZL ZM ZN ZP ZQ ZR ZS ZT ZU ZV ZW ZX ZY ZZ
""".split())
_MEDIA_TYPES = frozenset((*range(1, 11), *range(80, 100)))

#: GS1 AI encodable character set 82 (GS1 General Specifications fig. 7.11-1).
CSET82 = frozenset(
    "!\"%&'()*+,-./0123456789:;<=>?ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
)
#: Character set 39 (AI 8010).
CSET39 = frozenset("#-/0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
#: Character set 64 (AI 8030 digital signature): base64url, '=' only as padding.
CSET64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_DIGITS = frozenset("0123456789")
_CSET32 = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"
_CSET82_ORDER = "!\"%&'()*+,-./0123456789:;<=>?ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
_CSUMALPHA_WEIGHT = {c: i for i, c in enumerate(_CSET82_ORDER)}
_PRIMES = (
    2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97,
    101, 103, 107, 109, 113, 127, 131, 137, 139, 149, 151, 157, 163, 167, 173, 179, 181, 191, 193,
    197, 199, 211, 223, 227, 229, 233, 239, 241, 251, 257, 263, 269, 271, 277, 281, 283, 293, 307,
    311, 313, 317, 331, 337, 347, 349, 353, 359, 367, 373, 379, 383, 389, 397, 401, 409, 419, 421,
    431, 433, 439, 443, 449, 457, 461, 463, 467, 479, 487, 491, 499, 503, 509,
)
_GCP_MIN_LENGTH = 4


def _err(code: str, pos: int, length: int, message: str) -> LintError:
    return LintError(code, pos, length, message)


def _show(ch: str) -> str:
    if ch == " ":
        return "' ' (space)"
    if ch == "\x1d":
        return "GS (0x1D)"
    return repr(ch) if ch.isascii() and ch.isprintable() else f"{ch!r} (U+{ord(ch):04X})"


def _need_digits(data: str) -> None:
    for i, ch in enumerate(data):
        if ch not in _DIGITS:
            raise _err("NON_DIGIT_CHARACTER", i, 1, f"character {_show(ch)} at position {i + 1} is not a digit")


# ---- character sets ------------------------------------------------------


def lint_csetnumeric(data: str) -> None:
    _need_digits(data)


def _cset(data: str, allowed: frozenset[str], code: str, name: str) -> None:
    for i, ch in enumerate(data):
        if ch not in allowed:
            raise _err(code, i, 1, f"character {_show(ch)} at position {i + 1} is not in {name}")


def lint_cset82(data: str) -> None:
    _cset(data, CSET82, "INVALID_CSET82_CHARACTER", "GS1 character set 82")


def lint_cset39(data: str) -> None:
    _cset(data, CSET39, "INVALID_CSET39_CHARACTER", "GS1 character set 39")


def lint_cset64(data: str) -> None:
    pads = len(data) - len(data.rstrip("="))
    body = len(data) - pads
    if pads > 2 or (pads > 0 and len(data) % 3 != 0):
        raise _err("INVALID_CSET64_PADDING", body, pads, f"invalid base64url padding {data[body:]!r}")
    _cset(data[:body], CSET64, "INVALID_CSET64_CHARACTER", "GS1 character set 64")


CHARSET_LINTERS: dict[str, Callable[[str], None]] = {
    "N": lint_csetnumeric,
    "X": lint_cset82,
    "Y": lint_cset39,
    "Z": lint_cset64,
}


# ---- check digits and key prefixes --------------------------------------


def check_digit(body: str) -> str:
    """GS1 mod-10 check digit for a digit string (weights 3,1,3,... from the right)."""
    total = sum(int(c) * (3 if i % 2 == 0 else 1) for i, c in enumerate(reversed(body)))
    return str((10 - total % 10) % 10)


def lint_csum(data: str) -> None:
    if not data:
        raise _err("TOO_SHORT_FOR_CHECK_DIGIT", 0, 0, "too short for a check digit")
    _need_digits(data)
    expected = check_digit(data[:-1])
    if data[-1] != expected:
        raise _err("INCORRECT_CHECK_DIGIT", len(data) - 1, 1, f"check digit is {data[-1]}, expected {expected}")


def lint_csumalpha(data: str) -> None:
    if len(data) > len(_PRIMES) + 2:
        raise _err("TOO_LONG_FOR_CHECK_PAIR_IMPLEMENTATION", 0, len(data), "too long for a check character pair")
    if len(data) < 2:
        raise _err("TOO_SHORT_FOR_CHECK_PAIR", 0, len(data), "too short for a check character pair")
    total = 0
    n = len(data)
    for pos in range(n - 2):
        w = _CSUMALPHA_WEIGHT.get(data[pos])
        if w is None:
            raise _err("INVALID_CSET82_CHARACTER", pos, 1,
                       f"character {_show(data[pos])} at position {pos + 1} is not in GS1 character set 82")
        total += w * _PRIMES[n - 3 - pos]
    total %= 1021
    expected = _CSET32[total >> 5] + _CSET32[total & 31]
    if data[-2:] != expected:
        raise _err("INCORRECT_CHECK_PAIR", n - 2, 2, f"check character pair is {data[-2:]!r}, expected {expected!r}")


def lint_gcppos1(data: str) -> None:
    if len(data) < _GCP_MIN_LENGTH:
        raise _err("TOO_SHORT_FOR_GCP", 0, len(data),
                   f"too short to start with a GS1 Company Prefix ({_GCP_MIN_LENGTH} digits at least)")
    for i in range(_GCP_MIN_LENGTH):
        if data[i] not in _DIGITS:
            raise _err("INVALID_GCP_PREFIX", i, 1,
                       f"does not start with a GS1 Company Prefix: character {_show(data[i])} at position "
                       f"{i + 1} is not a digit")


def lint_gcppos2(data: str) -> None:
    if len(data) < 2:
        raise _err("TOO_SHORT_FOR_GCP", 0, len(data), "too short to hold a GS1 Company Prefix")
    try:
        lint_gcppos1(data[1:])
    except LintError as exc:
        raise _err(exc.code, exc.pos + 1, exc.length, exc.message) from None


# ---- dates and times ------------------------------------------------------


def century_year(yy: int, current: int) -> int:
    """Full year for YY, sliding window of GS1 General Specifications 7.12."""
    century, cur_yy = current - current % 100, current % 100
    diff = yy - cur_yy
    if 51 <= diff <= 99:
        return century - 100 + yy
    if -99 <= diff <= -50:
        return century + 100 + yy
    return century + yy


def _this_year() -> int:
    import datetime as dt

    return dt.date.today().year


def _date(data: str, year: int, offset: int, zero_day_ok: bool) -> None:
    mm, dd = int(data[offset:offset + 2]), int(data[offset + 2:offset + 4])
    raw = data
    if not 1 <= mm <= 12:
        raise _err("ILLEGAL_MONTH", offset, 2, f"invalid date {raw!r}: month {mm:02d} does not exist")
    if dd == 0:
        if zero_day_ok:
            return
        raise _err("ILLEGAL_DAY", offset + 2, 2, f"invalid date {raw!r}: day 00 is not allowed for this AI")
    last = calendar.monthrange(year, mm)[1]
    if dd > last:
        raise _err("ILLEGAL_DAY", offset + 2, 2,
                   f"invalid date {raw!r}: day {dd:02d} does not exist in {calendar.month_name[mm]} {year} "
                   f"(last day is {last})")


def _len_check(data: str, n: int, short: str, long: str, what: str) -> None:
    if len(data) != n:
        raise _err(short if len(data) < n else long, 0, len(data), f"{what} {data!r} must have {n} digits")


def lint_yyyymmd0(data: str) -> None:
    _len_check(data, 8, "DATE_TOO_SHORT", "DATE_TOO_LONG", "date")
    _need_digits(data)
    _date(data, int(data[:4]), 4, True)


def lint_yyyymmdd(data: str) -> None:
    _len_check(data, 8, "DATE_TOO_SHORT", "DATE_TOO_LONG", "date")
    _need_digits(data)
    _date(data, int(data[:4]), 4, False)


def lint_yymmd0(data: str, current_year: int | None = None) -> None:
    _len_check(data, 6, "DATE_TOO_SHORT", "DATE_TOO_LONG", "date")
    _need_digits(data)
    _date(data, century_year(int(data[:2]), current_year or _this_year()), 2, True)


def lint_yymmdd(data: str, current_year: int | None = None) -> None:
    _len_check(data, 6, "DATE_TOO_SHORT", "DATE_TOO_LONG", "date")
    _need_digits(data)
    _date(data, century_year(int(data[:2]), current_year or _this_year()), 2, False)


def _two_digits(data: str, limit: int, short: str, long: str, illegal: str, what: str) -> None:
    _len_check(data, 2, short, long, what)
    _need_digits(data)
    if int(data) > limit:
        raise _err(illegal, 0, 2, f"{what} {data} does not exist (00 to {limit:02d})")


def lint_hh(data: str) -> None:
    _two_digits(data, 23, "HOUR_TOO_SHORT", "HOUR_TOO_LONG", "ILLEGAL_HOUR", "hour")


def lint_mi(data: str) -> None:
    _two_digits(data, 59, "MINUTE_TOO_SHORT", "MINUTE_TOO_LONG", "ILLEGAL_MINUTE", "minute")


def lint_ss(data: str) -> None:
    _two_digits(data, 59, "SECOND_TOO_SHORT", "SECOND_TOO_LONG", "ILLEGAL_SECOND", "second")


def lint_hhmi(data: str) -> None:
    _len_check(data, 4, "HOUR_WITH_MINUTE_TOO_SHORT", "HOUR_WITH_MINUTE_TOO_LONG", "time")
    lint_hh(data[:2])
    try:
        lint_mi(data[2:])
    except LintError as exc:
        raise _err(exc.code, exc.pos + 2, exc.length, exc.message) from None


# ---- code lists -----------------------------------------------------------


def lint_iso3166(data: str) -> None:
    if not (len(data) == 3 and data.isdigit() and data.isascii() and int(data) in _ISO3166):
        raise _err("NOT_ISO3166", 0, len(data), f"{data!r} is not an ISO 3166-1 numeric country code")


def lint_iso3166999(data: str) -> None:
    if data == "999":
        return
    if not (len(data) == 3 and data.isdigit() and data.isascii() and int(data) in _ISO3166):
        raise _err("NOT_ISO3166_OR_999", 0, len(data),
                   f"{data!r} is not an ISO 3166-1 numeric country code or 999")


def lint_iso3166alpha2(data: str) -> None:
    if data not in _ISO3166_ALPHA2:
        raise _err("NOT_ISO3166_ALPHA2", 0, len(data), f"{data!r} is not an ISO 3166-1 alpha-2 country code")


def lint_iso4217(data: str) -> None:
    if not (len(data) == 3 and data.isdigit() and data.isascii() and int(data) in _ISO4217):
        raise _err("NOT_ISO4217", 0, len(data), f"{data!r} is not an ISO 4217 numeric currency code")


def lint_iso5218(data: str) -> None:
    if data not in ("0", "1", "2", "9"):
        raise _err("INVALID_BIOLOGICAL_SEX_CODE", 0, len(data), f"{data!r} is not an ISO/IEC 5218 code")


def lint_packagetype(data: str) -> None:
    if data not in _PACKAGE_TYPES:
        raise _err("INVALID_PACKAGE_TYPE", 0, len(data), f"{data!r} is not a UN/ECE Rec 21 package type code")


def lint_mediatype(data: str) -> None:
    if not (len(data) == 2 and data.isdigit() and data.isascii() and int(data) in _MEDIA_TYPES):
        raise _err("INVALID_MEDIA_TYPE", 0, len(data), f"{data!r} is not an AIDC media type")


def lint_iban(data: str) -> None:
    if len(data) < 4:
        raise _err("IBAN_TOO_SHORT", 0, len(data), "IBAN is too short")
    if data[:2] not in _ISO3166_ALPHA2:
        raise _err("ILLEGAL_IBAN_COUNTRY_CODE", 0, 2, f"IBAN country code {data[:2]!r} is not ISO 3166-1 alpha-2")
    if len(data) > 34:
        raise _err("IBAN_TOO_LONG", 0, len(data), "IBAN is longer than 34 characters")
    if len(data) <= 10:
        raise _err("IBAN_TOO_SHORT", 0, len(data), "IBAN is too short")
    csum = 0
    n = len(data)
    for k in range(4, n + 4):
        pos = k if k < n else k - n
        ch = data[pos]
        if ch in _DIGITS:
            csum = (csum * 10 + int(ch)) % 97
        elif "A" <= ch <= "Z":
            csum = (csum * 100 + ord(ch) - 55) % 97
        else:
            raise _err("INVALID_IBAN_CHARACTER", pos, 1, f"character {_show(ch)} at position {pos + 1} "
                       "is not allowed in an IBAN")
    if csum != 1:
        raise _err("INCORRECT_IBAN_CHECKSUM", 2, 2, "IBAN check digits are wrong")


# ---- small structural tests ----------------------------------------------


def lint_zero(data: str) -> None:
    if not data or any(c != "0" for c in data):
        raise _err("NOT_ZERO", 0, len(data), f"{data!r} must be zero")


def lint_nonzero(data: str) -> None:
    _need_digits(data)
    if all(c == "0" for c in data):
        raise _err("ILLEGAL_ZERO_VALUE", 0, len(data), f"{data!r} must not be zero")


def lint_nozeroprefix(data: str) -> None:
    if data.startswith("0"):
        raise _err("ILLEGAL_ZERO_PREFIX", 0, 1, f"{data!r} must not start with 0")
    _need_digits(data)


def lint_hasnondigit(data: str) -> None:
    if all(c in _DIGITS for c in data):
        raise _err("REQUIRES_NON_DIGIT_CHARACTER", 0, len(data), f"{data!r} must contain a non-digit character")


def lint_yesno(data: str) -> None:
    if data not in ("0", "1"):
        raise _err("NOT_ZERO_OR_ONE", 0, len(data), f"{data!r} must be 0 or 1")


def lint_hyphen(data: str) -> None:
    if not data or any(c != "-" for c in data):
        raise _err("NOT_HYPHEN", 0, len(data), f"{data!r} must be a hyphen '-'")


def lint_winding(data: str) -> None:
    if data not in ("0", "1", "9"):
        raise _err("INVALID_WINDING_DIRECTION", 0, len(data), f"winding direction {data!r} must be 0, 1 or 9")


def lint_importeridx(data: str) -> None:
    if len(data) != 1:
        raise _err("IMPORTER_IDX_MUST_BE_ONE_CHARACTER", 0, len(data), "importer index must be one character")
    if data not in CSET64:
        raise _err("INVALID_IMPORT_IDX_CHARACTER", 0, 1, f"importer index {_show(data)} is not in 0-9 A-Z a-z - _")


def _coordinate(data: str, limit: int, kind: str) -> None:
    if len(data) != 10:
        raise _err(f"{kind.upper()}_INVALID_LENGTH", 0, len(data), f"{kind} must have 10 digits")
    _need_digits(data)
    if int(data) > limit:
        raise _err(f"INVALID_{kind.upper()}", 0, 10, f"{kind} {data} is out of range")


def lint_latitude(data: str) -> None:
    _coordinate(data, 1800000000, "latitude")


def lint_longitude(data: str) -> None:
    _coordinate(data, 3600000000, "longitude")


def lint_pcenc(data: str) -> None:
    pos = 0
    hexd = "0123456789abcdefABCDEF"
    while pos < len(data):
        if data[pos] == "%":
            if pos + 2 >= len(data):
                raise _err("INVALID_PERCENT_SEQUENCE", pos, len(data) - pos,
                           f"invalid percent sequence {data[pos:]!r} at position {pos + 1}")
            if data[pos + 1] not in hexd or data[pos + 2] not in hexd:
                raise _err("INVALID_PERCENT_SEQUENCE", pos, 3,
                           f"invalid percent sequence {data[pos:pos + 3]!r} at position {pos + 1}")
            pos += 3
            continue
        pos += 1


def lint_pieceoftotal(data: str) -> None:
    _need_digits(data)
    if not data or len(data) % 2:
        raise _err("INVALID_LENGTH_FOR_PIECE_OF_TOTAL", 0, len(data), "piece and total must have equal length")
    half = len(data) // 2
    piece, total = data[:half], data[half:]
    if int(piece) == 0:
        raise _err("ZERO_PIECE_NUMBER", 0, half, f"piece number {piece} must not be zero")
    if int(total) == 0:
        raise _err("ZERO_TOTAL_PIECES", half, half, f"total number of pieces {total} must not be zero")
    if int(piece) > int(total):
        raise _err("PIECE_NUMBER_EXCEEDS_TOTAL", 0, len(data),
                   f"piece number {int(piece)} exceeds the total number of pieces {int(total)}")


def lint_posinseqslash(data: str) -> None:
    slash = data.find("/")
    malformed = _err("POSITION_IN_SEQUENCE_MALFORMED", 0, len(data), f"{data!r} is not <position>/<end>")
    if slash <= 0 or not data[:slash].isdigit() or not data[:slash].isascii():
        raise malformed
    end = data[slash + 1:]
    if not end or not all(c in _DIGITS for c in end):
        raise malformed
    if data[0] == "0":
        raise _err("ILLEGAL_ZERO_PREFIX", 0, 1, f"position in {data!r} must not start with 0")
    if end[0] == "0":
        raise _err("ILLEGAL_ZERO_PREFIX", slash + 1, 1, f"end of sequence in {data!r} must not start with 0")
    if int(data[:slash]) > int(end):
        raise _err("POSITION_EXCEEDS_END", 0, len(data), f"position exceeds the end of the sequence in {data!r}")


# ---- coupons (North American coupon codes, AIs 8110 and 8112) ---------------


class _Cursor:
    def __init__(self, data: str) -> None:
        self.data, self.p = data, 0

    @property
    def left(self) -> int:
        return len(self.data) - self.p

    def fail(self, code: str, what: str) -> LintError:
        return _err(code, self.p, max(self.left, 0), f"coupon: {what}")

    def vli(self, missing: str, invalid: str, ok: Callable[[str], bool], what: str) -> str:
        if self.left <= 0:
            raise self.fail(missing, f"{what} is missing")
        ch = self.data[self.p]
        if not ok(ch):
            raise _err(invalid, self.p, 1, f"coupon: {what} {ch!r} is not allowed")
        self.p += 1
        return ch

    def take(self, n: int, truncated: str, what: str) -> str:
        if self.left < n:
            raise self.fail(truncated, f"{what} is truncated")
        part = self.data[self.p:self.p + n]
        self.p += n
        return part


def _coupon_gcp(cur: _Cursor, start: int, n: int) -> None:
    try:
        lint_gcppos1(cur.data[start:start + n])
    except LintError as exc:
        raise _err(exc.code, start + exc.pos, exc.length, f"coupon: {exc.message}") from None


def _coupon_purchase(cur: _Cursor, nth: str, with_gcp: bool) -> None:
    n = cur.vli(f"COUPON_MISSING_{nth}_PURCHASE_REQUIREMENT_VLI", f"COUPON_INVALID_{nth}_PURCHASE_REQUIREMENT_LENGTH",
                lambda c: "1" <= c <= "5", f"{nth} purchase requirement length")
    cur.take(int(n), f"COUPON_TRUNCATED_{nth}_PURCHASE_REQUIREMENT", f"{nth} purchase requirement")
    cur.vli(f"COUPON_MISSING_{nth}_PURCHASE_REQUIREMENT_CODE", f"COUPON_INVALID_{nth}_PURCHASE_REQUIREMENT_CODE",
            lambda c: c <= "4" or c == "9", f"{nth} purchase requirement code")
    cur.take(3, f"COUPON_TRUNCATED_{nth}_PURCHASE_FAMILY_CODE", f"{nth} purchase family code")
    if not with_gcp:
        return
    g = cur.vli(f"COUPON_MISSING_{nth}_PURCHASE_GCP_VLI", f"COUPON_INVALID_{nth}_PURCHASE_GCP_LENGTH",
                lambda c: c <= "6" or c == "9", f"{nth} purchase GCP length")
    if g != "9":
        start = cur.p
        cur.take(int(g) + 6, f"COUPON_TRUNCATED_{nth}_PURCHASE_GCP", f"{nth} purchase GCP")
        _coupon_gcp(cur, start, int(g) + 6)


def lint_couponcode(data: str) -> None:
    _need_digits(data)
    cur = _Cursor(data)
    g = cur.vli("COUPON_MISSING_GCP_VLI", "COUPON_INVALID_GCP_LENGTH", lambda c: c <= "6", "GCP length")
    start = cur.p
    cur.take(int(g) + 6, "COUPON_TRUNCATED_GCP", "GCP")
    _coupon_gcp(cur, start, int(g) + 6)
    cur.take(6, "COUPON_TRUNCATED_OFFER_CODE", "offer code")
    n = cur.vli("COUPON_MISSING_SAVE_VALUE_VLI", "COUPON_INVALID_SAVE_VALUE_LENGTH", lambda c: "1" <= c <= "5",
                "save value length")
    cur.take(int(n), "COUPON_TRUNCATED_SAVE_VALUE", "save value")
    _coupon_purchase(cur, "1ST", with_gcp=False)
    if cur.left > 0 and data[cur.p] == "1":
        cur.p += 1
        cur.vli("COUPON_MISSING_ADDITIONAL_PURCHASE_RULES_CODE", "COUPON_INVALID_ADDITIONAL_PURCHASE_RULES_CODE",
                lambda c: c <= "3", "additional purchase rules code")
        _coupon_purchase(cur, "2ND", with_gcp=True)
    if cur.left > 0 and data[cur.p] == "2":
        cur.p += 1
        _coupon_purchase(cur, "3RD", with_gcp=True)
    expiry: str | None = None
    if cur.left > 0 and data[cur.p] == "3":
        cur.p += 1
        if cur.left < 6:
            raise cur.fail("COUPON_TOO_SHORT_FOR_EXPIRATION_DATE", "expiration date is truncated")
        expiry = data[cur.p:cur.p + 6]
        try:
            lint_yymmdd(expiry)
        except LintError:
            raise _err("COUPON_INVALID_EXIPIRATION_DATE", cur.p, 6, f"coupon: invalid expiration date {expiry!r}") \
                from None
        cur.p += 6
    if cur.left > 0 and data[cur.p] == "4":
        cur.p += 1
        if cur.left < 6:
            raise cur.fail("COUPON_TOO_SHORT_FOR_START_DATE", "start date is truncated")
        start_date = data[cur.p:cur.p + 6]
        try:
            lint_yymmdd(start_date)
        except LintError:
            raise _err("COUPON_INVALID_START_DATE", cur.p, 6, f"coupon: invalid start date {start_date!r}") from None
        if expiry is not None and start_date > expiry:
            raise _err("COUPON_EXPIRATION_BEFORE_START", cur.p - 8, 14, "coupon: expiration date before start date")
        cur.p += 6
    if cur.left > 0 and data[cur.p] == "5":
        cur.p += 1
        if cur.left <= 0:
            raise cur.fail("COUPON_MISSING_SERIAL_NUMBER_VLI", "serial number length is missing")
        serial_len = int(data[cur.p]) + 6
        cur.p += 1
        cur.take(serial_len, "COUPON_TRUNCATED_SERIAL_NUMBER", "serial number")
    if cur.left > 0 and data[cur.p] == "6":
        cur.p += 1
        g = cur.vli("COUPON_MISSING_RETAILER_GCP_OR_GLN_VLI", "COUPON_INVALID_RETAILER_GCP_OR_GLN_LENGTH",
                    lambda c: "1" <= c <= "7", "retailer GCP/GLN length")
        start = cur.p
        cur.take(int(g) + 6, "COUPON_TRUNCATED_RETAILER_GCP_OR_GLN", "retailer GCP/GLN")
        _coupon_gcp(cur, start, int(g) + 6)
    if cur.left > 0 and data[cur.p] == "9":
        cur.p += 1
        cur.vli("COUPON_MISSING_SAVE_VALUE_CODE", "COUPON_INVALID_SAVE_VALUE_CODE", lambda c: c in "01256",
                "save value code")
        cur.vli("COUPON_MISSING_SAVE_VALUE_APPLIES_TO_ITEM", "COUPON_INVALID_SAVE_VALUE_APPLIES_TO_ITEM",
                lambda c: c <= "2", "save value applies to item")
        cur.vli("COUPON_MISSING_STORE_COUPON_FLAG", "COUPON_MISSING_STORE_COUPON_FLAG", lambda c: True,
                "store coupon flag")
        cur.vli("COUPON_MISSING_DONT_MULTIPLY_FLAG", "COUPON_INVALID_DONT_MULTIPLY_FLAG", lambda c: c in "01",
                "don't multiply flag")
    if cur.left > 0:
        raise _err("COUPON_EXCESS_DATA", cur.p, cur.left, f"coupon: excess data {data[cur.p:]!r}")


def lint_couponposoffer(data: str) -> None:
    _need_digits(data)
    cur = _Cursor(data)
    cur.vli("COUPON_MISSING_FORMAT_CODE", "COUPON_INVALID_FORMAT_CODE", lambda c: c in "01", "format code")
    f = cur.vli("COUPON_MISSING_FUNDER_VLI", "COUPON_INVALID_FUNDER_LENGTH", lambda c: c <= "6", "funder length")
    cur.take(int(f) + 6, "COUPON_TRUNCATED_FUNDER", "funder")
    cur.take(6, "COUPON_TRUNCATED_OFFER_CODE", "offer code")
    if cur.left <= 0:
        raise cur.fail("COUPON_MISSING_SERIAL_NUMBER_VLI", "serial number length is missing")
    n = int(data[cur.p]) + 6
    cur.p += 1
    cur.take(n, "COUPON_TRUNCATED_SERIAL_NUMBER", "serial number")
    if cur.left > 0:
        raise _err("COUPON_EXCESS_DATA", cur.p, cur.left, f"coupon: excess data {data[cur.p:]!r}")


def _deprecated_stub(data: str) -> None:
    """Linters the dictionary renamed; the reference keeps them as no-op stubs."""


#: Every linter name the dictionary format knows, by name.
LINTERS: dict[str, Callable[[str], None]] = {
    name[5:]: fn for name, fn in globals().items() if name.startswith("lint_") and callable(fn)
}
LINTERS.update({name: _deprecated_stub for name in ("hhmm", "iso3166list", "key", "keyoff1", "mmoptss",
                                                     "yymmddhh")})


# --------------------------------------------------------------------------
# the dictionary file
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """One component of an AI's data field, e.g. ``N3,iso3166`` or ``[X..17]``."""

    cset: str  # N, X, Y or Z
    min_len: int
    max_len: int
    optional: bool
    linters: tuple[str, ...]

    @property
    def fixed(self) -> bool:
        return self.min_len == self.max_len


@dataclass(frozen=True)
class AIEntry:
    """One AI as the dictionary defines it."""

    ai: str
    fnc1: bool  # False: predefined length ("*" flag), no FNC1 separator needed after it
    dl_data_attribute: bool  # "?" flag: allowed in a Digital Link query string
    components: tuple[Component, ...]
    #: each req= attribute: alternatives, each alternative: AIs/patterns that must all be present
    req: tuple[tuple[tuple[str, ...], ...], ...]
    ex: tuple[str, ...]
    #: None: not a Digital Link primary key; else its alternative qualifier sequences
    dlpkey: tuple[tuple[str, ...], ...] | None
    title: str
    # Derived from the components once, since every scan needs them.
    min_len: int = field(init=False)
    max_len: int = field(init=False)
    fixed_len: int | None = field(init=False)

    def __post_init__(self) -> None:
        max_len = sum(c.max_len for c in self.components)
        fixed = not any(c.optional or not c.fixed for c in self.components)
        object.__setattr__(self, "min_len", sum(c.min_len for c in self.components if not c.optional))
        object.__setattr__(self, "max_len", max_len)
        object.__setattr__(self, "fixed_len", max_len if fixed else None)

    @property
    def spec(self) -> str:
        """The specification as written in the dictionary, e.g. ``N14,csum,gcppos2``."""
        out = []
        for c in self.components:
            core = f"{c.cset}{c.max_len}" if c.fixed else f"{c.cset}..{c.max_len}"
            if c.optional:
                core = f"[{core}]"
            out.append(",".join((core, *c.linters)))
        return " ".join(out)


_COMPONENT_RE = re.compile(r"^(\[)?([NXYZ])(\.\.)?(\d+)(\])?((?:,[a-z0-9]+)*)$")
_AI_RE = re.compile(r"^\d{2,4}$")
_PATTERN_RE = re.compile(r"^\d{1,4}n*$")


class DictionaryError(ValueError):
    """The dictionary file itself is malformed (never expected for GS1's file)."""


def _parse_component(tok: str, where: str) -> Component:
    m = _COMPONENT_RE.match(tok)
    if m is None or bool(m.group(1)) != bool(m.group(5)):
        raise DictionaryError(f"{where}: bad component {tok!r}")
    n = int(m.group(4))
    linters = tuple(x for x in m.group(6).split(",") if x)
    for name in linters:
        if name not in LINTERS:
            raise DictionaryError(f"{where}: unknown linter {name!r}")
    return Component(m.group(2), 1 if m.group(3) else n, n, bool(m.group(1)), linters)


def _parse_line(line: str, lineno: int) -> list[AIEntry]:
    body, _, title = line.partition("#")
    toks = body.split()
    where = f"line {lineno}"
    ais = toks.pop(0)
    lo, _, hi = ais.partition("-")
    hi = hi or lo
    if not (_AI_RE.match(lo) and _AI_RE.match(hi) and len(lo) == len(hi) and lo <= hi):
        raise DictionaryError(f"{where}: bad AI or range {ais!r}")
    flags = ""
    if toks and not _COMPONENT_RE.match(toks[0]) and "=" not in toks[0] and toks[0] != "dlpkey":
        flags = toks.pop(0)
    comps: list[Component] = []
    while toks and _COMPONENT_RE.match(toks[0]):
        comps.append(_parse_component(toks.pop(0), where))
    if not comps:
        raise DictionaryError(f"{where}: no specification for AI {ais}")
    if any(not a.fixed for a in comps[:-1]):
        raise DictionaryError(f"{where}: only the last component may have variable length")
    seen_optional = False
    for c in comps:
        if seen_optional and not c.optional:
            raise DictionaryError(f"{where}: mandatory component after an optional one")
        seen_optional = seen_optional or c.optional
    req: list[tuple[tuple[str, ...], ...]] = []
    ex: list[str] = []
    dlpkey: tuple[tuple[str, ...], ...] | None = None
    for tok in toks:
        key, eq, val = tok.partition("=")
        if key == "req" and eq:
            groups = tuple(tuple(g.split("+")) for g in val.split(","))
            for g in groups:
                for p in g:
                    if not _PATTERN_RE.match(p):
                        raise DictionaryError(f"{where}: bad req pattern {p!r}")
            req.append(groups)
        elif key == "ex" and eq:
            for p in val.split(","):
                if not _PATTERN_RE.match(p):
                    raise DictionaryError(f"{where}: bad ex pattern {p!r}")
                ex.append(p)
        elif key == "dlpkey":
            dlpkey = tuple(tuple(seq.split(",")) for seq in val.split("|")) if eq else ((),)
        else:
            # Unknown attributes are allowed by the format; none is meaningful to us.
            continue
    out = []
    for n in range(int(lo), int(hi) + 1):
        ai = str(n).zfill(len(lo))
        out.append(AIEntry(
            ai=ai,
            fnc1="*" not in flags,
            dl_data_attribute="?" in flags,
            components=tuple(comps),
            req=tuple(req),
            ex=tuple(ex),
            dlpkey=dlpkey,
            title=title.strip(),
        ))
    return out


@dataclass(frozen=True)
class Dictionary:
    """All AI entries of one dictionary file."""

    release: str
    entries: dict[str, AIEntry]

    def get(self, ai: str) -> AIEntry | None:
        return self.entries.get(ai)

    def ai_at(self, s: str, pos: int = 0) -> AIEntry | None:
        """The known AI that the data at ``pos`` starts with (AIs are prefix-free)."""
        for n in (2, 3, 4):
            entry = self.entries.get(s[pos:pos + n])
            if entry is not None:
                return entry
        return None


def parse_text(text: str) -> Dictionary:
    release = "unknown"
    entries: dict[str, AIEntry] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("# Release:"):
            release = line.split(":", 1)[1].strip()
        if not line or line.startswith("#"):
            continue
        for entry in _parse_line(line, lineno):
            if entry.ai in entries:
                raise DictionaryError(f"line {lineno}: AI ({entry.ai}) defined twice")
            entries[entry.ai] = entry
    # AIs must be prefix-free, else element strings would be ambiguous.
    for ai in entries:
        for n in range(2, len(ai)):
            if ai[:n] in entries:
                raise DictionaryError(f"AI ({ai}) has the AI ({ai[:n]}) as a prefix")
    return Dictionary(release=release, entries=entries)


@lru_cache(maxsize=1)
def load() -> Dictionary:
    """The dictionary shipped with linectl (parsed once per process)."""
    text = resources.files("linectl").joinpath(DICTIONARY_RESOURCE).read_text(encoding="utf-8")
    return parse_text(text)


def matches(pattern: str, ai: str) -> bool:
    """``31nn`` matches any four-digit AI starting 31; a plain AI matches itself."""
    if len(pattern) != len(ai):
        return False
    stem = pattern.rstrip("n")
    return ai.startswith(stem)


def present(pattern: str, ais: Iterable[str], ignore: str | None = None) -> str | None:
    """The first AI in ``ais`` matching ``pattern``, never ``ignore`` itself."""
    for ai in ais:
        if ai != ignore and matches(pattern, ai):
            return ai
    return None
