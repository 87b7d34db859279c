"""Handheld and fixed scanners: one read per line, optional AIM symbology identifier, TCP or serial.

Rework and aggregation stations scan by hand; the scanner sends the data and,
when configured to, the AIM symbology identifier (`]d2` GS1 DataMatrix,
`]C1` GS1-128, `]Q3` GS1 QR...). That prefix is the only way to tell a GS1
DataMatrix from a plain one, so `aim_prefix: required` refuses lines without
it. Scanners that cannot transmit GS (keyboard-wedge heritage) often send a
printable stand-in; `gs_replacement` maps it back. Garbage handling is the one
in drivers/reader.py: never a read, always a health note.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from linectl.drivers.base import Decoded, Read, register_driver
from linectl.drivers.reader import AIM_RE, Garbage, LineCodeReader, LineReaderConfig


class ScannerConfig(LineReaderConfig):
    """`driver: scanner`."""

    driver: Literal["scanner"]
    aim_prefix: Literal["auto", "required", "none"] = Field(
        "auto", description="auto: strip ]Xn when present; required: lines without it are garbage; none: keep all as data"
    )
    gs_replacement: str | None = Field(None, min_length=1, description="printable stand-in the scanner sends for GS")
    no_read: str | None = Field(None, min_length=1, description="line a fixed scanner sends when it decoded nothing")


@register_driver
class Scanner(LineCodeReader):
    """One code per line; `seq` is None (a person pulled the trigger, there is no unit number)."""

    config_class = ScannerConfig
    config: ScannerConfig
    kind = "scanner"

    def parse_line(self, text: str, raw: bytes, received_at: float) -> Read:
        cfg = self.config
        if cfg.no_read is not None and text == cfg.no_read:
            return Read(None, (), received_at, raw)
        sym: str | None = None
        data = text
        if cfg.aim_prefix != "none":
            if AIM_RE.match(text):
                sym, data = text[:3], text[3:]
            elif cfg.aim_prefix == "required":
                raise Garbage("line without AIM symbology identifier")
        if cfg.gs_replacement:
            data = data.replace(cfg.gs_replacement, "\x1d")
        if data == "":
            raise Garbage("empty data")
        return Read(None, (Decoded(data, sym),), received_at, raw)
