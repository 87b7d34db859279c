"""The clock the stations' rules read (reject confirm wait, reader silence), so a test can drive it.

Rule timers compare `monotonic()` readings: in production that is
`time.monotonic`; the in-process rule tests (tests/test_rules_inprocess.py)
give the line a clock they advance by hand, so "a reject not confirmed within
2 s stops the line" is checked in milliseconds, not by waiting 2 s. Only the
rule timers read it: waits on the event loop (asyncio.sleep, wait_for, drain
deadlines) and latency figures stay on real time.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds from an arbitrary origin, never going back."""
        ...


class SystemClock:
    """`time.monotonic`: the clock of a real line."""

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = SystemClock()
