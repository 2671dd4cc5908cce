"""A coroutine driven in line: started by its caller at once, resumed by whoever has what it waits for.

policyd decides every request in a coroutine (the checks await Redis). As an asyncio Task, each request costs
three trips through the event loop: the Task's first step is scheduled, the Redis reply wakes it through its
Future's done callbacks (scheduled again), and the Task's own done callback is scheduled a third time; each
trip is a Handle made and run, and the Task registers itself in a WeakSet. With the Redis pipe resolving
the reply in line (``ReplyWait``), a request that needs one round trip runs in two steps: from the client's
data callback to the Redis call, then from the Redis data callback to the answer.

Anything else the coroutine awaits (an asyncio Future: a DNS lookup, a thread, ``asyncio.sleep``) resumes it
from that Future's done callback, as a Task would. ``asyncio.current_task()`` is None inside: what needs a
Task (``asyncio.timeout``, ``wait_for`` from Python 3.12) runs in one of its own (``mailwarden.inline.bounded``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")

_running: InlineTask | None = None
"""The InlineTask whose step is executing (None between steps, and inside a Task)."""


def running() -> InlineTask | None:
    """The InlineTask executing now: a Redis call made now is awaited by it (``PipelinedRedis.ask``)."""
    return _running


class ReplyWait:
    """What an in-line coroutine awaits for a reply that its resolver hands over in line: ``resume`` with the
    value, ``fail`` with an exception (the resolver calls one of them once)."""

    __slots__ = ("task",)

    def __init__(self, task: InlineTask) -> None:
        self.task = task

    def __await__(self) -> Generator[ReplyWait, Any, Any]:
        return (yield self)

    def resume(self, value: object) -> None:
        if self.task.waiting is self:  # else it was never awaited (its coroutine failed first): nobody to tell
            self.task.step(value, None)

    def fail(self, exc: BaseException) -> None:
        if self.task.waiting is self:
            self.task.step(None, exc)


class InlineTask:
    """Runs ``coro`` to its end and calls ``on_done(result, None)`` or ``on_done(None, exception)``.

    ``start`` runs the first step at once, in the caller's own callback; ``on_done`` may thus run before
    ``start`` returns. An exception in ``on_done`` goes to the loop's exception handler, never to whoever
    resumed the coroutine (the Redis pipe must go on reading its replies)."""

    __slots__ = ("_coro", "_loop", "_on_done", "waiting")

    def __init__(self, coro: Coroutine[Any, Any, T], on_done: Callable[[T | None, BaseException | None], None],
                 loop: asyncio.AbstractEventLoop) -> None:
        self._coro = coro
        self._on_done = on_done
        self._loop = loop
        self.waiting: ReplyWait | None = None
        """The reply it is suspended on, if any: only that one may resume it."""

    def start(self) -> None:
        self.step(None, None)

    def step(self, value: object, exc: BaseException | None) -> None:
        global _running
        previous, _running = _running, self
        self.waiting = None
        try:
            waited = self._coro.send(value) if exc is None else self._coro.throw(exc)
        except StopIteration as stop:
            _running = previous
            self._finish(stop.value, None)
            return
        except (KeyboardInterrupt, SystemExit):
            _running = previous
            raise
        except BaseException as error:
            _running = previous
            self._finish(None, error)
            return
        _running = previous
        if type(waited) is ReplyWait:
            if waited.task is not self:
                self._misuse("a Redis reply awaited by another coroutine than the one that asked")
                return
            self.waiting = waited
            return  # its resolver resumes this coroutine
        if waited is None:  # a bare yield (asyncio.sleep(0)): go on in the next loop iteration
            self._loop.call_soon(self.step, None, None)
            return
        if getattr(waited, "_asyncio_future_blocking", None):
            waited._asyncio_future_blocking = False
            waited.add_done_callback(self._wakeup)
            return
        self._misuse(f"awaited {type(waited).__name__}, which is not an asyncio Future")

    def _wakeup(self, _future: asyncio.Future[Any]) -> None:
        self.step(None, None)  # the Future's __await__ returns its result or raises its exception

    def _misuse(self, why: str) -> None:
        self._loop.call_soon(self.step, None, RuntimeError(f"in-line coroutine: {why}"))

    def _finish(self, result: object, exc: BaseException | None) -> None:
        try:
            self._on_done(result, exc)  # type: ignore[arg-type]
        except Exception as error:
            self._loop.call_exception_handler({"message": "exception in an in-line coroutine's done callback",
                                               "exception": error})


async def bounded(awaitable: Awaitable[T], seconds: float) -> T:
    """``asyncio.wait_for`` that works without a current Task: the work runs in a Task of its own (a coroutine)
    or as the Future it is, cancelled after ``seconds`` with TimeoutError raised here."""
    future = asyncio.ensure_future(awaitable)
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        future.cancel()

    timer = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        return await future
    except asyncio.CancelledError:
        if expired:
            raise TimeoutError(f"no result within {seconds:g}s") from None
        raise
    finally:
        timer.cancel()
