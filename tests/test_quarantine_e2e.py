"""Release through a real Postfix, configured with the re-injection listener exactly as README.md documents
it (the lines are read from the README): the listener skips the milters that its main smtpd runs, and the
released message reaches the next hop with its bytes unchanged below Postfix's Received header."""

from __future__ import annotations

import datetime
import io
import re
import shutil
import smtplib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need_postfix
from harness.net import free_port, wait_port
from harness.postfix import PostfixInstance
from harness.sink import Sink

from quarantine.models import State
from quarantine.release import release
from quarantine.store import HeldEnvelope, Hold, QuarantineSettings, QuarantineStore

pytestmark = pytest.mark.e2e

RAW = (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=s1; h=from:to:subject:date; bh=abc; b=def\r\n"
       b"From: Sender <sender@example.org>\r\nTo: alice@example.test\r\nSubject: released\r\n"
       b"Date: Sun, 1 Nov 2026 08:00:00 +0000\r\nMessage-ID: <released@example.org>\r\n\r\n"
       b"body\r\n.\r\n..dots\r\n")


class PostfixWithListener(PostfixInstance):
    """The harness's Postfix, its main smtpd behind a milter that is down (milter_default_action =
    tempfail: nothing gets through it), plus the documented re-injection listener (the harness writes the
    README's master.cf lines)."""


@pytest.fixture
def postfix(sink: Sink) -> Iterator[PostfixWithListener]:
    need_postfix()
    directory = Path(tempfile.mkdtemp(prefix="mw-postfix-"))
    directory.chmod(0o755)
    instance = PostfixWithListener(directory, free_port(), sink.port, None, milters=f"inet:127.0.0.1:{free_port()}",
                                   reinject_port=free_port())
    instance.start()
    try:
        wait_port(instance.smtp_port)
        wait_port(instance.reinject_port)
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(directory, ignore_errors=True)


def test_release_through_the_documented_listener(postfix: PostfixWithListener, sink: Sink, tmp_path: Path) -> None:
    # the control: the main smtpd runs the (unreachable) milter, so mail sent to it is refused for now
    with smtplib.SMTP("127.0.0.1", postfix.smtp_port, timeout=30) as client:
        with pytest.raises(smtplib.SMTPResponseException) as refused:
            client.sendmail("sender@example.org", ["alice@example.test"], RAW)
        assert refused.value.smtp_code // 100 == 4

    settings = QuarantineSettings(database_url=f"sqlite:///{tmp_path / 'q.sqlite'}", message_dir=tmp_path / "m",
                                  reinject=f"127.0.0.1:{postfix.reinject_port}")
    store = QuarantineStore(settings)
    try:
        store.migrate()
        envelope = HeldEnvelope("4ZbQ000", "bounces@example.org", "192.0.2.10", "", "sender@example.org",
                                "released", "", datetime.datetime.now(datetime.UTC))
        alice, bob = store.hold(io.BytesIO(RAW), len(RAW), envelope,
                                [Hold(r, r, "banned", "banned", "x.exe") for r in ("alice@example.test",
                                                                                   "bob@example.test")])
        done = release(store, alice, "postmaster")
        assert re.fullmatch(r"[0-9A-Za-z]+", done.queue_id)  # Postfix's "queued as"
        [received] = sink.wait_for(1)
        assert received.mail_from == "bounces@example.org" and received.rcpt_tos == ("alice@example.test",)
        assert received.data.endswith(RAW)  # the original bytes, unchanged
        added = received.data[: -len(RAW)].decode()
        assert added.startswith("Received: ") and "\r\n\r\n" not in added  # only Postfix's trace header
        record = store.get(alice)
        assert record is not None and record.state is State.RELEASED and record.released_queue_id == done.queue_id
        other = store.get(bob)
        assert other is not None and other.state is State.HELD
        assert done.queue_id in postfix.log_text()
    finally:
        store.close()
