"""The Sink protocol and the registry of upstream sinks, keyed by their config key.

A sink takes outbox rows after its own cursor (linectl.upstream.outbox.OutboxReader) to one upstream and
moves the cursor once that upstream has them. Adding a sink = one module with a class following `Sink`, plus
its line in SINKS below (config key -> "module:Class") and its config model in linectl.config. Nothing else
changes: the store keeps one cursor per sink name, forwarded_at and retention follow the slowest enabled sink.

One config key may configure several instances (`upstream.epcis_rest` is a list of repositories): a sink class's
`from_config(cfg, store)` returns a LIST of instances (mqtt and file: one element), and each instance's `name` is
its cursor's name (`mqtt`, `file`, `epcis_rest:<name>`, `epcis_xml:<name>`). Every class has a static
`names(cfg)` returning exactly those names, so the store learns them (set_sinks) without building the sinks.
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
    "epcis_rest": "linectl.upstream.epcis_rest:EpcisRestSink",  # `upstream: {epcis_rest: [{name, url, ...}]}`, one per entry
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

    @staticmethod
    def names(cfg: LineConfig) -> list[str]:
        """The cursor names of the instances `cfg` configures (a one-instance sink: its registry key), each one the
        `name` of what from_config builds; read without building the sinks (the store's retention follows them)."""
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

    def unpark(self) -> bool:
        """The operator says the far side's refusal is fixed (`sink_retry`): deliver again now. False: nothing waited."""
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


def instance_names(key: str, cfg: LineConfig) -> list[str]:
    """The cursor names of the instances of sink `key` that `cfg` enables (none when it is off)."""
    cls = sink_class(key)
    return list(cls.names(cfg)) if cls.enabled(cfg) else []


def enabled_names(cfg: LineConfig) -> list[str]:
    """The cursor names of every sink instance this config enables, in registry order (what store.set_sinks takes)."""
    return [name for key in SINKS for name in instance_names(key, cfg)]


def build_sinks(cfg: LineConfig, store: Any, on_alarm: AlarmHook | None = None) -> list[Any]:
    """Every instance of every enabled sink, each with its own cursor in `store`, in the order of enabled_names."""
    sinks: list[Any] = []
    for key in SINKS:
        want = instance_names(key, cfg)
        if not want:
            continue
        built = list(sink_class(key).from_config(cfg, store))
        got = [s.name for s in built]
        if got != want:  # a cursor the store does not count would let retention purge rows this sink still owes
            raise RuntimeError(f"sink {key!r} built instances {got} but its config names {want}")
        sinks += built
    for sink in sinks:
        sink.on_alarm = on_alarm
    return sinks
