"""DecisionLog batching (issue 14): decision lines written every ``batch_seconds`` instead of every
event-loop tick must keep their order and must all be written when the daemon stops."""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Iterator

import pytest
from conftest import base_settings

from mailwarden.logs import LOGGER_NAME, DecisionLog, LoggingSettings, setup_logging


class CountingStream(io.StringIO):
    """A stream that counts its writes and says when one happened."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.written = asyncio.Event()

    def write(self, text: str) -> int:
        self.writes += 1
        self.written.set()
        return super().write(text)


def lines_of(text: str) -> list[str]:
    return [line.split(" level=info ", 1)[1] for line in text.splitlines()]


def test_lines_wait_for_the_batch_then_go_out_in_order_on_flush() -> None:
    async def main() -> CountingStream:
        stream = CountingStream()
        log = DecisionLog(stream=stream, batch_seconds=3600)  # the timer never fires within this test
        for tick in range(50):
            for n in range(10):
                log.emit(f"line={tick * 10 + n}")
            await asyncio.sleep(0)  # let the loop run other ticks: nothing may be written yet
        assert stream.writes == 0
        log.flush()  # what the daemon does when it stops
        log.emit("line=500")
        log.flush()
        log.flush()  # nothing pending: no write, no duplicate
        return stream

    stream = asyncio.run(main())
    assert lines_of(stream.getvalue()) == [f"line={n}" for n in range(501)]
    assert stream.writes == 2


def test_the_timer_writes_the_batch_in_one_write() -> None:
    async def main() -> CountingStream:
        stream = CountingStream()
        log = DecisionLog(stream=stream, batch_seconds=0.01)
        for n in range(100):
            log.emit(f"line={n}")
            if n % 7 == 0:
                await asyncio.sleep(0)
        await asyncio.wait_for(stream.written.wait(), 10)
        return stream

    stream = asyncio.run(main())
    assert lines_of(stream.getvalue()) == [f"line={n}" for n in range(100)]
    assert stream.writes == 1


def test_without_a_batch_interval_each_tick_is_written() -> None:
    async def main() -> CountingStream:
        stream = CountingStream()
        log = DecisionLog(stream=stream)
        log.emit("line=0")
        log.emit("line=1")
        await asyncio.wait_for(stream.written.wait(), 10)
        return stream

    stream = asyncio.run(main())
    assert lines_of(stream.getvalue()) == ["line=0", "line=1"]
    assert stream.writes == 1


def test_outside_an_event_loop_lines_are_written_at_once() -> None:
    stream = CountingStream()
    log = DecisionLog(stream=stream, batch_seconds=3600)
    log.emit("line=0")
    assert lines_of(stream.getvalue()) == ["line=0"]


def test_the_daemon_writes_every_line_in_order_when_stopped(policyd_factory, redis_server) -> None:
    """Requests answered just before SIGTERM: their lines may still be pending (a tick, or a whole batch
    or a whole [logging] decision_batch) and must be in the log after the stop, in order."""
    daemon = policyd_factory(base_settings(redis_server.url))
    senders = [f"order-{n}@batch.example.org" for n in range(40)]
    with daemon.connect() as client:
        for sender in senders:
            assert client.ask(sender=sender).startswith("DEFER_IF_PERMIT")
    daemon.stop()
    logged = re.findall(r"event=decision .*? sender=(order-\d+@batch\.example\.org) ", daemon.log_text())
    assert logged == senders


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """setup_logging reconfigures the ``mailwarden`` logger for the whole process: put it back after."""
    root = logging.getLogger(LOGGER_NAME)
    handlers, level, propagate = list(root.handlers), root.level, root.propagate
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = propagate


def test_only_the_daemon_that_asks_batches_by_decision_batch(restored_logging: None) -> None:
    """policyd's serve asks for batching (and flushes at stop); the milters and phishhook do not ask."""
    assert LoggingSettings().decision_batch == 0.05

    async def main() -> tuple[CountingStream, CountingStream, CountingStream]:
        batched, unasked, zero = CountingStream(), CountingStream(), CountingStream()
        hour = LoggingSettings.model_validate({"decision_batch": "1h"})
        policyd = setup_logging(hour, batched, batch_decisions=True)
        other = setup_logging(hour, unasked)
        per_tick = setup_logging(LoggingSettings.model_validate({"decision_batch": "0"}), zero, batch_decisions=True)
        for log in (policyd, other, per_tick):
            log.emit("line=0")
        await asyncio.wait_for(asyncio.gather(unasked.written.wait(), zero.written.wait()), 10)
        for _ in range(10):
            await asyncio.sleep(0)
        assert batched.writes == 0  # an hour's batch: still pending
        policyd.flush()
        return batched, unasked, zero

    for stream in asyncio.run(main()):
        assert lines_of(stream.getvalue()) == ["line=0"]


def test_each_line_carries_the_utc_time_it_was_emitted_to_the_millisecond(monkeypatch) -> None:
    """The ts= prefix is kept per millisecond (several lines share it): each line still gets its own time,
    in UTC, with the milliseconds of that moment, across a second's and a millisecond's boundary."""
    moments = iter([1764700000.9994, 1764700000.9996, 1764700000.9999, 1764700001.0002, 1764700001.0123])
    monkeypatch.setattr("mailwarden.logs.time.time", lambda: next(moments))
    stream = io.StringIO()
    log = DecisionLog(stream=stream)
    for n in range(5):
        log.emit(f"line={n}")  # outside an event loop: written at once
    assert stream.getvalue().splitlines() == [
        "ts=2025-12-02T18:26:40.999Z level=info line=0", "ts=2025-12-02T18:26:40.999Z level=info line=1",
        "ts=2025-12-02T18:26:40.999Z level=info line=2", "ts=2025-12-02T18:26:41.000Z level=info line=3",
        "ts=2025-12-02T18:26:41.012Z level=info line=4"]
