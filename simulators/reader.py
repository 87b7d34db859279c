"""Smart-reader simulator: emits one result line per unit at the read point, like a DataMan or SR reader.

What it reports follows the unit (content, symbology, print quality), so the
verification logic is exercised by what the printer simulator actually put on
the pack. Hardware-trigger mode reports as soon as a unit is presented;
software-trigger mode holds the unit until the trigger command arrives and
answers with the trigger's sequence number (NOREAD if nothing is there).

Faults (seeded rates and on-demand `inject`): silence (lines dropped),
garbage bytes, TCP reset, forced no-reads.

    python -m linectl.simulators.reader --port 7200 --rate 60
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import string
import time
from collections import deque
from typing import Any

from linectl.simulators.model import SimUnit
from linectl.simulators.serialpty import SimServer, add_endpoint_args, run_forever

GRADE_LETTERS = ((3.5, "A"), (2.5, "B"), (1.5, "C"), (0.5, "D"))


def grade_letter(q: float) -> str:
    for threshold, letter in GRADE_LETTERS:
        if q >= threshold:
            return letter
    return "F"


def _trigger_regex(cmd: str) -> re.Pattern[bytes]:
    parts = []
    for literal, fname, _, _ in string.Formatter().parse(cmd):
        if literal:
            parts.append(re.escape(literal.encode("latin-1")))
        if fname == "seq":
            parts.append(rb"(?P<seq>\d+)")
    return re.compile(b"".join(parts))


class ReaderSim(SimServer):
    """Reader at the read point of a conveyor (`present(unit)`), over TCP or a pty."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        serial_link: str | None = None,
        name: str = "reader",
        config: Any = None,
        line_format: str = "{seq};{sym}{data};{grade}",
        terminator: str = "\r\n",
        no_read: str = "NOREAD",
        trigger_command: str | None = "TRIGGER {seq}\r\n",
        grade_format: str = "numeric",
        mode: str = "hardware",
        noread_below: float = 0.25,
        seed: int = 0,
        silence_rate: float = 0.0,
        garbage_rate: float = 0.0,
        reset_rate: float = 0.0,
    ) -> None:
        super().__init__(host=host, port=port, serial_link=serial_link, name=name)
        if config is not None:  # the driver's ReaderConfig: speak exactly what it expects
            line_format, terminator, no_read = config.line_format, config.terminator, config.no_read
            trigger_command = config.trigger_command
        if mode not in ("hardware", "software"):
            raise ValueError("mode is hardware or software")
        if grade_format not in ("numeric", "letter"):
            raise ValueError("grade_format is numeric or letter")
        self.line_format = line_format
        self.terminator = terminator.encode("latin-1")
        self.no_read = no_read
        self.trigger_rx = _trigger_regex(trigger_command) if trigger_command else None
        self.grade_format = grade_format
        self.mode = mode
        self.noread_below = noread_below
        self.rng = random.Random(seed)
        self.silence_rate, self.garbage_rate, self.reset_rate = silence_rate, garbage_rate, reset_rate
        self.waiting: deque[SimUnit] = deque()
        self.lines_sent = 0
        self.lines_dropped = 0
        self.triggers = 0
        self._silent_n = 0
        self._silent_forever = False
        self._noread_n = 0
        self._t0 = time.monotonic()

    # -- read point

    def present(self, unit: SimUnit) -> None:
        if self.mode == "software":
            self.waiting.append(unit)
            while len(self.waiting) > 64:
                self.waiting.popleft()
            return
        self._emit(unit.seq, unit)

    def readable(self, unit: SimUnit | None) -> bool:
        if unit is None or unit.content is None or unit.extras.get("unreadable"):
            return False
        return unit.quality >= self.noread_below

    def line_for(self, seq: int, unit: SimUnit | None) -> bytes:
        t_ms = str(int((time.monotonic() - self._t0) * 1000) % 100000)
        if self._noread_n > 0 or not self.readable(unit):
            self._noread_n = max(0, self._noread_n - 1)
            text = self.line_format.format(seq=seq, sym="", data=self.no_read, grade="0.0", time=t_ms)
        else:
            assert unit is not None and unit.content is not None
            q = unit.quality
            grade = grade_letter(q) if self.grade_format == "letter" else f"{q:.1f}"
            text = self.line_format.format(seq=seq, sym=unit.symbology or "", data=unit.content, grade=grade, time=t_ms)
        return text.encode("latin-1") + self.terminator

    def _emit(self, seq: int, unit: SimUnit | None) -> None:
        if self._silent_forever or self._silent_n > 0 or (self.silence_rate and self.rng.random() < self.silence_rate):
            self._silent_n = max(0, self._silent_n - 1)
            self.lines_dropped += 1
            return
        line = self.line_for(seq, unit)
        if self.garbage_rate and self.rng.random() < self.garbage_rate:
            line = bytes(self.rng.randrange(128, 256) for _ in range(self.rng.randint(1, 12))) + b"\r\n" + line
        if self.reset_rate and self.rng.random() < self.reset_rate:
            self.reset_connection()
            return
        if self.send(line):
            self.lines_sent += 1

    # -- software trigger

    async def handle(self, reader: asyncio.StreamReader, writer: Any) -> None:
        buf = b""
        while True:
            data = await reader.read(65536)
            if not data:
                return
            buf += data
            if self.trigger_rx is None:
                buf = b""
                continue
            while (m := self.trigger_rx.search(buf)) is not None:
                buf = buf[m.end() :]
                self.triggers += 1
                seq = int(m.group("seq")) if "seq" in m.groupdict() and m.group("seq") else self.triggers
                unit = self.waiting.popleft() if (self.mode == "software" and self.waiting) else None
                self._emit(seq, unit)
            if len(buf) > 4096:
                buf = buf[-256:]

    # -- faults

    def inject(self, kind: str, **kw: Any) -> None:
        if kind == "silence":
            if "on" in kw:
                self._silent_forever = bool(kw["on"])
            else:
                self._silent_n += int(kw.get("count", 1))
        elif kind == "garbage":
            n = int(kw.get("nbytes", 32))
            self.send(bytes(self.rng.randrange(256) for _ in range(n)))
        elif kind == "noread":
            self._noread_n += int(kw.get("count", 1))
        elif kind == "reset":
            self.reset_connection()
        else:
            raise ValueError(f"unknown fault kind {kind!r} for a reader (silence, garbage, noread, reset)")


def demo_unit(seq: int, rng: random.Random) -> SimUnit:
    from linectl import gs1

    serial = "".join(rng.choice("0123456789ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(12))
    code = gs1.compose_unit("09501101530003", serial, lot="LOT1", expiry="301231")
    return SimUnit(seq=seq, content=code.element_string, quality=round(rng.uniform(2.5, 4.0), 1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m linectl.simulators.reader", description="Smart reader simulator (result lines over TCP or a pty).")
    add_endpoint_args(p, default_port=7200)
    p.add_argument("--format", default="{seq};{sym}{data};{grade}", help="line format (default {seq};{sym}{data};{grade})")
    p.add_argument("--no-read", default="NOREAD")
    p.add_argument("--grades", choices=("numeric", "letter"), default="numeric")
    p.add_argument("--mode", choices=("hardware", "software"), default="hardware")
    p.add_argument("--rate", type=float, default=0.0, help="present demo units per minute (0 = only answer triggers)")
    p.add_argument("--silence-rate", type=float, default=0.0)
    p.add_argument("--garbage-rate", type=float, default=0.0)
    p.add_argument("--reset-rate", type=float, default=0.0)
    args = p.parse_args(argv)
    from linectl.logging import setup_logging

    setup_logging()
    sim = ReaderSim(
        host=args.host, port=args.port, serial_link=args.serial, line_format=args.format, no_read=args.no_read,
        grade_format=args.grades, mode=args.mode, seed=args.seed, silence_rate=args.silence_rate,
        garbage_rate=args.garbage_rate, reset_rate=args.reset_rate,
    )

    async def run() -> None:
        if args.rate > 0:

            async def feed() -> None:
                rng = random.Random(args.seed)
                n = 0
                while True:
                    await asyncio.sleep(60.0 / args.rate)
                    n += 1
                    sim.present(demo_unit(n, rng))

            asyncio.get_running_loop().create_task(feed())
        await run_forever(sim)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
