"""The PLC as an operator panel: command tags in, status tags out, e-stop and PLC loss stop the line.

Commands from tags go through the same `Line.execute` as MQTT and CLI, with
origin "plc:<name>", so they are validated and audited the same way. A
command bit is cleared only after the command was handled, so the HMI sees
when it was taken.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog

from linectl import control as C
from linectl.drivers.base import HealthState, Plc
from linectl.engine.line import Line

log = structlog.get_logger("linectl.plc_surface")

COMMAND_TAGS: dict[str, Callable[[], C.Command]] = {
    "cmd_start": lambda: C.StartBatch(actor="hmi"),
    "cmd_stop": lambda: C.StopBatch(actor="hmi", reason="stop from PLC/HMI"),
    "cmd_pause": lambda: C.PauseBatch(actor="hmi"),
    "cmd_reset": lambda: C.ResetLine(actor="hmi"),
}


class PlcSurface:
    def __init__(self, line: Line, plc: Plc, interval_s: float = 0.1) -> None:
        self.line = line
        self.plc = plc
        self.interval_s = interval_s
        self._estop_seen = False
        self._lost = False

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

    def _on_health(self, plc: Any, health: Any) -> None:
        if health.state == HealthState.DISCONNECTED:
            if not self._lost and self.line.batch is not None and not self.line.shutting_down:
                self._lost = True
                asyncio.get_running_loop().create_task(self.line.fault_stop("plc_lost", f"PLC {plc.name} lost: {health.reason}"))
        elif health.state == HealthState.CONNECTED:
            self._lost = False
