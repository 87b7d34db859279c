"""RFID label printers speaking ZPL (Zebra RFID): the encode-and-verify commands of one label, and their verdict.

One label format encodes its tag and has the printer report what the tag holds, so every label is judged
by the printer's own read-back, never assumed (Zebra ZPL II / RFID Programming Guide: ^RS, ^RF, ^HV):

    ^RS8,,<v>,<n>,<e>                      Gen 2 tags; VOID length; labels tried; what to do when all fail
    ^RFW,H,1,2,1^FD<PC>^FS                 EPC bank (1), word 1: the PC word, whose top 5 bits are the EPC
                                           length in words (3000 = 96 bits, 6800 = 208 bits for SGTIN-198)
    ^RFW,H,2,<bytes>,1^FD<EPC>^FS          EPC bank, from word 2: the EPC itself
    ^RFR,H,1,<2+bytes>,1^FN<f>^FS          read PC + EPC back from the tag into field <f>
    ^FH_^HV<f>,<chars>,EPC#<seq>[,]_0D_0A,L^FS
                                           send field <f> to the host for every label printed:
                                           `EPC#<seq>[<PC><EPC>]` CR LF

The PC word is written explicitly (Zebra's documented way of setting the EPC length; bank `E` is fixed at
96 bits) so that SGTIN-198 and any length up to 496 bits gets the PC length it needs, and a pre-encoded tag
of another length is corrected. The header names the job, so a line is matched to its job by number, not
by position in a stream where voided labels and dropped formats would shift it.

What a real Zebra sends for a voided label is not spelled out in the manual: with `,L` it sends one
response per label printed; a failed tag leaves the read-back field empty or unreadable. linectl counts
an empty or non-hex field as a VOID label, a well-formed field that differs from what was sent as a
mismatch, and no line at all (in `verify_timeout_s` after the format left the printer) as no answer.
Only an exact read-back is "ok".
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from linectl.drivers.base import DeviceError

#: the PC word's EPC length field has 5 bits: at most 31 words (496 bits)
MAX_EPC_WORDS = 31
HV_HEADER = "EPC#"
#: one host-verification line as the printer sends it (after ^FH_ turned _0D_0A into CR LF)
HV_LINE = re.compile(rb"EPC#(\d{1,12})\[([^\]\r\n]*)\]")
_HEX = re.compile(r"[0-9A-F]+")

Verdict = Literal["ok", "void", "mismatch"]


class ZplRfidConfig(BaseModel):
    """`rfid:` under a `driver: zpl` printer: encode each job's EPC and verify it on the same label.

    Default `error_handling: N` with `labels_per_format: 1`: a tag that fails gives exactly one VOID label
    and the printer moves on, so one job is one physical label and its VOID is reported as that job's
    reject (the line's consecutive-reject limit stops the line on a run of them). The printer's `N` alone
    would drop a failing label silently; here every label's read-back is checked, so nothing passes unseen.
    `E` stops the printer itself in error mode after the failed labels (format kept until an operator
    clears or cancels it): the job stays unconfirmed meanwhile and the driver reports the printer faulted.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    error_handling: Literal["N", "E"] = Field(
        "N", description="^RS e: N = VOID and go on to the next format, E = VOID and stop in error mode"
    )
    labels_per_format: int = Field(1, ge=1, le=10, description="^RS n: labels tried (each failure prints VOID)")
    void_length_dots: int | None = Field(
        None, ge=0, le=32000, description="^RS v: length of the VOID printout in dots; None = printer default"
    )
    field_number: int = Field(99, ge=0, le=999, description="^FN number the read-back goes into (not printed)")
    verify_timeout_s: float = Field(
        5.0, gt=0, description="after the format left the printer, wait this long for its host verification"
    )
    require_epc: bool = Field(True, description="refuse jobs without epc_hex (a blank tag would leave unnoticed)")
    void_run_limit: int = Field(3, ge=1, description="VOID jobs in a row that degrade the printer's health")


def check_epc_hex(epc_hex: str) -> str:
    """The EPC as the printer gets it: uppercase hex of whole 16-bit words, 1 to 31 words."""
    epc = epc_hex.strip().upper()
    if not epc or not _HEX.fullmatch(epc):
        raise DeviceError(f"EPC {epc_hex!r} is not hexadecimal")
    if len(epc) % 4:
        raise DeviceError(f"EPC {epc_hex!r} has {len(epc)} hex digits: the EPC bank is written in 16-bit words (4 digits)")
    if len(epc) // 4 > MAX_EPC_WORDS:
        raise DeviceError(f"EPC {epc_hex!r} has {len(epc) // 4} words: the PC length field allows at most {MAX_EPC_WORDS}")
    return epc


def pc_word(epc: str) -> str:
    """PC word for a GS1 EPC of this length: length in words in bits 15-11, UMI/XI/T and AFI bits 0."""
    return f"{(len(epc) // 4) << 11:04X}"


def rfid_commands(cfg: ZplRfidConfig, seq: int, epc: str) -> str:
    """The ZPL lines that encode `epc` on this label and report the read-back as `EPC#<seq>[...]`."""
    nbytes = len(epc) // 2
    void = "" if cfg.void_length_dots is None else str(cfg.void_length_dots)
    f = cfg.field_number
    return "\n".join(
        [
            f"^RS8,,{void},{cfg.labels_per_format},{cfg.error_handling}",
            f"^RFW,H,1,2,1^FD{pc_word(epc)}^FS",
            f"^RFW,H,2,{nbytes},1^FD{epc}^FS",
            f"^RFR,H,1,{2 + nbytes},1^FN{f}^FS",
            f"^FH_^HV{f},{4 + len(epc)},{HV_HEADER}{seq}[,]_0D_0A,L^FS",
        ]
    )


def judge(epc: str, data: bytes) -> tuple[Verdict, str | None, str]:
    """(verdict, EPC read, reason) for one host-verification field against the EPC sent."""
    text = data.decode("ascii", errors="replace").strip().upper()
    if not text:
        return "void", None, "VOID: nothing read back from the tag"
    if not _HEX.fullmatch(text) or len(text) < 4:
        return "void", None, f"VOID: read-back {text[:40]!r} is not a PC word + EPC"
    pc, got = text[:4], text[4:]
    want_pc = pc_word(epc)
    if got == epc and pc == want_pc:
        return "ok", got, ""
    if got != epc:
        return "mismatch", got, f"tag holds EPC {got}, sent {epc}"
    return "mismatch", got, f"tag PC word {pc} (EPC length {int(pc, 16) >> 11} words), expected {want_pc}"
