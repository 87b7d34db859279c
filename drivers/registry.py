"""Imports every driver module so each registers its `driver:` key, and exposes the result.

Adding a protocol = adding its module name here. Config validation builds its
discriminated union from exactly this list.
"""

from __future__ import annotations

import importlib

from linectl.drivers.base import DRIVERS, Driver, DriverConfig

DRIVER_MODULES = (
    "linectl.drivers.zpl",
    "linectl.drivers.coder",
    "linectl.drivers.reader",
    "linectl.drivers.scanner",
    "linectl.drivers.camera",
    "linectl.drivers.modbus",
    "linectl.drivers.s7",
    "linectl.drivers.opcua",
    "linectl.drivers.llrp",
)

for _mod in DRIVER_MODULES:
    try:
        importlib.import_module(_mod)
    except ModuleNotFoundError as exc:  # TODO(bootstrap): make strict once every module exists
        if exc.name != _mod:
            raise


def device_config_classes() -> list[type[DriverConfig]]:
    seen: list[type[DriverConfig]] = []
    for cls in DRIVERS.values():
        if cls.config_class not in seen:
            seen.append(cls.config_class)
    return seen


def driver_class(key: str) -> type[Driver]:
    return DRIVERS[key]


def role_of(key: str) -> str:
    return DRIVERS[key].role
