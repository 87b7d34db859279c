"""Which configuration a batch ran under, and which clock stamped its records (21 CFR 11.10(e), Annex 11 §4/§9).

A batch record is only reviewable against the settings in force: the grade
threshold, the challenge set, the serial scheme. `config_fingerprint(cfg)`
gives two hashes, recorded in the batch's `batch_created` audit record and
shown in the batch report and review:

- `config_file_sha256`: sha256 of the YAML file's bytes exactly as read by
  `load_config` (what `sha256sum line.yaml` prints), so the file kept under
  change control can be matched to the batch; None when the config was not
  loaded from a file (the demo and tests build it from data);
- `config_sha256`: sha256 of the resolved config (after ${ENV} substitution
  and pydantic defaults) as canonical JSON (sorted keys, no whitespace,
  UTF-8): two files that differ only in comments or in defaults spelt out
  resolve to the same hash, while a changed default between linectl versions
  changes it.

`clock_source()` says what the audit trail's timestamps rest on: the system
clock, and whether NTP synchronised it when that can be told (systemd's
timesync flag file, else `timedatectl`), else "unknown".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from linectl.config import LineConfig

#: systemd-timesyncd creates this file once it has synchronised the clock (systemd-timesyncd.service(8))
TIMESYNC_FLAG = "/run/systemd/timesync/synchronized"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def config_sha256(cfg: LineConfig) -> str:
    """sha256 of the resolved config's canonical JSON."""
    return hashlib.sha256(canonical_json(cfg.model_dump(mode="json")).encode("utf-8")).hexdigest()


def config_fingerprint(cfg: LineConfig) -> dict[str, Any]:
    src = cfg.source
    return {
        "config_file": src[0] if src is not None else None,
        "config_file_sha256": src[1] if src is not None else None,
        "config_sha256": config_sha256(cfg),
    }


def clock_source(flag: str = TIMESYNC_FLAG) -> dict[str, Any]:
    """The clock the records are stamped with: {"clock", "ntp_synchronized" (True/False/None), "how", "timezone", "utc_offset"}."""
    now = datetime.now().astimezone()
    out: dict[str, Any] = {"clock": "system", "ntp_synchronized": None, "how": "unknown",
                           "timezone": time.tzname[0] if now.tzinfo is None else str(now.tzinfo), "utc_offset": now.strftime("%z")}
    if os.path.exists(flag):
        out.update(ntp_synchronized=True, how=f"systemd-timesyncd ({flag} present)")
        return out
    exe = shutil.which("timedatectl")
    if exe is not None:
        try:
            r = subprocess.run([exe, "show", "-p", "NTPSynchronized", "--value"], capture_output=True, text=True, timeout=3, check=False)
        except (OSError, subprocess.SubprocessError):
            return out
        value = r.stdout.strip().lower()
        if r.returncode == 0 and value in ("yes", "no"):
            out.update(ntp_synchronized=value == "yes", how="timedatectl NTPSynchronized")
    return out
