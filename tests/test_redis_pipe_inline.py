"""The Redis pipe with in-line coroutines (mailwarden/inline.py), against a real redis-server: a reply resumes
the coroutine that asked, in order; errors and a lost connection reach it as exceptions, never the pipe."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from mailwarden.inline import InlineTask
from mailwarden.redis_pipe import PipelinedRedis, RedisCommandError, RedisUnavailable
from mailwarden.redis_settings import RedisSettings


def with_pipe(url: str, scenario: Callable[[PipelinedRedis], Awaitable[None]]) -> None:
    """Run ``scenario`` with a connected pipe, closed after."""
    async def main() -> None:
        pipe = PipelinedRedis(RedisSettings(url=url, timeout="2s"))
        pipe.start()
        assert await pipe.wait_connected(5)
        try:
            await scenario(pipe)
        finally:
            await pipe.close()

    asyncio.run(main())


async def run_inline(work: Callable[[], Awaitable[Any]], timeout: float = 5.0) -> tuple[Any, BaseException | None]:
    """Run ``work`` in an InlineTask started from a loop callback (as policyd starts a request)."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[tuple[Any, BaseException | None]] = loop.create_future()

    def done(result: Any, exc: BaseException | None) -> None:
        finished.set_result((result, exc))

    async def body() -> Any:
        return await work()

    loop.call_soon(InlineTask(body(), done, loop).start)
    return await asyncio.wait_for(finished, timeout)


def test_ask_in_line_gives_a_reply_wait_and_elsewhere_a_future(redis_server) -> None:
    async def scenario(pipe: PipelinedRedis) -> None:
        outside = pipe.ask("PING")
        assert isinstance(outside, asyncio.Future)
        assert await outside == b"PONG"

        async def inside() -> tuple[str, object]:
            waiter = pipe.ask("PING")
            return type(waiter).__name__, await waiter

        assert await run_inline(inside) == (("ReplyWait", b"PONG"), None)

    with_pipe(redis_server.url, scenario)


def test_many_in_line_coroutines_each_get_their_own_reply(redis_server) -> None:
    async def scenario(pipe: PipelinedRedis) -> None:
        async def one(number: int) -> object:
            await pipe.ask("SET", f"t:inline:{number}", f"value {number}")
            await pipe.ask("INCRBY", "t:inline:count", number)
            return await pipe.ask("GET", f"t:inline:{number}")

        results = await asyncio.gather(*(run_inline(lambda n=n: one(n)) for n in range(50)))
        assert results == [(f"value {n}".encode(), None) for n in range(50)]
        assert await pipe.call("GET", "t:inline:count") == str(sum(range(50))).encode()

    with_pipe(redis_server.url, scenario)


def test_an_error_reply_raises_in_the_coroutine_and_the_pipe_goes_on(redis_server) -> None:
    async def scenario(pipe: PipelinedRedis) -> None:
        await pipe.call("SET", "t:inline:text", "not a number")

        async def broken() -> object:
            return await pipe.ask("INCR", "t:inline:text")

        result, exc = await run_inline(broken)
        assert result is None
        assert isinstance(exc, RedisCommandError) and "not an integer" in str(exc)
        assert await run_inline(lambda: pipe.ask("PING")) == (b"PONG", None)

    with_pipe(redis_server.url, scenario)


def test_a_lost_connection_fails_the_waiting_coroutine_with_redis_unavailable(own_redis) -> None:
    async def scenario(pipe: PipelinedRedis) -> None:
        async def blocked() -> object:
            return await pipe.ask("BLPOP", "t:inline:never", 0)  # waits until the connection goes

        loop = asyncio.get_running_loop()
        pending = asyncio.ensure_future(run_inline(blocked, timeout=10))
        while not pipe._pending:
            await asyncio.sleep(0.01)
        await loop.run_in_executor(None, own_redis.stop)
        result, exc = await pending
        assert result is None
        assert isinstance(exc, RedisUnavailable)

    with_pipe(own_redis.url, scenario)


def test_post_sends_and_a_failure_is_only_logged_at_debug(redis_server, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(pipe: PipelinedRedis) -> None:
        pipe.post("SET", "t:inline:cached", "yes", "EX", 60)
        pipe.post("INCR", "t:inline:cached")  # an error reply nobody waits for
        assert await pipe.call("GET", "t:inline:cached") == b"yes"

    with caplog.at_level(logging.DEBUG, logger="mailwarden.redis"):
        with_pipe(redis_server.url, scenario)
    failures = [record for record in caplog.records if "nobody waited for failed" in record.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.DEBUG

