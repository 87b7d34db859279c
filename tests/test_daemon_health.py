"""The daemon's own health: the systemd watchdog is fed only while the store writer lives (a dead writer stops the
line), and a command retried after a restart gets the reply it got the first time (command ids are durable)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import wait_for
from test_aggregation_support import GTIN, config, open_store

from linectl import control as C
from linectl.daemon import Daemon
from linectl.engine.line import Line
from linectl.store.writer import Op, _stop


def received(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


async def test_watchdog_is_fed_only_while_the_store_writer_lives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # feed every 0.1 s (the health loop ticks every 0.5 s)
    d = Daemon(config(db=str(tmp_path / "line.db")), create=True)
    try:
        await d.start()
        assert d.line is not None
        await asyncio.sleep(1.3)
        msgs = received(sock)
        assert any(m.startswith("READY=1") for m in msgs) and msgs.count("WATCHDOG=1") >= 2, msgs
        assert d.store.writer_alive()

        # the writer thread ends (as if it had died): the store refuses writes instead of queueing them for ever
        d.store._writer.submit(Op(_stop, (), None, None, None))
        await wait_for(lambda: not d.store.writer_alive(), 5, "the writer thread to end")
        await wait_for(lambda: d.line.fault == "store_error", 5, "the line to stop for the store")
        assert d.line.store_down is not None and "writer is not running" in d.line.store_down
        received(sock)
        await asyncio.sleep(1.3)
        assert "WATCHDOG=1" not in received(sock), "the watchdog must starve while nothing can be recorded"
        with pytest.raises(C.CommandRejected) as ei:  # and nothing is accepted that would need a record
            await d.line.execute(C.CreateBatch(actor="t", lot="L9", gtin=GTIN, expiry="281231", planned_qty=10), "test")
        assert ei.value.code == "store_unavailable"
    finally:
        await d.shutdown("test")
        sock.close()


async def test_command_retried_after_a_restart_gets_its_first_reply(tmp_path: Path) -> None:
    cfg = config()
    store = await open_store(tmp_path / "line.db", cfg)
    try:
        cmd: dict[str, Any] = {"name": "create_batch", "actor": "mes", "lot": "L1", "gtin": GTIN, "expiry": "281231",
                               "planned_qty": 10, "command_id": "mes-0001"}
        first = await Line(cfg, store, {}).execute(dict(cmd), "mqtt:mes")
        restarted = Line(cfg, store, {})  # a new daemon: nothing in memory
        again = await restarted.execute(dict(cmd), "mqtt:mes")
        assert again == first == {"lot": "L1", "state": "created"}
        assert [b.lot for b in store.batches()] == ["L1"] and restarted.batch is None  # not executed twice
        with pytest.raises(C.CommandRejected) as ei:
            await restarted.execute({"name": "start_batch", "actor": "mes", "command_id": "mes-0001"}, "mqtt:mes")
        assert ei.value.code == "command_id_reused"
    finally:
        await store.close()
