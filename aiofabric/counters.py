"""ImmCounter: a credit counter of immediate values that arrived.

Arrivals before a wait count.  ``await counter.wait(n)`` returns once n
arrivals that no earlier wait consumed exist, and consumes them.  Waiters are
served first come, first served, so a large wait is not starved by small ones.
"""
from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .errors import ClosedResourceError

if TYPE_CHECKING:
    from .memory import Address

__all__ = ["ImmCounter", "CounterStatistics"]


@dataclass(frozen=True)
class CounterStatistics:
    imm: int
    total: int       #: arrivals ever counted
    available: int   #: arrivals not yet consumed by a wait
    waiters: int     #: tasks blocked in wait()


class ImmCounter:
    """Counts arrivals of one immediate value at this engine.  Get it with
    :meth:`TransferEngine.imm_counter`; one object per value."""

    __slots__ = ("imm", "_loop", "_expect", "_watch", "_available", "_total", "_waiters", "_closed")

    def __init__(self, imm: int, loop: asyncio.AbstractEventLoop,
                 expect: Callable[[int], None] = lambda delta: None,
                 watch: Callable[[Any, asyncio.Future[Any]], Callable[[], None]] | None = None) -> None:
        self.imm = imm
        self._loop = loop
        self._expect = expect  # tells the worker someone awaits arrivals
        self._watch = watch    # fails a wait when the peer it names fails
        self._available = 0
        self._total = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._closed: BaseException | None = None

    @property
    def available(self) -> int:
        """Arrivals counted and not yet consumed."""
        return self._available

    @property
    def total(self) -> int:
        """Arrivals counted since the engine opened."""
        return self._total

    def statistics(self) -> CounterStatistics:
        return CounterStatistics(self.imm, self._total, self._available, len(self._waiters))

    def try_consume(self, n: int) -> bool:
        """Consume n arrivals now if they are there and nobody waits before us."""
        _check_n(n)
        if self._closed is not None:
            raise self._closed
        if n == 0 or (not self._waiters and self._available >= n):  # 0 takes nothing from anyone
            self._available -= n
            return True
        return False

    async def wait(self, n: int = 1, *, peer: Address | None = None) -> None:
        """Wait for n unconsumed arrivals and consume them.

        ``peer`` names the engine expected to deliver them: if it fails (see
        ``EngineConfig.peer_timeout``) the wait raises BrokenResourceError
        instead of waiting forever.  Raises ClosedResourceError if the engine
        closes first.  Cancelling the waiting task (or a failure) consumes
        nothing: credit it was about to take is returned.
        """
        if self.try_consume(n):
            return
        if peer is not None and self._watch is None:
            raise ValueError("this counter cannot watch peers")
        fut: asyncio.Future[None] = self._loop.create_future()
        unwatch = self._watch(peer, fut) if peer is not None else None
        entry = (n, fut)
        self._waiters.append(entry)
        self._expect(1)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._available += n  # granted, then cancelled: give it back
            else:
                try:
                    self._waiters.remove(entry)
                except ValueError:
                    pass
            self._serve()
            raise
        finally:
            self._expect(-1)
            if unwatch is not None:
                unwatch()

    def _add(self, k: int) -> None:
        self._total += k
        self._available += k
        if self._waiters:
            self._serve()

    def _serve(self) -> None:
        w = self._waiters
        while w and self._available >= w[0][0]:
            n, fut = w.popleft()
            if fut.done():
                continue
            self._available -= n
            fut.set_result(None)

    def _close(self, exc: BaseException) -> None:
        self._closed = exc
        while self._waiters:
            _, fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def __repr__(self) -> str:
        return f"<ImmCounter imm={self.imm} available={self._available} total={self._total}>"


def _check_n(n: int) -> None:
    if type(n) is not int:
        raise TypeError(f"n must be an int, not {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")


def closed_error() -> ClosedResourceError:
    return ClosedResourceError("engine is closed")
