"""What every benchmark prints about the machine it ran on, so figures in RESULTS.md can be compared."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "?"


def machine(*extra: str) -> str:
    """CPU model, CPU count, Python and kernel, then whatever the benchmark adds (library versions...)."""
    parts = [cpu_model(), f"{os.cpu_count()} CPU", f"Python {platform.python_version()}", f"{platform.system()} {platform.release()}", *extra]
    return ", ".join(parts)
