"""The PLC as an operator panel: command tags in, status tags out, e-stop and PLC loss stop the line.

Commands from tags go through the same `Line.execute` as MQTT and CLI, with
origin "plc:<name>", so they are validated and audited the same way. A
command bit is cleared only after the command was handled, so the HMI sees
when it was taken.

A PLC programmed to PackML drives the line through the PackTags command
handshake instead (README "PackTags on the PLC"): it writes CntrlCmd, then
raises CmdChangeRequest; linectl reads the command on the rising edge,
executes it as a PackmlCmd, writes packml_cmd_result and StateCurrent, and
clears CmdChangeRequest as the acknowledge. Nothing the PLC sends is run
twice: a command whose acknowledge did not reach the PLC is acknowledged
again, not executed again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog

from linectl import control as C
from linectl.drivers.base import DeviceError, HealthState, Plc
from linectl.drivers.plc_tags import (
    PACKML_CMD_CHANGE_REQUEST as REQ,
)
from linectl.drivers.plc_tags import (
    PACKML_CMD_RESULT as RESULT,
)
from linectl.drivers.plc_tags import (
    PACKML_CNTRL_CMD as CNTRL,
)
from linectl.drivers.plc_tags import (
    PACKML_RESULT_CHANGED,
    PACKML_RESULT_DONE,
    PACKML_RESULT_INVALID_STATE,
    PACKML_RESULT_REFUSED,
    PACKML_RESULT_STALE,
    PACKML_RESULT_UNKNOWN_COMMAND,
    PACKML_STATUS_TAGS,
    PlcConfigBase,
    fit_counter,
)
from linectl.engine.line import Line
from linectl.engine.packml import PackmlCommand

log = structlog.get_logger("linectl.plc_surface")

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
        self.interval_s = interval_s
        self._estop_seen = False
        self._lost = False
        names = set(plc.tag_names)
        self._specs: dict[str, Any] = plc.config.tag_specs() if isinstance(plc.config, PlcConfigBase) else {}
        self._packml_cmd = REQ in names and CNTRL in names and RESULT in names
        self._packml_status_tags = [t for t in PACKML_STATUS_TAGS if t in names]
        #: CmdChangeRequest as last seen; None until the first look (a request already up then is stale)
        self._req_prev: bool | None = None
        #: (CntrlCmd, result, plc_epoch) of a command executed whose acknowledge did not reach the PLC
        self._unacked: tuple[int, int, Any] | None = None
        #: PackTags as last written to the PLC (forgotten when the PLC goes away: it may have restarted)
        self._written: dict[str, Any] = {}
        self._written_at = 0.0
        self.packml_refresh_s = packml_refresh_s
        self.packml_results: list[dict[str, Any]] = []  # the last handshakes, for status and tests (bounded)

    async def run(self) -> None:
        self.plc.on_health(self._on_health)
        while True:
            await asyncio.sleep(self.interval_s)
            tags = self.plc.latest()
            if not tags or self.plc.health.state != HealthState.CONNECTED:
                continue
            await self.line.resync_line_mode(self.plc)
            await self._check_estop(tags)
            for tag, make in COMMAND_TAGS.items():
                if tags.get(tag):
                    await self._command(tag, make())
            if self._packml_cmd:
                await self._packml_handshake(tags)
            if self._packml_status_tags:
                await self._packml_status()
            await self.line._write_status()

    async def _check_estop(self, tags: dict[str, Any]) -> None:
        estop = bool(tags.get("estop"))
        if estop and not self._estop_seen:
            await self.line.fault_stop("estop", f"emergency stop on PLC {self.plc.name}")
        self._estop_seen = estop

    async def _command(self, tag: str, cmd: Any) -> None:
        try:
            result = await self.line.execute(cmd, origin=f"plc:{self.plc.name}")
            log.info("plc_command", tag=tag, result=result)
        except C.CommandRejected as exc:
            log.warning("plc_command_rejected", tag=tag, reason=exc.reason)
        try:
            await self.plc.write_tag(tag, False)
        except Exception as exc:  # noqa: BLE001
            log.warning("plc_command_clear_failed", tag=tag, error=str(exc))

    # -- PackTags ---------------------------------------------------------------------

    async def _packml_handshake(self, tags: dict[str, Any]) -> None:
        """CmdChangeRequest up: take CntrlCmd, execute it once, write the result and StateCurrent, then acknowledge.

        The polled value only says "look": the request and then the command are read from the wire, in the order
        the PLC writes them backwards (request first, command second), so the command read is the one the request
        was raised for, and a late notification of an old request (OPC UA) is never taken for a new one."""
        first = self._req_prev is None
        if not tags.get(REQ) and not first:
            self._req_prev = False
            if self._unacked is not None:
                log.warning("packml_ack_dropped", plc=self.plc.name, cntrl_cmd=self._unacked[0],
                            why="the PLC withdrew the request (or restarted) before the acknowledge reached it")
                self._unacked = None
            return
        try:
            req = bool((await self.plc.read_tags([REQ]))[REQ])
            if not req:
                self._req_prev = False
                return
            fresh = await self.plc.read_tags([CNTRL] + (["plc_epoch"] if "plc_epoch" in self.plc.tag_names else []))
        except DeviceError as exc:
            log.debug("packml_request_read_failed", plc=self.plc.name, error=exc.reason)
            return
        value, epoch = fresh[CNTRL], fresh.get("plc_epoch")
        if self._unacked is not None:
            cmd, result, was_epoch = self._unacked
            if value == cmd and epoch == was_epoch:
                # executed before the link dropped; the PLC still waits for the acknowledge: give it, do not re-run
                log.info("packml_ack_repeated", plc=self.plc.name, cntrl_cmd=cmd, result=result)
                await self._ack(value, result, epoch)
                return
            self._unacked = None  # another command, or a restarted PLC: a new request
        if first:
            # up before linectl looked: raised for a linectl that is gone, maybe long ago; never run it unasked
            log.warning("packml_request_stale", plc=self.plc.name, cntrl_cmd=value)
            await self._ack(value, PACKML_RESULT_STALE, epoch)
            return
        result, message = await self._packml_execute(value)
        try:
            after = (await self.plc.read_tags([CNTRL]))[CNTRL]
        except DeviceError:
            after = value
        if after != value:
            log.warning("packml_command_changed", plc=self.plc.name, executed=value, now=after, result=result)
            message = f"CntrlCmd changed from {value} to {after} while {value} ran ({message}); {after} not executed"
            result = PACKML_RESULT_CHANGED
        self.packml_results.append({"cntrl_cmd": value, "result": result, "message": message, "at": time.time()})
        del self.packml_results[:-50]
        await self._ack(value, result, epoch)

    async def _packml_execute(self, value: Any) -> tuple[int, str]:
        try:
            cmd = PackmlCommand(int(value))
            if cmd is PackmlCommand.Undefined:
                raise ValueError(value)
        except (TypeError, ValueError):
            known = ", ".join(f"{c.value}={c.name}" for c in PackmlCommand if c is not PackmlCommand.Undefined)
            log.warning("packml_command_unknown", plc=self.plc.name, cntrl_cmd=value, known=known)
            return PACKML_RESULT_UNKNOWN_COMMAND, f"CntrlCmd {value} is no PackML command ({known})"
        try:
            await self.line.execute(C.PackmlCmd(command=cmd.name, actor="plc"), origin=f"plc:{self.plc.name}")
        except C.CommandRejected as exc:
            log.warning("packml_command_refused", plc=self.plc.name, command=cmd.name, code=exc.code, reason=exc.reason)
            code = PACKML_RESULT_INVALID_STATE if exc.code == "invalid_state" else PACKML_RESULT_REFUSED
            return code, f"{cmd.name} refused ({exc.code}): {exc.reason}"
        log.info("packml_command", plc=self.plc.name, command=cmd.name)
        return PACKML_RESULT_DONE, f"{cmd.name} done"

    async def _ack(self, value: Any, result: int, epoch: Any) -> None:
        """Result, then StateCurrent, then the request cleared: the PLC that sees the request fall reads both valid."""
        self._req_prev = False
        try:
            await self.plc.write_tag(RESULT, result)
            await self._packml_status(force=True)
            await self.plc.write_tag(REQ, False)
            self._unacked = None
        except DeviceError as exc:
            self._unacked = (int(value), result, epoch)
            log.warning("packml_ack_failed", plc=self.plc.name, cntrl_cmd=value, result=result, error=exc.reason)

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
            if not self._lost and self.line.batch is not None and not self.line.shutting_down:
                self._lost = True
                asyncio.get_running_loop().create_task(self.line.fault_stop("plc_lost", f"PLC {plc.name} lost: {health.reason}"))
        elif health.state == HealthState.CONNECTED:
            self._lost = False
