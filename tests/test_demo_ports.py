"""A port picked as free for a simulated device can be bound by another process before the simulator binds it (tests
run in parallel): the demo picks its ports again instead of failing."""

from __future__ import annotations

import socket

from linectl import demo
from linectl.broker import free_port


async def test_a_taken_port_is_picked_again(tmp_path, monkeypatch):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    calls = {"n": 0}

    def first_taken() -> int:
        calls["n"] += 1
        return port if calls["n"] == 1 else free_port()  # the first device's port: already in use

    monkeypatch.setattr(demo, "free_port", first_taken)
    released = []
    real_release = demo.SimulatedLine._release_processes

    def release(self: demo.SimulatedLine) -> None:
        released.append(1)
        real_release(self)

    monkeypatch.setattr(demo.SimulatedLine, "_release_processes", release)
    sl = demo.SimulatedLine(db=tmp_path / "line.db")
    try:
        await sl.start()
        assert sl.sim is not None and sl.sim.poll() is None
        assert port not in {d.port for d in sl.cfg.devices.values() if hasattr(d, "port")}
        assert released == [1]  # the first start lost its port and was released, the second got fresh ones
    finally:
        await sl.stop()
        taken.close()

