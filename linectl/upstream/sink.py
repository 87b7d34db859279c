"""The Sink protocol and the registry of upstream sinks, keyed by their config key.

A sink takes outbox rows after its own cursor (linectl.upstream.outbox.OutboxReader) to one upstream and
moves the cursor once that upstream has them. Adding a sink = one module with a class following `Sink`, plus
its line in SINKS below (config key -> "module:Class") and its config model in linectl.config. Nothing else
changes: the store keeps one cursor per sink name, forwarded_at and retention follow the slowest enabled sink.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from linectl.config import LineConfig

#: config key -> "module:Class". The key is also the sink's name in the store's sink_cursors table.
SINKS: dict[str, str] = {
    "mqtt": "linectl.upstream.mqtt:MqttSink",  # configured by `mqtt:` (enabled: mqtt.enabled)
    "file": "linectl.upstream.file:FileSink",  # configured by `upstream: {file: {...}}`
    "epcis_xml": "linectl.upstream.epcis_xml:EpcisXmlSink",  # `upstream: {epcis_xml: [{name, ...}]}`: one instance (cursor epcis_xml:<name>) each
}


#: raise an operator alarm (code, message); the daemon passes the line's, so it reaches the HMI, the audit and MQTT
AlarmHook = Callable[[str, str], Awaitable[Any]]


@runtime_checkable
class Sink(Protocol):
    """What the daemon needs of a sink: its lifetime, a nudge when rows arrive, and a status for the state topic."""

    name: str
    #: called once when deliveries start failing (not per retry); None: log only
    on_alarm: AlarmHook | None

    @staticmethod
    def enabled(cfg: LineConfig) -> bool:
        """Whether the config turns this sink on."""
        ...

    async def run(self) -> None:
        """Deliver until stop(); never raises for trouble on the far side (it retries with backoff)."""
        ...

    async def stop(self, timeout: float = 3.0) -> None:
        """Stop delivering; whatever is already confirmed is recorded in the cursor first (bounded wait)."""
        ...

    def notify(self, *_: Any) -> None:
        """Rows were appended: look now rather than at the next poll."""
        ...

    def status(self) -> dict[str, Any]:
        """Cursor, backlog, connection/error state: JSON for `<root>/state`."""
        ...


def sink_class(key: str) -> Any:
    """The class registered under `key` (imported on first use, so an unused sink costs no import)."""
    try:
        target = SINKS[key]
    except KeyError:
        raise KeyError(f"unknown upstream sink {key!r}; known: {', '.join(SINKS)}") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def enabled_names(cfg: LineConfig) -> list[str]:
    """The cursor names of the sink instances this config enables, in registry order (a sink configured as a list
    names each instance: a static `names(cfg)`, the convention of branch rest; else its config key)."""
    out: list[str] = []
    for key in SINKS:
        cls = sink_class(key)
        if cls.enabled(cfg):
            out += cls.names(cfg) if hasattr(cls, "names") else [key]
    return out


def build_sinks(cfg: LineConfig, store: Any, on_alarm: AlarmHook | None = None) -> list[Any]:
    """Every instance of every enabled sink, each with its own cursor in `store` (from_config: one or a list)."""
    sinks: list[Any] = []
    for key in SINKS:
        cls = sink_class(key)
        if cls.enabled(cfg):
            made = cls.from_config(cfg, store)
            sinks += made if isinstance(made, list) else [made]
    for sink in sinks:
        sink.on_alarm = on_alarm
    return sinks
