"""Kept importable for existing callers (tests): the command bridge now lives in linectl.upstream.bridge."""

from __future__ import annotations

from linectl.upstream.bridge import (
    MAX_JSON_DEPTH,
    MAX_JSON_ITEMS,
    REFUSAL_INTERVAL_S,
    CommandError,
    MqttBridge,
    json_shape_problem,
)

__all__ = ["MAX_JSON_DEPTH", "MAX_JSON_ITEMS", "REFUSAL_INTERVAL_S", "CommandError", "MqttBridge", "json_shape_problem"]
