"""Release by re-injection, against a real SMTP listener (aiosmtpd) standing in for Postfix's re-injection
port: the bytes unchanged, the original sender, one recipient, exactly once when two releases race, back
to held when sending fails, a virus only with admin."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import random
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from harness.net import free_port
from harness.sink import Sink

from quarantine.models import State
from quarantine.release import SEND_BUFFER, Failure, ReleaseError, dot_stuffed, release
from quarantine.store import HeldEnvelope, Hold, QuarantineSettings, QuarantineStore, StoreError

T0 = datetime.datetime(2026, 11, 1, 8, 0, tzinfo=datetime.UTC)
RAW = (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=s1; bh=abc; b=def\r\n"
       b"From: Sender <sender@example.org>\r\nTo: alice@example.test, bob@example.test\r\n"
       b"Subject: quarterly figures\r\nMessage-ID: <q1@example.org>\r\n\r\n"
       b"Dear all,\r\n.\r\n..a line starting with dots\r\n\xc3\xa9t\xc3\xa9 8bit\r\n  trailing space \r\n")


@dataclass(frozen=True)
class Got:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes


class Listener:
    """A re-injection listener whose end-of-data reply the test chooses, and whose end of data can be held
    back until the test lets it go (``gate``); it signals each transaction that reached RCPT."""

    def __init__(self, reply: str = "250 2.0.0 Ok: queued as 4ZbQ3x5yQ7z9") -> None:
        self.reply = reply
        self.got: list[Got] = []
        self.in_rcpt = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options) -> str:
        envelope.rcpt_tos.append(address)
        self.in_rcpt.set()
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:


        await asyncio.get_running_loop().run_in_executor(None, self.gate.wait, 30)
        self.got.append(Got(envelope.mail_from, tuple(envelope.rcpt_tos), envelope.original_content))
        return self.reply

    def __enter__(self) -> Listener:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        self.controller.stop()


@pytest.fixture
def listener() -> Iterator[Listener]:
    with Listener() as server:
        yield server


def make_store(tmp_path: Path, port: int, url: str | None = None, **extra: object) -> QuarantineStore:
    settings = QuarantineSettings(database_url=url or f"sqlite:///{tmp_path / 'q.sqlite'}", message_dir=tmp_path / "m",
                                  inline_max_size=1024, reinject=f"127.0.0.1:{port}", reinject_timeout="10s",
                                  **extra)
    store = QuarantineStore(settings, now=lambda: T0)
    store.migrate()
    return store


@pytest.fixture(params=["sqlite", "mariadb"])
def store(request: pytest.FixtureRequest, tmp_path: Path, listener: Listener) -> Iterator[QuarantineStore]:
    url = None if request.param == "sqlite" else request.getfixturevalue("mariadb").create_database(
        "quarantine_release", drop=True)
    quarantine = make_store(tmp_path, listener.port, url)
    yield quarantine
    quarantine.close()


def hold(store: QuarantineStore, raw: bytes = RAW, recipients: tuple[str, ...] = ("alice@example.test",),
         kind: str = "banned", sender: str = "bounces+123@example.org") -> list[str]:
    envelope = HeldEnvelope(queue_id="4ZbQ000", sender=sender, client_address="192.0.2.10", auth_user="",
                            header_from="Sender <sender@example.org>", subject="quarterly figures", date="",
                            received_at=T0)
    return store.hold(io.BytesIO(raw), len(raw), envelope,
                      [Hold(rcpt, rcpt, "clamav" if kind == "virus" else "banned", kind, "figures.xls.exe")
                       for rcpt in recipients])


def test_release_reinjects_the_bytes_unchanged_to_that_recipient_only(store, listener) -> None:
    alice, bob = hold(store, recipients=("alice@example.test", "bob@example.test"))
    done = release(store, alice, "postmaster")
    assert done.queue_id == "4ZbQ3x5yQ7z9" and done.recipient == "alice@example.test"
    [got] = listener.got
    assert got == Got("bounces+123@example.org", ("alice@example.test",), RAW)
    record = store.get(alice)
    assert record is not None and record.state is State.RELEASED
    assert (record.state_by, record.state_at, record.released_queue_id) == ("postmaster", T0, "4ZbQ3x5yQ7z9")
    other = store.get(bob)
    assert other is not None and other.state is State.HELD  # the other recipient's copy stays held
    with pytest.raises(ReleaseError) as again:
        release(store, alice, "postmaster")
    assert again.value.failure is Failure.NOT_HELD and "released by postmaster" in str(again.value)
    assert len(listener.got) == 1


def test_large_message_from_a_file_and_the_null_sender(store, listener) -> None:
    big = RAW + b"".join(b"line %07d with a dot\r\n.%d\r\n" % (i, i) for i in range(60000))
    [public_id] = hold(store, raw=big, sender="")
    record = store.get(public_id)
    assert record is not None and str(record.storage) == "file"
    release(store, public_id, "postmaster")
    [got] = listener.got
    assert got.mail_from == "<>" or got.mail_from == ""
    assert got.data == big


def test_two_racing_releases_deliver_once(store, listener) -> None:
    [public_id] = hold(store)
    listener.gate.clear()  # the first release waits at end of data ...
    outcome: dict[str, object] = {}

    def first() -> None:
        try:
            outcome["first"] = release(store, public_id, "alice")
        except BaseException as exc:
            outcome["first"] = exc

    thread = threading.Thread(target=first)
    thread.start()
    assert listener.in_rcpt.wait(10)  # ... inside its SMTP transaction
    with pytest.raises(ReleaseError) as second:  # the second, meanwhile, does not send
        release(store, public_id, "bob")
    assert second.value.failure is Failure.NOT_HELD and "releasing" in str(second.value)
    listener.gate.set()
    thread.join(30)
    assert not isinstance(outcome["first"], BaseException), outcome["first"]
    assert len(listener.got) == 1
    record = store.get(public_id)
    assert record is not None and record.state is State.RELEASED and record.state_by == "alice"


def test_many_threads_racing_deliver_once(store, listener) -> None:
    [public_id] = hold(store)
    racers = 5
    barrier = threading.Barrier(racers)
    results: list[object] = []

    def racer(name: str) -> None:
        barrier.wait(10)
        try:
            results.append(release(store, public_id, name))
        except ReleaseError as exc:
            results.append(exc.failure)

    threads = [threading.Thread(target=racer, args=(f"admin{i}",)) for i in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(map(str, results)).count(str(Failure.NOT_HELD)) == racers - 1
    assert len(listener.got) == 1


def test_nothing_listening_returns_the_row_to_held(tmp_path: Path) -> None:
    store = make_store(tmp_path, free_port())
    try:
        [public_id] = hold(store)
        with pytest.raises(ReleaseError, match="stays held") as failed:
            release(store, public_id, "postmaster")
        assert failed.value.failure is Failure.SEND and "Connection refused" in str(failed.value)
        record = store.get(public_id)
        assert record is not None and record.state is State.HELD
    finally:
        store.close()


def test_a_refusal_at_end_of_data_returns_the_row_to_held_and_a_retry_works(tmp_path: Path) -> None:
    with Listener(reply="554 5.7.1 refused by policy") as refusing:
        store = make_store(tmp_path, refusing.port)
        try:
            [public_id] = hold(store)
            with pytest.raises(ReleaseError, match=r"554 5\.7\.1 refused by policy") as failed:
                release(store, public_id, "postmaster")
            assert failed.value.failure is Failure.SEND
            record = store.get(public_id)
            assert record is not None and record.state is State.HELD and record.released_queue_id == ""
            refusing.reply = "250 2.0.0 Ok: queued as 4ABC"
            assert release(store, public_id, "postmaster").queue_id == "4ABC"
            assert len(refusing.got) == 2  # the refused attempt and the accepted one
        finally:
            store.close()


def test_a_virus_needs_admin(store, listener) -> None:
    [public_id] = hold(store, kind="virus")
    with pytest.raises(ReleaseError, match="--admin") as refused:
        release(store, public_id, "alice")
    assert refused.value.failure is Failure.ADMIN_ONLY
    record = store.get(public_id)
    assert record is not None and record.state is State.HELD
    assert release(store, public_id, "postmaster", admin=True).queue_id
    assert [got.data for got in listener.got] == [RAW]  # only the admin's release was sent


def test_a_delivered_record_is_not_released(store, listener) -> None:
    """Tagged spam the recipient already got (state delivered): release refuses it as not held, sends
    nothing, and leaves the row as it was (the digest's REPORT needs it)."""
    envelope = HeldEnvelope(queue_id="4ZbQ001", sender="news@example.com", client_address="192.0.2.10",
                            auth_user="", header_from="", subject="offer", date="", received_at=T0)
    [public_id] = store.hold(io.BytesIO(RAW), len(RAW), envelope, [Hold(
        "alice@example.test", "alice@example.test", "spamassassin", "spam", "score 6.2 >= tag level 5",
        state=State.DELIVERED)])
    with pytest.raises(ReleaseError, match=r"not held: it was delivered to alice@example\.test") as refused:
        release(store, public_id, "postmaster", admin=True)
    assert refused.value.failure is Failure.NOT_HELD
    assert listener.got == []
    record = store.get(public_id)
    assert record is not None and record.state is State.DELIVERED and record.state_by == "spamassassin"
    assert store.raw(public_id) == RAW


def test_unknown_id(store) -> None:
    with pytest.raises(ReleaseError) as unknown:
        release(store, "nosuchid", "postmaster")
    assert unknown.value.failure is Failure.UNKNOWN


def test_the_harness_sink_as_listener_without_a_queue_id(tmp_path: Path) -> None:
    sink = Sink().start()
    try:
        store = make_store(tmp_path, sink.port)
        try:
            [public_id] = hold(store)
            assert release(store, public_id, "postmaster").queue_id == ""  # its 250 names no queue id
            [received] = sink.wait_for(1)
            assert received.data == RAW and received.rcpt_tos == ("alice@example.test",)
        finally:
            store.close()
    finally:
        sink.stop()


def test_the_data_payload_is_dot_stuffed_in_bounded_blocks() -> None:
    """What smtplib.sendmail would send (line ends made CRLF, leading dots doubled, the final dot), built
    from the file in blocks of about 64 KB instead of two whole copies of a 50 MB message."""
    def reference(data: bytes) -> bytes:
        quoted = re.sub(rb"(?m)^\.", b"..", re.sub(rb"\r\n|\n|\r(?!\n)", b"\r\n", data))
        return quoted + (b"\r\n" if quoted and not quoted.endswith(b"\r\n") else b"") + b".\r\n"

    rng = random.Random(7)
    for _ in range(3000):
        data = bytes(rng.choice(b".\r\na") for _ in range(rng.randint(0, 14)))
        for size in (1, 2, 3, 7, 100):
            assert b"".join(dot_stuffed(io.BytesIO(data), size)) == reference(data), (data, size)
    big = b"".join(b".%06d\r\n" % i for i in range(200000))  # 1.8 MB, one dot per line
    blocks = list(dot_stuffed(io.BytesIO(big)))
    assert b"".join(blocks) == reference(big)
    assert max(len(block) for block in blocks) <= 2 * SEND_BUFFER


def test_delivered_but_not_recorded_says_so(store, listener, monkeypatch) -> None:
    [public_id] = hold(store)
    real = store.transition

    def failing(public_id, from_states, to_state, by, **kwargs):
        if to_state is State.RELEASED:
            raise StoreError("cannot change the state: quarantine database down")
        return real(public_id, from_states, to_state, by, **kwargs)

    monkeypatch.setattr(store, "transition", failing)
    with pytest.raises(ReleaseError, match=r"re-injected .* do not release it again") as failed:
        release(store, public_id, "postmaster")
    assert failed.value.failure is Failure.STORE
    assert len(listener.got) == 1
    record = store.get(public_id)
    assert record is not None and record.state is State.RELEASING  # not back to held: it was delivered


class SilentAfterData:
    """A listener that takes the whole message, then closes the connection without a reply (a crash of
    Postfix's smtpd at the worst moment: whether it was queued is unknown), or with ``reply`` and then
    without answering QUIT."""

    def __init__(self, reply: bytes = b"") -> None:
        self.reply = reply
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.received = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError:
            return  # closed before anyone connected
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 silent ESMTP\r\n")
            while line := lines.readline():
                command = line[:4].upper()
                if command == b"DATA":
                    conn.sendall(b"354 go on\r\n")
                    while lines.readline() not in (b".\r\n", b""):
                        pass
                    self.received.set()
                    conn.sendall(self.reply)
                    return  # the connection closes
                conn.sendall(b"250 ok\r\n")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)  # wakes an accept still waiting: no thread outlives the test
        self.server.close()
        self.thread.join(10)


def test_no_reply_after_the_whole_message_leaves_it_releasing(tmp_path: Path) -> None:
    listener = SilentAfterData()
    store = make_store(tmp_path, listener.port)
    try:
        [public_id] = hold(store)
        with pytest.raises(ReleaseError, match="may have been queued") as unknown:
            release(store, public_id, "postmaster")
        assert unknown.value.failure is Failure.OUTCOME_UNKNOWN and listener.received.is_set()
        record = store.get(public_id)
        assert record is not None and record.state is State.RELEASING  # not held: a retry could deliver twice
        with pytest.raises(ReleaseError) as again:
            release(store, public_id, "postmaster")
        assert again.value.failure is Failure.NOT_HELD
    finally:
        store.close()
        listener.close()


def test_a_connection_lost_at_quit_after_the_250_is_released(tmp_path: Path) -> None:
    listener = SilentAfterData(reply=b"250 2.0.0 Ok: queued as 4XYZ\r\n")
    store = make_store(tmp_path, listener.port)
    try:
        [public_id] = hold(store)
        assert release(store, public_id, "postmaster").queue_id == "4XYZ"
        record = store.get(public_id)
        assert record is not None and record.state is State.RELEASED
    finally:
        store.close()
        listener.close()
