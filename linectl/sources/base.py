"""The SerialSource protocol and the registry of sources, keyed by the config's `serials.source.type`.

A source speaks one L3/L4 protocol for asking serial numbers (serialbox REST, the SOAP number-range request,
OPEN-SCS over OPC UA). It knows nothing of the store or the line: the provisioner (linectl.sources.provisioner)
persists every request before it calls `request()` and every answer (`SerialPage.raw`) before it imports a single
serial, validates each serial, refuses duplicates, and parks the source with an alarm when it raises
SourceRefused. Adding a source = one module with a class following `SerialSource`, its config model in
linectl.config (a member of the `serials.source` union, discriminated by `type`), and its line in SOURCES below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

#: config `type` -> "module:Class"
SOURCES: dict[str, str] = {
    "serialbox": "linectl.sources.serialbox:SerialboxSource",
    "number_range": "linectl.sources.number_range:NumberRangeSource",
    "openscs": "linectl.sources.openscs:OpenScsSource",
}


@dataclass(frozen=True)
class SerialRequest:
    """One request as the store recorded it before it was sent."""

    request_id: int  # the store's id of this request
    gtin: str  # GTIN-14 of the product the serials are for
    size: int  # serials asked for
    #: idempotency key / request token, stored with the request: a request repeated after a restart sends the same
    #: key, so a protocol that honours one (OPEN-SCS request tokens) answers the numbers it already allocated
    key: str
    lot: str | None = None  # the batch being run when it was asked, when the protocol carries one


@dataclass
class SerialPage:
    """One answer of the L3: the serial values (the AI 21 part only), in the L3's order, and the raw answer."""

    serials: list[str]
    raw: str  # the answer as received (HTTP body, SOAP envelope, OPC UA result rendered as text): kept in the record
    #: the protocol says more pages follow for this request; `continuation` is what to send for the next one
    more: bool = False
    continuation: str | None = None
    #: serials the L3 answered that are not for this request (another GTIN in an element string, ...), with why:
    #: the provisioner records them as refused; they are never imported
    foreign: list[tuple[str, str]] = field(default_factory=list)


class SourceError(Exception):
    """Base of what a source raises; `reason` is one line for an operator."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SourceUnavailable(SourceError):
    """Transient: no connection, timeout, connection dropped mid-answer, HTTP 5xx/502/503. Retried with backoff."""


class SourceRefused(SourceError):
    """The L3 answered and said no (SOAP fault, 4xx, unknown pool, malformed answer it will give again):
    the request is parked with an alarm until an operator retries it."""


@runtime_checkable
class SerialSource(Protocol):
    """What the provisioner needs of a source."""

    #: "<type>" or "<type>:<something the operator recognises>", for logs, state and the record
    name: str
    #: the protocol honours `SerialRequest.key`: the same key asked again answers the same numbers (OPEN-SCS request
    #: tokens). False: a request repeated after a restart allocates new numbers, so the provisioner records the
    #: unanswered one as lost instead of sending it again
    idempotent: bool

    async def request(self, req: SerialRequest, continuation: str | None = None) -> SerialPage:
        """Ask for `req.size` serials (or the next page of a paged request). Raises SourceUnavailable/SourceRefused."""
        ...

    async def give_back(self, gtin: str, serials: list[str], key: str) -> bool:
        """Return unused serials to the L3. False: this protocol has no return (the provisioner reports them)."""
        ...

    async def aclose(self) -> None:
        """Close connections (idempotent)."""
        ...

    def status(self) -> dict[str, Any]:
        """Connection state and last error: JSON for `<root>/state` and `linectl upstream status`."""
        ...


def source_class(kind: str) -> Any:
    """The class registered under `kind` (imported on first use)."""
    try:
        target = SOURCES[kind]
    except KeyError:
        raise KeyError(f"unknown serial source {kind!r}; known: {', '.join(SOURCES)}") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
