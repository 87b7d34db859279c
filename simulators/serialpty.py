"""Serve a device protocol on TCP or on a pseudo-terminal, so drivers are tested over real serial I/O.

A pty pair stands in for an RS-232 cable: the simulator owns the master side,
the slave side is symlinked at a stable path (`/tmp/linectl-reader0`) and the
driver opens that path with pyserial exactly as it would open /dev/ttyUSB0.
The simulator keeps its own slave descriptor open so the master never sees a
hang-up between driver (re)connects, the way a cable stays plugged in.

`SimServer` is the common base of the printer, reader and scanner simulators:
one client at a time (like most devices; a new connection replaces the old),
`send()` for unsolicited output, `reset_connection()` for an abrupt TCP RST.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import tty
from typing import Any

import structlog

from linectl.drivers.transport import FdStream

log = structlog.get_logger("linectl.sim")


class PtyPair:
    """A pty whose slave is reachable at `link`; `stream` is the master as an asyncio stream."""

    def __init__(self, link: str | None = None) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no echo, no line discipline: bytes as on a serial wire
        self.slave_name = os.ttyname(self.slave)
        self.link = link
        if link:
            if os.path.lexists(link):
                if not os.path.islink(link):
                    raise FileExistsError(f"{link} exists and is not a symlink; refusing to replace it")
                os.unlink(link)
            os.symlink(self.slave_name, link)
        self.stream: FdStream | None = None

    @property
    def path(self) -> str:
        return self.link or self.slave_name

    def open_stream(self) -> FdStream:
        self.stream = FdStream(self.master, label=f"pty:{self.path}", eof_on_eio=False)
        return self.stream

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.link and os.path.islink(self.link):
            try:
                os.unlink(self.link)
            except OSError:
                pass


class SimServer:
    """Base of the stream simulators: TCP server (port 0 = any free port) or pty.

    Subclasses implement `handle(reader, writer)`, which runs for as long as a
    client is attached. Unsolicited output goes through `send()`, which quietly
    drops data when no client is attached (a device talking to an unplugged
    cable), and `reset_connection()` closes the client with RST.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, serial_link: str | None = None, name: str = "sim") -> None:
        self.host = host
        self.port = port
        self.serial_link = serial_link
        self.name = name
        self.log = log.bind(sim=name)
        self._server: asyncio.base_events.Server | None = None
        self._pty: PtyPair | None = None
        self._pty_task: asyncio.Task[None] | None = None
        self._writer: Any = None
        self._handler_tasks: set[asyncio.Task[Any]] = set()
        self.connections = 0

    # -- lifecycle

    async def start(self) -> None:
        if self.serial_link is not None:
            self._pty = PtyPair(self.serial_link or None)
            stream = self._pty.open_stream()
            self._writer = stream
            self._pty_task = asyncio.create_task(self._run_handler(stream.reader, stream))
            self.log.info("sim_listening", serial=self._pty.path)
        else:
            self._server = await asyncio.start_server(self._on_client, self.host, self.port)
            sock = self._server.sockets[0]
            self.port = sock.getsockname()[1]
            self.log.info("sim_listening", host=self.host, port=self.port)
        await self.on_started()

    async def on_started(self) -> None:
        """Hook for background tasks of the simulated device (print engine...)."""

    async def stop(self) -> None:
        await self.on_stopping()
        if self._server is not None:
            self._server.close()
        for t in list(self._handler_tasks):
            t.cancel()
        if self._pty_task is not None:
            self._pty_task.cancel()
        for t in [*self._handler_tasks, *( [self._pty_task] if self._pty_task else [])]:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        if self._writer is not None and self._pty is None:
            try:
                self._writer.close()
            except Exception:
                pass
        self._writer = None
        if self._pty is not None:
            self._pty.close()
            self._pty = None
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            except (TimeoutError, Exception):
                pass
            self._server = None

    async def on_stopping(self) -> None:
        """Hook to stop background tasks."""

    @property
    def serial_path(self) -> str | None:
        return self._pty.path if self._pty is not None else None

    @property
    def listening(self) -> str:
        """Where a driver finds this device (what the line simulator prints)."""
        return self.serial_path or f"{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    # -- clients

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        old = self._writer
        if old is not None and old is not writer:
            old.close()  # one client at a time, like the device
        self._writer = writer
        self.connections += 1
        await self._run_handler(reader, writer)

    async def _run_handler(self, reader: asyncio.StreamReader, writer: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handler_tasks.add(task)
        try:
            await self.handle(reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("sim_handler_failed")
        finally:
            self._handler_tasks.discard(task)
            if self._writer is writer and self._pty is None:
                self._writer = None
            if self._pty is None:
                try:
                    writer.close()
                except Exception:
                    pass

    async def handle(self, reader: asyncio.StreamReader, writer: Any) -> None:
        raise NotImplementedError

    def send(self, data: bytes) -> bool:
        w = self._writer
        if w is None or w.is_closing():
            return False
        try:
            w.write(data)
        except (ConnectionError, OSError):
            return False
        return True

    def reset_connection(self) -> bool:
        """Close the client abruptly (TCP RST). A pty cannot be reset; returns False there."""
        w = self._writer
        if w is None or self._pty is not None:
            return False
        sock = w.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        transport = getattr(w, "transport", None)
        if transport is not None:
            transport.abort()
        else:
            w.close()
        self._writer = None
        self.log.info("sim_connection_reset")
        return True


def add_endpoint_args(p: argparse.ArgumentParser, default_port: int | None) -> None:
    p.add_argument("--host", default="127.0.0.1", help="TCP address to listen on (default 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=default_port,
        help=f"TCP port ({'default ' + str(default_port) if default_port else 'default depends on --protocol'}; 0 = any free port)",
    )
    p.add_argument(
        "--serial", metavar="PATH", nargs="?", const="",
        help="serve on a pty instead of TCP; with PATH, symlink the pty's slave there (open it as the serial port)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the fault injection (default 0)")


async def run_forever(sim: SimServer) -> None:
    """Serve until SIGINT/SIGTERM, then stop cleanly (the pty symlink must not outlive the simulator)."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await sim.start()
    log.info("sim_ready", sim=sim.name, at=sim.listening)
    try:
        await stop.wait()
    finally:
        await sim.stop()


def main() -> None:
    """Manual helper: create a pty, link it, and relay it to a TCP device (debugging serial drivers)."""
    p = argparse.ArgumentParser(
        prog="python -m linectl.simulators.serialpty",
        description="Create a pty pair, symlink its slave at PATH and relay the master to a TCP device.",
    )
    p.add_argument("link", help="path for the slave symlink, e.g. /tmp/linectl-tty0")
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="TCP device to relay to")
    args = p.parse_args()

    async def relay() -> None:
        pair = PtyPair(args.link)
        stream = pair.open_stream()
        host, _, port = args.to.rpartition(":")
        r, w = await asyncio.open_connection(host, int(port))

        async def pump(src: asyncio.StreamReader, dst: Any) -> None:
            while data := await src.read(65536):
                dst.write(data)

        try:
            await asyncio.gather(pump(stream.reader, w), pump(r, stream))
        finally:
            pair.close()

    asyncio.run(relay())


if __name__ == "__main__":
    main()
