"""The first users of a line: `linectl init` (and a demo's own store) create operator, qa and admin.

Their passwords come from the environment (LINECTL_PASSWORD_OPERATOR, LINECTL_PASSWORD_QA, LINECTL_PASSWORD_ADMIN;
checked against access.password) or are generated; a generated password is handed back to the caller to show
once (init prints it; the demo writes it to a 0600 file beside its store), never logged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from linectl.access.gate import DEFAULT_USERS, generate_password
from linectl.access.passwords import PasswordRefused, check_policy, hash_password
from linectl.access.settings import AccessConfig


def password_env(username: str) -> str:
    return f"LINECTL_PASSWORD_{username.upper()}"


async def create_default_users(cfg: AccessConfig, store: Any, *, actor: str, origin: str,
                               env: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """Create the default users a store without users gets; returns username -> generated password (None: from env).

    Nothing happens (and {} is returned) when the store has users already. A password from the environment that
    the policy refuses raises PasswordRefused before any user is created."""
    if store.users():
        return {}
    env = os.environ if env is None else env
    chosen: dict[str, tuple[str, bool]] = {}
    for name, _display, _roles in DEFAULT_USERS:
        pw = env.get(password_env(name))
        if pw:
            try:
                check_policy(pw, cfg.password, name)
            except PasswordRefused as exc:
                raise PasswordRefused(f"{password_env(name)}: {exc}") from None
            chosen[name] = (pw, False)
        else:
            chosen[name] = (generate_password(max(16, cfg.password.min_length)), True)
    out: dict[str, str | None] = {}
    for name, display, roles in DEFAULT_USERS:
        pw, generated = chosen[name]
        await store.add_user(name, display, list(roles), hash_password(pw), "local", actor=actor, origin=origin,
                             reason="default user created with the store")
        out[name] = pw if generated else None
    return out


def write_password_file(path: Path, generated: Mapping[str, str | None]) -> Path | None:
    """The generated passwords in a file only its owner can read (the demo's way of showing them once)."""
    lines = [f"{name}: {pw}\n" for name, pw in generated.items() if pw]
    if not lines:
        return None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return path
