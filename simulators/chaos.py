"""Chaos proxy: a seeded asyncio TCP proxy between a driver and its device that damages the link on demand.

A real device link is not a clean socket: serial-to-Ethernet converters
inject noise bytes, switches split and delay frames, and a converter reboot
resets the connection. The proxy sits where the driver connects, forwards to
the device simulator, and injects, as configured at run time:

- garbage: random bytes inserted into the stream (ASCII noise, a stray line
  end, a NUL now and then) with probability `garbage` per forwarded chunk;
- split: a chunk written in 2-4 pieces with a few ms between them
  (probability `split`);
- delay: every chunk held `delay_s` before it is forwarded;
- reset: the connection pair is aborted (probability `reset` per chunk, or
  at once with reset_now()); the driver must reconnect.

`directions` limits garbage to one direction ("down" = device -> driver, the
reads; "up" = driver -> device, the commands) so noise can be kept off a
framed binary protocol (Modbus TCP has no checksum and no real TCP link
corrupts bytes; garbage belongs on serial-over-IP links).

Everything is seeded (`seed`), bounded (chunks of at most 64 KiB, at most
`max_connections` pairs) and listens on loopback only. Control: the Python
API (`set`, `reset_now`, `clear`, `status`) or, standalone, the same
JSON-lines control server as the line simulator:

  python -m linectl.simulators.chaos --target 127.0.0.1:9302 --listen 0 --control-port 0 --seed 3
  {"cmd":"set","garbage":0.2,"split":0.5,"delay_s":0.01,"reset":0.0}
  {"cmd":"reset"}   {"cmd":"clear"}   {"cmd":"status"}
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import asdict, dataclass
from typing import Any

import structlog

log = structlog.get_logger("linectl.simulators.chaos")

CHUNK = 65536
NOISE = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789;:#*!?~ \r\n\x00\x1d\xff"


@dataclass
class ChaosSettings:
    garbage: float = 0.0  # probability per chunk of inserting noise bytes
    split: float = 0.0  # probability per chunk of writing it in pieces
    delay_s: float = 0.0  # added latency per chunk
    reset: float = 0.0  # probability per chunk of aborting the connection
    directions: str = "both"  # where garbage goes: both | up (driver->device) | down (device->driver)

    def validate(self) -> None:
        for k in ("garbage", "split", "reset"):
            v = getattr(self, k)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{k} must be within 0..1")
        if not 0.0 <= self.delay_s <= 5.0:
            raise ValueError("delay_s must be within 0..5")
        if self.directions not in ("both", "up", "down"):
            raise ValueError("directions must be both, up or down")


class ChaosProxy:
    """One listening port -> one device address; every accepted connection gets its own upstream connection."""

    def __init__(self, target: tuple[str, int], *, name: str = "link", listen_port: int = 0, seed: int = 0, max_connections: int = 16) -> None:
        self.name = name
        self.target = target
        self.listen_port = listen_port
        self.rng = random.Random(f"chaos:{seed}:{name}")
        self.settings = ChaosSettings()
        self.max_connections = max_connections
        self.stats = {"connections": 0, "chunks": 0, "garbage": 0, "splits": 0, "delays": 0, "resets": 0, "refused": 0}
        self._server: asyncio.base_events.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        return self.listen_port

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.listen_port, reuse_address=True)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        return self.listen_port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.reset_now()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)

    # -- control --------------------------------------------------------------------

    def set(self, **kw: Any) -> dict[str, Any]:
        new = ChaosSettings(**{**asdict(self.settings), **kw})
        new.validate()
        self.settings = new
        log.debug("chaos_set", link=self.name, **asdict(new))
        return asdict(new)

    def clear(self) -> None:
        self.settings = ChaosSettings()

    def reset_now(self) -> int:
        """Abort every open connection pair (the device side as well): a converter reboot."""
        n = 0
        for a, b in list(self._pairs):
            for w in (a, b):
                with contextlib.suppress(Exception):
                    w.transport.abort()
            n += 1
        self._pairs.clear()
        self.stats["resets"] += n
        return n

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "listen": self.listen_port, "target": list(self.target), "open": len(self._pairs), "settings": asdict(self.settings),
            **self.stats}

    def command(self, msg: dict[str, Any]) -> dict[str, Any]:
        """JSON-lines control (simulators.control.ControlServer): set, reset, clear, status."""
        cmd = msg["cmd"]
        if cmd == "set":
            return {"ok": True, "settings": self.set(**{k: v for k, v in msg.items() if k != "cmd"})}
        if cmd == "reset":
            return {"ok": True, "reset": self.reset_now()}
        if cmd == "clear":
            self.clear()
            return {"ok": True}
        if cmd == "status":
            return {"ok": True, **self.status()}
        raise ValueError(f"unknown cmd {cmd!r} (set, reset, clear, status)")

    # -- forwarding -----------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._pairs) >= self.max_connections:
            self.stats["refused"] += 1
            writer.transport.abort()
            return
        try:
            ur, uw = await asyncio.wait_for(asyncio.open_connection(*self.target), 3.0)
        except (TimeoutError, OSError):
            writer.transport.abort()  # device down: the driver sees a reset, as through a real converter
            return
        pair = (writer, uw)
        self._pairs.add(pair)
        self.stats["connections"] += 1
        tasks = [asyncio.create_task(self._pipe(reader, uw, "up")), asyncio.create_task(self._pipe(ur, writer, "down"))]
        self._tasks.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            self._tasks.difference_update(tasks)
            for w in pair:
                with contextlib.suppress(Exception):
                    w.transport.abort()
            self._pairs.discard(pair)

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, direction: str) -> None:
        try:
            while data := await r.read(CHUNK):
                s = self.settings
                self.stats["chunks"] += 1
                if s.delay_s > 0:
                    self.stats["delays"] += 1
                    await asyncio.sleep(s.delay_s)
                if s.reset > 0 and self.rng.random() < s.reset:
                    self.stats["resets"] += 1
                    return
                if s.garbage > 0 and s.directions in ("both", direction) and self.rng.random() < s.garbage:
                    self.stats["garbage"] += 1
                    noise = bytes(self.rng.choice(NOISE) for _ in range(self.rng.randint(1, 24)))
                    at = self.rng.randint(0, len(data))
                    data = data[:at] + noise + data[at:]
                if s.split > 0 and len(data) > 1 and self.rng.random() < s.split:
                    self.stats["splits"] += 1
                    cuts = sorted(self.rng.sample(range(1, len(data)), min(len(data) - 1, self.rng.randint(1, 3))))
                    prev = 0
                    for c in [*cuts, len(data)]:
                        w.write(data[prev:c])
                        await w.drain()
                        prev = c
                        if c != len(data):
                            await asyncio.sleep(self.rng.uniform(0.001, 0.02))
                    continue
                w.write(data)
                await w.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass


def main(argv: list[str] | None = None) -> int:
    """`python -m linectl.simulators.chaos --target HOST:PORT [--listen P] [--control-port C] [--seed S]`."""
    import argparse

    from linectl.simulators.control import ControlServer

    p = argparse.ArgumentParser(prog="python -m linectl.simulators.chaos", description="Seeded chaos TCP proxy (loopback only).")
    p.add_argument("--target", required=True, help="HOST:PORT of the device (loopback)")
    p.add_argument("--listen", type=int, default=0, help="port the driver connects to (0 = any free port)")
    p.add_argument("--control-port", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    host, _, port = a.target.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "::1"):
        p.error("the chaos proxy only forwards to loopback")

    async def go() -> None:
        proxy = ChaosProxy((host, int(port)), listen_port=a.listen, seed=a.seed)
        lp = await proxy.start()
        ctl = ControlServer(proxy, "127.0.0.1", a.control_port)
        ch, cp = await ctl.start()
        print(f"chaos: listening 127.0.0.1:{lp} -> {a.target}; control tcp {ch}:{cp}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await ctl.stop()
            await proxy.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(go())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
