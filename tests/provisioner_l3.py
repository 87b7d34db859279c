"""A small L3 over real HTTP for the provisioner tests, and the SerialSource that speaks to it.

A stand-in until the l3sim branch's simulator (simulators/l3_serials.py) and its serialbox / number_range sources
are merged: the provisioner's contract is the SerialSource protocol (linectl/sources/base.py), and this source
keeps to it exactly as the brief describes (SourceUnavailable for 5xx, timeouts, dropped connections, chained from
the transport error; SourceRefused for 4xx and answers it cannot read). The L3 records every serial it hands out
(`handed`), the ground truth the tests compare the store with. Faults are queued per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

import httpx

from linectl.sources.base import SerialPage, SerialRequest, SourceRefused, SourceUnavailable


@dataclass
class L3:
    """GET /allocate/<gtin>/<size>?key=K -> {"serials": [...], "foreign": [[s, why]...]}; faults in `faults` (FIFO)."""

    gtin: str
    next_number: int = 10**8
    idempotent: bool = False
    #: one per request, consumed in order: "ok", "short", "dup", "bad", "foreign", "500", "400", "hang", "drop", "hold"
    faults: list[str] = field(default_factory=list)
    handed: list[str] = field(default_factory=list)  # every serial answered, in order (the ground truth)
    by_key: dict[str, list[str]] = field(default_factory=dict)
    requests: int = 0
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    holding: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.base_events.Server | None = None
    port: int = 0

    def _numbers(self, n: int) -> list[str]:
        out = [str(self.next_number + i) for i in range(n)]
        self.next_number += n
        return out

    async def start(self, port: int = 0) -> L3:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)
            self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            self.requests += 1
            fault = self.faults.pop(0) if self.faults else "ok"
            parts, _, query = path.partition("?")
            _, _, _gtin, size_s = parts.split("/")[:4]
            size = int(size_s)
            key = query.partition("key=")[2]
            if fault == "hang":
                await asyncio.sleep(3600)
            if fault == "hold":  # allocate, then hold the answer until the test lets go (or kills the asker)
                self._numbers(size)
                self.holding.set()
                await self.hold.wait()
                return
            if fault in ("500", "400"):
                body = b"<html><body><h1>Internal Server Error</h1></body></html>" if fault == "500" else b"<html>bad pool</html>"
                writer.write(b"HTTP/1.1 " + fault.encode() + b" X\r\nContent-Type: text/html\r\nConnection: close\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)
                await writer.drain()
                return
            if self.idempotent and key in self.by_key:
                serials = self.by_key[key]
                foreign: list[list[str]] = []
            else:
                serials = self._numbers(size // 2 if fault == "short" else size)
                foreign = []
                if fault == "dup" and self.handed:
                    serials[1] = self.handed[0]  # one the L3 handed out before
                    serials[2] = serials[3]  # and one repeated in this answer
                if fault == "bad":
                    serials[0] = "ÄÖ-not-set-82"
                    serials[1] = "1" * 25
                if fault == "foreign":
                    foreign = [[serials.pop(0), "(01)09999999999994: another GTIN"]]
                self.handed.extend(serials + [f[0] for f in foreign])
                self.by_key[key] = serials
            body = json.dumps({"serials": serials, "foreign": foreign}).encode()
            if fault == "drop":  # the connection breaks mid-answer
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                             + b"\r\n\r\n" + body[: len(body) // 2])
                await writer.drain()
                writer.transport.abort()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()


class HttpSource:
    """A SerialSource over the L3 above."""

    def __init__(self, url: str, *, idempotent: bool = False, timeout_s: float = 2.0, name: str = "testl3") -> None:
        self.name = name
        self.url = url
        self.idempotent = idempotent
        self._client = httpx.AsyncClient(timeout=timeout_s)
        self.connected: bool | None = None
        self.last_error: str | None = None
        self.returned: list[str] = []
        self.has_return = False

    async def request(self, req: SerialRequest, continuation: str | None = None) -> SerialPage:
        try:
            r = await self._client.get(f"{self.url}/allocate/{req.gtin}/{req.size}?key={req.key}")
        except httpx.TransportError as exc:
            self.connected, self.last_error = False, f"{type(exc).__name__}: {exc}"
            raise SourceUnavailable(self.last_error) from exc
        self.connected = True
        if r.status_code >= 500:
            raise SourceUnavailable(f"HTTP {r.status_code}: {r.text[:80]}")
        if r.status_code >= 400:
            raise SourceRefused(f"HTTP {r.status_code}: {r.text[:80]}")
        try:
            data: dict[str, Any] = r.json()
        except ValueError as exc:
            raise SourceRefused(f"answer is not JSON: {r.text[:80]!r}") from exc
        return SerialPage(serials=list(data["serials"]), raw=r.text, foreign=[(a, b) for a, b in data.get("foreign", [])])

    async def give_back(self, gtin: str, serials: list[str], key: str) -> bool:
        if not self.has_return:
            return False
        self.returned.extend(serials)
        return True

    async def aclose(self) -> None:
        await self._client.aclose()

    def status(self) -> dict[str, Any]:
        return {"connected": self.connected, "last_error": self.last_error, "url": self.url}
