"""Device drivers, one module per wire protocol, chosen by the `driver:` key of a device config."""
