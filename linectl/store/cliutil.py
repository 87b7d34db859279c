"""Shared plumbing for the CLI subcommands that open the store (serials, trace, audit).

One rule for all of them: `--db PATH` or `-c CONFIG` (whose store.path is
used); a StoreError (corrupt, foreign, newer, missing file) is one line on
stderr and exit code 3, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from linectl.store.model import StoreError

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_STORE = 0, 1, 2, 3


class BadInput(Exception):
    """Bad arguments or input files: exit 2."""


def add_db_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--db", metavar="PATH", help="store database file")
    g.add_argument("-c", "--config", metavar="CONFIG", help="line YAML; its store.path is used")


def load_line_config(args: argparse.Namespace) -> Any | None:
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


def db_path(args: argparse.Namespace, cfg: Any | None = None) -> str:
    if getattr(args, "db", None):
        return str(args.db)
    cfg = cfg if cfg is not None else load_line_config(args)
    if cfg is None:
        raise BadInput("give the database with --db PATH or a line config with -c CONFIG")
    return str(cfg.store.path)


def run_with_store(
    args: argparse.Namespace,
    body: Callable[[Any, Any | None], Awaitable[int]],
    *,
    readonly: bool,
    create: bool = False,
) -> int:
    """Open the store, run `body(store, cfg)`, close; map errors to exit codes."""
    from linectl.store.store import Store

    try:
        cfg = load_line_config(args)
        path = db_path(args, cfg)
    except BadInput as exc:
        print(f"linectl: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    async def main() -> int:
        kwargs: dict[str, Any] = {"readonly": readonly, "create": create}
        if cfg is not None and not readonly:
            kwargs.update(group_commit_max=cfg.store.group_commit_max, queue_max=cfg.store.queue_max)
        store = await Store.open(path, **kwargs)
        try:
            return await body(store, cfg)
        finally:
            await store.close()

    try:
        return asyncio.run(main())
    except StoreError as exc:
        print(f"linectl: store error: {exc}", file=sys.stderr)
        return EXIT_STORE
    except BadInput as exc:
        print(f"linectl: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
