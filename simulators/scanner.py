"""Scanner simulator: sends the codes it is given as lines (with AIM prefix), over TCP or a pty.

    python -m linectl.simulators.scanner --port 7300          # then type codes; "\\G" or "<GS>" stands for GS
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from typing import Any

from linectl.simulators.model import SimUnit
from linectl.simulators.serialpty import SimServer, add_endpoint_args, run_forever


class ScannerSim(SimServer):
    """A scanner a person (or `present`) points at codes; `scan()` sends one read line."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        serial_link: str | None = None,
        name: str = "scanner",
        config: Any = None,
        terminator: str = "\r\n",
        aim: bool = True,
        gs_replacement: str | None = None,
        no_read: str | None = None,
        seed: int = 0,
        garbage_rate: float = 0.0,
    ) -> None:
        super().__init__(host=host, port=port, serial_link=serial_link, name=name)
        if config is not None:
            terminator, gs_replacement, no_read = config.terminator, config.gs_replacement, config.no_read
            aim = config.aim_prefix != "none"
        self.terminator = terminator.encode("latin-1")
        self.aim = aim
        self.gs_replacement = gs_replacement
        self.no_read = no_read
        self.rng = random.Random(seed)
        self.garbage_rate = garbage_rate
        self.scans = 0

    async def handle(self, reader: asyncio.StreamReader, writer: Any) -> None:
        while await reader.read(65536):
            pass  # scanners ignore what the host sends (no command set simulated)

    def scan(self, data: str, symbology: str | None = "]d2") -> bool:
        if self.gs_replacement:
            data = data.replace("\x1d", self.gs_replacement)
        line = ((symbology or "") if self.aim else "") + data
        out = line.encode("latin-1") + self.terminator
        if self.garbage_rate and self.rng.random() < self.garbage_rate:
            out = bytes(self.rng.randrange(128, 256) for _ in range(8)) + self.terminator + out
        ok = self.send(out)
        self.scans += ok
        return ok

    def present(self, unit: SimUnit) -> None:
        readable = unit.content is not None and not unit.extras.get("unreadable") and unit.quality >= 0.25
        if readable:
            assert unit.content is not None
            self.scan(unit.content, unit.symbology)
        elif self.no_read is not None:
            self.send(self.no_read.encode("latin-1") + self.terminator)

    def inject(self, kind: str, **kw: Any) -> None:
        if kind == "garbage":
            self.send(bytes(self.rng.randrange(256) for _ in range(int(kw.get("nbytes", 32)))))
        elif kind == "reset":
            self.reset_connection()
        elif kind == "scan":
            self.scan(str(kw["data"]), kw.get("symbology", "]d2"))
        else:
            raise ValueError(f"unknown fault kind {kind!r} for a scanner (garbage, reset, scan)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m linectl.simulators.scanner", description="Scanner simulator: each stdin line is sent as one scan.")
    add_endpoint_args(p, default_port=7300)
    p.add_argument("--symbology", default="]d2", help="AIM identifier sent before each code ('' for none)")
    args = p.parse_args(argv)
    from linectl.logging import setup_logging

    setup_logging()
    sim = ScannerSim(host=args.host, port=args.port, serial_link=args.serial, seed=args.seed, aim=bool(args.symbology))

    async def run() -> None:
        loop = asyncio.get_running_loop()

        async def stdin_scans() -> None:
            while True:
                line = await loop.run_in_executor(None, sys.stdin.readline)
                if not line:
                    return
                code = line.rstrip("\r\n").replace("<GS>", "\x1d").replace("\\G", "\x1d")
                if code:
                    sim.scan(code, args.symbology or None)

        loop.create_task(stdin_scans())
        await run_forever(sim)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
