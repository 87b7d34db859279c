"""Kept importable for existing callers (tests, benches, `python -m linectl.forwarder`): the MQTT forwarder now
lives in linectl.upstream.mqtt, its connection plumbing in linectl.upstream.mqtt_client."""

from __future__ import annotations

import sys

from linectl.upstream.mqtt import ALARM_KINDS, Forwarder, MqttSink, main
from linectl.upstream.mqtt_client import AckingClient, PublishRefused, client_options, default_client_id, track_link

__all__ = [
    "ALARM_KINDS",
    "AckingClient",
    "Forwarder",
    "MqttSink",
    "PublishRefused",
    "client_options",
    "default_client_id",
    "main",
    "track_link",
]

if __name__ == "__main__":
    sys.exit(main())
