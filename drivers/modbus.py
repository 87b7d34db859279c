"""Modbus TCP and Modbus RTU PLC drivers (pymodbus >= 3.10 client API: `device_id=`, not `slave=`).

Why the request handling is this careful:
- pymodbus retries silently and then waits its full timeout per retry, and
  after a few missed replies closes the link; on a shared RS-485 bus that
  takes every device with it. So: retries 0 or 1, a short per-request bound,
  and our own reconnect with backoff.
- RTU has no transaction id: a late reply to a timed-out request would be
  taken as the answer to the next one. After an RTU timeout the driver keeps
  the line quiet for one reply timeout before the next request, and checks
  every response's echo (address, count) against the request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

from pydantic import Field, field_validator

from linectl.drivers.base import DeviceError, register_driver
from linectl.drivers.plc_tags import ConnectionLost, ModbusTagSpec, PlcConfigBase, PolledPlc, S7TagSpec, plan_reads

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # it logs every retry; we log state changes once

#: protocol limits per request
MAX_READ_REGS = 125
MAX_READ_BITS = 2000
MAX_WRITE_REGS = 123
MAX_WRITE_BITS = 1968


class ModbusConfigBase(PlcConfigBase):
    tags: dict[str, ModbusTagSpec] = Field(default_factory=dict)

    def tag_specs(self) -> dict[str, ModbusTagSpec | S7TagSpec]:
        return dict(self.tags)
    device_id: int = Field(1, ge=0, le=255, description="unit id / slave address, sent with every request")
    retries: int = Field(0, ge=0, le=1, description="pymodbus retries per request (0 or 1: a stall costs one timeout)")
    confirm: Literal["ack", "readback"] = Field(
        "ack", description="ack: the write response echo confirms; readback: also read the values back"
    )
    max_gap: int = Field(8, ge=0, le=100, description="read across unused addresses up to this gap to save requests")
    max_read_registers: int = Field(MAX_READ_REGS, ge=1, le=MAX_READ_REGS)
    max_read_bits: int = Field(MAX_READ_BITS, ge=1, le=MAX_READ_BITS)


class ModbusTcpConfig(ModbusConfigBase):
    driver: Literal["modbus_tcp"]
    host: str
    port: int = Field(502, ge=1, le=65535)


class ModbusRtuConfig(ModbusConfigBase):
    driver: Literal["modbus_rtu"]
    serial_port: str = Field(description="serial device path or pyserial URL (/dev/ttyUSB0, /dev/pts/5, socket://host:port)")
    baudrate: int = Field(19200, gt=0)
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "E"
    stopbits: Literal[1, 2] = 1
    quiet_after_timeout_s: float | None = Field(
        None, ge=0, description="line silence after a missed reply before the next request; default: reply_timeout_s"
    )

    @field_validator("device_id")
    @classmethod
    def _unicast(cls, v: int) -> int:
        if not 1 <= v <= 247:
            raise ValueError("an RTU slave address is 1..247 (0 is broadcast: a PLC never answers it)")
        return v


_READ_FC = {"coil": "read_coils", "discrete": "read_discrete_inputs", "holding": "read_holding_registers", "input": "read_input_registers"}


class ModbusPlc(PolledPlc):
    """Common Modbus logic; the TCP and RTU classes only differ in how the client is made."""

    config: ModbusConfigBase
    #: TCP: a missed reply ends the session (reconnect); RTU: the port stays open, the next request goes on
    _timeout_breaks_session = True

    def __init__(self, name: str, config: ModbusConfigBase) -> None:
        super().__init__(name, config)
        self._client: Any = None
        self._quiet_until = 0.0

    # -- connection -----------------------------------------------------------------

    def _make_client(self) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    async def _open(self) -> None:
        await self._close()
        client = self._make_client()
        self._client = client
        ok = await client.connect()
        if not ok or not client.connected:
            raise DeviceError("no answer")

    async def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass

    # -- requests -------------------------------------------------------------------

    async def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """One request, bounded, serialized with every other request of this device."""
        cfg = self.config
        async with self._io:
            client = self._client
            if client is None or not client.connected:
                raise ConnectionLost("connection lost")
            loop = asyncio.get_running_loop()
            quiet = self._quiet_until - loop.time()
            if quiet > 0:
                await asyncio.sleep(quiet)
            try:
                rr = await asyncio.wait_for(
                    getattr(client, method)(*args, device_id=cfg.device_id, **kwargs),
                    cfg.reply_timeout_s * (cfg.retries + 1) + 0.1,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - pymodbus raises several kinds
                self._after_failure()
                text = "" if isinstance(exc, asyncio.TimeoutError) else str(exc)
                # Health reasons stay the same whatever request hit the outage, so it is logged once.
                self.log.debug("plc_request_failed", request=what, error=text or type(exc).__name__)
                if isinstance(exc, asyncio.TimeoutError) or "No response" in text:
                    err = ConnectionLost if self._timeout_breaks_session else DeviceError
                    raise err(f"no reply within {cfg.reply_timeout_s:g} s") from None
                raise ConnectionLost(f"connection lost: {text or type(exc).__name__}") from None
        if rr is None or rr.isError():
            code = getattr(rr, "exception_code", None)
            raise DeviceError(f"{what}: PLC answered exception {code}", code=str(code))
        return rr

    def _after_failure(self) -> None:
        """Keep a serial line quiet so a late reply cannot be taken for the next request's."""

    # -- Plc protocol part ----------------------------------------------------------

    async def _read(self, names: list[str]) -> dict[str, Any]:
        cfg = self.config
        specs = {n: self._tags[n] for n in names}
        out: dict[str, Any] = {}
        for table in ("coil", "discrete", "holding", "input"):
            tspecs = {n: s for n, s in specs.items() if s.table == table}
            if not tspecs:
                continue
            bits = table in ("coil", "discrete")
            blocks = plan_reads(
                ((table, s.address, s.size) for s in tspecs.values()),
                cfg.max_gap,
                cfg.max_read_bits if bits else cfg.max_read_registers,
            )
            image: dict[int, Any] = {}
            for b in blocks:
                rr = await self._call(f"read {table} {b.start}+{b.length}", _READ_FC[table], b.start, count=b.length)
                data = list(rr.bits[: b.length]) if bits else list(rr.registers)
                if len(data) != b.length:
                    raise ConnectionLost(f"read {table} {b.start}: asked {b.length}, got {len(data)} (stray reply?)")
                for i, v in enumerate(data):
                    image[b.start + i] = v
            for n, s in tspecs.items():
                vals = s.decode([image[a] for a in range(s.address, s.address + s.size)])
                out[n] = vals if s.count > 1 else vals[0]
        return out

    async def _write(self, name: str, spec: ModbusTagSpec, values: list[Any], index: int) -> None:
        cfg = self.config
        addr = spec.address + index * spec.width
        wire = spec.encode(values)
        what = f"write {name} ({spec.table} {addr}+{len(wire)})"
        if spec.is_bits:
            if len(wire) > MAX_WRITE_BITS:
                raise DeviceError(f"{what}: more than {MAX_WRITE_BITS} coils in one request")
            if len(wire) == 1:
                rr = await self._call(what, "write_coil", addr, bool(wire[0]))
                ok = rr.address == addr and bool(rr.bits[0]) == bool(wire[0])
            else:
                rr = await self._call(what, "write_coils", addr, [bool(b) for b in wire])
                ok = rr.address == addr and rr.count == len(wire)
        else:
            if len(wire) > MAX_WRITE_REGS:
                raise DeviceError(f"{what}: more than {MAX_WRITE_REGS} registers cannot be written in one request")
            if len(wire) == 1:
                rr = await self._call(what, "write_register", addr, int(wire[0]))
                ok = rr.address == addr and list(rr.registers)[:1] == [wire[0]]
            else:
                rr = await self._call(what, "write_registers", addr, [int(w) for w in wire])
                ok = rr.address == addr and rr.count == len(wire)
        if not ok:
            raise DeviceError(f"{what}: not confirmed (response echo {rr.address}/{getattr(rr, 'count', '?')})")
        if cfg.confirm == "readback":
            fc = "read_coils" if spec.is_bits else "read_holding_registers"
            back = await self._call(f"read back {name}", fc, addr, count=len(wire))
            got = list(back.bits[: len(wire)]) if spec.is_bits else list(back.registers)
            if [int(x) for x in got] != [int(x) for x in wire]:
                raise DeviceError(f"{what}: not confirmed, read back {spec.decode(got)} instead of {values}")


@register_driver
class ModbusTcpPlc(ModbusPlc):
    config_class = ModbusTcpConfig
    config: ModbusTcpConfig

    def _make_client(self) -> Any:
        from pymodbus.client import AsyncModbusTcpClient

        cfg = self.config
        return AsyncModbusTcpClient(
            cfg.host,
            port=cfg.port,
            timeout=min(cfg.reply_timeout_s, cfg.connect_timeout_s),
            retries=cfg.retries,
            reconnect_delay=0,  # the supervisor reconnects, with backoff and health
            name=self.name,
        )

    def _where(self) -> str:
        return f"{self.config.host}:{self.config.port}"


@register_driver
class ModbusRtuPlc(ModbusPlc):
    config_class = ModbusRtuConfig
    config: ModbusRtuConfig
    _timeout_breaks_session = False

    def _make_client(self) -> Any:
        from pymodbus.client import AsyncModbusSerialClient

        cfg = self.config
        return AsyncModbusSerialClient(
            cfg.serial_port,
            baudrate=cfg.baudrate,
            bytesize=cfg.bytesize,
            parity=cfg.parity,
            stopbits=cfg.stopbits,
            timeout=cfg.reply_timeout_s,
            retries=cfg.retries,
            reconnect_delay=0,
            name=self.name,
        )

    def _after_failure(self) -> None:
        cfg = self.config
        quiet = cfg.reply_timeout_s if cfg.quiet_after_timeout_s is None else cfg.quiet_after_timeout_s
        self._quiet_until = asyncio.get_running_loop().time() + quiet

    def _where(self) -> str:
        return self.config.serial_port
