"""Our spamd client (milters/spamd_client.py) against a real spamd (tests/harness/spamd.py: a private one with
per-user Bayes), and its failures: spamd stopped, hung, refusing, or answering garbage."""

from __future__ import annotations

import io
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import pytest
from harness.spamd import SpamdInstance
from pydantic import ValidationError

from milters.spamd_client import (
    Failure,
    RuleHit,
    SpamdClient,
    SpamdError,
    SpamdSettings,
    check_user,
    message_head,
    parse_summary,
    spamd_address,
)
from milters.spool import Spool

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def message(body: str, subject: str = "Minutes of Tuesday's meeting", date: bool = True, **headers: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Carol Smith <carol@example.org>"
    msg["To"] = "alice@example.org"
    msg["Subject"] = subject
    if date:
        msg["Date"] = formatdate()
    msg["Message-ID"] = make_msgid(domain="example.org")
    for name, value in headers.items():
        msg[name] = value
    msg.set_content(body)
    return bytes(msg)


HAM = ("Hello Alice,\n\nattached are the minutes of Tuesday's meeting. We agreed to move the design review to\n"
       "Thursday afternoon, and Bob will book the small meeting room on the second floor.\n\nRegards,\nCarol\n")
SPAM = ("Dear friend,\n\nCHEAP MEDS ONLINE!!! Buy viagra cialis now at the lowest prices, no prescription needed.\n"
        "Order today and get 80% discount, free shipping worldwide. Limited time offer, act now!\n"
        "Click here: http://203.0.113.7/cheap-meds/order.php\n\nTo unsubscribe reply REMOVE.\n")


def client(address: str, **settings: object) -> SpamdClient:
    return SpamdClient(SpamdSettings(address=address, **settings))


@pytest.fixture(scope="module")
def spamd_tcp(spamd: SpamdInstance) -> Iterator[SpamdClient]:
    with client(spamd.tcp_address, timeout=20) as tcp:
        yield tcp


# --- against the real spamd ---

def test_gtube_is_spam_with_its_rule_and_score(spamd_tcp):
    gtube = message(f"test\n{GTUBE}\n", subject="gtube")
    report = spamd_tcp.check(gtube, user="gtube-user")
    assert report.score >= 1000 and report.is_spam
    assert report.threshold == 5.0  # SpamAssassin's default required_score: no user_prefs for this user
    assert RuleHit("GTUBE", 1000.0, "BODY: Generic Test for Unsolicited Bulk Email") in report.rules
    assert not report.partial and report.bytes_scanned == len(gtube)


def test_ham_scores_low_and_lists_the_rules_it_hit_with_their_scores(spamd_tcp):
    report = spamd_tcp.check(message(HAM, date=False), user="ham-user")  # no Date: MISSING_DATE, about 1.4
    assert not report.is_spam and report.score < 3
    names = report.rule_names
    assert "MISSING_DATE" in names and "GTUBE" not in names
    assert all(rule.score is not None and rule.description for rule in report.rules)
    # the summary's scores are the score's parts (each printed to one decimal)
    assert sum(rule.score or 0 for rule in report.rules) == pytest.approx(report.score, abs=0.05 * len(names) + 0.05)
    assert report.score > 0


def test_the_unix_socket_and_a_spooled_file(spamd):
    spool = Spool(memory_limit=256)  # on disk: the milter's spool of a larger message
    spool.write(message(f"{HAM}\n{GTUBE}\n"))
    try:
        assert spool.on_disk
        with client(spamd.unix_address) as unix:
            report = unix.check(spool.reader(), user="unix-user")
            assert report.is_spam and "GTUBE" in report.rule_names
            assert report.bytes_scanned == spool.size
            assert unix.ping() < 5
    finally:
        spool.close()


def test_a_users_preferences_apply_to_that_user_only(spamd, spamd_tcp):
    spamd.write_user_prefs("strict-user", "required_score 1.0\n")
    ham = message(HAM, date=False)
    strict = spamd_tcp.check(ham, user="strict-user")
    lenient = spamd_tcp.check(ham, user="lenient-user")
    assert strict.threshold == 1.0 and strict.is_spam
    assert lenient.threshold == 5.0 and not lenient.is_spam
    assert strict.score == lenient.score


def test_a_report_template_without_the_summary_table_still_gives_the_rule_names(spamd, spamd_tcp):
    spamd.write_user_prefs("own-template", "clear_report_template\nreport our own report: _SCORE_ points\n")
    report = spamd_tcp.check(message(GTUBE, subject="gtube"), user="own-template")
    assert report.is_spam and RuleHit("GTUBE", None) in report.rules  # by SYMBOLS: names, no scores


def test_tell_spam_trains_that_users_bayes_only(spamd, spamd_tcp):
    spam, ham = message(SPAM, subject="CHEAP MEDS 80% OFF"), message(HAM)
    assert spamd.bayes_counts("alice") is None and spamd.bayes_counts("bob") is None
    assert spamd_tcp.tell(spam, "alice", "spam") is True
    assert spamd.bayes_counts("alice") == (1, 0)  # (nspam, nham) as sa-learn reads alice's database
    assert spamd.bayes_counts("bob") is None
    assert spamd_tcp.tell(spam, "alice", "spam") is False  # already learned as spam: spamd says so
    assert spamd.bayes_counts("alice") == (1, 0)
    assert spamd_tcp.tell(ham, "alice", "ham") is True
    assert spamd.bayes_counts("alice") == (1, 1)
    assert spamd.bayes_counts("bob") is None
    # and spamd uses it: alice's Bayes now speaks about the spam, bob has none
    alice, bob = spamd_tcp.check(spam, "alice"), spamd_tcp.check(spam, "bob")
    assert any(name.startswith("BAYES_") for name in alice.rule_names), alice.rules
    assert not any(name.startswith("BAYES_") for name in bob.rule_names), bob.rules
    assert alice.score > bob.score


def test_a_message_above_max_size_is_sent_in_part(spamd):
    # GTUBE in a part of its own after 80 KB of text (SpamAssassin reads only the first 50 KB of each text
    # part, body_part_scan_size, so GTUBE at the end of one long part would go unseen whatever is sent)
    filler = "filler line of text\n" * 4000
    outer = EmailMessage()
    outer["From"], outer["To"], outer["Subject"] = "carol@example.org", "alice@example.org", "large"
    outer.set_content(filler)
    outer.add_attachment(f"{GTUBE}\n", filename="gtube.txt")
    large = bytes(outer)
    assert len(large) > 80_000
    with client(spamd.tcp_address, max_size="64KB") as small, client(spamd.tcp_address, max_size="1MB") as whole:
        cut = small.check(large, "large-user")
        assert cut.partial and cut.bytes_scanned <= 64 << 10 and not cut.is_spam
        full = whole.check(large, "large-user")
        assert not full.partial and full.bytes_scanned == len(large) and full.is_spam
        head_first = small.check(message(f"{GTUBE}\n" + filler * 2), "large-user")
        assert head_first.partial and head_first.is_spam  # what fits is scanned


def test_a_forked_child_gets_a_loop_of_its_own(spamd_tcp):
    spamd_tcp.ping()  # the parent's loop thread runs; a forked child has none
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        signal.alarm(30)
        try:
            os._exit(0 if spamd_tcp.check(message(GTUBE), "fork-user").is_spam else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert spamd_tcp.check(message(GTUBE), "fork-user").is_spam  # and the parent's still serves


def test_threads_share_one_client(spamd_tcp):
    messages = [message(f"{GTUBE}\n" if n % 2 else HAM, subject=f"n{n}") for n in range(12)]
    with ThreadPoolExecutor(6) as pool:
        reports = list(pool.map(lambda m: spamd_tcp.check(m, "thread-user"), messages))
    assert [report.is_spam for report in reports] == [bool(n % 2) for n in range(12)]


# --- failures: each is a SpamdError with its reason, within the time bound, and the client recovers ---

def test_stopped_spamd_is_unreachable_at_once_and_the_client_recovers(spamd, spamd_tcp):
    spam = message(SPAM, subject="restart")
    assert spamd_tcp.tell(spam, "restart-user", "spam") is True
    spamd.stop()
    try:
        started = time.monotonic()
        with pytest.raises(SpamdError) as error:
            spamd_tcp.check(message(HAM), "down-user", timeout=10)
        assert error.value.reason == Failure.UNREACHABLE
        assert "Connection refused" in str(error.value) and spamd.tcp_address in str(error.value)
        assert time.monotonic() - started < 1.0
        with pytest.raises(SpamdError) as error:
            spamd_tcp.ping(timeout=10)
        assert error.value.reason == Failure.UNREACHABLE
    finally:
        spamd.start()
    assert spamd_tcp.check(message(GTUBE), "down-user").is_spam  # the same port again
    assert spamd.bayes_counts("restart-user") == (1, 0)  # and the users' databases
    assert spamd_tcp.tell(spam, "restart-user", "spam") is False


def test_a_missing_unix_socket_is_unreachable():
    with client("unix:/nonexistent-mailwarden-test/spamd.sock") as missing, pytest.raises(SpamdError) as error:
        missing.ping(timeout=5)
    assert error.value.reason == Failure.UNREACHABLE and "No such file or directory" in str(error.value)


def test_hung_spamd_times_out_within_the_bound_and_the_client_recovers(spamd, spamd_tcp):
    spamd.pause()  # SIGSTOP: the kernel accepts the connection, nobody answers
    try:
        started = time.monotonic()
        with pytest.raises(SpamdError) as error:
            spamd_tcp.check(message(GTUBE), "hung-user", timeout=1.5)
        elapsed = time.monotonic() - started
        assert error.value.reason == Failure.TIMEOUT
        assert 1.4 < elapsed < 2.5
    finally:
        spamd.resume()
    assert spamd_tcp.check(message(GTUBE), "hung-user").is_spam


def test_tell_refused_by_a_spamd_without_allow_tell():
    with SpamdInstance(allow_tell=False) as no_tell, client(no_tell.tcp_address) as spamd_client:
        assert spamd_client.check(message(GTUBE), "refused-user").is_spam  # it scans
        with pytest.raises(SpamdError) as error:
            spamd_client.tell(message(SPAM), "refused-user", "spam")
        assert error.value.reason == Failure.REFUSED, error.value
        assert no_tell.bayes_counts("refused-user") is None


@contextmanager
def fake_spamd(answer: bytes) -> Iterator[str]:
    """A TCP server that reads one request and answers ``answer`` (b"": closes without a word)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                data += chunk
            conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()
        thread.join(10)


@pytest.mark.parametrize("answer", [
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",          # not spamd
    b"",                                                         # closed without a word
    b"SPAMD/1.1 0 EX_OK\r\nContent-length: 50\r\n\r\nshort",    # cut short
    b"SPAMD/1.1 0 EX_OK\r\nSpam: perhaps\r\n\r\n",               # a Spam header we cannot read
    b"SPAMD/1.1 0 EX_OK\r\nContent-length: 2\r\n\r\nok",        # no Spam header at all
], ids=["http", "nothing", "truncated", "bad-spam-header", "no-spam-header"])
def test_an_answer_we_cannot_read_is_a_protocol_error(answer):
    with fake_spamd(answer) as address, client(address) as spamd_client:
        with pytest.raises(SpamdError) as error:
            spamd_client.check(message(GTUBE), "garbage-user", timeout=5)
        assert error.value.reason == Failure.PROTOCOL, error.value


# --- without spamd ---

@pytest.mark.parametrize(("address", "parsed"), [
    ("127.0.0.1:783", ("127.0.0.1", 783)),
    ("inet:spamd.example.org:7830", ("spamd.example.org", 7830)),
    ("[::1]:783", ("::1", 783)),
    ("unix:/run/spamd.sock", "/run/spamd.sock"),
])
def test_addresses(address, parsed):
    assert spamd_address(address) == parsed
    assert SpamdSettings(address=address).address == address


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "unix:relative.sock", "::1:783",
                                     "inet:[::1]", ""])
def test_bad_addresses_are_config_errors(address):
    with pytest.raises(ValidationError, match="address"):
        SpamdSettings(address=address)


def test_settings_defaults_and_limits():
    settings = SpamdSettings()
    assert (settings.address, settings.timeout, settings.max_size) == ("127.0.0.1:783", 30.0, 1 << 20)
    assert SpamdSettings(timeout="500ms", max_size="2MB").max_size == 2 << 20
    with pytest.raises(ValidationError, match="max_size"):
        SpamdSettings(max_size="1KB")
    with pytest.raises(ValidationError, match="timeout"):
        SpamdSettings(timeout=0)
    with pytest.raises(ValidationError, match="not permitted"):  # pydantic: "Extra inputs are not permitted"
        SpamdSettings(adress="127.0.0.1:783")


@pytest.mark.parametrize("user", ["alice", "alice@example.org", "a.b+tag@example.org", "o'brien"])
def test_user_names_spamd_takes(user):
    assert check_user(user) == user


@pytest.mark.parametrize("user", ["", "../etc", "a/b", ".hidden", "a b", "alice\r\nSet: local", "jürgen", "x" * 256])
def test_user_names_refused_before_anything_is_sent(user):
    with pytest.raises(ValueError, match="spamd user name"):
        check_user(user)
    with client("127.0.0.1:1") as unreachable, pytest.raises(ValueError):
        unreachable.check(b"Subject: x\n\nx\n", user)  # ValueError, not SpamdError: nothing was sent


def test_message_head_cuts_at_a_line_end():
    text = b"Subject: x\n\n" + b"0123456789\n" * 10
    assert message_head(text, len(text)) == (text, False)
    head, partial = message_head(text, 40)
    assert partial and head == text[:34] and head.endswith(b"\n")
    assert message_head(io.BytesIO(text), 40) == (head, True)
    assert message_head(b"x" * 50, 40) == (b"x" * 40, True)  # no line end at all: cut where the limit is


GERMAN_REPORT = """\
Die Software zur Erkennung von "Spam" auf dem Rechner

    vm

hat die eingegangene E-mail als mögliche "Spam"-Nachricht identifiziert.

Vorschau:  1 FAKE_RULE  hidden in the preview [...]
---- ---------------------- --------------------------------------------------
   1 FAKE_TOO               the preview's own separator above is not the last

Inhaltsanalyse im Detail:   (1003.7 points, 5.0 required)

 Pkte Regel                 Beschreibung
---- ---------------------- --------------------------------------------------
 3.5 BAYES_99               BODY: Bayes-Spamwahrscheinlichkeit ist 99 bis 100%
                            [score: 1.0000]
 0.2 BAYES_999              BODY: Bayes-Spamwahrscheinlichkeit ist 99.9 bis
                            100%
                            [score: 1.0000]
-0.0 NO_RELAYS              Informational: message was not relayed via SMTP
1000 GTUBE                  BODY: Generic Test for Unsolicited Bulk Email
  10 LOCAL_BIG              a site's own rule
 -15 LOCAL_WELCOME          another one
"""


def test_the_summary_table_is_read_after_the_last_separator():
    assert parse_summary(GERMAN_REPORT) == (
        RuleHit("BAYES_99", 3.5, "BODY: Bayes-Spamwahrscheinlichkeit ist 99 bis 100%"),
        RuleHit("BAYES_999", 0.2, "BODY: Bayes-Spamwahrscheinlichkeit ist 99.9 bis 100%"),
        RuleHit("NO_RELAYS", -0.0, "Informational: message was not relayed via SMTP"),
        RuleHit("GTUBE", 1000.0, "BODY: Generic Test for Unsolicited Bulk Email"),
        RuleHit("LOCAL_BIG", 10.0, "a site's own rule"),
        RuleHit("LOCAL_WELCOME", -15.0, "another one"),
    )
    assert parse_summary("Spam: yes\nno table here\n") is None
    assert parse_summary("---- ---------------------- ----------------\n") == ()
