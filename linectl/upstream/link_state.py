"""The state of every upstream link (sink, serial source) recorded in the store, so `linectl upstream status` shows
it from the store alone, also while the daemon is down.

The retained `<root>/state` shows the same live, but only while a broker is there and the daemon ran last. Here the
daemon records, per link, the part of its status an operator needs to act on (connected, last error and since when,
parked) when it changes, every HEARTBEAT_S anyway (so `as_of` tells how old it is), and once more at a clean stop
(`running: false`). The backlog is not recorded: `upstream status` counts it from the cursor, which is exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import structlog

log = structlog.get_logger("linectl.upstream")

#: how often the states are looked at (a change is recorded at the next look)
CHECK_S = 2.0
#: recorded again at least this often, unchanged or not: `as_of` then shows a daemon that stopped recording
HEARTBEAT_S = 60.0
#: what of a sink's status() is recorded (those it has)
SINK_KEYS = ("connected", "last_error", "error_since", "parked")


def sink_state(status: dict[str, Any]) -> dict[str, Any]:
    """The recorded part of a sink's status(); `parked` is true/false for every sink (a sink that cannot park: false),
    with `parked_reason` and `parked_rows` where the sink says them."""
    out = {k: status[k] for k in SINK_KEYS if k in status}
    parked = out.get("parked")
    out["parked"] = bool(parked)
    if isinstance(parked, dict):  # epcis_rest: the refused document's rows and the reason
        out["parked_reason"] = parked.get("reason")
        out["parked_rows"] = [parked.get("first_seq"), parked.get("last_seq")]
    return out


def source_state(prov: Any) -> dict[str, Any]:
    """The recorded part of a provisioner's state (its requests, parked ones included, are in the store already)."""
    try:
        connected = dict(prov.source.status()).get("connected")
    except Exception:  # noqa: BLE001 - a source's status must not stop the recording of the others
        connected = None
    return {"state": prov.state, "connected": connected, "last_error": prov.last_error, "last_error_at": prov.last_error_at}


def link_states(sinks: Iterable[Any], sources: Iterable[Any], *, running: bool = True) -> dict[str, dict[str, Any]]:
    """{"sink:<name>" | "source:<name>:<gtin>": state} of the daemon's links now."""
    out = {f"sink:{s.name}": {**sink_state(s.status()), "running": running} for s in sinks}
    for p in sources:
        out[f"source:{p.name}:{p.gtin}"] = {**source_state(p), "running": running}
    return out


class LinkStateRecorder:
    """Records the links' states in the store on change and every HEARTBEAT_S (a daemon task)."""

    def __init__(self, store: Any, sinks: list[Any], sources: list[Any], *, check_s: float = CHECK_S, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.store = store
        self.sinks = sinks
        self.sources = sources
        self.check_s = check_s
        self.heartbeat_s = heartbeat_s
        self._last: dict[str, dict[str, Any]] = {}
        self._last_all = 0.0

    async def record(self, *, running: bool = True, force: bool = False) -> int:
        """Record the states that changed (all of them when forced or at the heartbeat); returns how many."""
        now = asyncio.get_running_loop().time()
        states = link_states(self.sinks, self.sources, running=running)
        if force or now - self._last_all >= self.heartbeat_s:
            changed = states
            self._last_all = now
        else:
            changed = {k: v for k, v in states.items() if self._last.get(k) != v}
        await self.store.note_link_states(changed)
        self._last.update(changed)
        return len(changed)

    async def run(self) -> None:
        while True:
            await self.record()
            await asyncio.sleep(self.check_s)

    async def final(self) -> None:
        """At a clean stop: every link recorded with running false (what it was when the daemon stopped)."""
        try:
            await self.record(running=False, force=True)
        except Exception as exc:  # noqa: BLE001 - the store may be what failed; the stop goes on
            log.warning("link_state_final_failed", error=str(exc))
