"""Supervised tasks: a failing task is restarted with a rate limit, never silently lost.

A line controller that quietly loses its reader task keeps "running" while
nothing is verified. Every crash is logged with its traceback; a task that
keeps crashing past the limit escalates to `on_give_up` (the line stops with
an alarm) instead of looping forever.

`on_crash` runs after every crash and before the restart: the line uses it
to put the PLC's infeed to idle at once, because a crashed feeder or reader
task with the infeed open lets packs through that nobody prints or verifies.
Crashes `uncounted` says yes to (the store refusing writes: a full disk)
do not count toward the limit: the cause is outside the task, and the task
must be there when the cause goes away.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("linectl.supervisor")


class Supervisor:
    def __init__(
        self,
        *,
        max_restarts: int = 5,
        window_s: float = 60.0,
        restart_delay_s: float = 0.5,
        on_give_up: Callable[[str, BaseException], Awaitable[None]] | None = None,
        on_crash: Callable[[str, BaseException], Awaitable[None]] | None = None,
        uncounted: Callable[[BaseException], bool] | None = None,
    ) -> None:
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.restart_delay_s = restart_delay_s
        self.on_give_up = on_give_up
        self.on_crash = on_crash
        self.uncounted = uncounted
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self.restarts: dict[str, int] = {}

    def start(self, name: str, factory: Callable[[], Awaitable[None]], *, restart: bool = True) -> None:
        if name in self._tasks and not self._tasks[name].done():
            raise RuntimeError(f"task {name} already running")
        self._tasks[name] = asyncio.create_task(self._run(name, factory, restart), name=name)

    async def _run(self, name: str, factory: Callable[[], Awaitable[None]], restart: bool) -> None:
        history: deque[float] = deque()
        while not self._stopping:
            try:
                await factory()
                if not restart or self._stopping:
                    return
                log.warning("task_exited", task=name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the point is to catch everything
                if self.on_crash is not None:
                    # first, before the traceback is rendered (that alone can take a second on a loaded PC)
                    try:
                        await self.on_crash(name, exc)
                    except Exception:  # noqa: BLE001 - the restart must still happen
                        log.exception("on_crash_failed", task=name)
                now = time.monotonic()
                if self.uncounted is not None and self.uncounted(exc):
                    log.error("task_crashed", task=name, error=str(exc))  # the cause is outside the task: no traceback
                    self.restarts[name] = self.restarts.get(name, 0) + 1
                    await asyncio.sleep(max(self.restart_delay_s, 1.0))
                    continue
                log.exception("task_crashed", task=name, error=str(exc))
                history.append(now)
                while history and now - history[0] > self.window_s:
                    history.popleft()
                self.restarts[name] = self.restarts.get(name, 0) + 1
                if not restart or len(history) > self.max_restarts:
                    log.error("task_given_up", task=name, restarts=len(history), window_s=self.window_s)
                    if self.on_give_up is not None:
                        await self.on_give_up(name, exc)
                    return
            await asyncio.sleep(self.restart_delay_s)

    def stopping(self) -> None:
        """From now on a task that returns is done, not restarted (shutdown in progress)."""
        self._stopping = True

    def running(self) -> list[str]:
        return [n for n, t in self._tasks.items() if not t.done()]

    async def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        tasks = [t for t in self._tasks.values() if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
