"""One JSON encoding of command replies, shared by the MQTT bridge and the store.

A command's reply is sent over MQTT and stored for idempotency (command_ids);
both must encode it the same way, so a reply read back after a restart is the
one first sent.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any


def json_default(o: Any) -> Any:
    """`json.dumps(default=...)` for replies: datetimes, enums, sets, pydantic models and plain objects."""
    if isinstance(o, datetime):
        return o.isoformat()
    if isinstance(o, enum.Enum):
        return o.value
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    if hasattr(o, "__dict__"):
        return {k: v for k, v in vars(o).items() if not k.startswith("_")}
    return str(o)
