"""The SpamAssassin check's decisions without spamd: a fake client returns the report a test names, a fake
preference store the levels and lists. Each recipient's verdict, whom spamd is asked as, the message-wide
headers, the fail modes. The real spamd answers in test_spamd_client.py and the end-to-end tests."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import pytest

from mailwarden.directory import DirectorySettings
from milters.check import Message
from milters.mailbox import MailboxResolver
from milters.spamassassin import SpamAssassinCheck, SpamAssassinSettings
from milters.spamd_client import Failure, RuleHit, SpamdError, SpamReport
from milters.spool import Spool
from milters.verdict import REJECT_SPAM, Fate, Verdict, resolve
from quarantine.preferences import Kind, Levels
from quarantine.store import StoreError


@dataclass
class FakeSpamd:
    score: float = 0.0
    errors: list[SpamdError] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)

    def check(self, message, user, timeout=None) -> SpamReport:
        self.users.append(user)
        self.sent.append(message if isinstance(message, bytes) else message.read())
        if self.errors:
            raise self.errors.pop(0)
        return SpamReport(score=self.score, threshold=5.0, is_spam=self.score >= 5, partial=False,
                          rules=(RuleHit("GTUBE", 1000.0), RuleHit("MISSING_DATE", 1.4)), bytes_scanned=100)

    def close(self) -> None:
        pass


@dataclass
class FakePreferences:
    levels: dict[str, Levels] = field(default_factory=dict)
    lists: dict[str, Kind] = field(default_factory=dict)
    """mailbox -> its verdict on every sender."""
    fail: bool = False
    seen_senders: list[list[str]] = field(default_factory=list)

    def levels_for(self, mailbox: str) -> Levels:
        if self.fail:
            raise StoreError("cannot open the catalogue: database is locked")
        return self.levels.get(mailbox, Levels(None, None, None))

    def sender_verdict(self, mailbox: str, senders) -> Kind | None:
        self.seen_senders.append(list(senders))
        return self.lists.get(mailbox)


ALIASES = "carol@example.test\nsales@example.test: carol@example.test\n"


def make(tmp_path, score=0.0, prefs=None, errors=(), **settings) -> tuple[SpamAssassinCheck, FakeSpamd]:
    recipients = tmp_path / "recipients.map"
    recipients.write_text(ALIASES)
    directory = DirectorySettings.model_validate({"file": {"paths": [str(recipients)]}})
    spamd = FakeSpamd(score, list(errors))
    check = SpamAssassinCheck(SpamAssassinSettings.model_validate({"retry_pause": 0, **settings}),
                              MailboxResolver(directory, 60), prefs if prefs is not None else FakePreferences(),
                              client=spamd, sleep=lambda _s: None)  # type: ignore[arg-type]
    return check, spamd


def message(*rcpts: str, auth: str = "", subject: str = "hello") -> Message:
    spool = Spool()
    spool.write(f"From: Mallory <mallory@spam.example>\r\nSubject: {subject}\r\n\r\nbuy\r\n".encode())
    return Message(queue_id="4Q1", client_address="192.0.2.9", client_name="unknown", helo="x", sender="m@spam.example",
                   recipients=list(rcpts), auth_user=auth, spool=spool, mta_name="mx.example.test",
                   headers=[("From", "Mallory <mallory@spam.example>"), ("Subject", subject)])


def verdicts(result) -> dict[str, Verdict]:
    assert isinstance(result, dict), result
    return result


@pytest.mark.parametrize(("score", "fate"), [(4.9, Fate.ACCEPT), (5.0, Fate.TAG), (8.0, Fate.QUARANTINE),
                                             (15.0, Fate.REJECT)])
def test_the_score_against_the_default_levels(tmp_path, score, fate):
    check, _ = make(tmp_path, score)
    [verdict] = verdicts(check.check(message("dave@example.test"))).values()
    assert verdict.fate is fate
    assert verdict.reply == (REJECT_SPAM if fate is Fate.REJECT else None)
    assert ("score", f"{score:g}") in verdict.log_fields


@pytest.mark.parametrize(("score", "record_tagged", "recorded"), [
    (4.9, True, set()), (5.0, True, {"dave@example.test"}), (7.9, True, {"dave@example.test"}),
    (8.0, True, set()), (6.0, False, set())])
def test_tagged_mail_is_recorded_per_recipient_between_the_tag_and_hold_levels(tmp_path, score, record_tagged,
                                                                              recorded):
    """record_tagged: a recipient it is delivered to tagged (tag <= score < hold, their own levels) is
    recorded as delivered (Resolution.recorded); below tag, held, or with record_tagged off: not."""
    prefs = FakePreferences(levels={"carol@example.test": Levels(tag=10.0, hold=20.0, reject=None)})
    check, _ = make(tmp_path, score, prefs, record_tagged=record_tagged)
    judged = verdicts(check.check(message("carol@example.test", "dave@example.test")))
    resolution = resolve(["carol@example.test", "dave@example.test"], judged)
    assert set(resolution.recorded) == recorded
    for verdict in resolution.recorded.values():
        assert (verdict.check, verdict.kind, verdict.reason) == ("spamassassin", "spam",
                                                                f"score {score:g} >= tag level 5")


def test_a_clean_message_says_no_with_its_score_and_no_flag(tmp_path):
    check, _ = make(tmp_path, 1.4)
    [verdict] = verdicts(check.check(message("dave@example.test"))).values()
    headers = dict(verdict.headers)
    assert "X-Spam-Flag" not in headers
    assert headers["X-Spam-Status"].startswith("No, score=1.4 required=5.0 tests=GTUBE,MISSING_DATE")
    assert headers["X-Spam-Score"] == "1.4" and headers["X-Spam-Level"] == "*"


def test_recipients_levels_come_from_the_store_per_mailbox(tmp_path):
    prefs = FakePreferences(levels={"carol@example.test": Levels(tag=2.0, hold=3.0, reject=None)})
    check, _ = make(tmp_path, 4.0, prefs)
    judged = verdicts(check.check(message("sales@example.test", "dave@example.test")))
    assert judged["sales@example.test"].fate is Fate.QUARANTINE, "the alias was judged by its own address"
    assert judged["dave@example.test"].fate is Fate.ACCEPT


def test_one_copy_one_set_of_headers_tagged_when_any_delivered_recipient_is_tagged(tmp_path):
    prefs = FakePreferences(levels={"carol@example.test": Levels(tag=3.0, hold=None, reject=None)})
    check, _ = make(tmp_path, 4.0, prefs, subject_tag="[SPAM]")
    judged = verdicts(check.check(message("carol@example.test", "dave@example.test")))
    assert judged["carol@example.test"].fate is Fate.TAG and judged["dave@example.test"].fate is Fate.ACCEPT
    assert judged["carol@example.test"].headers == judged["dave@example.test"].headers
    headers = dict(judged["dave@example.test"].headers)
    assert headers["X-Spam-Flag"] == "YES" and headers["X-Spam-Status"].startswith("Yes, score=4.0 required=3.0")
    resolution = resolve(["carol@example.test", "dave@example.test"], judged)
    assert resolution.subject_tag == "", "dave did not ask for a tagged subject"
    alone = resolve(["carol@example.test"], verdicts(check.check(message("carol@example.test"))))
    assert alone.subject_tag == "[SPAM]"


def test_reject_level_rejects_only_when_every_recipient_rejects(tmp_path):
    prefs = FakePreferences(levels={"carol@example.test": Levels(tag=None, hold=None, reject=30.0)})
    check, _ = make(tmp_path, 20.0, prefs)
    judged = verdicts(check.check(message("carol@example.test", "dave@example.test")))
    resolution = resolve(["carol@example.test", "dave@example.test"], judged)
    assert resolution.fate is Fate.QUARANTINE and set(resolution.held) == {"carol@example.test", "dave@example.test"}
    everyone = verdicts(check.check(message("dave@example.test", "erin@example.test")))
    assert resolve(["dave@example.test", "erin@example.test"], everyone).fate is Fate.REJECT


def test_a_whitelisted_sender_is_delivered_whatever_the_score_and_a_blacklisted_one_held(tmp_path):
    prefs = FakePreferences(lists={"carol@example.test": Kind.WHITE, "dave@example.test": Kind.BLACK})
    check, spamd = make(tmp_path, 50.0, prefs)
    judged = verdicts(check.check(message("sales@example.test", "dave@example.test", "erin@example.test")))
    assert judged["sales@example.test"].fate is Fate.ACCEPT
    assert judged["dave@example.test"].fate is Fate.QUARANTINE and judged["dave@example.test"].kind == "blacklisted"
    assert judged["erin@example.test"].fate is Fate.REJECT
    assert prefs.seen_senders[0] == ["m@spam.example", "mallory@spam.example"]
    assert spamd.users == ["erin@example.test"], "only erin's verdict needed a score: asked as erin"


def test_spamd_is_not_asked_when_every_recipient_listed_the_sender(tmp_path):
    check, spamd = make(tmp_path, 50.0, FakePreferences(lists={"carol@example.test": Kind.WHITE}))
    [verdict] = verdicts(check.check(message("carol@example.test"))).values()
    assert verdict.fate is Fate.ACCEPT and spamd.users == []


@pytest.mark.parametrize(("rcpts", "per_user", "user"), [
    (("sales@example.test", "carol+x@example.test"), True, "carol@example.test"),
    (("carol@example.test", "dave@example.test"), True, "mailwarden"),
    (("carol@example.test",), False, "mailwarden"),
    (("jürgen@example.test",), True, "mailwarden"),
])
def test_spamd_is_asked_as_the_one_mailbox_else_the_shared_user(tmp_path, rcpts, per_user, user):
    check, spamd = make(tmp_path, 1.0, per_user=per_user)
    check.check(message(*rcpts))
    assert spamd.users == [user]


def test_authenticated_submission_is_not_scored_by_default(tmp_path):
    check, spamd = make(tmp_path, 50.0)
    verdict = check.check(message("dave@example.test", auth="alice"))
    assert isinstance(verdict, Verdict) and verdict.fate is Fate.ACCEPT and spamd.users == []
    scored, spamd = make(tmp_path, 6.0, scan_submission=True)
    [tagged] = verdicts(scored.check(message("dave@example.test", auth="alice"))).values()
    assert tagged.fate is Fate.TAG and "tests=" not in dict(tagged.headers)["X-Spam-Status"], \
        "rule names went out with a submission"


def test_unreachable_spamd_is_retried_once_then_451_inbound(tmp_path):
    refused = SpamdError(Failure.UNREACHABLE, "cannot connect to 127.0.0.1:1: Connection refused")
    check, spamd = make(tmp_path, 6.0, errors=[refused])
    [verdict] = verdicts(check.check(message("dave@example.test"))).values()
    assert verdict.fate is Fate.TAG and len(spamd.users) == 2, "the retry was not made"
    check, spamd = make(tmp_path, 6.0, errors=[refused, refused])
    failed = check.check(message("dave@example.test"))
    assert isinstance(failed, Verdict) and failed.fate is Fate.TEMPFAIL and failed.reply is not None
    assert failed.reply.code == "451"


def test_a_timeout_is_not_retried_and_a_submission_passes_unscanned(tmp_path):
    slow = SpamdError(Failure.TIMEOUT, "127.0.0.1:783: no answer within 30.0s")
    check, spamd = make(tmp_path, 6.0, errors=[slow], scan_submission=True)
    verdict = check.check(message("dave@example.test", auth="alice"))
    assert isinstance(verdict, Verdict) and verdict.fate is Fate.ACCEPT and len(spamd.users) == 1
    assert dict(verdict.headers)["X-Spam-Status"] == "Unscanned (spamd timeout)"


def test_a_store_that_cannot_answer_leaves_the_configured_levels(tmp_path):
    check, _ = make(tmp_path, 9.0, FakePreferences(fail=True))
    [verdict] = verdicts(check.check(message("carol@example.test"))).values()
    assert verdict.fate is Fate.QUARANTINE


def test_a_message_above_max_size_is_sampled_not_skipped(tmp_path):
    check, spamd = make(tmp_path, 1.0, spamd={"max_size": "16KB"}, part_size="1KB")
    sent: list[bytes] = []
    spamd_check = spamd.check
    spamd.check = lambda data, user, timeout=None: (sent.append(data), spamd_check(io.BytesIO(data), user))[1]
    big = message("dave@example.test")
    big.spool.write(b"filler line\r\n" * 5000)
    [verdict] = verdicts(check.check(big)).values()
    assert len(sent[0]) <= 16 << 10 and sent[0].startswith(b"Received: ") and b"\r\nFrom: Mallory" in sent[0]
    assert dict(verdict.headers)["X-Spam-Scan"] == f"partial, {len(sent[0])} of {big.spool.size} bytes " \
        "(the start of each part)"


def test_levels_must_rise():
    with pytest.raises(ValueError, match="levels must rise"):
        SpamAssassinSettings.model_validate({"tag_level": 9, "hold_level": 8})


def test_the_shared_user_must_be_a_name_spamd_can_use():
    with pytest.raises(ValueError, match="cannot be a spamd user name"):
        SpamAssassinSettings.model_validate({"shared_user": "../etc"})


def test_spamd_sees_the_hop_postfix_is_receiving_as_postfix_writes_it(tmp_path):
    check, spamd = make(tmp_path, 1.0)
    check.check(message("dave@example.test"))
    head = spamd.sent[0].split(b"\r\nFrom: Mallory", 1)[0].decode()
    assert head.startswith("Received: from x (unknown [192.0.2.9])\r\n\tby mx.example.test (Postfix) with ESMTP "
                           "id 4Q1\r\n\tfor <dave@example.test>; "), head
    submitted, spamd = make(tmp_path, 1.0, scan_submission=True)
    submitted.check(message("dave@example.test", "erin@example.test", auth="alice"))
    assert b"with ESMTPA id 4Q1; " in spamd.sent[0], "an authenticated hop must read as one"


def test_no_hop_is_invented_for_a_message_whose_client_is_not_known(tmp_path):
    check, spamd = make(tmp_path, 1.0)
    unknown = message("dave@example.test")
    unknown.client_address = ""
    check.check(unknown)
    assert spamd.sent[0].startswith(b"From: Mallory")
