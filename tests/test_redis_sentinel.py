"""The bounded Sentinel lookup against stand-in sentinels: every answer a sentinel can give has a row."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from mailwarden.redis_sentinel import SentinelLookup, SentinelLookupError
from mailwarden.redis_settings import RedisSettings

OLD, NEW = ("127.0.0.1", 7001), ("127.0.0.1", 7002)
NOT_ANSWERING = b""


def master_reply(address: tuple[str, int]) -> bytes:
    host, port = address[0].encode(), str(address[1]).encode()
    return b"*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(host), host, len(port), port)


async def with_sentinels(replies: list[tuple[bytes, float]], body: Callable[[SentinelLookup], Awaitable[object]],
                         timeout: str = "500ms", service: str = "mymaster") -> object:
    """Serve each (reply, delay) as a sentinel on a loopback port (an empty reply: accept, never answer)."""
    servers = []
    for reply, delay in replies:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         reply: bytes = reply, delay: float = delay) -> None:
            await reader.read(65536)
            if reply:
                await asyncio.sleep(delay)
                writer.write(reply)
                await writer.drain()
            await reader.read()  # hold the connection until the client closes it
            writer.close()

        servers.append(await asyncio.start_server(handle, "127.0.0.1", 0))
    addresses = [f"127.0.0.1:{server.sockets[0].getsockname()[1]}" for server in servers]
    settings = RedisSettings(sentinels=addresses, sentinel_service=service, sentinel_timeout=timeout)
    try:
        return await body(SentinelLookup(settings))
    finally:
        for server in servers:
            server.close()


def test_the_first_sentinel_to_name_a_master_wins_past_a_hung_one():
    async def body(lookup: SentinelLookup) -> object:
        started = time.monotonic()
        found = await lookup.master()
        return found, time.monotonic() - started

    found, took = asyncio.run(with_sentinels([(NOT_ANSWERING, 0), (master_reply(NEW), 0)], body, timeout="5s"))
    assert found == NEW
    assert took < 2.5  # not the 5 s bound: the hung sentinel is not waited for


def test_a_master_that_just_failed_is_taken_only_when_no_sentinel_names_another():
    async def body(lookup: SentinelLookup) -> object:
        return await lookup.master(), await lookup.master(avoid=OLD)

    # the first sentinel has not heard of the failover yet and answers first
    replies = [(master_reply(OLD), 0), (master_reply(NEW), 0.1)]
    assert asyncio.run(with_sentinels(replies, body)) == (OLD, NEW)

    async def only_old(lookup: SentinelLookup) -> object:
        return await lookup.master(avoid=OLD)

    assert asyncio.run(with_sentinels([(master_reply(OLD), 0), (NOT_ANSWERING, 0)], only_old)) == OLD


def test_no_master_named_is_an_error_naming_every_sentinel_and_why(caplog):
    replies = [(b"-ERR unknown command\r\n", 0), (b"*-1\r\n", 0), (NOT_ANSWERING, 0), (b"+OK\r\n", 0)]

    async def body(lookup: SentinelLookup) -> object:
        started = time.monotonic()
        with pytest.raises(SentinelLookupError) as raised:
            await lookup.master()
        return str(raised.value), [f"{h}:{p}" for h, p in lookup.addresses], time.monotonic() - started

    message, names, took = asyncio.run(with_sentinels(replies, body, timeout="500ms"))
    assert took < 0.5 * 4  # bounded by sentinel_timeout, whatever each sentinel does
    assert f"{names[0]}: error reply: ERR unknown command" in message
    assert f"{names[1]}: does not know the service 'mymaster'" in message
    assert f"{names[2]}: no answer within 0.5s" in message
    assert f"{names[3]}: unexpected answer" in message
    warned = [r for r in caplog.records if r.getMessage().startswith("sentinel failed")]
    assert sorted(r.kv["sentinel"] for r in warned) == sorted(names)  # type: ignore[attr-defined]
