"""The in-line coroutine driver (mailwarden/inline.py): what policyd's requests run in instead of a Task."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mailwarden import inline
from mailwarden.inline import InlineTask, ReplyWait, bounded


class Done:
    """The done callback: records each call, and wakes ``finished`` (a positive signal, no polling)."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, BaseException | None]] = []
        self._event = asyncio.Event()

    def __call__(self, result: object, exc: BaseException | None) -> None:
        self.calls.append((result, exc))
        self._event.set()

    async def finished(self) -> list[tuple[object, BaseException | None]]:
        await asyncio.wait_for(self._event.wait(), 5)
        return self.calls


class Asked:
    """Makes a ReplyWait for the in-line coroutine running now, as the Redis pipe's ``ask`` does, and keeps it."""

    def __init__(self) -> None:
        self.waits: list[ReplyWait] = []

    def __call__(self) -> ReplyWait:
        task = inline.running()
        assert task is not None
        self.waits.append(ReplyWait(task))
        return self.waits[-1]


def start(coro: Any) -> Done:
    """Start ``coro`` in line, from the running test; its Done records the outcome."""
    done = Done()
    InlineTask(coro, done, asyncio.get_running_loop()).start()
    return done


def run(coro_function: Any) -> Any:
    return asyncio.run(coro_function())


def test_a_coroutine_that_needs_nothing_is_done_before_start_returns() -> None:
    async def main() -> None:
        async def decide() -> str:
            return "answer"

        done = start(decide())
        assert done.calls == [("answer", None)]

    run(main)


def test_a_reply_resumes_the_coroutine_in_line_with_its_value() -> None:
    async def main() -> None:
        asked = Asked()

        async def decide() -> str:
            waiter = asked()
            value = await waiter
            return f"got {value}"

        done = start(decide())
        assert done.calls == []
        assert inline.running() is None  # only while a step executes
        asked.waits[0].resume(b"OK")
        assert done.calls == [("got b'OK'", None)]  # in line: no loop iteration between

    run(main)


def test_a_failed_reply_raises_inside_the_coroutine_where_it_can_be_caught() -> None:
    async def main() -> None:
        asked = Asked()

        async def decide() -> str:
            waiter = asked()
            try:
                await waiter
            except ConnectionError as exc:
                return f"fail mode: {exc}"
            return "no error"

        done = start(decide())
        asked.waits[0].fail(ConnectionError("redis down"))
        assert done.calls == [("fail mode: redis down", None)]

    run(main)


def test_an_asyncio_future_resumes_it_like_a_task_would() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        first, second = loop.create_future(), loop.create_future()

        async def decide() -> str:
            value = await first
            try:
                await second
            except LookupError as exc:
                return f"{value} then {exc!r}"
            return "unreachable"

        done = Done()
        InlineTask(decide(), done, loop).start()
        first.set_result("dns answer")
        await asyncio.sleep(0)
        assert done.calls == []
        second.set_exception(LookupError("nxdomain"))
        await asyncio.sleep(0)
        assert done.calls == [("dns answer then LookupError('nxdomain')", None)]

    run(main)


def test_asyncio_sleep_and_a_bare_yield_work() -> None:
    async def main() -> None:
        async def decide() -> str:
            await asyncio.sleep(0)
            await asyncio.sleep(0.01)
            return "slept"

        done = start(decide())
        assert await done.finished() == [("slept", None)]

    run(main)


def test_an_exception_is_the_result_not_raised_at_the_resumer() -> None:
    async def main() -> None:
        asked = Asked()

        async def decide() -> str:
            waiter = asked()
            await waiter
            raise ValueError("a bug in a check")

        done = start(decide())
        asked.waits[0].resume(None)  # does not raise here: the Redis pipe goes on with its other replies
        assert len(done.calls) == 1
        result, exc = done.calls[0]
        assert result is None and isinstance(exc, ValueError) and str(exc) == "a bug in a check"

    run(main)


def test_a_failing_done_callback_goes_to_the_loop_exception_handler() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: reported.append(context))

        async def decide() -> str:
            return "answer"

        def broken(_result: object, _exc: BaseException | None) -> None:
            raise RuntimeError("the answer could not be written")

        InlineTask(decide(), broken, loop).start()  # does not raise
        assert len(reported) == 1
        assert isinstance(reported[0]["exception"], RuntimeError)

    run(main)


def test_a_reply_nobody_awaits_any_more_is_dropped() -> None:
    """The coroutine asked, then failed before awaiting the reply: the reply, when it comes, resumes nothing."""
    async def main() -> None:
        asked = Asked()

        async def decide() -> str:
            asked()  # the pipe has sent the command; its reply comes after the failure
            raise ValueError("failed before awaiting")

        done = start(decide())
        asked.waits[0].resume(b"late")
        asked.waits[0].fail(ConnectionError("late"))
        assert len(done.calls) == 1

    run(main)


def test_a_reply_awaited_by_a_task_instead_is_an_error_not_a_hang() -> None:
    """A ReplyWait belongs to the in-line coroutine that asked: handed to asyncio.gather (a Task), it fails."""
    async def main() -> None:
        async def decide() -> str:
            task = inline.running()
            assert task is not None
            try:
                await asyncio.wait_for(asyncio.gather(ReplyWait(task)), 1.0)
            except RuntimeError as exc:
                return f"refused: {type(exc).__name__}"
            return "unreachable"

        done = start(decide())
        assert await done.finished() == [("refused: RuntimeError", None)]

    run(main)


def test_bounded_times_out_without_a_current_task_and_returns_a_result_in_time() -> None:
    async def main() -> None:
        async def slow() -> str:
            await asyncio.sleep(10)
            return "too late"

        async def quick() -> str:
            await asyncio.sleep(0)
            return "in time"

        async def decide() -> tuple[str, str]:
            assert asyncio.current_task() is None  # asyncio.timeout would refuse to work here
            try:
                await bounded(slow(), 0.05)
            except TimeoutError as exc:
                first = f"timed out: {exc}"
            else:
                first = "no time-out"
            return first, await bounded(quick(), 5)

        done = Done()
        loop = asyncio.get_running_loop()
        loop.call_soon(InlineTask(decide(), done, loop).start)  # from a callback, as policyd starts requests
        assert await done.finished() == [(("timed out: no result within 0.05s", "in time"), None)]

    run(main)


def test_bounded_passes_on_the_work_s_own_error() -> None:
    async def main() -> None:
        async def broken() -> str:
            raise OSError("connection refused")

        with pytest.raises(OSError, match="connection refused"):
            await bounded(broken(), 5)

    run(main)
