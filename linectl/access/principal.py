"""Who a command comes from, once a channel verified it, and whether that one may send it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Principal:
    """A verified identity: a person (store user) or a device actor (plc:<name>).

    `name` becomes the command's actor in the audit trail and the events. `session` is the store id of the login
    session the command came with (None: a one-shot credential, a device, an OPC UA session)."""

    name: str
    kind: Literal["user", "device"]
    roles: tuple[str, ...]
    permissions: frozenset[str]
    display_name: str = ""
    channel: str = ""
    session: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def device_principal(access: Any, name: str) -> Principal:
    """A device actor (plc:<name>) with its access.devices permissions (`access`: settings.AccessConfig)."""
    return Principal(name=name, kind="device", roles=(), permissions=access.device_permissions(name), display_name=name,
                     channel=name.split(":", 1)[0])


def permits(principal: Principal, command: Any) -> str | None:
    """Why `principal` may not send `command` (a control.Command), or None when it may.

    users_admin is needed for every user change except a user's own password change."""
    name = str(command.name)
    if name in principal.permissions:
        return None
    if name == "users_admin" and principal.kind == "user" and command.action == "passwd" and command.username == principal.name:
        return None
    roles = ", ".join(principal.roles) or "none"
    if principal.kind == "device":
        return f"device {principal.name} may not send {name} (access.devices)"
    return f"user {principal.name} (roles: {roles}) may not send {name}"
