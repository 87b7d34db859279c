"""Serial number generation and validation (pure functions; the writer decides uniqueness).

Random serials come from `secrets` (EU FMD asks for a non-deterministic
randomisation). Generation works on whole blocks with bytes.translate, so a
block of 100,000 costs milliseconds: random bytes outside the largest
multiple of the alphabet size are deleted rather than folded, which keeps
every character equally likely.
"""

from __future__ import annotations

import re
import secrets

GS1_SET82 = frozenset("!\"%&'()*+,-./0123456789:;<=>?ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz")
_SET82_RE = re.compile(r"[!\"%&'()*+,\-./0-9:;<=>?A-Z_a-z]{1,20}")
MAX_SERIAL_LEN = 20

_tables: dict[str, tuple[bytes, bytes]] = {}


def _translation(alphabet: str) -> tuple[bytes, bytes]:
    t = _tables.get(alphabet)
    if t is None:
        k = len(alphabet)
        if k < 2 or k > 256 or len(set(alphabet)) != k or not set(alphabet) <= GS1_SET82:
            raise ValueError(f"alphabet {alphabet!r} must be 2+ distinct characters of GS1 set 82")
        limit = 256 - 256 % k
        table = bytes(ord(alphabet[b % k]) if b < limit else 0 for b in range(256))
        t = (table, bytes(range(limit, 256)))
        _tables[alphabet] = t
    return t


def random_serials(n: int, alphabet: str, length: int) -> list[str]:
    """n uniformly random strings (duplicates possible; the registry's unique key filters them)."""
    if not 1 <= length <= MAX_SERIAL_LEN:
        raise ValueError(f"serial length {length} is outside 1..{MAX_SERIAL_LEN}")
    if n <= 0:
        return []
    table, delete = _translation(alphabet)
    need = n * length
    keep = (256 - len(delete)) / 256
    chunks: list[bytes] = []
    have = 0
    while have < need:
        b = secrets.token_bytes(int((need - have) / keep) + 32).translate(table, delete)
        chunks.append(b)
        have += len(b)
    s = b"".join(chunks)[:need].decode("ascii")
    return [s[i : i + length] for i in range(0, need, length)]


def sequential_serial(value: int, width: int) -> str:
    s = str(value).zfill(width) if width else str(value)
    if len(s) > MAX_SERIAL_LEN:
        raise ValueError(f"sequential serial {s} is longer than {MAX_SERIAL_LEN} characters")
    return s


def serial_problem(serial: object) -> str | None:
    """Why `serial` cannot be an AI (21) serial, or None when it can."""
    if not isinstance(serial, str):
        return f"not text ({type(serial).__name__})"
    if not serial:
        return "empty"
    if len(serial) > MAX_SERIAL_LEN:
        return f"{len(serial)} characters (at most {MAX_SERIAL_LEN})"
    if _SET82_RE.fullmatch(serial):
        return None
    bad = next(c for c in serial if c not in GS1_SET82)
    return f"character {bad!r} (U+{ord(bad):04X}) is not in GS1 character set 82"
