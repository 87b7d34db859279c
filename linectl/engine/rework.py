"""Rework: take units out of cases, put others in, dissolve containers, destroy damaged units, relabel.

Every operation is one `store.append` — one transaction holding every event
it needs (Unpacked before UnitDecommissioned, Unpacked + Packed for a
replacement) — so the hierarchy is never seen half-changed, and every event
names the actor, which puts it in the hash-chained audit trail. The store
checks consistency again inside the transaction; the checks here exist to
give the operator a precise reason before anything is written.

Invariants kept (and checked by `check_hierarchy`): a unit or case has at
most one parent; a parent holds only commissioned children; a decommissioned
unit is in no parent; containers hold only lower levels of their own lot.

The functions take a Store and work the same from the rework station
runtime (scanner-driven), the daemon, and `linectl rework` offline.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from linectl import gs1
from linectl.config import ReworkStation
from linectl.drivers.base import CodeReader, DeviceError, Printer, PrintJob
from linectl.engine.station import LinePort, Station, TaskFactory
from linectl.events import (
    ChildRef,
    ContainerDecommissioned,
    Packed,
    RejectReason,
    UnitDecommissioned,
    UnitInspected,
    Unpacked,
)
from linectl.store.trace import TraceError, active_children, container_facts, identify_code, snapshot, unit_facts, verify_code_async

if TYPE_CHECKING:
    from collections.abc import Mapping

    from linectl.drivers.base import Driver

log = structlog.get_logger("linectl.rework")

REPRINT_ACTION = "label_reprinted"
OPERATIONS = ("remove", "add", "replace", "dissolve", "decommission", "reprint", "inspect")


class ReworkError(Exception):
    """The operation is not allowed (reason code + an operator-facing message); nothing was written."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------- helpers


def _unit(code: str) -> tuple[str, str]:
    try:
        ident = identify_code(code)
    except TraceError as exc:
        raise ReworkError("bad_code", str(exc)) from None
    if ident["kind"] != "sgtin":
        raise ReworkError("not_a_unit", f"{code!r} is an SSCC, not a unit code")
    return ident["gtin"], ident["serial"]


def _sscc(code: str) -> str:
    if code.isdigit() and len(code) == 18:
        code = "(00)" + code
    try:
        ident = identify_code(code)
    except TraceError as exc:
        raise ReworkError("bad_code", str(exc)) from None
    if ident["kind"] != "sscc":
        raise ReworkError("not_a_container", f"{code!r} is a unit code, not an SSCC")
    return str(ident["sscc"])


async def _append(store: Any, *events: Any) -> None:
    from linectl.store import StoreError

    try:
        await store.append(*events)
    except StoreError as exc:
        raise ReworkError("refused", f"store refused: {exc}") from None


def _unit_facts(store: Any, gtin: str, serial: str) -> Any:
    f = unit_facts(store, [(gtin, serial)]).get((gtin, serial))
    if f is None or f.state is None:
        raise ReworkError("unknown", f"serial {serial} of GTIN {gtin} is not known to this line")
    return f


def _container_facts(store: Any, sscc: str) -> Any:
    c = container_facts(store, [sscc]).get(sscc)
    if c is None or c.state is None:
        raise ReworkError("unknown", f"SSCC {sscc} is not known to this line")
    return c


def _ref(gtin: str, serial: str) -> ChildRef:
    return ChildRef(gtin=gtin, serial=serial)


def _free_unit_for(store: Any, gtin: str, serial: str, parent: Any) -> Any:
    """The unit may go into `parent`: commissioned, free, same product and lot."""
    f = _unit_facts(store, gtin, serial)
    if f.state != "commissioned":
        raise ReworkError("not_commissioned", f"serial {serial} is {f.state}; only commissioned units can be packed")
    if f.parent is not None:
        raise ReworkError("already_packed", f"serial {serial} is already packed in {f.parent}; remove it there first")
    if parent.lot is not None and f.lot != parent.lot:
        raise ReworkError("other_batch", f"serial {serial} is of lot {f.lot}; {parent.sscc} holds lot {parent.lot}")
    if parent.gtin is not None and gtin != parent.gtin:
        raise ReworkError("other_product", f"serial {serial} is GTIN {gtin}; {parent.sscc} holds GTIN {parent.gtin}")
    return f


# --------------------------------------------------------------------------- operations


async def remove_unit(store: Any, code: str, actor: str, *, station: str | None = None) -> dict[str, Any]:
    """Take one unit out of its case (AggregationEvent DELETE)."""
    gtin, serial = _unit(code)
    f = _unit_facts(store, gtin, serial)
    if f.parent is None:
        raise ReworkError("not_packed", f"serial {serial} is not packed in any case")
    await _append(store, Unpacked(parent=f.parent, children=[_ref(gtin, serial)], lot=f.lot, actor=actor, station=station))
    log.info("rework_removed", gtin=gtin, serial=serial, parent=f.parent, actor=actor)
    return {"op": "remove", "gtin": gtin, "serial": serial, "parent": f.parent, "events": ["unpacked"]}


async def add_unit(store: Any, parent_code: str, code: str, actor: str, *, station: str | None = None) -> dict[str, Any]:
    """Put a free commissioned unit into a commissioned case of its lot (fills a place left by a removal)."""
    sscc = _sscc(parent_code)
    gtin, serial = _unit(code)
    c = _container_facts(store, sscc)
    if c.state != "commissioned":
        raise ReworkError("parent_not_commissioned", f"SSCC {sscc} is {c.state}")
    if c.level != "case":
        raise ReworkError("wrong_level", f"SSCC {sscc} is a {c.level}; units go into cases")
    _free_unit_for(store, gtin, serial, c)
    await _append(store, Packed(parent=sscc, children=[_ref(gtin, serial)], lot=c.lot, actor=actor, station=station))
    log.info("rework_added", gtin=gtin, serial=serial, parent=sscc, actor=actor)
    return {"op": "add", "gtin": gtin, "serial": serial, "parent": sscc, "events": ["packed"]}


async def replace_unit(
    store: Any, old_code: str, new_code: str, actor: str, *, decommission_old: bool = False, detail: str = "", station: str | None = None
) -> dict[str, Any]:
    """Swap a packed unit for a free one in the same case, in one transaction (optionally destroying the old one)."""
    og, os_ = _unit(old_code)
    ng, ns = _unit(new_code)
    if (og, os_) == (ng, ns):
        raise ReworkError("same_unit", "old and new unit are the same code")
    old = _unit_facts(store, og, os_)
    if old.parent is None:
        raise ReworkError("not_packed", f"serial {os_} is not packed in any case")
    parent = _container_facts(store, old.parent)
    _free_unit_for(store, ng, ns, parent)
    events: list[Any] = [
        Unpacked(parent=old.parent, children=[_ref(og, os_)], lot=old.lot, actor=actor, station=station),
        Packed(parent=old.parent, children=[_ref(ng, ns)], lot=parent.lot, actor=actor, station=station),
    ]
    if decommission_old:
        events.append(
            UnitDecommissioned(
                gtin=og,
                serial=os_,
                lot=old.lot,
                reason=RejectReason.DAMAGED,
                destroyed=True,
                detail=detail or "replaced in rework",
                actor=actor,
                station=station,
            )
        )
    await _append(store, *events)
    log.info("rework_replaced", old=os_, new=ns, parent=old.parent, actor=actor, decommissioned=decommission_old)
    return {"op": "replace", "old": {"gtin": og, "serial": os_}, "new": {"gtin": ng, "serial": ns}, "parent": old.parent, "events": [e.kind for e in events]}


async def dissolve(store: Any, code: str, actor: str, *, void_sscc: bool = True, reason: str = "dissolved", station: str | None = None) -> dict[str, Any]:
    """Empty a case or pallet (its children become free); by default its SSCC is voided too (label destroyed).

    The children are listed explicitly in the Unpacked event rather than
    "all": the record and the EPCIS event then say exactly what was taken out.
    """
    sscc = _sscc(code)
    with snapshot(store) as conn:
        c = container_facts(store, [sscc], conn).get(sscc)
        kids = active_children(store, sscc, conn)
    if c is None or c.state is None:
        raise ReworkError("unknown", f"SSCC {sscc} is not known to this line")
    if c.state != "commissioned":
        raise ReworkError("not_commissioned", f"SSCC {sscc} is {c.state}")
    events: list[Any] = []
    if c.parent is not None:
        events.append(Unpacked(parent=c.parent, children=[ChildRef(sscc=sscc)], lot=c.lot, actor=actor, station=station))
    refs = [ChildRef(sscc=k["sscc"]) if k["kind"] == "container" else _ref(k["gtin"], k["serial"]) for k in kids]
    if refs:
        events.append(Unpacked(parent=sscc, children=refs, lot=c.lot, actor=actor, station=station))
    if void_sscc:
        events.append(ContainerDecommissioned(sscc=sscc, reason=reason or "dissolved", commissioned=True, lot=c.lot, actor=actor, station=station))
    if not events:
        raise ReworkError("nothing_to_do", f"SSCC {sscc} is empty and keeps its SSCC")
    await _append(store, *events)
    log.info("rework_dissolved", sscc=sscc, level=c.level, children=len(refs), voided=void_sscc, actor=actor)
    return {
        "op": "dissolve",
        "sscc": sscc,
        "level": c.level,
        "children": len(refs),
        "from_parent": c.parent,
        "sscc_voided": void_sscc,
        "events": [e.kind for e in events],
    }


async def decommission_unit(
    store: Any, code: str, actor: str, *, detail: str = "damaged", reason: RejectReason = RejectReason.DAMAGED, station: str | None = None
) -> dict[str, Any]:
    """Destroy a damaged unit: out of its case first (same transaction), then decommissioned as destroyed."""
    gtin, serial = _unit(code)
    f = _unit_facts(store, gtin, serial)
    if f.state not in ("commissioned", "sent"):
        raise ReworkError("not_commissioned", f"serial {serial} is {f.state}; nothing to decommission")
    events: list[Any] = []
    if f.parent is not None:
        events.append(Unpacked(parent=f.parent, children=[_ref(gtin, serial)], lot=f.lot, actor=actor, station=station))
    events.append(UnitDecommissioned(gtin=gtin, serial=serial, lot=f.lot, reason=reason, detail=detail[:500], destroyed=True, actor=actor, station=station))
    await _append(store, *events)
    log.info("rework_decommissioned", gtin=gtin, serial=serial, parent=f.parent, actor=actor)
    return {"op": "decommission", "gtin": gtin, "serial": serial, "parent": f.parent, "events": [e.kind for e in events]}


def label_job(store: Any, sscc: str, seq: int) -> PrintJob:
    """The same label the case/pallet station printed, rebuilt from the record (product, lot, expiry, count)."""
    f = store.label_facts(sscc)
    code = gs1.compose({"00": sscc})
    fields = {"sscc": sscc, "product": f.product, "gtin": f.gtin, "lot": f.lot, "expiry": f.expiry, "count": str(f.children), "level": f.level}
    return PrintJob(seq=seq, element_string=code.element_string, hri=code.hri, fields=fields)


async def reprint_label(
    store: Any,
    code: str,
    actor: str,
    *,
    printer: Printer | None = None,
    confirm: Callable[[int], Awaitable[bool]] | None = None,
    timeout_s: float = 10.0,
    origin: str | None = None,
) -> dict[str, Any]:
    """Print a case/pallet label again with the same SSCC; the audit trail records who, where and whether it printed.

    Without a printer (offline CLI) only the reprint is recorded, for a
    label printed by other means. `confirm(job_seq)` waits for the print
    confirmation when the caller owns the printer's confirmation stream.
    """
    sscc = _sscc(code)
    c = _container_facts(store, sscc)
    if c.state != "commissioned":
        raise ReworkError("not_commissioned", f"SSCC {sscc} is {c.state}; a voided SSCC is never relabelled")
    confirmed: bool | None = None
    if printer is not None:
        job = label_job(store, sscc, int(datetime.now(UTC).timestamp() * 1000) % 1_000_000_000)
        try:
            await printer.send(job)
        except DeviceError as exc:
            raise ReworkError("print_failed", f"printer {printer.name}: {exc.reason}") from None
        confirmed = await (confirm(job.seq) if confirm is not None else _await_confirm(printer, job.seq, timeout_s))
    detail = {"sscc": sscc, "level": c.level, "lot": c.lot, "printer": printer.name if printer else None, "confirmed": confirmed}
    await store.audit(actor, origin or (actor.split(":", 1)[0] if ":" in actor else "rework"), REPRINT_ACTION, detail)
    log.info("rework_label_reprinted", sscc=sscc, actor=actor, printer=detail["printer"], confirmed=confirmed)
    if confirmed is False:
        raise ReworkError("print_unconfirmed", f"label for {sscc} sent to {printer.name if printer else '?'} but not confirmed within {timeout_s}s")
    return {"op": "reprint", "sscc": sscc, "level": c.level, "printer": detail["printer"], "confirmed": confirmed, "events": []}


async def _await_confirm(printer: Printer, seq: int, timeout_s: float) -> bool:
    async def wait() -> bool:
        async for c in printer.confirmations():
            if c.seq == seq:
                return True
        return False

    try:
        return await asyncio.wait_for(wait(), timeout_s)
    except TimeoutError:
        return False


# --------------------------------------------------------------------------- invariants


def check_hierarchy(store: Any) -> list[str]:
    """Every violation of the aggregation invariants, in words; [] when consistent. Full scans: a check, not a hot path."""
    return store.hierarchy_problems()  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- rework station runtime


MODE_PREFIX = "LINECTL:"


class ReworkRuntime(Station):
    """A rework bench: the operator picks an operation (HMI, MQTT or a command barcode) and scans.

    Command barcodes (plain DataMatrix/QR/128): `LINECTL:MODE=remove` (any of
    OPERATIONS) and `LINECTL:OPERATOR=<id>` (badge). In `add` mode the first
    SSCC scanned is the target case; in `replace` the first unit scanned is
    the one taken out, the second the one put in. `inspect` (the default)
    verifies the code, raises an alarm for a suspicious one and records a
    UnitInspected event for a known unit.
    """

    def __init__(self, cfg: ReworkStation, line: LinePort, scanner: CodeReader, printer: Printer | None = None, *, label_timeout_s: float = 10.0) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.line = line
        self.scanner = scanner
        self.printer = printer
        self.label_timeout_s = label_timeout_s
        self.mode = "inspect"
        self.operator: str | None = None
        self._pending: str | None = None  # replace: old unit; add: target SSCC
        self.results: deque[dict[str, Any]] = deque(maxlen=50)
        self.counts: dict[str, int] = {}
        self._waiting: dict[int, asyncio.Future[bool]] = {}
        self.log = log.bind(station=cfg.name)

    def tasks(self) -> dict[str, TaskFactory]:
        t: dict[str, TaskFactory] = {f"{self.name}.scans": self._scans}
        if self.printer is not None:
            t[f"{self.name}.label_confirms"] = self._confirms
        return t

    # Rework does not follow the batch state (units of any lot can be reworked): the line's lifecycle hooks
    # are the Station defaults (nothing to do).

    def set_mode(self, mode: str, operator: str | None = None) -> None:
        if mode not in OPERATIONS:
            raise ValueError(f"unknown rework operation {mode!r} (one of {', '.join(OPERATIONS)})")
        self.mode = mode
        self._pending = None
        if operator:
            self.operator = operator
        self.log.info("rework_mode", mode=mode, operator=self.operator)

    def snapshot(self) -> dict[str, Any]:
        return {
            "type": "rework",
            "mode": self.mode,
            "operator": self.operator,
            "pending": self._pending,
            "counts": dict(self.counts),
            "last": list(self.results)[-5:],
        }

    @property
    def actor(self) -> str:
        return self.operator or "operator"

    async def _scans(self) -> None:
        async for r in self.scanner.reads():
            for d in r.codes:
                try:
                    await self.handle_scan((d.symbology or "") + d.data)
                except Exception as exc:  # noqa: BLE001 - the bench must keep taking scans
                    self.log.exception("rework_scan_failed", error=str(exc))

    async def _confirms(self) -> None:
        assert self.printer is not None
        async for c in self.printer.confirmations():
            fut = self._waiting.pop(c.seq, None)
            if fut is not None and not fut.done():
                fut.set_result(True)

    async def confirm_print(self, seq: int) -> bool:
        """Whether the bench printer confirmed job `seq` in time: the bench owns its confirmation stream, so a reprint
        ordered from elsewhere (MQTT) waits here rather than on a second reader of that stream."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting[seq] = fut
        try:
            return await asyncio.wait_for(fut, self.label_timeout_s)
        except TimeoutError:
            return False
        finally:
            self._waiting.pop(seq, None)

    async def handle_scan(self, code: str) -> dict[str, Any]:
        body = code[3:] if code.startswith("]") else code
        if body.upper().startswith(MODE_PREFIX):
            res = self._command(body[len(MODE_PREFIX) :])
            self.results.append(res)
            return res
        store = self.line.store
        try:
            res = await self._dispatch(store, code)
            res["ok"] = True
        except ReworkError as exc:
            res = {"op": self.mode, "ok": False, "code": exc.code, "reason": exc.message, "scanned": code[:80]}
            self.log.warning("rework_refused", op=self.mode, code=exc.code, reason=exc.message)
        res["actor"] = self.actor
        res["at"] = datetime.now(UTC).isoformat(timespec="milliseconds")
        self.counts[f"{res['op']}_{'ok' if res['ok'] else 'refused'}"] = self.counts.get(f"{res['op']}_{'ok' if res['ok'] else 'refused'}", 0) + 1
        self.results.append(res)
        return res

    def _command(self, text: str) -> dict[str, Any]:
        key, _, value = text.partition("=")
        key = key.strip().upper()
        if key == "MODE":
            try:
                self.set_mode(value.strip().lower())
            except ValueError as exc:
                return {"op": "command", "ok": False, "reason": str(exc)}
            return {"op": "command", "ok": True, "mode": self.mode}
        if key == "OPERATOR" and value.strip():
            self.operator = value.strip()[:64]
            self.log.info("rework_operator", operator=self.operator)
            return {"op": "command", "ok": True, "operator": self.operator}
        return {"op": "command", "ok": False, "reason": f"unknown command {text!r}"}

    async def _dispatch(self, store: Any, code: str) -> dict[str, Any]:
        actor, st = self.actor, self.name
        mode = self.mode
        if mode == "remove":
            return await remove_unit(store, code, actor, station=st)
        if mode == "decommission":
            return await decommission_unit(store, code, actor, detail="damaged (rework bench)", station=st)
        if mode == "dissolve":
            return await dissolve(store, code, actor, station=st)
        if mode == "reprint":
            return await reprint_label(store, code, actor, printer=self.printer, confirm=self.confirm_print if self.printer else None, origin=f"station:{st}")
        if mode == "replace":
            if self._pending is None:
                gtin, serial = _unit(code)
                f = _unit_facts(store, gtin, serial)
                if f.parent is None:
                    raise ReworkError("not_packed", f"serial {serial} is not packed in any case")
                self._pending = code
                return {"op": "replace", "step": "old_scanned", "gtin": gtin, "serial": serial, "parent": f.parent}
            old, self._pending = self._pending, None
            return await replace_unit(store, old, code, actor, station=st)
        if mode == "add":
            try:
                ident = identify_code(code)
            except TraceError as exc:
                raise ReworkError("bad_code", str(exc)) from None
            if ident["kind"] == "sscc":
                c = _container_facts(store, ident["sscc"])
                if c.level != "case" or c.state != "commissioned":
                    raise ReworkError("wrong_level", f"SSCC {ident['sscc']} is a {c.state} {c.level}; scan a commissioned case")
                self._pending = ident["sscc"]
                return {"op": "add", "step": "case_scanned", "sscc": ident["sscc"], "children": c.children}
            if self._pending is None:
                raise ReworkError("no_target", "scan the case first")
            return await add_unit(store, self._pending, code, actor, station=st)
        # inspect
        v = await verify_code_async(store, code, raise_alarm=True, station=st)
        ident = v.get("identity") or {}
        if v["status"] != "unknown" and ident.get("serial"):
            await _append(store, UnitInspected(gtin=ident["gtin"], serial=ident["serial"], lot=v.get("lot"), actor=actor, station=st))
        return {"op": "inspect", **v}


def build(st: ReworkStation, line: LinePort, drivers: Mapping[str, Driver]) -> ReworkRuntime:
    """The registry's builder (linectl/engine/station.py) for `type: rework`."""
    scanner = drivers[st.scanner]
    printer = drivers[st.printer] if st.printer else None
    assert isinstance(scanner, CodeReader)
    assert printer is None or isinstance(printer, Printer)
    return ReworkRuntime(st, line, scanner, printer)
