"""JSON-lines control server of the line simulator: ground truth, status, challenge units, faults, settings.

One JSON object per line in, one per line out. Tests and the demo ask the
simulator what physically happened ({"cmd":"truth"}) instead of trusting
linectl's own counters, and steer the line (challenge units, faults, speed,
PLC tags such as estop or cmd_start pressed on the "HMI").

Commands:
  {"cmd":"truth"}                                  -> {"ok":true, **Truth.as_dict()}
  {"cmd":"status"}                                 -> {"ok":true, "conveyors":{...}, "devices":{...}, ...}
  {"cmd":"units","last":N}                         -> {"ok":true, "units":[{seq, outcome, defect, ...}, ...]}
  {"cmd":"challenge","kinds":[...],"conveyor":C?}  -> {"ok":true, "queued":n}   (fed while line_mode = 1)
  {"cmd":"inject","device":NAME,"fault":KIND,...}  -> {"ok":true, ...}           (extra keys go to the device)
  {"cmd":"set","defect_rate":F,"variation_rate":F,"defect_mix":{...},"rate_upm":R}
  {"cmd":"set","device":PLC,"tags":{"estop":true}} -> writes PLC tags as the HMI/field would
  {"cmd":"pack","flush":B?}                        -> the case packer's counts; flush: show the partial case now
Errors: {"ok":false,"error":"..."}.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Protocol

import structlog

log = structlog.get_logger("linectl.simulators.control")

MAX_LINE = 1 << 20


class Commandable(Protocol):
    def command(self, msg: dict[str, Any]) -> dict[str, Any]: ...


class ControlServer:
    def __init__(self, target: Commandable, host: str = "127.0.0.1", port: int = 7700) -> None:
        self.target = target
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._client, self.host, self.port, limit=MAX_LINE)
        sock = self._server.sockets[0].getsockname()
        self.port = sock[1]
        return sock[0], sock[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._clients):
                w.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            except (TimeoutError, Exception):
                pass
            self._server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        try:
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    writer.write(b'{"ok": false, "error": "line too long"}\n')
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                reply = self.handle_line(line)
                writer.write(json.dumps(reply, default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(writer)
            writer.close()

    def handle_line(self, line: bytes) -> dict[str, Any]:
        try:
            msg = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return {"ok": False, "error": f"not JSON: {exc}"}
        if not isinstance(msg, dict) or not isinstance(msg.get("cmd"), str):
            return {"ok": False, "error": 'expected an object with "cmd"'}
        try:
            return self.target.command(msg)
        except (ValueError, KeyError, TypeError) as exc:
            return {"ok": False, "error": str(exc).strip("'\"")}
        except Exception as exc:  # noqa: BLE001 - a bad command must not take the simulator down
            log.error("control_command_failed", cmd=msg.get("cmd"), error=repr(exc))
            return {"ok": False, "error": repr(exc)}


async def request(host: str, port: int, msg: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """One command, one reply (for tests, the demo and scripts)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=MAX_LINE), timeout)
    try:
        writer.write(json.dumps(msg).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise ValueError(f"control reply is not a JSON object: {line[:80]!r}")
        return reply
    finally:
        writer.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m linectl.simulators.control [--port P] CMD [JSON-ARGS]`: send one command to a running line simulator."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m linectl.simulators.control", description="Send one command to the line simulator.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7700)
    p.add_argument("cmd", help="truth | status | units | challenge | inject | set")
    p.add_argument("args", nargs="?", default="{}", help='extra JSON, e.g. \'{"kinds":["no_code"]}\'')
    a = p.parse_args(argv)
    try:
        extra = json.loads(a.args)
    except json.JSONDecodeError as exc:
        p.error(f"args: not JSON: {exc}")
    if not isinstance(extra, dict):
        p.error("args must be a JSON object")
    try:
        reply = asyncio.run(request(a.host, a.port, {"cmd": a.cmd, **extra}))
    except OSError as exc:
        print(f"cannot reach the simulator at {a.host}:{a.port}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2, sort_keys=True))
    return 0 if reply.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
