"""Durable local store: serial registry, event outbox, aggregation, batches, hash-chained audit trail.

One SQLite file in WAL mode with synchronous=FULL, written by exactly one
thread (group commit), read through separate connections. See docs_store.md.
"""

from linectl.store.model import (
    SERIAL_STATES,
    AuditCheck,
    AuditRecord,
    Batch,
    Container,
    OutboxRow,
    PoolExhausted,
    ProvisionResult,
    SerialRecord,
    StoreError,
)
from linectl.store.schema import SCHEMA_VERSION
from linectl.store.store import Store

__all__ = [
    "SCHEMA_VERSION",
    "SERIAL_STATES",
    "AuditCheck",
    "AuditRecord",
    "Batch",
    "Container",
    "OutboxRow",
    "PoolExhausted",
    "ProvisionResult",
    "SerialRecord",
    "Store",
    "StoreError",
]


def __getattr__(name: str) -> object:
    # verify_code lives in linectl.store.trace (the one trace module); kept importable from here, lazily: no import cycle
    if name == "verify_code":
        from linectl.store.trace import verify_code

        return verify_code
    raise AttributeError(f"module 'linectl.store' has no attribute {name!r}")
