"""The milter base without Postfix: pymilter's TestCtx drives MessageMilter through every stage (macros
included) and records the actions; the checks here are small fakes of pure logic. End-to-end proof through
the real Postfix is in test_e2e_milter.py."""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field

import Milter
import pytest
from harness.milter_ctx import drive_milter

from mailwarden.logs import DecisionLog
from milters.base import HeldCopy, HoldFailed, MilterApp
from milters.check import Message
from milters.verdict import REJECT_VIRUS, Fate, Verdict

MESSAGE = (b"From: Alice <alice@example.org>\r\nTo: bob@example.test\r\nSubject: hello\r\n"
           b"X-Virus-Status: Clean\r\n\r\nHello Bob.\r\n")


@dataclass
class FakeCheck:
    """Returns what it is told to; records the messages it saw."""

    name: str
    result: object
    owned_headers: tuple[str, ...] = ()
    seen: list[Message] = field(default_factory=list)

    def check(self, message: Message):
        self.seen.append(message)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result(message) if callable(self.result) else self.result

    def close(self) -> None:
        pass


@dataclass
class FakeHolder:
    fail: bool = False
    copies: list[tuple[bytes, dict[str, Verdict], dict[str, str]]] = field(default_factory=list)

    def hold(self, copy: HeldCopy) -> list[str]:
        raw = copy.raw.read()
        if self.fail:
            raise HoldFailed("database is locked")
        self.copies.append((raw, dict(copy.holds), dict(copy.mailboxes)))
        return [f"id{n}" for n in range(len(copy.holds))]

    def close(self) -> None:
        pass


def drive(app: MilterApp, monkeypatch, raw: bytes = MESSAGE, sender: str = "alice@example.org",
          rcpts: tuple[str, ...] = ("bob@example.test",), auth: str | None = None):
    return drive_milter(app, monkeypatch, raw, sender, rcpts, auth)


@pytest.fixture
def decisions() -> tuple[DecisionLog, io.StringIO]:
    out = io.StringIO()
    return DecisionLog(stream=out), out


def test_clean_message_gets_the_checks_headers_and_a_decision_line_per_recipient(monkeypatch, decisions):
    log, out = decisions
    check = FakeCheck("clamav", Verdict(Fate.ACCEPT, "clamav", "clean",
                                        headers=(("X-Virus-Status", "Clean"),)), ("X-Virus-Status",))
    app = MilterApp("clamav", [check], log)
    rc, ctx = drive(app, monkeypatch, rcpts=("bob@example.test", "carol@example.test"))
    assert rc == Milter.ACCEPT
    assert ctx.added == [("X-Virus-Status", "Clean")]
    seen = check.seen[0]
    assert seen.queue_id == "4XyZ12AB" and seen.client_address == "192.0.2.7"
    assert seen.recipients == ["bob@example.test", "carol@example.test"]
    assert seen.header("subject") == "hello"
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "queue_id=4XyZ12AB" in lines[0] and "recipient=bob@example.test" in lines[0]
    assert "action=accept" in lines[1] and "milter=clamav" in lines[1]


def test_the_spool_holds_the_message_as_received(monkeypatch, decisions):
    check = FakeCheck("x", Verdict(Fate.ACCEPT, "x", "ok"))
    captured: list[bytes] = []
    check.result = lambda message: captured.append(message.spool.reader().read()) or Verdict(Fate.ACCEPT, "x", "")
    drive(MilterApp("t", [check], decisions[0]), monkeypatch)
    assert captured[0].startswith(b"From: Alice <alice@example.org>\r\n")
    assert b"\r\n\r\nHello Bob." in captured[0]


def test_forged_verdict_headers_are_removed(monkeypatch, decisions):
    check = FakeCheck("clamav", Verdict(Fate.ACCEPT, "clamav", "clean"), ("X-Virus-Status",))
    _, ctx = drive(MilterApp("clamav", [check], decisions[0]), monkeypatch)
    assert "X-Virus-Status" not in ctx._msg


def test_all_recipients_rejected_is_a_rejection_with_the_generic_reply(monkeypatch, decisions):
    log, out = decisions
    check = FakeCheck("clamav", Verdict(Fate.REJECT, "clamav", "Eicar-Test-Signature", kind="virus",
                                        reply=REJECT_VIRUS))
    rc, ctx = drive(MilterApp("clamav", [check], log), monkeypatch)
    assert rc == Milter.REJECT
    assert ctx._reply[:2] == ("554", "5.7.1") and "Eicar" not in " ".join(ctx._reply)
    assert "reason=Eicar-Test-Signature" in out.getvalue() and "action=reject" in out.getvalue()


def test_a_rejection_stops_the_later_checks(monkeypatch, decisions):
    first = FakeCheck("banned", Verdict(Fate.REJECT, "banned", "part 2 rule=extension:exe"))
    second = FakeCheck("clamav", Verdict(Fate.ACCEPT, "clamav", "clean"))
    drive(MilterApp("clamav", [first, second], decisions[0]), monkeypatch)
    assert second.seen == []


@pytest.mark.parametrize(("banned_kind", "named"), [("", "check=clamav action=accept reason=clean"),
                                                    ("unscanned", "check=banned action=accept reason=partly")])
def test_a_later_clean_does_not_hide_an_earlier_partial_inspection(monkeypatch, decisions, banned_kind, named):
    """On a tie the later check names the outcome, unless only the earlier one has a finding (banned could
    not inspect everything, and accepted it: on_limits = "accept")."""
    log, out = decisions
    first = FakeCheck("banned", Verdict(Fate.ACCEPT, "banned", "partly", kind=banned_kind))
    second = FakeCheck("clamav", Verdict(Fate.ACCEPT, "clamav", "clean", headers=(("X-Virus-Status", "Clean"),)))
    rc, ctx = drive(MilterApp("clamav", [first, second], log), monkeypatch)
    assert rc == Milter.ACCEPT and ctx.added == [("X-Virus-Status", "Clean")]
    assert named in out.getvalue()


def test_one_recipient_held_is_committed_then_removed_and_the_other_gets_the_message(monkeypatch, decisions):
    log, out = decisions
    verdicts = {"bob@example.test": Verdict(Fate.QUARANTINE, "spam", "score 9", held_headers=(("X-Held", "1"),)),
                "carol+news@example.test": Verdict(Fate.TAG, "spam", "score 6", headers=(("X-Spam-Flag", "YES"),))}
    holder = FakeHolder()
    app = MilterApp("spam", [FakeCheck("spam", verdicts)], log, holder=holder)
    rc, ctx = drive(app, monkeypatch, rcpts=("bob@example.test", "carol+news@example.test"))
    assert rc == Milter.ACCEPT
    assert ctx._delrcpt == ["<bob@example.test>"]
    assert ctx.added == [("X-Spam-Flag", "YES")]
    raw, holds, mailboxes = holder.copies[0]
    assert raw.startswith(b"X-Held: 1\r\nFrom: Alice")
    assert list(holds) == ["bob@example.test"] and mailboxes == {"bob@example.test": "bob@example.test"}
    assert "action=quarantine" in out.getvalue() and "held_id=id0" in out.getvalue()


def test_every_recipient_held_is_discarded_only_after_the_commit(monkeypatch, decisions):
    holder = FakeHolder()
    check = FakeCheck("clamav", Verdict(Fate.QUARANTINE, "clamav", "Eicar", kind="virus"))
    rc, _ = drive(MilterApp("clamav", [check], decisions[0], holder=holder), monkeypatch)
    assert rc == Milter.DISCARD
    assert len(holder.copies) == 1


def test_a_store_failure_is_a_temporary_failure_not_a_discard(monkeypatch, decisions):
    log, out = decisions
    check = FakeCheck("clamav", Verdict(Fate.QUARANTINE, "clamav", "Eicar", kind="virus"))
    rc, ctx = drive(MilterApp("clamav", [check], log, holder=FakeHolder(fail=True)), monkeypatch)
    assert rc == Milter.TEMPFAIL
    assert ctx._reply[0] == "451"
    assert "action=defer" in out.getvalue()


def test_a_check_that_raises_is_a_temporary_failure(monkeypatch, decisions):
    check = FakeCheck("clamav", RuntimeError("bug"))
    rc, ctx = drive(MilterApp("clamav", [check], decisions[0]), monkeypatch)
    assert rc == Milter.TEMPFAIL and ctx._reply[0] == "451"


def test_a_scanner_tempfail_for_one_recipient_tempfails_the_message(monkeypatch, decisions):
    verdicts = {"bob@example.test": Verdict(Fate.TEMPFAIL, "spam", "spamd down"),
                "carol@example.test": Verdict(Fate.ACCEPT, "spam", "score 1")}
    rc, ctx = drive(MilterApp("spam", [FakeCheck("spam", verdicts)], decisions[0]), monkeypatch,
                    rcpts=("bob@example.test", "carol@example.test"))
    assert rc == Milter.TEMPFAIL and ctx._reply[0] == "451"


def test_mixed_reject_and_accept_holds_the_rejected_recipient(monkeypatch, decisions):
    verdicts = {"bob@example.test": Verdict(Fate.REJECT, "spam", "score 20"),
                "carol@example.test": Verdict(Fate.ACCEPT, "spam", "score 1")}
    holder = FakeHolder()
    rc, ctx = drive(MilterApp("spam", [FakeCheck("spam", verdicts)], decisions[0], holder=holder), monkeypatch,
                    rcpts=("bob@example.test", "carol@example.test"))
    assert rc == Milter.ACCEPT and ctx._delrcpt == ["<bob@example.test>"]
    assert list(holder.copies[0][1]) == ["bob@example.test"]


def test_authenticated_user_reaches_the_checks(monkeypatch, decisions):
    check = FakeCheck("x", Verdict(Fate.ACCEPT, "x", ""))
    drive(MilterApp("t", [check], decisions[0]), monkeypatch, auth="alice")
    assert check.seen[0].auth_user == "alice" and check.seen[0].authenticated


def test_a_large_message_is_spooled_to_disk_not_memory(monkeypatch, decisions):
    sizes: list[tuple[int, bool]] = []

    def look(message: Message) -> Verdict:
        sizes.append((message.spool.size, message.spool.on_disk))
        return Verdict(Fate.ACCEPT, "x", "")

    body = b"Subject: big\r\n\r\n" + b"0123456789abcdef" * 65536 * 2  # 2 MB
    drive(MilterApp("t", [FakeCheck("x", look)], decisions[0], spool_memory=64 * 1024), monkeypatch, raw=body)
    assert sizes[0][0] > 2_000_000 and sizes[0][1]


def test_connections_are_independent(monkeypatch, decisions):
    """Per-message state lives on the connection's instance: two connections in two threads at once."""
    seen: list[str] = []
    barrier = threading.Barrier(2)

    def look(message: Message) -> Verdict:
        barrier.wait(timeout=5)
        seen.append(message.sender)
        return Verdict(Fate.ACCEPT, "x", "")

    app = MilterApp("t", [FakeCheck("x", look)], decisions[0])
    results: list[int] = []
    threads = [threading.Thread(target=lambda s=s: results.append(drive(app, monkeypatch, sender=s)[0]))
               for s in ("one@example.org", "two@example.org")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(seen) == ["one@example.org", "two@example.org"] and results == [Milter.ACCEPT] * 2


def test_a_pass_carries_the_headers_of_every_check(monkeypatch, decisions):
    banned = FakeCheck("banned", Verdict(Fate.ACCEPT, "banned", "no banned attachment"))
    clamav = FakeCheck("clamav", Verdict(Fate.ACCEPT, "clamav", "clean", headers=(("X-Virus-Status", "Clean"),)))
    _, ctx = drive(MilterApp("clamav", [banned, clamav], decisions[0]), monkeypatch)
    assert ctx.added == [("X-Virus-Status", "Clean")]


@dataclass
class ListeningCheck(FakeCheck):
    """A check told where its held recipients went (the phish check links them to its snag)."""

    told: list[dict[str, str]] = field(default_factory=list)
    fail: bool = False

    def after_hold(self, message: Message, held, verdicts) -> None:
        if self.fail:
            raise RuntimeError("snag store down")
        self.told.append(dict(held))


def test_a_hold_listener_hears_the_held_ids_after_the_commit(monkeypatch, decisions):
    holder = FakeHolder()
    check = ListeningCheck("phish", {"bob@example.test": Verdict(Fate.QUARANTINE, "phish", "snag", kind="phish")})
    rc, _ = drive(MilterApp("phish", [check], decisions[0], holder=holder), monkeypatch,
                  rcpts=("bob@example.test", "carol@example.test"))
    assert rc == Milter.ACCEPT and len(holder.copies) == 1
    assert check.told == [{"bob@example.test": "id0"}]  # the held one only, not carol who gets the message


def test_a_failing_hold_listener_costs_the_link_not_the_message(monkeypatch, decisions):
    log, out = decisions
    check = ListeningCheck("phish", Verdict(Fate.QUARANTINE, "phish", "snag", kind="phish"), fail=True)
    rc, _ = drive(MilterApp("phish", [check], log, holder=FakeHolder()), monkeypatch)
    assert rc == Milter.DISCARD  # held and committed: the answer stands
    assert "action=quarantine" in out.getvalue()
