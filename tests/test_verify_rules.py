"""The verdict rules, one per reject reason, through real GS1 composition and parsing."""

from linectl import gs1
from linectl.drivers.base import Decoded
from linectl.engine.verdict import CHALLENGE_EXPECTED_REASON, Expected, classify_unknown, verify_unit
from linectl.events import RejectReason

GTIN = "09501101530003"


def expected(serial: str = "SER001", lot: str = "LOT1", expiry: str = "271231") -> Expected:
    code = gs1.compose_unit(GTIN, serial, lot=lot, expiry=expiry)
    return Expected(GTIN, serial, lot, expiry, code.element_string)


def read(serial: str = "SER001", lot: str = "LOT1", expiry: str = "271231", sym: str = "]d2", grade: float | None = 3.5) -> tuple[Decoded, ...]:
    return (Decoded(gs1.compose_unit(GTIN, serial, lot=lot, expiry=expiry).element_string, sym, grade),)


def test_good_unit_passes_with_grade():
    v = verify_unit(expected(), read(), min_grade=1.5)
    assert v.good and v.reason is None and v.grade == 3.5


def test_no_read():
    v = verify_unit(expected(), (), min_grade=1.5)
    assert not v.good and v.reason == RejectReason.NO_READ


def test_not_gs1_is_rejected_even_with_right_content():
    v = verify_unit(expected(), read(sym="]d1"), min_grade=1.5)
    assert v.reason == RejectReason.NOT_GS1 and "FNC1" in v.detail


def test_wrong_content_names_both_codes():
    v = verify_unit(expected(), read(serial="OTHER1"), min_grade=1.5)
    assert v.reason == RejectReason.WRONG_CONTENT
    assert "OTHER1" in v.detail and "SER001" in v.detail


def test_duplicate_when_serial_already_known():
    v = verify_unit(expected(), read(serial="PREV01"), min_grade=1.5, is_known_serial=lambda g, s: s == "PREV01")
    assert v.reason == RejectReason.DUPLICATE


def test_lot_and_expiry_mismatch():
    assert verify_unit(expected(), read(lot="LOT2"), min_grade=1.5).reason == RejectReason.DATA_MISMATCH
    assert verify_unit(expected(), read(expiry="281231"), min_grade=1.5).reason == RejectReason.DATA_MISMATCH


def test_grade_below_minimum_and_ungraded():
    v = verify_unit(expected(), read(grade=1.0), min_grade=1.5)
    assert v.reason == RejectReason.LOW_GRADE and "1.0" in v.detail
    assert verify_unit(expected(), read(grade=None), min_grade=1.5).reason == RejectReason.LOW_GRADE
    assert verify_unit(expected(), read(grade=None), min_grade=1.5, check_grade=False).good


def test_garbage_content_is_wrong_content_with_reason():
    v = verify_unit(expected(), (Decoded("0109501101530004", "]d2", 4.0),), min_grade=1.5)
    assert v.reason == RejectReason.WRONG_CONTENT and "check digit" in v.detail


def test_two_codes_on_one_unit_rejected():
    v = verify_unit(expected(), read() + read(), min_grade=1.5)
    assert v.reason == RejectReason.WRONG_CONTENT


def test_challenge_classification_matches_each_kind():
    seen = {("09501101530003", "DUP1")}
    known = lambda g, s: (g, s) in seen  # noqa: E731
    cases = {
        "no_code": (),
        "not_gs1": read(sym="]d1"),
        "low_grade": read(grade=0.5),
        "duplicate": read(serial="DUP1"),
        "wrong_code": read(serial="ZZZ9"),
    }
    for kind, codes in cases.items():
        v = classify_unknown(codes, min_grade=1.5, is_known_serial=known)
        assert not v.good
        assert v.reason == CHALLENGE_EXPECTED_REASON[kind], kind
