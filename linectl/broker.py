"""An MQTT broker for `linectl demo` on a machine that has none.

Uses amqtt (pure Python, MQTT 3.1.1) in its own process so the demo needs
nothing but pip. On a real line use the site's broker (Mosquitto, EMQX,
HiveMQ...): this one is for desks and demos only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def serve(port: int) -> None:
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {port}", flush=True)
    await stop.wait()
    await broker.shutdown()


def wait_listening(port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def start_embedded(port: int | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """Start the embedded broker in a child process; returns (process, port) once it accepts connections."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "linectl.broker", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait_listening(port):
        proc.kill()
        raise RuntimeError(f"embedded MQTT broker did not start on port {port}")
    return proc, port


def main() -> None:
    ap = argparse.ArgumentParser(description="embedded MQTT 3.1.1 broker (amqtt) for demos")
    ap.add_argument("--port", type=int, default=1883)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
