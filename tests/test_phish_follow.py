"""phishhook's log follower: Dovecot's and Postfix's login lines as Debian 12 writes them (Dovecot 2.3.19,
Postfix 3.7), through syslog files, Dovecot's own log file and the journal; the tail -F follower on real
files; journalctl run as a subprocess (a stand-in script here); the command's usage errors.

Where each format comes from (read in the projects' sources at those tags):
- Dovecot 2.3.19.1, src/login-common/login-settings.c: login_log_format = "%$: %s",
  login_log_format_elements = "user=<%u> method=%m rip=%r lip=%l mpid=%e %c session=<%{session}>" (empty
  elements left out, the rest joined with ", ");
  client-common-auth.c: client_destroy_success(client, "Login") -> "Login: user=<...>, ...";
  client-common.c client_disconnect(): e_info("Disconnected: %s", reason) with
  client_get_extra_disconnect_reason() appended: "(auth failed, %u attempts in %u secs)", "(user disabled)",
  "(no auth attempts in %u secs)", "(authorization failed, %u attempts in %u secs)", ...;
  the reasons: src/lib/iostream.c "Connection closed", client-common.h "Aborted login by logging out",
  client-common.c "Inactivity";
  src/lib/failures.c syslog_format(): no "Info: " before info lines in syslog; Dovecot's own log file has it.
- Dovecot 2.2.36: imap-login-client.c client_destroy(..., "Aborted login"), client-common.c "Disconnected".
- Postfix 3.7.11, src/smtpd/smtpd.c: msg_info("%s: client=%s%s%s...", queue_id, namaddr, ", sasl_method=",
  ..., ", sasl_username=", ..., ", sasl_sender=", ..., ", orig_queue_id=", ..., ", orig_client=", ...);
  smtpd.h SMTPD_BUILD_NAMADDRPORT: name[addr] (":port" with smtpd_client_port_logging);
  smtpd_sasl_glue.c: msg_warn("%s: SASL %.100s authentication failed: %s, sasl_username=%.100s", namaddr,
  method, reason, username or "(unavailable)") since 3.7.8 (3.7.0 to 3.7.7: no sasl_username);
  src/xsasl/xsasl_dovecot_server.c: "Connection lost to authentication server" (a temporary failure);
  msg_warn lines start "warning: ".
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import re
import signal
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from mailwarden.cli import CliContext
from phishhook.events import LoginEvent
from phishhook.follow import (
    MAX_ATTEMPTS,
    MAX_LINE,
    Delivered,
    FileFollower,
    FollowError,
    FollowSettings,
    _stop_on_sigterm,
    deliver,
    events_from_journal,
    events_from_lines,
    follow_command,
    journal_lines,
    parse_journal_entry,
    parse_line,
)

UTC = datetime.UTC


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime.datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


NOW = ts(2026, 12, 2, 6, 30, 0)
AT = ts(2026, 12, 2, 6, 19, 13)

# (line, expected events as (user, address, success, service, session), how many times each)
OK, FAIL = True, False
LINES: list[tuple[str, str, tuple[str, str, bool, str, str] | None, int]] = [
    # --- Dovecot 2.3 through syslog (rsyslog traditional stamp, then Debian 12's RFC 3339 default) ---
    ("dovecot imap success",
     "Dec  2 06:19:13 mail dovecot: imap-login: Login: user=<alice@example.org>, method=PLAIN, rip=203.0.113.5, "
     "lip=10.0.0.1, mpid=1234, TLS, session=<6NlQ5jMFKtfLcXIB>",
     ("alice@example.org", "203.0.113.5", OK, "imap", "6NlQ5jMFKtfLcXIB"), 1),
    ("dovecot pop3 success, rfc 3339",
     "2026-12-02T06:19:13.000000+00:00 mail dovecot: pop3-login: Login: user=<Alice>, method=PLAIN, "
     "rip=203.0.113.5, lip=10.0.0.1, mpid=1235, TLS, session=<a1b2>",
     ("alice", "203.0.113.5", OK, "pop3", "a1b2"), 1),
    ("dovecot submission success",
     "2026-12-02T06:19:13+00:00 mail dovecot: submission-login: Login: user=<bob>, method=LOGIN, "
     "rip=198.51.100.7, lip=10.0.0.1, mpid=9, TLS, session=<s>",
     ("bob", "198.51.100.7", OK, "submission", "s"), 1),
    ("dovecot managesieve success, secured, no session",
     "Dec  2 06:19:13 mail dovecot: managesieve-login: Login: user=<bob>, method=PLAIN, rip=198.51.100.7, "
     "lip=10.0.0.1, mpid=9, secured",
     ("bob", "198.51.100.7", OK, "managesieve", ""), 1),
    ("journalctl short output (pid, zero-padded day)",
     "Dec 02 06:19:13 mail dovecot[812]: imap-login: Login: user=<alice>, method=PLAIN, rip=203.0.113.5, "
     "lip=10.0.0.1, mpid=1234, TLS, session=<x>",
     ("alice", "203.0.113.5", OK, "imap", "x"), 1),
    ("dovecot IPv6",
     "Dec  2 06:19:13 mail dovecot: imap-login: Login: user=<alice>, method=PLAIN, rip=2001:db8::1, "
     "lip=2001:db8::25, mpid=77, TLS, session=<v6>",
     ("alice", "2001:db8::1", OK, "imap", "v6"), 1),
    ("dovecot IPv4-mapped IPv6",
     "Dec  2 06:19:13 mail dovecot: imap-login: Login: user=<alice>, method=PLAIN, rip=::ffff:203.0.113.5, "
     "lip=::ffff:10.0.0.1, mpid=77, TLS, session=<m>",
     ("alice", "203.0.113.5", OK, "imap", "m"), 1),
    # --- Dovecot 2.3 failures: "Disconnected: <reason> (auth failed, N attempts in S secs): ..." ---
    ("dovecot 2.3 connection closed, 3 attempts",
     "Dec  2 06:19:13 mail dovecot: imap-login: Disconnected: Connection closed (auth failed, 3 attempts in 12 "
     "secs): user=<alice>, method=PLAIN, rip=203.0.113.5, lip=10.0.0.1, TLS, session=<f3>",
     ("alice", "203.0.113.5", FAIL, "imap", "f3"), 3),
    ("dovecot 2.3 logged out",
     "Dec  2 06:19:13 mail dovecot: imap-login: Disconnected: Aborted login by logging out (auth failed, "
     "1 attempts in 2 secs): user=<alice>, method=PLAIN, rip=203.0.113.5, lip=10.0.0.1, TLS, session=<f1>",
     ("alice", "203.0.113.5", FAIL, "imap", "f1"), 1),
    ("dovecot 2.3 inactivity, pop3",
     "Dec  2 06:19:13 mail dovecot: pop3-login: Disconnected: Inactivity (auth failed, 2 attempts in 185 secs): "
     "user=<carol>, method=PLAIN, rip=203.0.113.9, lip=10.0.0.1, session=<p>",
     ("carol", "203.0.113.9", FAIL, "pop3", "p"), 2),
    ("dovecot 2.3 connection closed with an error",
     "Dec  2 06:19:13 mail dovecot: imap-login: Disconnected: Connection closed: read(size=1024) failed: "
     "Connection reset by peer (auth failed, 1 attempts in 4 secs): user=<alice>, method=PLAIN, "
     "rip=2001:db8::66, lip=2001:db8::25, TLS, session=<e>",
     ("alice", "2001:db8::66", FAIL, "imap", "e"), 1),
    # --- Dovecot 2.2 failures ---
    ("dovecot 2.2 aborted login",
     "Dec  2 06:19:13 mail dovecot: imap-login: Aborted login (auth failed, 1 attempts in 2 secs): user=<alice>, "
     "method=PLAIN, rip=203.0.113.5, lip=10.0.0.1, TLS, session=<a>",
     ("alice", "203.0.113.5", FAIL, "imap", "a"), 1),
    ("dovecot 2.2 disconnected, no method",
     "Dec  2 06:19:13 mail dovecot: pop3-login: Disconnected (auth failed, 4 attempts in 6 secs): user=<root>, "
     "rip=203.0.113.71, lip=10.0.0.1",
     ("root", "203.0.113.71", FAIL, "pop3", ""), 4),
    # --- Dovecot's own log file (log_path; "Info: ", no host, its own log_timestamp) ---
    ("dovecot log file, default stamp",
     "Dec 02 06:19:13 imap-login: Info: Login: user=<alice>, method=PLAIN, rip=203.0.113.5, lip=10.0.0.1, "
     "mpid=1, TLS, session=<lf>",
     ("alice", "203.0.113.5", OK, "imap", "lf"), 1),
    ("dovecot log file, %Y-%m-%d stamp, failure",
     "2026-12-02 06:19:13 imap-login: Info: Disconnected (auth failed, 1 attempts in 2 secs): user=<a.b>, "
     "method=DIGEST-MD5, rip=203.0.113.8, lip=10.0.0.1, TLS, session=<YJaq>",
     ("a.b", "203.0.113.8", FAIL, "imap", "YJaq"), 1),
    # --- Dovecot lines that are no login or no wrong password ---
    ("no auth attempts", "Dec  2 06:19:13 mail dovecot: imap-login: Disconnected: Connection closed (no auth "
     "attempts in 0 secs): user=<>, rip=203.0.113.5, lip=10.0.0.1, TLS, session=<n>", None, 0),
    ("user disabled", "Dec  2 06:19:13 mail dovecot: imap-login: Disconnected: Connection closed (user "
     "disabled): user=<alice>, method=PLAIN, rip=203.0.113.5, lip=10.0.0.1", None, 0),
    ("authorization failed", "Dec  2 06:19:13 mail dovecot: imap-login: Disconnected: Connection closed "
     "(authorization failed, 1 attempts in 2 secs): user=<alice>, method=PLAIN, rip=203.0.113.5, lip=10.0.0.1",
     None, 0),
    ("auth process trouble", "Dec  2 06:19:13 mail dovecot: imap-login: Disconnected: Connection closed (auth "
     "process communication failure): user=<alice>, method=PLAIN, rip=203.0.113.5, lip=10.0.0.1", None, 0),
    ("empty user", "Dec  2 06:19:13 mail dovecot: imap-login: Disconnected: Connection closed (auth failed, 1 "
     "attempts in 2 secs): user=<>, method=PLAIN, rip=203.0.113.5, lip=10.0.0.1", None, 0),
    ("no rip (local socket)", "Dec  2 06:19:13 mail dovecot: imap-login: Login: user=<alice>, method=PLAIN, "
     "mpid=5, secured, session=<l>", None, 0),
    ("logged out", "Dec  2 06:19:13 mail dovecot: imap(alice)<1234><6NlQ5jMF>: Logged out in=70 out=543", None, 0),
    ("auth process", "Dec  2 06:19:13 mail dovecot: auth: passwd-file(alice,203.0.113.5,<x>): Password mismatch",
     None, 0),
    ("proxy", "Dec  2 06:19:13 mail dovecot: imap-login: proxy(alice): started proxying to 10.0.0.2:143: "
     "user=<alice>, method=PLAIN, rip=203.0.113.5, lip=10.0.0.1", None, 0),
    # --- Postfix 3.7 smtpd ---
    ("postfix smtpd success",
     "Dec  2 06:19:13 mail postfix/smtpd[123]: 4F2A21234: client=host.example[203.0.113.5], sasl_method=PLAIN, "
     "sasl_username=alice",
     ("alice", "203.0.113.5", OK, "smtp", "4F2A21234"), 1),
    ("postfix submission, IPv6, rfc 3339",
     "2026-12-02T06:19:13.000000+00:00 mail postfix/submission/smtpd[4242]: 4bQ9kq2xY7z4Tc: "
     "client=unknown[2001:db8::1], sasl_method=LOGIN, sasl_username=alice@example.org",
     ("alice@example.org", "2001:db8::1", OK, "submission", "4bQ9kq2xY7z4Tc"), 1),
    ("postfix smtps, client port, sasl_sender and forwarded fields",
     "Dec  2 06:19:13 mail postfix/smtps/smtpd[9]: 9A1B2C3D: client=h.example[203.0.113.5]:54321, "
     "sasl_method=PLAIN, sasl_username=alice, sasl_sender=boss@example.org, orig_queue_id=ABC, "
     "orig_client=x[198.51.100.1]",
     ("alice", "203.0.113.5", OK, "smtps", "9A1B2C3D"), 1),
    ("postfix postmulti instance",
     "Dec  2 06:19:13 mail postfix-out/smtpd[9]: 9A1B2C3D: client=h.example[203.0.113.5], sasl_method=XCLIENT, "
     "sasl_username=alice",
     ("alice", "203.0.113.5", OK, "smtp", "9A1B2C3D"), 1),
    ("postfix failure 3.7.8+",
     "Dec  2 06:19:13 mail postfix/smtpd[123]: warning: unknown[203.0.113.5]: SASL LOGIN authentication failed: "
     "UGFzc3dvcmQ6, sasl_username=alice",
     ("alice", "203.0.113.5", FAIL, "smtp", ""), 1),
    ("postfix failure, cyrus, submission, IPv6",
     "Dec  2 06:19:13 mail postfix/submission/smtpd[7]: warning: unknown[2001:db8::bad]: SASL PLAIN "
     "authentication failed: authentication failure, sasl_username=Bob@Example.org",
     ("bob@example.org", "2001:db8::bad", FAIL, "submission", ""), 1),
    ("postfix failure, name unavailable", "Dec  2 06:19:13 mail postfix/smtpd[123]: warning: unknown[203.0.113.5]: "
     "SASL LOGIN authentication failed: UGFzc3dvcmQ6, sasl_username=(unavailable)", None, 0),
    ("postfix failure before 3.7.8 (no name)", "Dec  2 06:19:13 mail postfix/smtpd[123]: warning: "
     "unknown[203.0.113.5]: SASL LOGIN authentication failed: UGFzc3dvcmQ6", None, 0),
    ("postfix failure, auth server down", "Dec  2 06:19:13 mail postfix/smtpd[123]: warning: unknown[203.0.113.5]: "
     "SASL PLAIN authentication failed: Connection lost to authentication server, sasl_username=alice", None, 0),
    ("postfix client without sasl", "Dec  2 06:19:13 mail postfix/smtpd[123]: 4F2A21234: "
     "client=mx.example[198.51.100.3]", None, 0),
    ("postfix aborted", "Dec  2 06:19:13 mail postfix/smtpd[123]: warning: unknown[203.0.113.5]: SASL LOGIN "
     "authentication aborted", None, 0),
    ("postfix smtp client", "Dec  2 06:19:13 mail postfix/smtp[55]: 4F2A21234: to=<x@example.net>, "
     "relay=mx.example.net[198.51.100.2]:25, status=sent (250 ok)", None, 0),
    ("sshd", "Dec  2 06:19:13 mail sshd[1]: Accepted password for alice from 203.0.113.5 port 2222 ssh2", None, 0),
]


@pytest.mark.parametrize(("line", "expected", "count"), [row[1:] for row in LINES], ids=[row[0] for row in LINES])
def test_parse_line(line: str, expected: tuple[str, str, bool, str, str] | None, count: int) -> None:
    events = parse_line(line, NOW, UTC)
    if expected is None:
        assert events == []
        return
    user, address, success, service, session = expected
    assert events == [LoginEvent(user=user, address=address, at=AT, success=success, service=service, via="log",
                                 session=session)] * count


SYSLOG = re.compile(r"(?:\w{3} +\d+ [\d:]+|\d{4}-\S+) mail ([^\s\[]+)(?:\[\d+\])?: (.*)")
"""A table line's syslog identifier and message, as journald keeps them."""


@pytest.mark.parametrize("line", [row[1] for row in LINES if SYSLOG.fullmatch(row[1])], ids=lambda line: line[:60])
def test_a_journal_entry_is_read_as_its_line(line: str) -> None:
    """One parser: the same message through the journal gives what its syslog line gives (at the entry's time)."""
    match = SYSLOG.fullmatch(line)
    assert match is not None
    ident, message = match.groups()
    entry = {"SYSLOG_IDENTIFIER": ident, "MESSAGE": message, "__REALTIME_TIMESTAMP": str(int(AT * 1e6)),
             "_SYSTEMD_UNIT": "dovecot.service", "PRIORITY": "6"}
    assert parse_journal_entry(entry, NOW) == parse_line(line, NOW, UTC)
    as_bytes = dict(entry, MESSAGE=list(message.encode()))
    assert parse_journal_entry(as_bytes, NOW) == parse_line(line, NOW, UTC)


# --- hostile and odd input ---------------------------------------------------------------------------------

DOVECOT_LOGIN = ("Dec  2 06:19:13 mail dovecot: imap-login: Login: user=<{user}>, method=PLAIN, rip=203.0.113.5, "
                 "lip=10.0.0.1, mpid=1, TLS, session=<s>")
DOVECOT_FAIL = ("Dec  2 06:19:13 mail dovecot: imap-login: Disconnected: Connection closed (auth failed, 2 attempts "
                "in 4 secs): user=<{user}>, method=PLAIN, rip=203.0.113.5, lip=10.0.0.1, TLS, session=<s>")
POSTFIX_FAIL = ("Dec  2 06:19:13 mail postfix/smtpd[1]: warning: unknown[203.0.113.5]: SASL LOGIN authentication "
                "failed: UGFzc3dvcmQ6, sasl_username={user}")


@pytest.mark.parametrize(("template", "user"), [
    (DOVECOT_LOGIN, 'a b"c'),
    (DOVECOT_LOGIN, "x>, method=PLAIN, rip=8.8.8.8, lip=1.1.1.1, session=<evil>"),
    (DOVECOT_FAIL, "x>, method=PLAIN, rip=8.8.8.8"),
    (DOVECOT_FAIL, "x (auth failed, 100 attempts in 1 secs): user=<victim"),
    (POSTFIX_FAIL, "x, sasl_username=victim"),
    (POSTFIX_FAIL, "x dovecot: imap-login: Login: user=<victim>, method=PLAIN, rip=8.8.8.8"),
    (POSTFIX_FAIL, "ünïcødé@example.org"),
])
def test_a_chosen_login_name_cannot_move_the_address_or_the_count(template: str, user: str) -> None:
    """The login name is the client's choice: it is taken whole, as typed, and the address, the count and
    the kind of event stay what the server wrote."""
    events = parse_line(template.format(user=user), NOW, UTC)
    assert events, "the line is a login line"
    assert {event.user for event in events} == {user.lower()}
    assert {event.address for event in events} == {"203.0.113.5"}
    assert len(events) == (2 if template is DOVECOT_FAIL else 1)
    assert {event.success for event in events} == {template is DOVECOT_LOGIN}


@pytest.mark.parametrize("line", [
    "",
    "\n",
    ":",
    ": : :",
    "\x00\x01\x02",
    "dovecot:",
    "dovecot: imap-login:",
    "dovecot: imap-login: Login:",
    "dovecot: imap-login: Login: user=<",
    "dovecot: imap-login: Login: user=<alice",
    "dovecot: imap-login: Login: user=<alice>, rip=",
    "dovecot: imap-login: Login: user=<alice>, rip=not-an-address",
    "dovecot: imap-login: Login: user=<alice>, rip=999.1.1.1",
    "dovecot: imap-login: Login: user=<alice\x07>, rip=203.0.113.5",
    "dovecot: imap-login: Login: user=<" + "a" * 400 + ">, rip=203.0.113.5",
    "dovecot: imap-login: Login: user=<alice>, method=PLAIN, rip=203.0.113.5\nDec  2 06:19:13 x",
    "postfix/smtpd[1]: warning: unknown[]: SASL LOGIN authentication failed: x, sasl_username=alice",
    "postfix/smtpd[1]: warning: unknown[unknown]: SASL LOGIN authentication failed: x, sasl_username=alice",
    "postfix/smtpd[1]: NOQUEUE: client=unknown[203.0.113.5], sasl_method=PLAIN, sasl_username=",
    "Dec  2 06:19:13 mail dovecot: imap-login: Login: user=<alice>, method=PLAIN, rip=203.0.113.5"
    + ", x=" + "y" * MAX_LINE,
    "[[[[[[[[[[[[[[[[[: ]]]]",
    "dovecot: imap-login: Disconnected: x (auth failed, 1 attempts in 2 secs) (user disabled): user=<alice>, "
    "method=PLAIN, rip=203.0.113.5",
    "\ud800 dovecot: imap-login: Login: user=<\ud800>, rip=203.0.113.5",
])
def test_junk_gives_no_event(line: str) -> None:
    assert parse_line(line, NOW, UTC) == []


def test_odd_stamps_and_absurd_counts_do_not_raise() -> None:
    line = DOVECOT_LOGIN.format(user="alice")
    assert [e.at for e in parse_line("Dec 99 99:99:99" + line[15:], NOW, UTC)] == [NOW]
    assert [e.at for e in parse_line("9999-99-99T99:99:99+00:00" + line[15:], NOW, UTC)] == [NOW]
    assert [e.at for e in parse_line("0001-01-01T00:00:00+23:59" + line[15:], NOW, UTC)] == [
        datetime.datetime(1, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=23, minutes=59))).timestamp()]
    huge = DOVECOT_FAIL.replace("2 attempts", "999999999 attempts").format(user="alice")
    assert len(parse_line(huge, NOW, UTC)) == MAX_ATTEMPTS
    assert parse_line(DOVECOT_FAIL.replace("2 attempts", "0 attempts").format(user="alice"), NOW, UTC) == []
    assert parse_line(None, NOW) == []  # type: ignore[arg-type]


def test_mangled_lines_never_raise() -> None:
    """Every valid line cut at every place, and randomly mangled: an event or none, never an exception."""
    rng = random.Random(13)
    alphabet = "<>[](),:= \t\x00\xff\u2028abc0123456789.:"
    for _, line, _, _ in LINES:
        for cut in range(len(line)):
            parse_line(line[:cut], NOW, UTC)
        for _ in range(200):
            chars = list(line)
            for _ in range(rng.randint(1, 5)):
                chars[rng.randrange(len(chars))] = rng.choice(alphabet)
            parse_line("".join(chars), NOW, UTC)


def test_a_very_long_line_is_refused_quickly() -> None:
    line = DOVECOT_LOGIN.format(user="a" * 2_000_000)
    started = time.monotonic()
    assert parse_line(line, NOW, UTC) == []
    assert time.monotonic() - started < 0.5


# --- time stamps -------------------------------------------------------------------------------------------

LOGIN_MESSAGE = ("mail dovecot: imap-login: Login: user=<alice>, method=PLAIN, rip=203.0.113.5, lip=10.0.0.1, "
                 "mpid=1, TLS, session=<s>")


@pytest.mark.parametrize(("stamp", "now", "expected"), [
    ("Dec  2 06:19:13", NOW, AT),
    ("Dec 02 06:19:13", NOW, AT),
    ("Dec 31 23:59:59", ts(2027, 1, 1, 0, 0, 10), ts(2026, 12, 31, 23, 59, 59)),  # last year's, read after New Year
    ("Jan  1 00:00:05", ts(2027, 1, 1, 0, 0, 10), ts(2027, 1, 1, 0, 0, 5)),  # this year's, not last year's
    ("Jan  1 00:00:05", ts(2026, 12, 31, 23, 59, 59), ts(2026, 12, 31, 23, 59, 59)),  # ahead of now: now
    ("Feb 29 12:00:00", ts(2028, 3, 1), ts(2028, 2, 29, 12)),
    ("Feb 29 12:00:00", ts(2027, 3, 1), ts(2027, 3, 1)),  # nearest 29 February is ahead: now
    ("2026-12-02T06:19:13.123456+00:00", NOW, AT + 0.123456),
    ("2026-12-02T07:19:13+01:00", NOW, AT),
    ("2026-12-02T06:19:13Z", NOW, AT),
    ("2026-12-02 06:19:13", NOW, AT),  # no zone: tz
    ("2027-06-01T00:00:00+00:00", NOW, NOW),  # ahead of now: now
])
def test_time_stamps(stamp: str, now: float, expected: float) -> None:
    [event] = parse_line(f"{stamp} {LOGIN_MESSAGE}", now, UTC)
    assert event.at == pytest.approx(expected)


def test_a_stamp_without_zone_is_in_the_given_zone() -> None:
    zone = datetime.timezone(datetime.timedelta(hours=-5))
    [event] = parse_line(f"Dec  2 01:19:13 {LOGIN_MESSAGE}", NOW, zone)
    assert event.at == AT
    [event] = parse_line(f"2026-12-02 01:19:13 {LOGIN_MESSAGE}", NOW, zone)
    assert event.at == AT


def test_no_stamp_is_now() -> None:
    [event] = parse_line(LOGIN_MESSAGE.removeprefix("mail "), NOW, UTC)
    assert event.at == NOW


# --- the journal -------------------------------------------------------------------------------------------

JOURNAL_DOVECOT = {
    "__CURSOR": "s=0;i=1", "__REALTIME_TIMESTAMP": str(int(AT * 1_000_000)), "_SYSTEMD_UNIT": "dovecot.service",
    "SYSLOG_IDENTIFIER": "dovecot", "_PID": "812", "PRIORITY": "6", "SYSLOG_FACILITY": "2",
    "MESSAGE": "imap-login: Login: user=<alice>, method=PLAIN, rip=203.0.113.5, lip=10.0.0.1, mpid=1, TLS, "
               "session=<j>",
}
JOURNAL_POSTFIX = {
    "__REALTIME_TIMESTAMP": str(int(AT * 1_000_000) + 250_000), "_SYSTEMD_UNIT": "postfix@-.service",
    "SYSLOG_IDENTIFIER": "postfix/submission/smtpd", "SYSLOG_PID": "4242",
    "MESSAGE": "warning: unknown[2001:db8::1]: SASL LOGIN authentication failed: UGFzc3dvcmQ6, sasl_username=bob",
}


def test_journal_entries() -> None:
    assert parse_journal_entry(JOURNAL_DOVECOT, NOW) == [
        LoginEvent("alice", "203.0.113.5", AT, True, "imap", "log", "j")]
    assert parse_journal_entry(JOURNAL_POSTFIX, NOW) == [
        LoginEvent("bob", "2001:db8::1", AT + 0.25, False, "submission", "log", "")]


def test_a_journal_message_as_bytes() -> None:
    """journalctl -o json gives a field that is not UTF-8 as a list of byte values."""
    raw = JOURNAL_DOVECOT["MESSAGE"].replace("alice", "al\xefce").encode("latin-1")
    [event] = parse_journal_entry(dict(JOURNAL_DOVECOT, MESSAGE=list(raw)), NOW)
    assert event.user == "al\ufffdce"
    [event] = parse_journal_entry(dict(JOURNAL_DOVECOT, SYSLOG_IDENTIFIER=list(b"dovecot")), NOW)
    assert event.user == "alice"


@pytest.mark.parametrize(("change", "at"), [
    ({"__REALTIME_TIMESTAMP": None}, NOW),
    ({"__REALTIME_TIMESTAMP": "soon"}, NOW),
    ({"__REALTIME_TIMESTAMP": str(int(NOW * 1e6) + 10**9)}, NOW),  # ahead of now
    ({"__REALTIME_TIMESTAMP": "9" * 30}, NOW),
])
def test_journal_time_falls_back_to_now(change: dict[str, object], at: float) -> None:
    [event] = parse_journal_entry(dict(JOURNAL_DOVECOT, **change), NOW)
    assert event.at == at


@pytest.mark.parametrize("change", [
    {"MESSAGE": None},  # journalctl prints null for a field it will not show
    {"MESSAGE": ["one", "two"]},  # a field logged twice
    {"MESSAGE": [104, 300, 105]},
    {"MESSAGE": [104, -1]},
    {"MESSAGE": [1.5]},
    {"MESSAGE": list(b"x" * (MAX_LINE * 5))},
    {"MESSAGE": "x" * (MAX_LINE + 1)},
    {"MESSAGE": 42},
    {"SYSLOG_IDENTIFIER": None},
    {"SYSLOG_IDENTIFIER": "sshd"},
    {"SYSLOG_IDENTIFIER": "dovecot extra"},
    {"SYSLOG_IDENTIFIER": "dovecot: imap-login"},
])
def test_journal_junk(change: dict[str, object]) -> None:
    assert parse_journal_entry(dict(JOURNAL_DOVECOT, **change), NOW) == []


@pytest.mark.parametrize("entry", [None, [], "dovecot", 7, {}])
def test_journal_entries_that_are_no_entries(entry: object) -> None:
    assert parse_journal_entry(entry, NOW) == []  # type: ignore[arg-type]


@pytest.fixture
def fake_journalctl(tmp_path: Path) -> Callable[[list[bytes], bool], tuple[str, Path]]:
    """A stand-in for journalctl: records its arguments and pid, prints the given output lines, then exits 3
    (or, with ``hang``, waits for its end as journalctl -f does)."""

    def make(output: list[bytes], hang: bool) -> tuple[str, Path]:
        (tmp_path / "out.bin").write_bytes(b"".join(output))
        script = tmp_path / "journalctl"
        record = tmp_path / "record.json"
        script.write_text(f"""#!{sys.executable}
import json, os, sys, time
with open({str(record)!r}, "w") as f:
    json.dump({{"argv": sys.argv[1:], "pid": os.getpid()}}, f)
sys.stdout.buffer.write(open({str(tmp_path / "out.bin")!r}, "rb").read())
sys.stdout.flush()
if {hang!r}:
    time.sleep(3600)
sys.exit(3)
""")
        script.chmod(0o755)
        return str(script), record

    return make


def test_journal_lines_runs_journalctl_and_parses_its_json(fake_journalctl: Callable[..., tuple[str, Path]]) -> None:
    output = [json.dumps(JOURNAL_DOVECOT).encode() + b"\n", b"not json\n", b"[1, 2]\n",
              b'{"MESSAGE": "' + b"x" * 70_000 + b'"}\n', b"[" * 50_000 + b"\n",
              json.dumps(JOURNAL_POSTFIX).encode() + b"\n", b'{"partial": ']
    command, record = fake_journalctl(output, False)
    entries = []
    with pytest.raises(FollowError, match="status 3"):
        for entry in journal_lines(["dovecot", "postfix@-"], journalctl=command):
            entries.append(entry)
    assert entries == [JOURNAL_DOVECOT, JOURNAL_POSTFIX]
    assert json.loads(record.read_text())["argv"] == ["-f", "-o", "json", "-n", "0", "--unit=dovecot",
                                                     "--unit=postfix@-"]
    assert [e for entry in entries for e in parse_journal_entry(entry, NOW)] == (
        parse_journal_entry(JOURNAL_DOVECOT, NOW) + parse_journal_entry(JOURNAL_POSTFIX, NOW))


def test_closing_the_journal_stops_journalctl(fake_journalctl: Callable[..., tuple[str, Path]]) -> None:
    command, record = fake_journalctl([json.dumps(JOURNAL_DOVECOT).encode() + b"\n"], True)
    entries = journal_lines(["dovecot"], journalctl=command)
    assert next(entries) == JOURNAL_DOVECOT
    pid = json.loads(record.read_text())["pid"]
    os.kill(pid, 0)  # still running
    entries.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_journal_errors(tmp_path: Path) -> None:
    with pytest.raises(FollowError, match="cannot run"):
        next(journal_lines(["dovecot"], journalctl=str(tmp_path / "no-journalctl")))
    for unit in ["", "-evil", "two words", "a\nb"]:
        with pytest.raises(FollowError, match="not a systemd unit"):
            next(journal_lines([unit], journalctl=str(tmp_path / "no-journalctl")))


# --- the file follower -------------------------------------------------------------------------------------


def append(path: Path, text: str | bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(text.encode() if isinstance(text, str) else text)


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    path = tmp_path / "mail.log"
    path.write_text("old line 1\nold line 2\n")
    return path


def test_starts_at_the_end_and_reads_appended_lines(log_file: Path) -> None:
    follower = FileFollower([log_file])
    assert follower.poll() == []
    append(log_file, "new 1\nnew 2\r\n")
    assert follower.poll() == ["new 1", "new 2"]
    assert follower.poll() == []
    append(log_file, b"caf\xe9\n")
    assert follower.poll() == ["caf\ufffd"]
    follower.close()


def test_from_start(log_file: Path) -> None:
    assert FileFollower([log_file], from_start=True).poll() == ["old line 1", "old line 2"]


def test_an_incomplete_line_waits_for_its_end(log_file: Path) -> None:
    follower = FileFollower([log_file])
    append(log_file, "complete\nparti")
    assert follower.poll() == ["complete"]
    append(log_file, "al")
    assert follower.poll() == []
    append(log_file, " line\nnext")
    assert follower.poll() == ["partial line"]
    append(log_file, "\n")
    assert follower.poll() == ["next"]


def test_rotation_by_rename_and_create(log_file: Path) -> None:
    follower = FileFollower([log_file])
    append(log_file, "before\n")
    log_file.rename(log_file.with_suffix(".log.1"))
    append(log_file.with_suffix(".log.1"), "written to the old file after the rename\nunfinished")
    assert follower.poll() == ["before", "written to the old file after the rename"]  # no new file yet
    log_file.write_text("first of the new file\n")
    assert follower.poll() == ["unfinished", "first of the new file"]
    append(log_file, "second\n")
    assert follower.poll() == ["second"]


def test_truncation(log_file: Path) -> None:
    follower = FileFollower([log_file])
    append(log_file, "a\n")
    assert follower.poll() == ["a"]
    log_file.write_text("")  # copytruncate
    assert follower.poll() == []
    append(log_file, "after\n")
    assert follower.poll() == ["after"]


def test_truncated_and_refilled_shorter(log_file: Path) -> None:
    follower = FileFollower([log_file])
    log_file.write_text("x\n")
    assert follower.poll() == ["x"]


def test_a_file_that_appears_later_is_read_from_its_start(tmp_path: Path) -> None:
    path = tmp_path / "later.log"
    follower = FileFollower([path])
    assert follower.poll() == []
    path.write_text("one\ntwo\n")
    assert follower.poll() == ["one", "two"]


def test_several_files(tmp_path: Path, log_file: Path) -> None:
    other = tmp_path / "dovecot.log"
    other.write_text("")
    follower = FileFollower([log_file, other])
    append(other, "from dovecot\n")
    append(log_file, "from syslog\n")
    assert sorted(follower.poll()) == ["from dovecot", "from syslog"]


def test_an_overlong_line_is_skipped_with_bounded_memory(log_file: Path) -> None:
    follower = FileFollower([log_file], max_line=64)
    [tail] = follower.tails
    append(log_file, "short\n" + "x" * 50)
    assert follower.poll() == ["short"]
    for _ in range(20):
        append(log_file, "y" * 1000)
        assert follower.poll() == []
        assert len(tail.pending) <= 64
    append(log_file, "z" * 1000 + "\nafter\n" + "q" * 65 + "\n" + "w" * 64 + "\n")
    assert follower.poll() == ["after", "w" * 64]


def test_a_round_reads_a_bounded_amount(log_file: Path) -> None:
    follower = FileFollower([log_file], read_budget=10)
    lines = [f"line {n}" for n in range(50)]
    append(log_file, "".join(f"{line}\n" for line in lines))
    got: list[str] = []
    rounds = 0
    while len(got) < len(lines) and rounds < 1000:
        got += follower.poll()
        rounds += 1
    assert got == lines
    assert rounds > 20


def test_something_that_is_not_a_file(tmp_path: Path) -> None:
    follower = FileFollower([tmp_path])
    assert follower.poll() == []


def test_the_state_file_resumes_where_the_last_run_stopped(tmp_path: Path, log_file: Path) -> None:
    state = tmp_path / "state.json"
    follower = FileFollower([log_file], state_file=str(state))
    append(log_file, "seen\nhalf")
    assert follower.poll() == ["seen"]
    follower.close()
    append(log_file, " a line\nwhile away\n")
    follower = FileFollower([log_file], state_file=str(state))
    assert follower.poll() == ["half a line", "while away"]
    follower.close()
    # rotated while away: the file at the path is a newer one, read from its start
    log_file.rename(tmp_path / "mail.log.1")
    log_file.write_text("new file\n")
    follower = FileFollower([log_file], state_file=str(state))
    assert follower.poll() == ["new file"]
    follower.close()
    # truncated while away (the same file, shorter than the saved position)
    log_file.write_text("")
    append(log_file, "x\n")
    assert FileFollower([log_file], state_file=str(state)).poll() == ["x"]


@pytest.mark.parametrize("content", ["not json", "[]", '{"files": []}', '{"files": {"%s": {"offset": "x"}}}'])
def test_a_bad_state_file_means_the_end(tmp_path: Path, log_file: Path, content: str) -> None:
    state = tmp_path / "state.json"
    state.write_text(content.replace("%s", str(log_file)))
    follower = FileFollower([log_file], state_file=str(state))
    assert follower.poll() == []
    append(log_file, "new\n")
    assert follower.poll() == ["new"]


def test_the_lines_generator(tmp_path: Path, log_file: Path) -> None:
    """Each idle poll of the generator performs the next change to the files; the test waits only for the
    generator to yield (a bounded number of idle polls, no real sleep)."""
    state = tmp_path / "state.json"
    steps: list[Callable[[], object]] = [
        lambda: append(log_file, "a\n"),
        lambda: (log_file.rename(tmp_path / "mail.log.1"), log_file.write_text("b long\n")),
        lambda: log_file.write_text("c\n"),  # truncated and refilled shorter
        lambda: append(log_file, "par"),
        lambda: append(log_file, "tial\n"),
    ]
    idle: list[float] = []

    def sleep(seconds: float) -> None:
        idle.append(seconds)
        if steps:
            steps.pop(0)()

    follower = FileFollower([log_file], poll=0.25, state_file=str(state), sleep=sleep)
    assert list(follower.lines(stop=lambda: not steps and len(idle) > 7)) == ["a", "b long", "c", "partial"]
    assert set(idle) == {0.25}
    saved = json.loads(state.read_text())["files"][str(log_file)]
    assert saved["offset"] == log_file.stat().st_size and saved["inode"] == log_file.stat().st_ino


def test_waiting_on_the_generator(log_file: Path) -> None:
    idle = [0]
    follower = FileFollower([log_file], sleep=lambda _: idle.__setitem__(0, idle[0] + 1))
    lines = follower.lines(stop=lambda: idle[0] > 1000)
    append(log_file, "x\n")
    assert next(lines) == "x"
    append(log_file, "y\nz\n")
    assert [next(lines), next(lines)] == ["y", "z"]
    lines.close()
    assert follower.tails[0].file is None


# --- to the detector ---------------------------------------------------------------------------------------


class Down(Exception):
    pass


def test_deliver() -> None:
    ok = LoginEvent("alice", "203.0.113.5", AT, True, "imap", "log")
    failed = LoginEvent("bob", "203.0.113.6", AT, False, "smtp", "log")
    stale = LoginEvent("carol", "203.0.113.7", AT - 10_000, True, "imap", "log")
    broken = LoginEvent("dave", "203.0.113.8", AT, True, "imap", "log")
    logins: list[LoginEvent] = []
    failures: list[LoginEvent] = []

    def login(event: LoginEvent) -> None:
        if event.user == "dave":
            raise Down("redis down")
        logins.append(event)

    done = deliver([ok, failed, failed, stale, broken, ok], login, failures.append, lambda: AT - 100, (Down,))
    assert logins == [ok, ok] and failures == [failed, failed]
    assert done == Delivered(logins=2, failures=2, stale=1, errors=1, by_error={"Down": 1})
    with pytest.raises(Down):  # an error not named is no backend trouble: it is not hidden
        deliver([broken], login, failures.append, lambda: 0.0)


def test_from_a_file_to_the_detector(log_file: Path) -> None:
    follower = FileFollower([log_file])
    for _, line, _, _ in LINES:
        append(log_file, line + "\n")
    seen: list[LoginEvent] = []
    done = deliver(events_from_lines(follower.poll(), lambda: NOW, UTC), seen.append, seen.append, lambda: 0.0)
    expected = [e for _, line, _, _ in LINES for e in parse_line(line, NOW, UTC)]
    assert seen == expected
    assert done.logins == sum(e.success for e in expected) and done.failures == sum(not e.success for e in expected)
    assert done.failures == 3 + 1 + 2 + 1 + 1 + 4 + 1 + 1 + 1


def test_from_the_journal_to_the_detector() -> None:
    seen: list[LoginEvent] = []
    deliver(events_from_journal([JOURNAL_DOVECOT, {"MESSAGE": "junk"}, JOURNAL_POSTFIX], lambda: NOW),
            seen.append, seen.append, lambda: 0.0)
    assert [(e.user, e.success) for e in seen] == [("alice", True), ("bob", False)]


def test_sigterm_stops_the_command() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped, _stop_on_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between two bytecodes
            pass
    assert stopped.value.code == 0
    assert signal.getsignal(signal.SIGTERM) is previous


# --- the command's usage ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    ([], "give log FILEs or --journal"),
    (["--journal", "/tmp/x.log"], "give log FILEs or --journal"),
    (["--unit", "dovecot", "x.log"], "--unit goes with --journal"),
    (["--journal", "--state", "s.json"], "--state goes with FILEs"),
    (["--poll", "soon", "x.log"], "--poll"),
    (["--poll", "0", "x.log"], "--poll"),
])
def test_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(follow_command, args, obj=CliContext(config_path=None))
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_settings_defaults() -> None:
    settings = FollowSettings()
    assert settings.units == ["dovecot", "postfix@-"] and settings.poll == 1.0 and settings.state_file == ""
    assert FollowSettings(poll="500ms").poll == 0.5


# --- the command, with a stand-in detector (phishhook.cli's detector_for yields it) ---------------------------


class FakeDetector:
    """Records what it is given; after ``stop_after`` events it sends this process SIGTERM, as systemd would."""

    def __init__(self, stop_after: int) -> None:
        self.stop_after = stop_after
        self.events: list[LoginEvent] = []
        self.settings = types.SimpleNamespace(history=types.SimpleNamespace(ttl=90 * 86400.0))

    def now(self) -> float:
        return NOW

    def login(self, event: LoginEvent) -> None:
        assert event.success
        self._take(event)

    def failed_login(self, event: LoginEvent) -> None:
        assert not event.success
        self._take(event)

    def _take(self, event: LoginEvent) -> None:
        self.events.append(event)
        if len(self.events) == self.stop_after:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture
def run_follow(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[str], FakeDetector], Result]:
    """``mailwarden phish follow ARGS`` with ``detector``; a broken run ends after 20 s (SIGALRM), not never."""

    def run(args: list[str], detector: FakeDetector) -> Result:
        @contextlib.contextmanager
        def detector_for(ctx: CliContext) -> Iterator[FakeDetector]:
            yield detector

        monkeypatch.setitem(sys.modules, "phishhook.cli", types.SimpleNamespace(detector_for=detector_for))

        def too_long(signum: int, frame: object) -> None:
            raise TimeoutError("the command did not stop")

        previous = signal.signal(signal.SIGALRM, too_long)
        signal.alarm(20)
        try:
            return CliRunner().invoke(follow_command, args, obj=CliContext(config_path=None))
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)

    return run


def test_the_command_follows_files(tmp_path: Path, log_file: Path, run_follow: Callable[..., Result]) -> None:
    lines = [row[1] for row in LINES if row[2] is not None]
    append(log_file, "".join(f"{line}\n" for line in lines))
    stat = log_file.stat()
    state = tmp_path / "state.json"  # saved by an earlier run before these lines
    state.write_text(json.dumps({"files": {str(log_file): {"device": stat.st_dev, "inode": stat.st_ino,
                                                           "offset": len("old line 1\nold line 2\n")}}}))
    expected = [e for line in lines for e in parse_line(line, NOW)]
    detector = FakeDetector(stop_after=len(expected))
    result = run_follow(["--poll", "10ms", "--state", str(state), str(log_file)], detector)
    assert result.exit_code == 0, result.output
    assert detector.events == expected
    assert json.loads(state.read_text())["files"][str(log_file)]["offset"] == log_file.stat().st_size


def test_the_command_follows_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         fake_journalctl: Callable[..., tuple[str, Path]],
                                         run_follow: Callable[..., Result]) -> None:
    _, record = fake_journalctl([json.dumps(JOURNAL_DOVECOT).encode() + b"\n",
                                 json.dumps(JOURNAL_POSTFIX).encode() + b"\n"], True)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    detector = FakeDetector(stop_after=2)
    result = run_follow(["--journal", "--unit", "dovecot"], detector)
    assert result.exit_code == 0, result.output
    assert detector.events == parse_journal_entry(JOURNAL_DOVECOT, NOW) + parse_journal_entry(JOURNAL_POSTFIX, NOW)
    ran = json.loads(record.read_text())
    assert ran["argv"][-1] == "--unit=dovecot"
    with pytest.raises(ProcessLookupError):  # journalctl stopped with the command
        os.kill(ran["pid"], 0)


def test_the_command_when_journalctl_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          fake_journalctl: Callable[..., tuple[str, Path]],
                                          run_follow: Callable[..., Result]) -> None:
    fake_journalctl([json.dumps(JOURNAL_DOVECOT).encode() + b"\n"], False)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    detector = FakeDetector(stop_after=99)
    result = run_follow(["--journal"], detector)
    assert result.exit_code == 69
    assert "journalctl ended with status 3" in result.output
    assert len(detector.events) == 1
