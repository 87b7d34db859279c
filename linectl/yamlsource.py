"""YAML loading that remembers where every key came from, so config errors can name their line.

Engineers fix configs from the error text alone, on a line PC, often over a
phone call: `line.yaml:42: devices.printer1.port: ...` is worth more than a
traceback.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file, located by its YAML line (1-based, 0 when unknown)."""

    path: str  # dotted field path, e.g. "devices.printer1.port"
    line: int
    message: str

    def format(self, file: str | os.PathLike[str]) -> str:
        return f"{file}:{self.line}: {self.path or '<root>'}: {self.message}"


class ConfigFileError(Exception):
    """The file could not be turned into a valid config; `problems` lists every reason found."""

    def __init__(self, file: str | os.PathLike[str], problems: list[Problem]) -> None:
        self.file = str(file)
        self.problems = problems
        super().__init__("\n".join(p.format(file) for p in problems))


def load_yaml(path: str | os.PathLike[str]) -> Any:
    """Parse with ruamel's round-trip loader (which keeps line numbers); YAML syntax errors become Problems."""
    return parse_yaml(read_config_bytes(path), path)


def read_config_bytes(path: str | os.PathLike[str]) -> bytes:
    """The file's bytes, read once: what is parsed is what is hashed (linectl.config_hash), `sha256sum` gives the same."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigFileError(path, [Problem("", 0, f"cannot read file: {exc.strerror or exc}")]) from exc


def parse_yaml(raw: bytes, path: str | os.PathLike[str]) -> Any:
    """`load_yaml` on bytes already read (`path` names them in problems)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(path, [Problem("", 0, f"not UTF-8 text: {exc}")]) from exc
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        data = yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        msg = " ".join(x for x in (exc.context, exc.problem) if x) or str(exc)
        raise ConfigFileError(path, [Problem("", line, f"YAML syntax: {msg}")]) from exc
    except YAMLError as exc:
        raise ConfigFileError(path, [Problem("", 0, f"YAML syntax: {exc}")]) from exc
    if data is None:
        raise ConfigFileError(path, [Problem("", 1, "file is empty")])
    if not isinstance(data, CommentedMap):
        raise ConfigFileError(path, [Problem("", 1, "top level must be a mapping")])
    return data


def substitute_env(node: Any, env: dict[str, str] | None = None) -> list[Problem]:
    """Replace ${VAR} and ${VAR:-default} in every string scalar, in place. Secrets stay out of the file."""
    env = dict(os.environ) if env is None else env
    problems: list[Problem] = []

    def sub(value: str, path: tuple[Any, ...], line: int) -> str:
        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(Problem(dotted(path), line, f"environment variable {name} is not set"))
            return m.group(0)

        return _ENV.sub(repl, value)

    def walk(n: Any, path: tuple[Any, ...]) -> None:
        if isinstance(n, CommentedMap):
            for k in list(n.keys()):
                v = n[k]
                if isinstance(v, str) and "${" in v:
                    n[k] = sub(v, path + (k,), key_line(n, k))
                else:
                    walk(v, path + (k,))
        elif isinstance(n, CommentedSeq):
            for i, v in enumerate(n):
                if isinstance(v, str) and "${" in v:
                    n[i] = sub(v, path + (i,), item_line(n, i))
                else:
                    walk(v, path + (i,))

    walk(node, ())
    return problems


def key_line(node: CommentedMap, key: Any) -> int:
    try:
        return int(node.lc.key(key)[0]) + 1
    except Exception:
        return int(getattr(node.lc, "line", -1)) + 1


def item_line(node: CommentedSeq, index: int) -> int:
    try:
        return int(node.lc.item(index)[0]) + 1
    except Exception:
        return int(getattr(node.lc, "line", -1)) + 1


def line_of(root: Any, loc: Iterable[Any]) -> int:
    """The YAML line of the deepest node on `loc` that exists in the file.

    pydantic locations may contain entries that are not keys in the file (the
    tag of a discriminated union, a validator name); they are skipped.
    """
    node = root
    line = int(getattr(getattr(root, "lc", None), "line", 0)) + 1
    for part in loc:
        if isinstance(node, CommentedMap) and part in node:
            line = key_line(node, part)
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
            line = item_line(node, part)
            node = node[part]
        else:
            continue
    return line


def dotted(loc: Iterable[Any]) -> str:
    return ".".join(str(p) for p in loc)


def to_plain(node: Any) -> Any:
    """ruamel containers -> dict/list, so pydantic sees ordinary Python data."""
    if isinstance(node, CommentedMap):
        return {str(k) if not isinstance(k, (str, int)) else k: to_plain(v) for k, v in node.items()}
    if isinstance(node, CommentedSeq):
        return [to_plain(v) for v in node]
    if isinstance(node, str):
        return str(node)
    if isinstance(node, bool):
        return bool(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    return node
