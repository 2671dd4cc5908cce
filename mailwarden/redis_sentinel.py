"""Finding the Redis master through Sentinel, within a bounded time whatever state each Sentinel is in.

redis-py's ``Sentinel`` asks the sentinels one after another and retries each with back-off: a dead
Sentinel listed first cost seconds, a hung one (a powered-off host, a paused process) most of a minute,
and that is the common case, because with one Sentinel per Redis host losing the master's host loses a
Sentinel too. Here every sentinel is asked at once (``SENTINEL get-master-addr-by-name`` on a fresh
connection each), the first valid answer wins and the whole lookup ends within ``sentinel_timeout``. A
sentinel that fails is logged by name, at most once per interval with a count. The caller verifies what
it reaches with ROLE, since a sentinel that has not yet heard of a failover still names the old master.
"""

from __future__ import annotations

import asyncio
import logging

import hiredis

from mailwarden.logs import Throttled, get_logger
from mailwarden.redis_settings import RedisSettings
from mailwarden.resp import pack

log = get_logger("redis")

Address = tuple[str, int]


class SentinelLookupError(Exception):
    """No sentinel named a master within ``sentinel_timeout``; the message names each one and why."""


class SentinelLookup:
    """One per client, for its whole life: the sentinels, the service and the rate-limited failure log."""

    def __init__(self, settings: RedisSettings) -> None:
        self.addresses = settings.sentinel_addresses()
        self.service = settings.sentinel_service
        self.password = settings.sentinel_password
        self.timeout = settings.sentinel_timeout
        self._failed = Throttled(log, logging.WARNING, "sentinel failed to name the master; asking the others")

    async def master(self, avoid: Address | None = None) -> Address:
        """The master's address as the first sentinel to answer names it. ``avoid`` (an address that just
        failed) is taken only when no sentinel names another one within the time: after a failover the
        sentinels that have not heard of it yet keep naming the old master for a moment."""
        loop = asyncio.get_running_loop()
        tasks = {loop.create_task(self._ask(host, port)): f"{_label(host)}:{port}" for host, port in self.addresses}
        errors: dict[str, str] = {}
        fallback: Address | None = None
        deadline = loop.time() + self.timeout
        pending = set(tasks)
        try:
            while pending and (left := deadline - loop.time()) > 0:
                done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    name = tasks[task]
                    exc = task.exception()
                    if exc is not None:
                        errors[name] = str(exc) or type(exc).__name__
                        self._failed.hit(name, sentinel=name, error=errors[name])
                    elif (found := task.result()) == avoid:
                        fallback = found
                    else:
                        return found
            for task in pending:
                errors[tasks[task]] = f"no answer within {self.timeout:g}s"
                self._failed.hit(tasks[task], sentinel=tasks[task], error=errors[tasks[task]])
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
                elif not task.cancelled():
                    task.exception()  # retrieved: asyncio would warn about the ones a winner left unread
        if fallback is not None:
            return fallback
        raise SentinelLookupError(f"no sentinel named the master of {self.service!r}: "
                                  + "; ".join(f"{name}: {why}" for name, why in errors.items()))

    async def _ask(self, host: str, port: int) -> Address:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            commands: list[tuple[str, ...]] = [("AUTH", self.password)] if self.password else []
            commands.append(("SENTINEL", "get-master-addr-by-name", self.service))
            writer.write(b"".join(pack(command) for command in commands))
            parser, replies = hiredis.Reader(), list[object]()
            while len(replies) < len(commands):
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("closed the connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    replies.append(reply)
        finally:
            writer.close()
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise ConnectionError(f"error reply: {reply}")
        answer = replies[-1]
        if answer is None:
            raise LookupError(f"does not know the service {self.service!r}")
        if not isinstance(answer, list) or len(answer) != 2:
            raise ValueError(f"unexpected answer {answer!r}")
        return answer[0].decode(), int(answer[1])


def _label(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def find_master(settings: RedisSettings, avoid: Address | None = None) -> Address:
    """The same bounded lookup for synchronous callers (the CLI): at most ``sentinel_timeout``."""
    async def lookup() -> Address:
        return await SentinelLookup(settings).master(avoid)

    return asyncio.run(lookup())
