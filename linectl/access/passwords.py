"""Passwords: argon2id hashes only (argon2-cffi), the policy of access.password, and where a password comes from.

A password never appears on a command line (it would sit in the shell history and in `ps`), in a log line, an
audit record or a reply: the CLI reads it from a prompt, a file (`--password-file`) or the environment.
"""

from __future__ import annotations

import os
import string
import sys
from collections.abc import Callable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from linectl.access.settings import PasswordPolicy

#: OWASP's minimum argon2id parameters (m=19 MiB, t=2, p=1): ~20-30 ms per verification on a line PC
_HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
#: a hash verified when a user is unknown, so "no such user" costs the same time as "wrong password"
_DUMMY = _HASHER.hash("linectl-no-such-user")
PASSWORD_ENV = "LINECTL_PASSWORD"
NEW_PASSWORD_ENV = "LINECTL_NEW_PASSWORD"


class PasswordRefused(ValueError):
    """A new password the policy does not take; the message says which rule."""


def hash_password(password: str) -> str:
    return str(_HASHER.hash(password))


def verify_password(password_hash: str | None, password: str) -> bool:
    """True when `password` matches; False for a wrong one or no hash (the same argon2 cost either way)."""
    try:
        return bool(_HASHER.verify(password_hash or _DUMMY, password)) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def check_policy(password: str, policy: PasswordPolicy, username: str, earlier: tuple[str, ...] = ()) -> None:
    """Raise PasswordRefused naming the first rule a new password breaks; `earlier`: current and past hashes."""
    if len(password) < policy.min_length:
        raise PasswordRefused(f"the password must have at least {policy.min_length} characters")
    if len(password) > 1024:
        raise PasswordRefused("the password must have at most 1024 characters")
    classes = sum((any(c in string.ascii_lowercase for c in password), any(c in string.ascii_uppercase for c in password),
                   any(c in string.digits for c in password), any(not c.isascii() or not c.isalnum() for c in password)))
    if classes < policy.classes:
        raise PasswordRefused(f"the password must mix at least {policy.classes} of: lower case, upper case, digits, other characters")
    if username.lower() in password.lower():
        raise PasswordRefused("the password must not contain the user name")
    for h in earlier[: policy.history + 1]:
        if verify_password(h, password):
            raise PasswordRefused(f"the password must differ from the current one and the last {policy.history}")


def read_password(*, file: str | None, env: str, prompt: str, confirm: bool = False,
                  ask: Callable[[str], str] | None = None) -> str:
    """A password from `file` (first line), else the environment variable `env`, else a prompt on the terminal.

    Raises ValueError when none gives one (no terminal to ask on)."""
    if file:
        with open(file, encoding="utf-8") as f:
            pw = f.readline().rstrip("\r\n")
        if not pw:
            raise ValueError(f"{file}: empty password file")
        return pw
    from_env = os.environ.get(env)
    if from_env:
        return from_env
    if ask is None:
        if not sys.stdin.isatty():
            raise ValueError(f"no password: give --password-file, set {env}, or run on a terminal")
        import getpass

        ask = getpass.getpass
    pw = ask(prompt)
    if confirm and ask("again: ") != pw:
        raise ValueError("the two passwords differ")
    if not pw:
        raise ValueError("empty password")
    return pw
