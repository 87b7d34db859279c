"""Batch data is validated completely at create, with a reply naming the field; supervised crashes close the infeed.

Fast tests: the command model, the line's create checks on a line without stations (a real store), and the
supervisor's crash hook. The end-to-end behaviour (a crashed task on a running simulated line, a printer that
cannot be primed, a full disk) is in test_engine_guards.py.
"""

from __future__ import annotations

import asyncio
from datetime import date, timedelta

import pytest
from pydantic import ValidationError

from linectl import control as C
from linectl.config import parse_config
from linectl.demo import DEFAULT_CONFIG
from linectl.engine.line import Line
from linectl.engine.supervisor import Supervisor
from linectl.store import Store
from linectl.yamlsource import load_yaml, to_plain

GTIN = "09501101530003"


def _fields(exc: ValidationError) -> set[str]:
    return {str(e["loc"][0]) for e in exc.errors()}


@pytest.mark.parametrize(
    "expiry, why",
    [
        ("281332", "month 13"),
        ("281300", "month 13"),
        ("280001", "month 00"),
        ("270229", "day 29"),  # 2027 is not a leap year
        ("280431", "day 31"),
        ("28013", "6 digits"),
        ("2801A1", "6 digits"),
    ],
)
def test_impossible_expiry_refused_naming_expiry(expiry, why):
    with pytest.raises(ValidationError) as ei:
        C.CreateBatch(lot="L1", gtin=GTIN, expiry=expiry, planned_qty=10)
    assert _fields(ei.value) == {"expiry"}, ei.value
    assert why in str(ei.value), str(ei.value)


@pytest.mark.parametrize("expiry", ["280229", "280200", "271231", "270200"])
def test_valid_gs1_expiry_accepted(expiry):
    assert C.CreateBatch(lot="L1", gtin=GTIN, expiry=expiry, planned_qty=10).expiry == expiry


@pytest.mark.parametrize(
    "fields, name",
    [
        ({"lot": "A" * 21}, "lot"),
        ({"lot": "LOT 1"}, "lot"),  # space is not in GS1 character set 82
        ({"lot": "LOT#1"}, "lot"),
        ({"lot": ""}, "lot"),
        ({"planned_qty": 0}, "planned_qty"),
        ({"planned_qty": -5}, "planned_qty"),
        ({"planned_qty": C.MAX_PLANNED_QTY + 1}, "planned_qty"),
        ({"gtin": "09501101530004"}, "gtin"),  # wrong check digit
        ({"gtin": "95011015"}, "gtin"),
    ],
)
def test_bad_batch_fields_refused_naming_the_field(fields, name):
    with pytest.raises(ValidationError) as ei:
        C.CreateBatch(**{"lot": "L1", "gtin": GTIN, "expiry": "281231", "planned_qty": 10, **fields})
    assert _fields(ei.value) == {name}, ei.value


def _line_cfg(shelf_life_days: int | None):
    raw = to_plain(load_yaml(DEFAULT_CONFIG))
    raw["stations"] = []
    raw["mqtt"]["enabled"] = False
    if shelf_life_days is not None:
        raw["products"][0]["shelf_life_days"] = shelf_life_days
    return parse_config(raw)


async def _line(tmp_path, shelf_life_days: int | None = None) -> tuple[Line, Store]:
    store = await Store.open(tmp_path / "line.db")
    cfg = _line_cfg(shelf_life_days)
    await store.upsert_products(cfg.products)
    return Line(cfg, store, {}), store


def _yymmdd(d: date) -> str:
    return d.strftime("%y%m%d")


async def test_expiry_in_the_past_refused(tmp_path):
    line, store = await _line(tmp_path)
    try:
        with pytest.raises(C.CommandRejected) as ei:
            await line.execute(C.CreateBatch(lot="P1", gtin=GTIN, expiry=_yymmdd(date.today() - timedelta(days=1)), planned_qty=10), "test")
        assert ei.value.code == "invalid_expiry" and ei.value.reason.startswith("expiry"), ei.value.reason
        assert store.batch("P1") is None
        # day 00 of the current month means its last day: not in the past
        res = await line.execute(C.CreateBatch(lot="P2", gtin=GTIN, expiry=date.today().strftime("%y%m00"), planned_qty=10), "test")
        assert res["state"] == "created"
    finally:
        await store.close()


async def test_expiry_beyond_shelf_life_refused(tmp_path):
    line, store = await _line(tmp_path, shelf_life_days=365)
    try:
        too_late = _yymmdd(date.today() + timedelta(days=400))
        with pytest.raises(C.CommandRejected) as ei:
            await line.execute(C.CreateBatch(lot="S1", gtin=GTIN, expiry=too_late, planned_qty=10), "test")
        assert ei.value.code == "invalid_expiry" and "shelf life" in ei.value.reason and ei.value.reason.startswith("expiry"), ei.value.reason
        assert store.batch("S1") is None
        ok = _yymmdd(date.today() + timedelta(days=360))
        assert (await line.execute(C.CreateBatch(lot="S2", gtin=GTIN, expiry=ok, planned_qty=10), "test"))["state"] == "created"
    finally:
        await store.close()


async def test_challenge_requirement_is_stored_with_the_batch(tmp_path):
    line, store = await _line(tmp_path)
    try:
        exp = _yymmdd(date.today() + timedelta(days=300))
        await line.execute(C.CreateBatch(lot="C1", gtin=GTIN, expiry=exp, planned_qty=10), "test")
        assert store.batch("C1").challenge_required == list(line.cfg.batch.challenge)
        await line.execute(C.CloseBatch(), "test")
        await line.execute(C.CreateBatch(lot="C2", gtin=GTIN, expiry=exp, planned_qty=10, challenge=False), "test")
        assert store.batch("C2").challenge_required == []
    finally:
        await store.close()


async def test_supervisor_runs_crash_hook_before_restart_and_gives_up():
    order: list[str] = []
    gave_up: list[str] = []

    async def task() -> None:
        order.append("run")
        raise RuntimeError("boom")

    async def on_crash(name: str, exc: BaseException) -> None:
        order.append("crash_hook")

    async def on_give_up(name: str, exc: BaseException) -> None:
        gave_up.append(name)

    sup = Supervisor(max_restarts=2, window_s=60, restart_delay_s=0.01, on_crash=on_crash, on_give_up=on_give_up)
    sup.start("t", task)
    for _ in range(200):
        if gave_up:
            break
        await asyncio.sleep(0.01)
    await sup.stop()
    assert gave_up == ["t"]
    assert order == ["run", "crash_hook"] * 3, order


async def test_supervisor_does_not_count_uncounted_crashes():
    runs = 0

    class Full(Exception):
        pass

    async def task() -> None:
        nonlocal runs
        runs += 1
        if runs <= 4:
            raise Full("disk full")
        await asyncio.sleep(3600)

    gave_up: list[str] = []

    async def on_give_up(name: str, exc: BaseException) -> None:
        gave_up.append(name)

    sup = Supervisor(max_restarts=1, window_s=60, restart_delay_s=0.01, on_give_up=on_give_up, uncounted=lambda e: isinstance(e, Full))
    sup.restart_delay_s = 0.01
    sup.start("t", task)
    for _ in range(600):
        if runs >= 5:
            break
        await asyncio.sleep(0.01)
    await sup.stop()
    assert runs == 5 and not gave_up


def _station(**kw):
    from linectl.config import PrintVerifyStation

    return PrintVerifyStation(type="print_verify", name="pv", printer="p", reader="r", plc="x", **kw)


def test_printer_queue_s_sizes_the_queue_and_inconsistent_bounds_are_refused():
    from linectl.config import IMPLICIT_QUEUE_BOUND, queue_depth_for

    assert queue_depth_for(1.5, 600) == 15 and queue_depth_for(1.5, 6000) == 150 and queue_depth_for(0.01, 60) == 2
    st = _station(printer_queue_s=1.5, rate_upm=600)
    assert st.queue_bound == IMPLICIT_QUEUE_BOUND
    assert _station(printer_queue_s=1.5, rate_upm=600, printer_queue_depth=64).queue_bound == 64
    with pytest.raises(ValidationError, match="needs 15 codes on the printer, but printer_queue_depth bounds it to 4"):
        _station(printer_queue_s=1.5, rate_upm=600, printer_queue_depth=4)
    with pytest.raises(ValidationError, match="printer_queue_s needs rate_upm"):
        _station(printer_queue_s=1.5)
    assert _station().queue_bound == 4  # no printer_queue_s: the fixed depth, as before
