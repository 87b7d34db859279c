"""Old value, new value and reason in the audit record of every engine command (EU GMP Annex 11 §9).

`Line.execute` writes one audit record per command with the command as given
and its result. An inspector reading it must also see what the command
changed without replaying the line: `before(line, command)` takes what the
command is about to change, `change_of(...)` puts it beside what it is after
as the record's `old` / `new` keys, with the person's `reason` (None when
none was given). The keys are in every command record, so a reader never has
to guess whether a missing key means "nothing changed" or "not recorded".

`require_reason` refuses a command the line's `audit.reason_required` lists
when it comes without a reason (code `reason_required`), before anything ran.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from linectl import control as C
from linectl.engine.station import ReworkBench
from linectl.store.audit import change

if TYPE_CHECKING:
    from linectl.config import LineConfig
    from linectl.engine.line import Line

REASON_REQUIRED = "reason_required"

#: commands whose change is the batch's state
_BATCH_COMMANDS = frozenset({"create_batch", "start_batch", "pause_batch", "resume_batch", "stop_batch", "close_batch", "challenge", "packml_command"})


def missing_reason(required: Collection[str], name: str, reason: str | None) -> str | None:
    """The refusal for command `name` without a reason when the config requires one; None when it may go ahead."""
    if name in required and not (reason or "").strip():
        return (f"{name} needs a reason: the line's audit.reason_required lists it, and the audit trail keeps why "
                "a GMP record was changed (give reason)")
    return None


def reason_required(cfg: LineConfig | None) -> list[str]:
    """The config's list, or the defaults for a CLI command given only --db (no config: the defaults still hold)."""
    from linectl.config import AuditConfig

    return list((cfg.audit if cfg is not None else AuditConfig()).reason_required)


def require_reason(required: Collection[str], command: C.Command) -> None:
    """Raise CommandRejected(code reason_required) for a listed command that gives no reason; nothing has run."""
    refusal = missing_reason(required, _name(command), command.reason)
    if refusal is not None:
        raise C.CommandRejected(refusal, REASON_REQUIRED)


def _name(command: C.Command) -> str:
    name: str = type(command).model_fields["name"].default
    return name


def before(line: Line, command: C.Command) -> dict[str, Any]:
    """What `command` may change, as it is now (read before the handler runs, under the line's lock)."""
    name = _name(command)
    b = line.batch
    out: dict[str, Any] = {}
    if name in _BATCH_COMMANDS:
        out["batch"] = None if b is None or b.state.value == "closed" else {"lot": b.lot, "state": b.state.value}
    elif name == "ack_alarm":
        out["alarms"] = {a.alarm_id: a.code for a in line.alarms.values() if not a.acknowledged}
    elif name == "reset":
        out["fault"] = line.fault
    elif name == "provision_pool" and isinstance(command, C.ProvisionPool):
        out["available"] = _available(line, command.gtin)
    elif name == "rework_mode":
        out["benches"] = {s.name: {"mode": s.mode, "operator": s.operator} for s in line.stations if isinstance(s, ReworkBench)}
    return out


def change_of(line: Line, command: C.Command, was: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """The `old` / `new` / `reason` keys of the command's audit record."""
    name = _name(command)
    reason = command.reason
    if name in _BATCH_COMMANDS:
        b = line.batch
        now = None if b is None else {"lot": b.lot, "state": b.state.value}
        return change(was.get("batch"), now, reason)
    if name == "ack_alarm":
        acked = list(result.get("acknowledged", []))
        alarms = was.get("alarms", {})
        return change([{"alarm_id": a, "code": alarms.get(a), "acknowledged": False} for a in acked],
                      [{"alarm_id": a, "code": alarms.get(a), "acknowledged": True} for a in acked], reason)
    if name == "reset":
        return change({"fault": was.get("fault")}, {"fault": line.fault}, reason)
    if name == "set_unit_mode":
        return change({"unit_mode": result.get("previous")}, {"unit_mode": result.get("unit_mode")}, reason)
    if name == "rework_mode":
        station = result.get("station")
        return change(was.get("benches", {}).get(station), {"mode": result.get("mode"), "operator": result.get("operator")}, reason)
    if name == "provision_pool" and isinstance(command, C.ProvisionPool):
        return change({"available": was.get("available")}, {"available": _available(line, command.gtin)}, reason)
    if name == "recall_batch":
        return change({"recalled": bool(result.get("already"))}, {"recalled": True}, reason)
    if name == "reconcile_units":
        serials = result.get("serials", [])
        return change({"fate": "fate_unknown", "serials": serials},
                      {"fate": "resolved", "outcome": result.get("outcome"), "serials": serials}, reason)
    if name == "rework":
        return _rework_change(result.get("rework") or {}, reason)
    return change(None, None, reason)


def _rework_change(r: dict[str, Any], reason: str | None) -> dict[str, Any]:
    op = r.get("op")
    unit = {"gtin": r.get("gtin"), "serial": r.get("serial")}
    if op == "remove":
        return change({**unit, "parent": r.get("parent")}, {**unit, "parent": None}, reason)
    if op == "add":
        return change({**unit, "parent": None}, {**unit, "parent": r.get("parent")}, reason)
    if op == "replace":
        return change({**(r.get("old") or {}), "parent": r.get("parent")}, {**(r.get("new") or {}), "parent": r.get("parent")}, reason)
    if op == "dissolve":
        return change({"sscc": r.get("sscc"), "children": r.get("children"), "parent": r.get("from_parent"), "sscc_state": "commissioned"},
                      {"sscc": r.get("sscc"), "children": 0, "parent": None,
                       "sscc_state": "decommissioned" if r.get("sscc_voided") else "commissioned"}, reason)
    if op == "decommission":
        return change({**unit, "serial_state": "commissioned", "parent": r.get("parent")},
                      {**unit, "serial_state": "decommissioned", "parent": None}, reason)
    if op == "reprint":
        return change(None, {"sscc": r.get("sscc"), "label_printed": r.get("confirmed")}, reason)
    return change(None, None, reason)


def _available(line: Line, gtin: str) -> int | None:
    try:
        return line.store.available(line.cfg.product(gtin).gtin)
    except Exception:  # noqa: BLE001 - an unknown GTIN is refused by the command itself; the record still says so
        return None
