"""The PLC as an operator panel: command tags in, status tags out, e-stop and PLC loss stop the line.

Commands from tags go through the same `Line.execute` as MQTT and CLI, with
origin "plc:<name>", so they are validated and audited the same way. With access
control on, the PLC is the device actor "plc:<name>" (the actor of its commands)
and may send only what access.devices allows it (default: start, pause, resume,
stop, reset, PackML commands and unit mode; never close a batch). A
command bit is cleared only after the command was handled, so the HMI sees
when it was taken.

A PLC programmed to PackML drives the line through the PackTags command
handshake instead (README "PackTags on the PLC"): it writes CntrlCmd, then
raises CmdChangeRequest; linectl reads the command on the rising edge,
executes it as a PackmlCmd, writes packml_cmd_result and StateCurrent, and
clears CmdChangeRequest as the acknowledge (UnitMode / UnitModeChangeRequest
the same way). Nothing the PLC sends is run twice: a command whose acknowledge did not reach the PLC is acknowledged
again, not executed again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from linectl import control as C
from linectl.access.principal import Principal, device_principal
from linectl.drivers.base import DeviceError, HealthState, Plc
from linectl.drivers.plc_tags import (
    PACKML_BLOCKED_INPUT,
    PACKML_CMD_CHANGE_REQUEST,
    PACKML_CMD_RESULT,
    PACKML_CNTRL_CMD,
    PACKML_RESULT_CHANGED,
    PACKML_RESULT_DONE,
    PACKML_RESULT_INVALID_STATE,
    PACKML_RESULT_REFUSED,
    PACKML_RESULT_STALE,
    PACKML_RESULT_UNKNOWN_COMMAND,
    PACKML_STARVED_INPUT,
    PACKML_STATUS_TAGS,
    PACKML_UNIT_MODE,
    PACKML_UNIT_MODE_CHANGE_REQUEST,
    PlcConfigBase,
    fit_counter,
)
from linectl.engine.line import Line
from linectl.engine.packml import PackmlCommand, UnitMode

log = structlog.get_logger("linectl.plc_surface")

REQ, CNTRL, RESULT = PACKML_CMD_CHANGE_REQUEST, PACKML_CNTRL_CMD, PACKML_CMD_RESULT
MODE_REQ, MODE = PACKML_UNIT_MODE_CHANGE_REQUEST, PACKML_UNIT_MODE

@dataclass
class _Handshake:
    """One PackML request handshake (CntrlCmd or UnitMode) of one PLC."""

    req: str
    value_tag: str
    #: not looked at yet: a request already up at the first look is stale
    first: bool = True
    #: (value, result, plc_epoch) of a request run whose acknowledge did not reach the PLC
    unacked: tuple[Any, int, Any] | None = None


COMMAND_TAGS: dict[str, Callable[[], C.Command]] = {
    "cmd_start": lambda: C.StartBatch(actor="hmi"),
    "cmd_stop": lambda: C.StopBatch(actor="hmi", reason="stop from PLC/HMI"),
    "cmd_pause": lambda: C.PauseBatch(actor="hmi"),
    "cmd_reset": lambda: C.ResetLine(actor="hmi"),
}


class PlcSurface:
    def __init__(self, line: Line, plc: Plc, interval_s: float = 0.1, packml_refresh_s: float = 1.0) -> None:
        self.line = line
        self.plc = plc
        #: who the PLC's commands come from (None: access control off, the commands' own actor)
        self.principal: Principal | None = device_principal(line.cfg.access, f"plc:{plc.name}") if line.cfg.access.enabled else None
        self.interval_s = interval_s
        self._estop_seen = False
        self._lost = False
        names = set(plc.tag_names)
        self._specs: dict[str, Any] = plc.config.tag_specs() if isinstance(plc.config, PlcConfigBase) else {}
        #: the PackML request handshakes this PLC's tag map names (CntrlCmd, UnitMode), each with its own state
        self._handshakes = [
            _Handshake(req, value) for req, value in ((REQ, CNTRL), (MODE_REQ, MODE)) if req in names and value in names and RESULT in names
        ]
        self._packml_status_tags = [t for t in PACKML_STATUS_TAGS if t in names]
        #: the equipment inputs this PLC's tag map names (downstream_blocked, infeed_starved)
        self._blocked_tag = PACKML_BLOCKED_INPUT if PACKML_BLOCKED_INPUT in names else None
        self._starved_tag = PACKML_STARVED_INPUT if PACKML_STARVED_INPUT in names else None
        #: PackTags as last written to the PLC (forgotten when the PLC goes away: it may have restarted)
        self._written: dict[str, Any] = {}
        self._written_at = 0.0
        self.packml_refresh_s = packml_refresh_s

    async def run(self) -> None:
        self.plc.on_health(self._on_health)
        # PackML requests in their own loop: a Stop that drains the belt for seconds must not delay the e-stop check
        packml = asyncio.create_task(self._packml_loop(), name=f"packml:{self.plc.name}") if self._handshakes else None
        try:
            while True:
                await asyncio.sleep(self.interval_s)
                if packml is not None and packml.done():
                    packml.result()  # it crashed: raise here, so the supervisor restarts the whole surface
                tags = self.plc.latest()
                if not tags or self.plc.health.state != HealthState.CONNECTED:
                    continue
                await self.line.resync_line_mode(self.plc)
                await self._check_estop(tags)
                self._equipment(tags)
                for tag, make in COMMAND_TAGS.items():
                    if tags.get(tag):
                        await self._command(tag, make())
                # StateCurrent stays 0 (Undefined) on the PLC until every handshake had its first look: a PLC program
                # that waits for a non-zero StateCurrent before raising a request never has it refused as stale
                if self._packml_status_tags and not any(hs.first for hs in self._handshakes):
                    await self._packml_status()
                await self.line._write_status()
        finally:
            if packml is not None:
                packml.cancel()
                await asyncio.gather(packml, return_exceptions=True)

    async def _packml_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            tags = self.plc.latest()
            if not tags or self.plc.health.state != HealthState.CONNECTED:
                continue
            for hs in self._handshakes:
                await self._packml_handshake(hs, tags)

    async def _check_estop(self, tags: dict[str, Any]) -> None:
        estop = bool(tags.get("estop"))
        if estop and not self._estop_seen:
            await self.line.fault_stop("estop", f"emergency stop on PLC {self.plc.name}")
        self._estop_seen = estop

    def _equipment(self, tags: dict[str, Any]) -> None:
        if self._blocked_tag is None and self._starved_tag is None:
            return
        b, s = self._blocked_tag, self._starved_tag
        self.line.equipment_reported(self.plc.name, blocked=None if b is None or b not in tags else bool(tags[b]),
                                     starved=None if s is None or s not in tags else bool(tags[s]))

    async def _command(self, tag: str, cmd: Any) -> None:
        try:
            result = await self.line.execute(cmd, origin=f"plc:{self.plc.name}", principal=self.principal)
            log.info("plc_command", tag=tag, result=result)
        except C.CommandRejected as exc:
            log.warning("plc_command_rejected", tag=tag, reason=exc.reason)
        try:
            await self.plc.write_tag(tag, False)
        except Exception as exc:  # noqa: BLE001
            log.warning("plc_command_clear_failed", tag=tag, error=str(exc))

    # -- PackTags ---------------------------------------------------------------------

    async def _packml_handshake(self, hs: _Handshake, tags: dict[str, Any]) -> None:
        """The request up: take the value (CntrlCmd / UnitMode), run it once, write the result and StateCurrent, then
        acknowledge by clearing the request.

        The polled value only says "look": the request and then the value are read from the wire, in the order the
        PLC writes them backwards (request first, value second), so the value read is the one the request was raised
        for, and a late notification of an old request (OPC UA) is never taken for a new one."""
        if not tags.get(hs.req) and not hs.first:
            if hs.unacked is not None:
                log.warning("packml_ack_dropped", plc=self.plc.name, tag=hs.value_tag, value=hs.unacked[0],
                            why="the PLC withdrew the request (or restarted) before the acknowledge reached it")
                hs.unacked = None
            return
        try:
            req = bool((await self.plc.read_tags([hs.req]))[hs.req])
            if not req:
                hs.first = False
                return
            fresh = await self.plc.read_tags([hs.value_tag] + (["plc_epoch"] if "plc_epoch" in self.plc.tag_names else []))
        except DeviceError as exc:
            log.debug("packml_request_read_failed", plc=self.plc.name, error=exc.reason)
            return
        value, epoch = fresh[hs.value_tag], fresh.get("plc_epoch")
        if hs.unacked is not None:
            was, result, was_epoch = hs.unacked
            if value == was and epoch == was_epoch:
                # run before the link dropped; the PLC still waits for the acknowledge: give it, do not run it again
                log.info("packml_ack_repeated", plc=self.plc.name, tag=hs.value_tag, value=was, result=result)
                await self._ack(hs, value, result, epoch)
                return
            hs.unacked = None  # another value, or a restarted PLC: a new request
        if hs.first:
            # up before linectl looked: raised for a linectl that is gone, maybe long ago; never run it unasked
            log.warning("packml_request_stale", plc=self.plc.name, tag=hs.value_tag, value=value)
            await self._ack(hs, value, PACKML_RESULT_STALE, epoch)
            return
        result = await (self._packml_command(value) if hs.value_tag == CNTRL else self._packml_unit_mode(value))
        try:
            after = (await self.plc.read_tags([hs.value_tag]))[hs.value_tag]
        except DeviceError:
            after = value
        if after != value:
            log.warning("packml_request_changed", plc=self.plc.name, tag=hs.value_tag, executed=value, now=after, result=result,
                        why="changed while the request ran: the first value was handled, the new one was not")
            result = PACKML_RESULT_CHANGED
        await self._ack(hs, value, result, epoch)

    async def _packml_command(self, value: Any) -> int:
        try:
            cmd = PackmlCommand(int(value))
            if cmd is PackmlCommand.Undefined:
                raise ValueError(value)
        except (TypeError, ValueError):
            known = ", ".join(f"{c.value}={c.name}" for c in PackmlCommand if c is not PackmlCommand.Undefined)
            log.warning("packml_command_unknown", plc=self.plc.name, cntrl_cmd=value, known=known)
            return PACKML_RESULT_UNKNOWN_COMMAND
        return await self._run(C.PackmlCmd(command=cmd.name, actor="plc"), cmd.name)

    async def _packml_unit_mode(self, value: Any) -> int:
        try:
            mode = UnitMode(int(value))
            if mode is UnitMode.Invalid:
                raise ValueError(value)
        except (TypeError, ValueError):
            known = ", ".join(f"{m.value}={m.name}" for m in UnitMode if m is not UnitMode.Invalid)
            log.warning("packml_unit_mode_unknown", plc=self.plc.name, unit_mode=value, known=known)
            return PACKML_RESULT_UNKNOWN_COMMAND
        return await self._run(C.SetUnitMode(mode=mode.name, actor="plc"), f"UnitMode {mode.name}")

    async def _run(self, command: C.Command, what: str) -> int:
        try:
            await self.line.execute(command, origin=f"plc:{self.plc.name}", principal=self.principal)
        except C.CommandRejected as exc:
            log.warning("packml_request_refused", plc=self.plc.name, request=what, code=exc.code, reason=exc.reason)
            return PACKML_RESULT_INVALID_STATE if exc.code == "invalid_state" else PACKML_RESULT_REFUSED
        log.info("packml_request_done", plc=self.plc.name, request=what)
        return PACKML_RESULT_DONE

    async def _ack(self, hs: _Handshake, value: Any, result: int, epoch: Any) -> None:
        """Result, then StateCurrent, then the request cleared: the PLC that sees the request fall reads both valid."""
        hs.first = False
        try:
            await self.plc.write_tag(RESULT, result)
            await self._packml_status(force=True)
            await self.plc.write_tag(hs.req, False)
            hs.unacked = None
        except DeviceError as exc:
            hs.unacked = (value, result, epoch)
            log.warning("packml_ack_failed", plc=self.plc.name, tag=hs.value_tag, value=value, result=result, error=exc.reason)

    def _packtags_values(self) -> dict[str, Any]:
        pt = self.line.packtags()
        values: dict[str, Any] = {
            "packml_state_current": int(pt.state),
            "packml_unit_mode_current": int(pt.unit_mode),
            "packml_stop_reason": pt.stop_reason.id if pt.stop_reason is not None else 0,
            "packml_blocked": bool(pt.blocked),
            "packml_starved": bool(pt.starved),
            "packml_prod_processed_count": pt.admin.processed,
            "packml_prod_defective_count": sum(pt.admin.defective.values()),
        }
        return {k: values[k] for k in self._packml_status_tags}

    async def _packml_status(self, force: bool = False) -> None:
        """The Status/Admin PackTags that changed, and all of them every packml_refresh_s (a PLC may have zeroed them)."""
        now = time.monotonic()
        refresh = now - self._written_at >= self.packml_refresh_s
        if refresh:
            self._written_at = now
        for name, value in self._packtags_values().items():
            spec = self._specs.get(name)
            if spec is not None and not isinstance(value, bool):
                value = fit_counter(spec.type, int(value))
            if not refresh and self._written.get(name) == value:
                continue
            try:
                await self.plc.write_tag(name, value)
            except DeviceError as exc:
                self._written.pop(name, None)
                if force:
                    raise
                log.debug("packml_status_write_failed", plc=self.plc.name, tag=name, error=exc.reason)
                return
            self._written[name] = value

    def _on_health(self, plc: Any, health: Any) -> None:
        if health.state == HealthState.DISCONNECTED:
            self._written.clear()
            self.line.equipment_reported(plc.name, blocked=None, starved=None)  # a PLC gone says nothing of its equipment
            if not self._lost and self.line.batch is not None and not self.line.shutting_down:
                self._lost = True
                asyncio.get_running_loop().create_task(self.line.fault_stop("plc_lost", f"PLC {plc.name} lost: {health.reason}"))
        elif health.state == HealthState.CONNECTED:
            self._lost = False
