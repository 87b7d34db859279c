"""Siemens S7 PLC driver (python-snap7 3.x pure-Python `snap7.AsyncClient`, ISO-on-TCP).

Why it looks like this:
- `get_connected()` can stay true after the network is gone, so the driver
  never trusts it: PLC liveness is the `heartbeat_plc` toggle, and every
  request is bounded by `reply_timeout_s`; a timeout ends the session (the
  stream may hold half a reply) and the supervisor reconnects.
- BOOL tags are written with one single-bit request (S7 transport size BIT),
  which a real CPU applies atomically. A read-modify-write of the byte would
  silently undo a bit the PLC changed in between (heartbeat_plc and
  heartbeat_ctl often share a byte). AsyncClient has no bit-write call, so
  the request is built with its own protocol object.
- Every write is read back and compared (S7 write acks say nothing about
  what the CPU holds afterwards).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

from pydantic import Field

from linectl.drivers.base import DeviceError, register_driver
from linectl.drivers.plc_tags import ConnectionLost, ModbusTagSpec, PlcConfigBase, PolledPlc, S7TagSpec, plan_reads

logging.getLogger("snap7").setLevel(logging.CRITICAL)  # it logs per request/reconnect; we log state changes once


class S7Config(PlcConfigBase):
    driver: Literal["s7"]
    host: str
    port: int = Field(102, ge=1, le=65535, description="ISO-on-TCP port (102 on a real CPU)")
    rack: int = Field(0, ge=0, le=7)
    slot: int = Field(1, ge=0, le=31, description="S7-1200/1500: 1 (or 0); S7-300: 2")
    tags: dict[str, S7TagSpec] = Field(default_factory=dict)

    def tag_specs(self) -> dict[str, ModbusTagSpec | S7TagSpec]:
        return dict(self.tags)
    confirm: Literal["readback", "ack"] = Field("readback", description="readback: compare what the CPU holds after a write")
    max_gap: int = Field(16, ge=0, le=512, description="read across unused bytes up to this gap to save requests")


@register_driver
class S7Plc(PolledPlc):
    config_class = S7Config
    config: S7Config

    def __init__(self, name: str, config: S7Config) -> None:
        super().__init__(name, config)
        self._client: Any = None

    def _where(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    async def _open(self) -> None:
        import snap7

        await self._close()
        client = snap7.AsyncClient()
        self._client = client
        try:
            await client.connect(self.config.host, self.config.rack, self.config.slot, tcp_port=self.config.port)
        except Exception as exc:  # noqa: BLE001
            raise DeviceError(str(exc) or type(exc).__name__) from None
        if client.connection is not None:
            client.connection.timeout = self.config.reply_timeout_s

    async def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await asyncio.wait_for(client.disconnect(), 1.0)
            except Exception:  # noqa: BLE001 - closing a dead socket must not fail the supervisor
                pass

    async def _call(self, what: str, coro_fn: Any, *args: Any) -> Any:
        from snap7.error import S7PacketLostError, S7ProtocolError, S7StalePacketError

        async with self._io:
            client = self._client
            if client is None or client.connection is None:
                raise ConnectionLost("connection lost")
            try:
                return await asyncio.wait_for(coro_fn(client, *args), self.config.reply_timeout_s)
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                self.log.debug("plc_request_failed", request=what, error="timeout")
                raise ConnectionLost(f"no reply within {self.config.reply_timeout_s:g} s") from None
            except (S7StalePacketError, S7PacketLostError) as exc:
                raise ConnectionLost(f"connection lost: {exc}") from None  # the stream is out of step
            except S7ProtocolError as exc:
                raise DeviceError(f"{what}: PLC refused: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - S7ConnectionError, S7TimeoutError, OSError...
                # Health reasons stay the same whatever request hit the outage, so it is logged once.
                self.log.debug("plc_request_failed", request=what, error=str(exc) or type(exc).__name__)
                raise ConnectionLost(f"connection lost: {exc or type(exc).__name__}") from None

    # -- reads ----------------------------------------------------------------------

    async def _read(self, names: list[str]) -> dict[str, Any]:
        specs = {n: self._tags[n] for n in names}
        blocks = plan_reads(((s.db, *s.byte_span()) for s in specs.values()), self.config.max_gap, None)
        images: dict[int, list[tuple[int, bytearray]]] = {}
        for b in blocks:
            data = await self._call(f"read DB{b.area}.{b.start}+{b.length}", _db_read, b.area, b.start, b.length)
            if len(data) != b.length:
                raise ConnectionLost(f"read DB{b.area}.{b.start}: asked {b.length} bytes, got {len(data)}")
            images.setdefault(b.area, []).append((b.start, data))
        out: dict[str, Any] = {}
        for n, s in specs.items():
            start, size = s.byte_span()
            for bstart, data in images[s.db]:
                if bstart <= start and start + size <= bstart + len(data):
                    vals = s.decode(data, bstart)
                    out[n] = vals if s.count > 1 else vals[0]
                    break
        return out

    # -- writes ---------------------------------------------------------------------

    async def _write(self, name: str, spec: S7TagSpec, values: list[Any], index: int) -> None:
        if spec.type == "BOOL":
            for k, v in enumerate(values):
                bitno = spec.byte * 8 + spec.bit + index + k
                await self._call(f"write {name}", _db_write_bit, spec.db, bitno, bool(v))
        else:
            data = spec.encode(values)
            start = spec.byte + index * spec.elem_size
            await self._call(f"write {name} (DB{spec.db}.{start}+{len(data)})", _db_write, spec.db, start, data)
        if self.config.confirm == "readback":
            bstart, size = spec.byte_span(index, len(values))
            back = await self._call(f"read back {name}", _db_read, spec.db, bstart, size)
            got = spec.decode(back, bstart, index, len(values))
            if not _same(spec.type, got, values):
                raise DeviceError(f"write {name}: not confirmed, read back {got} instead of {values}")


def _same(typ: str, got: list[Any], want: list[Any]) -> bool:
    if typ == "REAL":
        import struct

        return [struct.pack(">f", g) for g in got] == [struct.pack(">f", w) for w in want]
    return [g == w for g, w in zip(got, want)] == [True] * len(want) and len(got) == len(want)


async def _db_read(client: Any, db: int, start: int, size: int) -> bytearray:
    data: bytearray = await client.db_read(db, start, size)  # snap7's async client is untyped
    return data


async def _db_write(client: Any, db: int, start: int, data: bytes) -> None:
    await client.db_write(db, start, bytearray(data))


async def _db_write_bit(client: Any, db: int, bitno: int, value: bool) -> None:
    from snap7.datatypes import S7Area, S7WordLen

    request = client.protocol.build_write_request(
        area=S7Area.DB, db_number=db, start=bitno, word_len=S7WordLen.BIT, data=b"\x01" if value else b"\x00"
    )
    response = await client._send_receive(request)  # noqa: SLF001 - no public bit write in AsyncClient 3.3
    client.protocol.check_write_response(response)
