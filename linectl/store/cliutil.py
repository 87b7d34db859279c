"""Shared plumbing for the CLI subcommands that open the store (serials, trace, audit, report, recall, …).

One rule for all of them: `--db PATH` or `-c CONFIG` (whose store.path is
used); a StoreError (corrupt, foreign, newer, missing file, held by another
process, another line's store) is one line on stderr and exit code 3, never a
traceback. None of them creates a store: only `linectl init` does.

Read-only commands open the file in SQLite's read-only mode (no writer, no
migration, no file created) and work beside a running daemon. Writing commands
take the store's owner lock, so they refuse while the daemon (or another
writing command) holds the store; with `-c CONFIG` they also check (or, for a
store from before identities, record) the line identity.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from linectl.store.model import StoreError

if TYPE_CHECKING:
    from linectl.config import LineConfig
    from linectl.store import Store

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_STORE = 0, 1, 2, 3


class BadInput(Exception):
    """Bad arguments or input files: exit 2."""


def add_db_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--db", metavar="PATH", help="store database file")
    g.add_argument("-c", "--config", metavar="CONFIG", help="line YAML; its store.path is used")


def load_line_config(args: argparse.Namespace) -> LineConfig | None:
    if not getattr(args, "config", None):
        return None
    from linectl.config import load_config
    from linectl.yamlsource import ConfigFileError

    try:
        return load_config(args.config)
    except ConfigFileError as exc:
        lines = [p.format(args.config) for p in exc.problems]
        raise BadInput("\n".join(lines) or f"{args.config}: invalid configuration") from None
    except OSError as exc:
        raise BadInput(f"{args.config}: {exc.strerror or exc}") from None


def db_path(args: argparse.Namespace, cfg: LineConfig | None = None) -> str:
    if getattr(args, "db", None):
        return str(args.db)
    cfg = cfg if cfg is not None else load_line_config(args)
    if cfg is None:
        raise BadInput("give the database with --db PATH or a line config with -c CONFIG")
    return str(cfg.store.path)


def command_name(args: argparse.Namespace) -> str:
    """`linectl serials import` etc., for the lock file and the audit trail."""
    parts = ["linectl", str(getattr(args, "command", "") or "")]
    for key in ("serials_command", "audit_command", "rework_command", "export_kind", "action"):
        v = getattr(args, key, None)
        if isinstance(v, str):
            parts.append(v)
    return " ".join(p for p in parts if p)


async def open_store(
    path: str, cfg: LineConfig | None, *, readonly: bool, command: str, create: bool = False, actor: str = "system", origin: str = "cli"
) -> Store:
    """The one way the CLI opens a store: read-only (checked, never changed) or owned (locked) for writing."""
    from linectl.store.store import Store, line_identity

    ident = line_identity(cfg) if cfg is not None else None
    if readonly:
        return await Store.open(path, readonly=True, create=False, identity=ident)
    kwargs: dict[str, Any] = {}
    if cfg is not None:
        kwargs.update(group_commit_max=cfg.store.group_commit_max, queue_max=cfg.store.queue_max)
    return await Store.open(path, create=create, lock=command, identity=ident, actor=actor, origin=origin, **kwargs)


def run_with_store(
    args: argparse.Namespace,
    body: Callable[[Store, LineConfig | None], Awaitable[int]],
    *,
    readonly: bool,
    actor: str = "system",
) -> int:
    """Open the store (never creating it), run `body(store, cfg)`, close; map errors to exit codes."""
    try:
        cfg = load_line_config(args)
        path = db_path(args, cfg)
    except BadInput as exc:
        print(f"linectl: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    async def main() -> int:
        store = await open_store(path, cfg, readonly=readonly, command=command_name(args), actor=actor)
        try:
            return await body(store, cfg)
        finally:
            await store.close()

    return run_async(main)


def run_async(main: Callable[[], Awaitable[int]]) -> int:
    """asyncio.run with the CLI's error mapping: StoreError exit 3, BadInput exit 2, OSError exit 2."""
    try:
        return asyncio.run(main())  # type: ignore[arg-type]
    except StoreError as exc:
        print(f"linectl: store error: {exc}", file=sys.stderr)
        return EXIT_STORE
    except BadInput as exc:
        print(f"linectl: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # an output file that cannot be written, and the like
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"linectl: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
