"""Test-wide set-up and the shared fixtures.

Structured logs go to stderr at warning level, so test output stays readable.

Fixtures: `store` (a fresh Store on a temp file), `fake_line` / `make_fake_line`
(the demo line on in-process fake devices, tests/fakes.py: the engine's rules in
milliseconds). The end-to-end harness with real processes is
tests/engine_helpers.py `simulated_line`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from linectl.logging import setup_logging
from linectl.store import Store

setup_logging("warning")

MakeFakeLine = Callable[..., Awaitable[Any]]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh store on a temp file, closed after the test."""
    s = await Store.open(tmp_path / "line.db")
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def make_fake_line(store: Store) -> AsyncIterator[MakeFakeLine]:
    """make_fake_line(rules=..., station=..., base=...) -> a started FakeLine (tests/fakes.py), one per test."""
    from engine_helpers import demo_line_config
    from fakes import FakeLine

    from linectl.epcis import EpcisMapper

    made: list[FakeLine] = []

    async def make(*, rules: dict[str, Any] | None = None, station: dict[str, Any] | None = None, base: Path | None = None) -> FakeLine:
        """The demo config (or `base`) with these print_verify rules / station fields (engine_helpers.demo_line_config)."""
        assert not made, "one fake line per test (they would share the store)"
        cfg = demo_line_config(rules=rules, station=station) if base is None else demo_line_config(rules=rules, station=station, base=base)
        store.set_epcis_mapper(EpcisMapper.from_config(cfg))  # as the daemon does: the record renders as in production
        await store.upsert_products(cfg.products)
        fl = await FakeLine.build(cfg, store)
        made.append(fl)
        await fl.start()
        return fl

    try:
        yield make
    finally:
        for fl in made:
            await fl.stop()


@pytest.fixture
async def fake_line(make_fake_line: MakeFakeLine) -> Any:
    """The demo line (its rules as configured) on fake devices, started, no batch yet."""
    return await make_fake_line()
