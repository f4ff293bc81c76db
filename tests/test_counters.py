"""ImmCounter on its own: credit accounting, FIFO fairness, cancellation, close.

No timing: tasks are advanced with ``asyncio.sleep(0)`` (one loop iteration
each), and every test body is bounded by ``asyncio.timeout(5)``.
"""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from aiofabric import ClosedResourceError, CounterStatistics, ImmCounter


async def settle(rounds: int = 5) -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def counter(**kw: Any) -> ImmCounter:
    return ImmCounter(7, asyncio.get_running_loop(), **kw)


def waiter(c: ImmCounter, n: int, done: list[Any] | None = None, label: Any = None) -> asyncio.Task[None]:
    async def go() -> None:
        await c.wait(n)
        if done is not None:
            done.append(label if label is not None else n)
    return asyncio.create_task(go())


@pytest.mark.asyncio
async def test_arrivals_before_the_wait_count() -> None:
    async with asyncio.timeout(5):
        c = counter()
        c._add(3)
        await c.wait(3)
        assert (c.available, c.total) == (0, 3)


@pytest.mark.asyncio
async def test_wait_consumes_exactly_n() -> None:
    async with asyncio.timeout(5):
        c = counter()
        c._add(5)
        await c.wait(2)
        assert c.available == 3
        await c.wait(3)
        assert c.available == 0
        t = waiter(c, 1)
        await settle()
        assert not t.done()
        c._add(2)
        await t
        assert (c.available, c.total) == (1, 7)


@pytest.mark.asyncio
async def test_fifo_big_waiter_first_is_served_before_later_small_one() -> None:
    async with asyncio.timeout(5):
        c = counter()
        done: list[str] = []
        big = waiter(c, 5, done, "big")
        await settle()
        small = waiter(c, 1, done, "small")
        await settle()
        c._add(1)  # enough for the small one, but the big one came first
        await settle()
        assert done == [] and c.available == 1
        assert c.try_consume(1) is False  # nor may anyone jump the queue
        c._add(4)
        await settle()
        assert done == ["big"] and c.available == 0
        c._add(1)
        await asyncio.gather(big, small)
        assert done == ["big", "small"] and c.available == 0


@pytest.mark.asyncio
async def test_concurrent_waiters_served_in_arrival_order() -> None:
    async with asyncio.timeout(5):
        c = counter()
        done: list[int] = []
        tasks = [waiter(c, 1, done, i) for i in range(10)]
        await settle()
        assert c.statistics().waiters == 10
        c._add(4)
        await settle()
        assert done == [0, 1, 2, 3]
        assert [t.done() for t in tasks] == [True] * 4 + [False] * 6
        c._add(6)
        await asyncio.gather(*tasks)
        assert done == list(range(10))
        assert c.statistics() == CounterStatistics(imm=7, total=10, available=0, waiters=0)


@pytest.mark.asyncio
async def test_one_arrival_batch_serves_several_waiters() -> None:
    async with asyncio.timeout(5):
        c = counter()
        tasks = [waiter(c, n) for n in (2, 3, 4)]
        await settle()
        c._add(8)  # 2 + 3, the 4 must wait for one more
        await settle()
        assert [t.done() for t in tasks] == [True, True, False] and c.available == 3
        c._add(1)
        await asyncio.gather(*tasks)
        assert c.available == 0


@pytest.mark.asyncio
async def test_wait_zero_returns_at_once() -> None:
    async with asyncio.timeout(5):
        c = counter()
        coro = c.wait(0)
        with pytest.raises(StopIteration):  # finished without suspending
            coro.send(None)
        big = waiter(c, 5)
        await settle()
        coro = c.wait(0)  # consuming nothing cannot starve the waiter ahead
        with pytest.raises(StopIteration):
            coro.send(None)
        assert c.try_consume(0) is True
        assert not big.done() and c.available == 0
        big.cancel()
        await asyncio.gather(big, return_exceptions=True)


@pytest.mark.asyncio
@pytest.mark.parametrize("n,exc", [(-1, ValueError), (-(2**70), ValueError), (1.0, TypeError), ("1", TypeError),
                                   (True, TypeError), (None, TypeError)])
async def test_bad_n(n: Any, exc: type[Exception]) -> None:
    async with asyncio.timeout(5):
        c = counter()
        c._add(3)
        with pytest.raises(exc):
            await c.wait(n)
        with pytest.raises(exc):
            c.try_consume(n)
        assert c.statistics() == CounterStatistics(7, 3, 3, 0)


@pytest.mark.asyncio
async def test_cancelled_waiter_consumes_nothing_and_unblocks_later_ones() -> None:
    async with asyncio.timeout(5):
        c = counter()
        done: list[str] = []
        big = waiter(c, 10, done, "big")
        await settle()
        small = waiter(c, 1, done, "small")
        await settle()
        c._add(3)
        await settle()
        assert done == []  # the big one blocks the queue
        big.cancel()
        await settle()
        assert big.cancelled()
        await small
        assert done == ["small"]
        assert c.statistics() == CounterStatistics(7, 3, 2, 0)


@pytest.mark.asyncio
async def test_cancelled_waiter_leaves_partial_credit() -> None:
    async with asyncio.timeout(5):
        c = counter()
        t = waiter(c, 2)
        await settle()
        c._add(1)
        t.cancel()
        await settle()
        assert t.cancelled()
        assert (c.available, c.statistics().waiters) == (1, 0)
        assert c.try_consume(1) is True


@pytest.mark.asyncio
async def test_granted_then_cancelled_in_the_same_iteration_returns_the_credit() -> None:
    async with asyncio.timeout(5):
        c = counter()
        first = waiter(c, 2)
        await settle()
        second = waiter(c, 2)
        await settle()
        c._add(2)
        assert c.available == 0  # granted to the first waiter; it has not run yet
        first.cancel()           # ... and now it is cancelled before it runs
        await settle()
        assert first.cancelled()
        await second             # the returned credit went to the next in line
        assert (c.available, c.total) == (0, 2)


@pytest.mark.asyncio
async def test_granted_then_cancelled_without_other_waiters() -> None:
    async with asyncio.timeout(5):
        c = counter()
        t = waiter(c, 3)
        await settle()
        c._add(3)
        assert c.available == 0
        t.cancel()
        await settle()
        assert t.cancelled()
        assert c.statistics() == CounterStatistics(7, 3, 3, 0)


@pytest.mark.asyncio
async def test_close_fails_waiters_and_later_waits() -> None:
    async with asyncio.timeout(5):
        c = counter()
        c._add(1)
        tasks = [waiter(c, 2), waiter(c, 5)]
        await settle()
        err = ClosedResourceError("engine is closed")
        c._close(err)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(r is err for r in results)
        with pytest.raises(ClosedResourceError):
            await c.wait(1)
        with pytest.raises(ClosedResourceError):
            await c.wait(0)
        with pytest.raises(ClosedResourceError):
            c.try_consume(1)
        assert c.statistics() == CounterStatistics(7, 1, 1, 0)


@pytest.mark.asyncio
async def test_closed_then_cancelled_in_the_same_iteration_returns_no_credit() -> None:
    async with asyncio.timeout(5):
        c = counter()
        t = waiter(c, 4)
        await settle()
        c._close(ClosedResourceError("engine is closed"))
        t.cancel()  # the waiter was failed, not granted: nothing to give back
        await asyncio.gather(t, return_exceptions=True)
        assert c.statistics() == CounterStatistics(7, 0, 0, 0)


@pytest.mark.asyncio
async def test_try_consume() -> None:
    async with asyncio.timeout(5):
        c = counter()
        assert c.try_consume(1) is False
        c._add(3)
        assert c.try_consume(2) is True
        assert c.try_consume(2) is False
        assert c.available == 1
        assert c.try_consume(1) is True
        assert (c.available, c.total) == (0, 3)


@pytest.mark.asyncio
async def test_statistics_and_expect_callback() -> None:
    async with asyncio.timeout(5):
        calls: list[int] = []
        c = counter(expect=calls.append)
        assert c.statistics() == CounterStatistics(imm=7, total=0, available=0, waiters=0)
        c._add(2)
        await c.wait(1)
        assert calls == []  # satisfied without blocking
        a, b = waiter(c, 3), waiter(c, 1)
        await settle()
        assert calls == [1, 1]
        assert c.statistics() == CounterStatistics(7, 2, 1, 2)
        c._add(2)
        await a
        b.cancel()
        await asyncio.gather(b, return_exceptions=True)
        assert sorted(calls) == [-1, -1, 1, 1]
        assert c.statistics() == CounterStatistics(7, 4, 0, 0)
        assert "imm=7" in repr(c)
