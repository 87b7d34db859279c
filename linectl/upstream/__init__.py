"""Upstream delivery of the store's outbox: one module per sink, each with its own durable cursor.

- outbox.py: the sink-agnostic reader (pages after a sink's cursor, advance it once the sink confirms)
- sink.py: the Sink protocol and the registry (config key -> sink class)
- mqtt_client.py: MQTT connection plumbing shared by the forwarder and the bridge
- mqtt.py: the MQTT forwarder sink (EPCIS documents, alarms, records; PUBACK or upstream confirmation)
- bridge.py: the MQTT command bridge (status, state, commands, serial requests); not a sink
- file.py: the file sink (EPCIS documents written atomically into a directory)
"""
