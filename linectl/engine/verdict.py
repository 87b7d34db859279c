"""The verdict on one read: pure functions, so every rule can be tested without a line.

The order of checks matters for the reason reported: an operator fixing a
printer needs "not GS1" (FNC1 missing) rather than "wrong content" when both
are true, and "no read" before anything else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from linectl import gs1
from linectl.drivers.base import Decoded
from linectl.events import RejectReason


@dataclass(frozen=True)
class Expected:
    """What should be on the unit: the code we sent to the printer."""

    gtin: str
    serial: str
    lot: str | None
    expiry: str | None  # YYMMDD
    element_string: str
    #: every AI besides (01)/(21) the code must carry, from the product's CodeTemplate (dates, constants);
    #: empty: the lot and expiry above
    data: tuple[tuple[str, str], ...] = ()

    def checked(self) -> tuple[tuple[str, str], ...]:
        """The (AI, value) pairs a read must carry besides GTIN and serial."""
        if self.data:
            return self.data
        return tuple((ai, v) for ai, v in (("10", self.lot), ("17", self.expiry)) if v is not None)


@dataclass(frozen=True)
class Verdict:
    good: bool
    reason: RejectReason | None = None
    detail: str = ""
    grade: float | None = None
    seen_gtin: str | None = None
    seen_serial: str | None = None

    @staticmethod
    def ok(grade: float | None) -> Verdict:
        return Verdict(True, None, "", grade)


SYMBOLOGY_GS1_DMRE = "]d8"  # GS1 (FNC1 first) in a DMRE symbol, ISO/IEC 21471; zxing-cpp 3.1 reports it so


def _is_gs1(symbology: str | None, allow_dmre: bool) -> bool:
    return symbology == gs1.SYMBOLOGY_GS1_DM or (allow_dmre and symbology == SYMBOLOGY_GS1_DMRE)


def _first_code(codes: tuple[Decoded, ...]) -> Decoded | None:
    return codes[0] if codes else None


def symbol_problem(codes: tuple[Decoded, ...], *, require_gs1: bool = True, allow_dmre: bool = False) -> Verdict | None:
    """What is wrong with a unit's symbols before their content matters (no read, several codes, not GS1), or None."""
    code = _first_code(codes)
    if code is None or not code.data:
        return Verdict(False, RejectReason.NO_READ, "nothing decoded")
    if len(codes) > 1:
        return Verdict(False, RejectReason.WRONG_CONTENT, f"{len(codes)} codes seen on one unit")
    if require_gs1 and not _is_gs1(code.symbology, allow_dmre):
        expected = "]d2 or ]d8 (DMRE)" if allow_dmre else "]d2"
        return Verdict(False, RejectReason.NOT_GS1, f"symbology {code.symbology or 'unknown'}, expected {expected} (FNC1 missing or DMRE not allowed)")
    return None


def verify_unit(
    expected: Expected,
    codes: tuple[Decoded, ...],
    *,
    min_grade: float,
    require_gs1: bool = True,
    check_grade: bool = True,
    allow_dmre: bool = False,
    is_known_serial: Callable[[str, str], bool] = lambda g, s: False,
) -> Verdict:
    """Production check of one unit against the code sent for it.

    `is_known_serial(gtin, serial)` says whether that serial was already
    printed/verified on a unit before (then the read is a duplicate).
    """
    bad = symbol_problem(codes, require_gs1=require_gs1, allow_dmre=allow_dmre)
    if bad is not None:
        return bad
    code = codes[0]
    try:
        parsed = gs1.parse(code.data)
    except gs1.GS1Error as exc:
        return Verdict(False, RejectReason.WRONG_CONTENT, f"not a valid GS1 element string: {exc.reason}")
    seen_g, seen_s = parsed.gtin, parsed.serial
    if seen_g != expected.gtin or seen_s != expected.serial:
        if seen_g and seen_s and is_known_serial(seen_g, seen_s):
            return Verdict(False, RejectReason.DUPLICATE, f"serial {seen_s} was already printed on another unit", seen_gtin=seen_g, seen_serial=seen_s)
        return Verdict(
            False,
            RejectReason.WRONG_CONTENT,
            f"read (01){seen_g}(21){seen_s}, expected (01){expected.gtin}(21){expected.serial}",
            seen_gtin=seen_g,
            seen_serial=seen_s,
        )
    wrong = gs1.mismatches(expected.checked(), parsed)
    if wrong:
        return Verdict(False, RejectReason.DATA_MISMATCH, "; ".join(wrong), seen_gtin=seen_g, seen_serial=seen_s)
    if parsed.element_string != expected.element_string:
        return Verdict(
            False, RejectReason.WRONG_CONTENT, "element string differs from the one sent (extra or missing AIs)", seen_gtin=seen_g, seen_serial=seen_s
        )
    if check_grade:
        if code.grade is None:
            return Verdict(False, RejectReason.LOW_GRADE, "no grade reported (ungraded)", seen_gtin=seen_g, seen_serial=seen_s)
        if code.grade < min_grade:
            return Verdict(
                False, RejectReason.LOW_GRADE, f"grade {code.grade:.1f} below minimum {min_grade:.1f}", grade=code.grade, seen_gtin=seen_g, seen_serial=seen_s
            )
    return Verdict.ok(code.grade)


def classify_unknown(
    codes: tuple[Decoded, ...],
    *,
    min_grade: float,
    is_known_serial: Callable[[str, str], bool],
    require_gs1: bool = True,
    allow_dmre: bool = False,
) -> Verdict:
    """A unit for which no code was sent (challenge units, unexpected units): always a reject, with the reason seen.

    Grade is checked before content so a low-grade challenge unit is
    recognised as such and the challenge proves the grade rule works too.
    """
    code = _first_code(codes)
    if code is None or not code.data:
        return Verdict(False, RejectReason.NO_READ, "nothing decoded")
    if require_gs1 and not _is_gs1(code.symbology, allow_dmre):
        return Verdict(False, RejectReason.NOT_GS1, f"symbology {code.symbology or 'unknown'}")
    if code.grade is None or code.grade < min_grade:
        return Verdict(False, RejectReason.LOW_GRADE, f"grade {code.grade} below minimum {min_grade:.1f}", grade=code.grade)
    try:
        parsed = gs1.parse(code.data)
    except gs1.GS1Error as exc:
        return Verdict(False, RejectReason.WRONG_CONTENT, exc.reason)
    if parsed.gtin and parsed.serial and is_known_serial(parsed.gtin, parsed.serial):
        return Verdict(False, RejectReason.DUPLICATE, f"serial {parsed.serial} seen before", seen_gtin=parsed.gtin, seen_serial=parsed.serial)
    return Verdict(False, RejectReason.WRONG_CONTENT, "code was not sent to the printer by this line", seen_gtin=parsed.gtin, seen_serial=parsed.serial)


CHALLENGE_EXPECTED_REASON = {
    "no_code": RejectReason.NO_READ,
    "wrong_code": RejectReason.WRONG_CONTENT,
    "duplicate": RejectReason.DUPLICATE,
    "not_gs1": RejectReason.NOT_GS1,
    "low_grade": RejectReason.LOW_GRADE,
}


def challenge_status(required: Sequence[str] | None, results: list[dict[str, Any]], stations: list[str] | None = None) -> dict[str, Any]:
    """Where a batch's challenge stands, from its stored results (batches.challenge).

    A kind passed at a station when the last result for (station, kind) is a unit rejected for that kind's own
    reason and confirmed by the gate; a later run of the challenge replaces an earlier one, the earlier stays
    in the record. `stations` are those that must pass (default: the stations seen in the results).
    `required` None means unknown (a batch created before schema v3): the caller's configured list applies.
    """
    kinds = list(required or [])
    last: dict[tuple[str | None, str], dict[str, Any]] = {}
    for res in results:
        last[(res.get("station"), str(res.get("challenge")))] = res
    seen: list[str | None] = [st for st in sorted({st for st, _ in last if st is not None})]
    names: list[str | None] = list(stations) if stations else seen or [None]
    passed: list[str] = []
    failed: list[str] = []
    never_ran: list[str] = []
    for st in names:
        for kind in kinds:
            r = last.get((st, kind)) or last.get((None, kind))
            label = kind if st is None else f"{st}:{kind}"
            expected = CHALLENGE_EXPECTED_REASON.get(kind)
            if r is None:
                never_ran.append(label)
            elif r.get("rejected") and expected is not None and r.get("reason_seen") == expected.value:
                passed.append(label)
            else:
                failed.append(label)
    return {"required": required, "passed": passed, "failed": failed, "never_ran": never_ran, "complete": not failed and not never_ran}
