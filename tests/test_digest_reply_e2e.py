"""Replies to digests through the real Postfix: the reply mailbox routed to ``mailwarden digest reply`` by the
pipe transport exactly as README.md's "Replies to digests" documents it (the harness copies the lines),
run by Postfix as an unprivileged user, with the SASL login and client address Postfix passes; the held
mail in the real store (SQLite and MariaDB); releases through the documented re-injection listener to the
sink; confirmations through the same listener; the handler's log lines read from the syslog socket it
writes to (pipe(8) discards what a successful command prints).

Replies are built as a mail client builds them from a digest (the line format of reply_parse's docstring,
tokens minted with the site's key): a ``mailto:`` button (the token in the address, the command in the
subject), a kept line, a typed command. Each abuse case is its own test and checks that nothing was
released, that nothing went to the forged address (the sink and Postfix's queue), and the security event
(log line and ``digest_event`` row)."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import email.utils
import functools
import io
import json
import os
import pwd
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import pytest
from conftest import MilterStack, need_postfix, text_message
from harness.net import free_port, wait_for, wait_port
from harness.policyd_proc import render_toml
from harness.postfix import PostfixInstance, documented_digest_reply
from harness.sink import Received, Sink
from test_e2e_spam import CHAIN, gtube, spam_settings

from mailwarden.paths import ROOT_ENV_VAR
from quarantine.digest.reply_parse import INSTRUCTIONS_BEGIN, INSTRUCTIONS_END, section_marker
from quarantine.digest.settings import Interval
from quarantine.digest.subscribers import events, interval_of
from quarantine.digest.tokens import Action, Tokens
from quarantine.models import State
from quarantine.store import HeldEnvelope, Hold, QuarantineSettings, QuarantineStore

pytestmark = pytest.mark.e2e

NULL_SENDER = ("", "<>")
"""The envelope sender of confirmations, as the sink records it."""
PIPE_USER = "nobody"
"""Postfix runs pipe commands as a user of the operator's choice, never root."""
SECRET = "k9Qv3xLr8ZpT2mW7yBn4cHs6dFj1gKa5eUo0iRt"
REPLY_MAILBOX = "quarantine@example.test"
ALICE, BOB = "alice@example.test", "bob@example.test"
CAROL, DAVE, ERIN = "carol@example.test", "dave@example.test", "erin@example.test"
RECIPIENTS = f"{ALICE}\n{BOB}\n{CAROL}\n{DAVE}\n{ERIN}\na.smith@example.test: {ALICE}\n"
"""The recipient sources: the mailboxes (each spamd test has its own: spamd is shared by the module) and an
alias of alice's."""


# -- the handler as Postfix runs it ----------------------------------------------------------------------


def pipe_python() -> list[str]:
    """How the pipe user runs this checkout's Python: this interpreter when that user may run it, else the
    system's of the same version with this environment's packages (a pyenv under /root is root's alone)."""
    probe = subprocess.run(["runuser", "-u", PIPE_USER, "--", sys.executable, "-c", "pass"], capture_output=True,
                           check=False)
    if probe.returncode == 0:
        return [sys.executable]
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if not os.access(system, os.X_OK):
        pytest.fail(f"{PIPE_USER} cannot run {sys.executable}, and there is no {system}")
    return [system]


def site_packages() -> list[str]:
    import pydantic

    return [str(Path(pydantic.__file__).parents[1])]


PACKAGES = ("mailwarden", "policyd", "milters", "quarantine", "phishhook")


@functools.cache
def pipe_pythonpath() -> str:
    """The PYTHONPATH the pipe user imports mailwarden from: this checkout and its packages where that user
    can read them; else (a checkout under a private home directory) a copy of both in a directory of the
    test run's own, made once per test process."""
    repo = Path(__file__).resolve().parents[1]
    paths = [str(repo), *site_packages()]
    probe = subprocess.run(["runuser", "-u", PIPE_USER, "--", "test", "-r", str(repo / "mailwarden" / "__init__.py"),
                            "-a", "-r", str(Path(paths[1]) / "pydantic" / "__init__.py")],
                           capture_output=True, check=False)
    if probe.returncode == 0:
        return ":".join(paths)
    copy = Path(tempfile.mkdtemp(prefix="mw-pipe-code-"))
    copy.chmod(0o755)
    for package in PACKAGES:
        if (repo / package).is_dir():
            shutil.copytree(repo / package, copy / "code" / package)
    shutil.copy(repo / "README.md", copy / "code" / "README.md")
    shutil.copytree(paths[1], copy / "site-packages", symlinks=True)
    subprocess.run(["chmod", "-R", "a+rX", str(copy)], check=True)
    atexit.register(shutil.rmtree, copy, ignore_errors=True)
    return f"{copy / 'code'}:{copy / 'site-packages'}"


class SyslogReceiver:
    """A unix datagram socket the handler's syslog handler writes to; lines kept for the test."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        path.chmod(0o666)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            with self.cond:
                self.lines.append(data.decode("utf-8", "replace"))
                self.cond.notify_all()

    def wait_for(self, *texts: str, timeout: float = 30.0) -> str:
        """The first line that has every one of ``texts``."""
        def found() -> str | None:
            return next((line for line in self.lines if all(text in line for text in texts)), None)

        with self.cond:
            if not self.cond.wait_for(found, timeout):
                raise TimeoutError(f"no log line with {texts}: {self.lines[-10:]}")
            line = found()
            assert line is not None
            return line

    def close(self) -> None:
        self.sock.close()


@dataclass
class ReplyEnv:
    """Everything a reply test needs: the directory the pipe user reaches, the settings, the store."""

    directory: Path
    settings: dict
    store: QuarantineStore
    tokens: Tokens
    syslog: SyslogReceiver
    sink: Sink
    postfix: PostfixInstance | None = None
    smtp_port: int = 0
    held: list[str] = field(default_factory=list)

    # -- held mail ---------------------------------------------------------------------------------------

    def hold(self, owner: str, subject: str, sender: str = "promo@shop.example", kind: str = "spam",
             body: str = "Buy now!\n", recipient: str | None = None) -> str:
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = sender, recipient or owner, subject
        message["Message-ID"] = email.utils.make_msgid(domain="shop.example")
        message.set_content(body)
        raw = message.as_bytes()
        envelope = HeldEnvelope("4Zq000", sender, "198.51.100.7", "", sender, subject, "",
                                datetime.datetime.now(datetime.UTC))
        check = "clamav" if kind == "virus" else "spamassassin"
        [public_id] = self.store.hold(io.BytesIO(raw), len(raw), envelope,
                                      [Hold(recipient or owner, owner, check, kind, "Eicar-Test-Signature"
                                            if kind == "virus" else "score 12.5")])
        return public_id

    def line(self, public_id: str, owner: str, action: Action = Action.RELEASE) -> str:
        """The digest's plain line of a held message, its release token at the end."""
        record = self.store.get(public_id)
        assert record is not None
        token = self.tokens.mint(action, owner, public_id)
        return (f"[{public_id[:6]}] {record.held_at:%Y-%m-%d %H:%M} {record.sender} \"{record.subject}\" "
                f"mailto:quarantine+{token}@example.test?subject={action.value.replace(' ', '%20')}%20{public_id[:6]}")

    def button(self, action: Action, owner: str, public_id: str | None = None, **mint: object) -> tuple[str, str]:
        """(recipient, subject) of a digest button: the token in the address, the command in the subject."""
        token = self.tokens.mint(action, owner, public_id, **mint)  # type: ignore[arg-type]
        return f"quarantine+{token}@example.test", f"{action.value} {public_id[:6]}" if public_id else action.value

    # -- sending replies ---------------------------------------------------------------------------------

    def reply(self, message: EmailMessage | bytes, recipient: str, sender: str, login: str | None = None,
              client: str = "192.0.2.10", status: str = "sent") -> str:
        """Submit the reply to Postfix (XCLIENT: the client address and the SASL login), wait until the pipe
        transport has run the handler for it with ``status`` (sent: exit 0; deferred: 75), return the queue
        id."""
        data = message if isinstance(message, bytes) else message.as_bytes()
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as conn:
            conn.ehlo("client.example")
            args = f"ADDR={client} NAME=unknown" + (f" LOGIN={login}" if login else "")
            assert conn.docmd("XCLIENT", args)[0] == 220
            conn.ehlo("client.example")
            assert conn.mail(sender)[0] == 250
            assert conn.rcpt(recipient)[0] == 250
            code, text = conn.data(data)
            assert code == 250, (code, text)
        match = re.search(rb"queued as ([0-9A-Za-z]+)", text)
        assert match is not None, text
        queue_id = match.group(1).decode()
        self.wait_delivery(queue_id, status)
        return queue_id

    def wait_delivery(self, queue_id: str, status: str = "sent") -> None:
        """Until the maillog shows the pipe's delivery attempt of ``queue_id`` with ``status``."""
        assert self.postfix is not None
        postfix = self.postfix
        pattern = re.compile(rf"{queue_id}: to=<[^>]*>.*relay=digestreply.*status={status}")
        wait_for(lambda: pattern.search(postfix.log_text()), timeout=60,
                 what=f"status={status} for {queue_id}: {postfix.log_text()[-1500:]}")

    def confirmations(self, to: str, count: int = 1) -> list[Received]:
        """The confirmations sent to ``to`` (null envelope sender), once ``count`` of them arrived."""
        def arrived() -> list[Received] | None:
            found = [m for m in self.sink.messages if to in m.rcpt_tos and m.mail_from in NULL_SENDER]
            return found if len(found) >= count else None

        with self.sink.cond:
            if not self.sink.cond.wait_for(arrived, 30):
                seen = [(m.mail_from, m.rcpt_tos, m.message["Subject"]) for m in self.sink.messages]
                raise TimeoutError(f"fewer than {count} confirmation(s) to {to}: the sink has {seen}")
            found = arrived()
            assert found is not None
            return found

    def nothing_queued(self) -> None:
        assert self.postfix is not None
        assert self.postfix.queue() == [], "mail left in Postfix's queue"


def new_reply(subject: str, body: str = "", sender: str = ALICE, message_id: str | None = None,
              from_header: str | None = None) -> EmailMessage:
    message = EmailMessage()
    message["From"] = from_header or sender
    message["To"] = REPLY_MAILBOX
    message["Subject"] = subject
    message["Message-ID"] = message_id or email.utils.make_msgid(domain="client.example")
    message["Date"] = email.utils.formatdate()
    message.set_content(body or "\n")
    return message


def reply_settings(directory: Path, database_url: str, reinject_port: int | None, **digest: object) -> dict:
    """The test's config; without ``reinject_port`` the milter stack fills in its listener."""
    recipients = directory / "recipients.map"
    recipients.write_text(RECIPIENTS)
    return {
        "quarantine": {"database_url": database_url, "message_dir": str(directory / "db" / "held"),
                       **({"reinject": f"127.0.0.1:{reinject_port}"} if reinject_port else {}),
                       "digest": {"from_address": "postmaster@example.test", "reply_mailbox": REPLY_MAILBOX,
                                  "token_keys": [{"id": "b", "secret": SECRET}], **digest}},
        "policyd": {"recipients": {"sources": ["file"], "file": {"paths": [str(recipients)]}}},
    }


def public_directory() -> Path:
    """A directory the pipe user reaches (pytest's tmp dirs are root's alone), with a db/ of its own for the
    SQLite catalogue and the message files (the store gives what it creates there to db/'s owner)."""
    directory = Path(tempfile.mkdtemp(prefix="mw-reply-"))
    directory.chmod(0o755)
    (directory / "db").mkdir()
    user = pwd.getpwnam(PIPE_USER)
    os.chown(directory / "db", user.pw_uid, user.pw_gid)
    return directory


def write_pipe_command(directory: Path, settings: dict) -> Path:
    """The command Postfix's pipe runs in the README's place of /opt/mailwarden/bin/mailwarden: this
    checkout's CLI with the test's config (logging to the test's syslog socket) and an empty system root."""
    config = directory / "mailwarden.toml"
    config.write_text(render_toml({**settings, "logging": {"destination": "syslog",
                                                          "syslog_socket": str(directory / "log.sock")}}))
    root = directory / "root"
    root.mkdir(exist_ok=True)
    path = pipe_pythonpath()
    command = directory / "mailwarden"
    python = " ".join(pipe_python())
    command.write_text(f"#!/bin/sh\nexec env PYTHONPATH={path} {ROOT_ENV_VAR}={root} {python} -m mailwarden.cli "
                       f"--config {config} \"$@\"\n")
    command.chmod(0o755)
    return command


SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
"""For tests whose point is how a reply is read or refused before the store is written: the same on both
databases, so MariaDB (its transitions, preferences and security events) is left to the others and to
test_digest_cycle, to keep the suite's time."""


@pytest.fixture(params=["sqlite", "mariadb"])
def database_url(request: pytest.FixtureRequest) -> Iterator[Callable[[Path], str]]:
    def url(directory: Path) -> str:
        if request.param == "sqlite":
            return f"sqlite:///{directory / 'db' / 'quarantine.sqlite'}"
        mariadb = request.getfixturevalue("mariadb")
        return str(mariadb.create_database("digest_reply", drop=True))

    yield url


@pytest.fixture
def reply_env_factory(sink: Sink, database_url: Callable[[Path], str]) -> Iterator[Callable[..., ReplyEnv]]:
    """A private Postfix with the reply transport and the re-injection listener (no milters: the replies'
    own path), the store migrated, the handler's syslog socket; ``digest`` settings on top of the test's."""
    need_postfix()
    cleanup: list[Callable[[], None]] = []

    def start(**digest: object) -> ReplyEnv:
        directory = public_directory()
        cleanup.append(lambda: shutil.rmtree(directory, ignore_errors=True))
        reinject_port = free_port()
        settings = reply_settings(directory, database_url(directory), reinject_port,
                                  **{"learn_on_release": False, "learn_on_delete": False, **digest})
        command = write_pipe_command(directory, settings)
        master, main = documented_digest_reply(directory, str(command), PIPE_USER, REPLY_MAILBOX)
        syslog = SyslogReceiver(directory / "log.sock")
        cleanup.append(syslog.close)
        store = QuarantineStore(QuarantineSettings.model_validate(settings["quarantine"]))
        cleanup.append(store.close)
        store.migrate()
        postfix_dir = Path(tempfile.mkdtemp(prefix="mw-postfix-"))
        postfix_dir.chmod(0o755)
        cleanup.append(lambda: shutil.rmtree(postfix_dir, ignore_errors=True))
        postfix = PostfixInstance(postfix_dir, free_port(), sink.port, None, reinject_port=reinject_port,
                                  extra_main_cf=main, extra_master_cf=master)
        cleanup.append(postfix.stop)
        postfix.start()
        wait_port(postfix.smtp_port)
        wait_port(reinject_port)
        assert store.settings.digest is not None
        return ReplyEnv(directory, settings, store, Tokens(store.settings.digest), syslog, sink, postfix,
                        postfix.smtp_port)

    yield start
    for step in reversed(cleanup):
        step()


@pytest.fixture
def reply_env(reply_env_factory: Callable[..., ReplyEnv]) -> ReplyEnv:
    return reply_env_factory()


def released(env: ReplyEnv, subject: str) -> list[Received]:
    return [m for m in env.sink.messages if m.message["Subject"] == subject and m.mail_from not in NULL_SENDER]


def assert_refused(env: ReplyEnv, public_id: str, reason: str, forged: tuple[str, ...] = ()) -> None:
    """Nothing released, nothing sent to ``forged``, Postfix's queue empty, the security event logged and
    stored."""
    record = env.store.get(public_id)
    assert record is not None and record.state is State.HELD
    assert [m for m in env.sink.messages if m.mail_from not in NULL_SENDER] == [], "a held message was released"
    for address in forged:
        assert [m for m in env.sink.messages if address in m.rcpt_tos] == [], f"mail sent to {address}"
    env.nothing_queued()
    line = env.syslog.wait_for("digest reply refused", f"reason={reason}")
    assert "security=yes" in line
    env.syslog.wait_for("event=decision service=digest stage=reply", f"reason={reason}")  # the core's event
    assert reason in [event.reason for event in events(env.store)]


# -- the owner's replies ---------------------------------------------------------------------------------


def test_a_button_releases_once_and_a_replay_changes_nothing(reply_env: ReplyEnv) -> None:
    env = reply_env
    public_id = env.hold(ALICE, "Your invoice")
    other = env.hold(ALICE, "Another one")
    recipient, subject = env.button(Action.RELEASE, ALICE, public_id)
    reply = new_reply(subject).as_bytes()  # a mailto: link with an empty body
    env.reply(reply, recipient, ALICE, login=ALICE)
    env.sink.wait_for_subjects("Your invoice")
    [arrived] = released(env, "Your invoice")
    assert arrived.rcpt_tos == (ALICE,) and arrived.mail_from == "promo@shop.example"
    [confirmation] = env.confirmations(ALICE)
    assert "Released" in confirmation.message.get_content() and confirmation.message["Auto-Submitted"] == "auto-replied"
    record = env.store.get(public_id)
    assert record is not None and record.state is State.RELEASED and record.state_by.startswith(ALICE)

    env.reply(reply, recipient, ALICE, login=ALICE)  # byte for byte
    env.reply(new_reply(subject), recipient, ALICE, login=ALICE)  # a new Message-ID
    assert len(released(env, "Your invoice")) == 1
    confirmations = env.confirmations(ALICE, 3)
    assert all("Already released" in m.message.get_content() for m in confirmations[1:])
    other_record = env.store.get(other)
    assert other_record is not None and other_record.state is State.HELD
    assert events(env.store) == [], "a replay by the owner is not a security event"
    decision = env.syslog.wait_for("event=decision service=digest stage=reply", "reason=done")
    assert f"recipient={ALICE}" in decision and "action=accept" in decision and "quarantine+" not in decision
    env.nothing_queued()


def test_typed_commands_with_the_reply_token_act_on_the_owners_messages(reply_env: ReplyEnv) -> None:
    env = reply_env
    keep, drop, look = (env.hold(ALICE, subject) for subject in ("Keep me", "Drop me", "Look at me"))
    recipient, _ = env.button(Action.REPLY, ALICE)
    body = f"DELETE {drop[:6]}\nRELEASE {keep[:6]}\nDIGEST WEEKLY\n\n> {env.line(look, ALICE)}\n"
    env.reply(new_reply("Re: Your quarantine digest", body), recipient, ALICE, login="a.smith@example.test")
    env.sink.wait_for_subjects("Keep me")
    [confirmation] = env.confirmations(ALICE)
    text = confirmation.message.get_content()
    assert "Deleted" in text and "Released" in text and "once a week" in text
    states = {public_id: env.store.get(public_id).state for public_id in (keep, drop, look)}  # type: ignore[union-attr]
    assert states == {keep: State.RELEASED, drop: State.DELETED, look: State.HELD}, "the quoted line counted"
    assert interval_of(env.store, ALICE, Interval.DAILY) is Interval.WEEKLY


def test_release_all_releases_the_owners_held_mail_but_viruses(reply_env: ReplyEnv) -> None:
    env = reply_env
    first, second = env.hold(ALICE, "First of all"), env.hold(ALICE, "Second of all")
    virus = env.hold(ALICE, "Infected", kind="virus")
    bobs = env.hold(BOB, "Not alice's")
    recipient, subject = env.button(Action.RELEASE_ALL, ALICE)
    env.reply(new_reply(subject), recipient, ALICE, login=ALICE)
    env.sink.wait_for_subjects("First of all", "Second of all")
    text = env.confirmations(ALICE)[0].message.get_content()
    assert "virus" in text and "only the mail administrators" in text
    states = {public_id: env.store.get(public_id).state  # type: ignore[union-attr]
              for public_id in (first, second, virus, bobs)}
    assert states == {first: State.RELEASED, second: State.RELEASED, virus: State.HELD, bobs: State.HELD}


def digest_text(env: ReplyEnv, owner: str, public_ids: list[str]) -> str:
    """The plain part of a digest as reply_parse's docstring describes it (instructions, a held section)."""
    return "\n".join([INSTRUCTIONS_BEGIN, "Reply to this mail. Keep the lines of the messages you want, or write",
                      "one command a line above the quote: RELEASE ab23cd, DELETE ab23cd ...", INSTRUCTIONS_END, "",
                      section_marker("held", len(public_ids)), *(env.line(p, owner) for p in public_ids)])


@SQLITE_ONLY
def test_replies_as_clients_write_them(reply_env: ReplyEnv) -> None:
    env = reply_env
    ids = [env.hold(ALICE, f"Held {n}") for n in range(1, 7)]
    recipient, _ = env.button(Action.REPLY, ALICE)
    # inline-quoted, keeping two of three lines (the third deleted), format=flowed client
    digest = digest_text(env, ALICE, ids[:3]).split("\n")
    kept = "\n".join("> " + line for line in digest if not line.startswith(f"[{ids[2][:6]}]"))
    inline = new_reply("Re: Your quarantine digest", f"On Tue, the quarantine wrote:\n{kept}\n")
    env.reply(inline, recipient, ALICE, login=ALICE)
    env.sink.wait_for_subjects("Held 1", "Held 2")
    # an HTML-only reply with a typed command above the quoted digest
    html = EmailMessage()
    html["From"], html["To"], html["Subject"] = ALICE, REPLY_MAILBOX, "Re: Your quarantine digest"
    quoted = "<br>".join(digest_text(env, ALICE, ids[3:]).split("\n"))
    html.set_content(f"<html><body><div>RELEASE {ids[3][:6]}</div><blockquote>{quoted}</blockquote></body></html>",
                     subtype="html")
    env.reply(html, recipient, ALICE, login=ALICE)
    env.sink.wait_for_subjects("Held 4")
    # German Outlook: AW:, ISO-8859-1, base64, top-posted above "Ursprüngliche Nachricht"
    outlook = EmailMessage()
    outlook["From"], outlook["To"], outlook["Subject"] = ALICE, REPLY_MAILBOX, "AW: Ihre Quarantäne-Übersicht"
    body = (f"RELEASE {ids[4][:6]}\n\nGrüße, Alice\n\n-----Ursprüngliche Nachricht-----\nVon: Quarantäne\n"
            f"Gesendet: Dienstag, 1. Dezember 2026 06:00\n\n{digest_text(env, ALICE, ids[3:])}\n")
    outlook.set_content(body.encode("iso-8859-1"), maintype="text", subtype="plain", cte="base64",
                        params={"charset": "iso-8859-1"})
    env.reply(outlook, recipient, ALICE, login=ALICE)
    env.sink.wait_for_subjects("Held 5")
    env.confirmations(ALICE, 3)
    states = [env.store.get(public_id).state for public_id in ids]  # type: ignore[union-attr]
    assert states == [State.RELEASED, State.RELEASED, State.HELD, State.RELEASED, State.RELEASED, State.HELD]
    assert all(len(released(env, f"Held {n}")) == 1 for n in (1, 2, 4, 5))


@SQLITE_ONLY
def test_preview_answers_with_text_and_no_live_link(reply_env: ReplyEnv) -> None:
    env = reply_env
    public_id = env.hold(ALICE, "Verify your account", sender="alerts@bank.example",
                         body="Log in now at https://bank.example.evil.example/login?id=7 or www.evil.example\n")
    recipient, subject = env.button(Action.PREVIEW, ALICE, public_id)
    env.reply(new_reply(subject), recipient, ALICE, login=ALICE)
    [confirmation] = env.confirmations(ALICE)
    text = confirmation.message.get_content()
    assert "hxxps://bank[.]example[.]evil[.]example/login?id=7" in text and "www[.]evil[.]example" in text
    assert not re.search(r"https?://|www\.evil", text), text
    assert confirmation.message.get_content_type() == "text/plain" and not confirmation.message.is_multipart()
    assert env.store.get(public_id).state is State.HELD  # type: ignore[union-attr]


@SQLITE_ONLY
def test_a_reply_with_no_command_gets_the_help_text(reply_env: ReplyEnv) -> None:
    env = reply_env
    public_id = env.hold(ALICE, "Only one")
    recipient, _ = env.button(Action.REPLY, ALICE)
    body = "Thanks!\n\n> ==== mailwarden held 1 ====\n> " + env.line(public_id, ALICE) + "\n"
    env.reply(new_reply("Re: Your quarantine digest", body), recipient, ALICE, login=ALICE)
    [answer] = env.confirmations(ALICE)
    assert "asked for nothing" in answer.message.get_content() and "RELEASE ab23cd" in answer.message.get_content()
    assert env.store.get(public_id).state is State.HELD  # type: ignore[union-attr]


@SQLITE_ONLY
def test_a_token_for_a_purged_message_says_so(reply_env: ReplyEnv) -> None:
    env = reply_env
    public_id = env.hold(ALICE, "Kept too long")
    recipient, subject = env.button(Action.RELEASE, ALICE, public_id)
    purged = env.store.purge(datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1))
    assert purged.expired == 1 and purged.raw_removed == 1
    env.reply(new_reply(subject), recipient, ALICE, login=ALICE)
    text = env.confirmations(ALICE)[0].message.get_content()
    assert "kept as long as the quarantine keeps mail" in text and "Released" not in text
    assert [m for m in env.sink.messages if m.mail_from not in NULL_SENDER] == []
    assert events(env.store) == []


@SQLITE_ONLY
def test_an_auto_reply_is_ignored_without_an_answer(reply_env: ReplyEnv) -> None:
    env = reply_env
    public_id = env.hold(ALICE, "Away")
    recipient, subject = env.button(Action.RELEASE, ALICE, public_id)
    message = new_reply(subject)
    message["Auto-Submitted"] = "auto-replied"
    env.reply(message, recipient, ALICE, login=ALICE)
    env.syslog.wait_for("digest reply ignored", "Auto-Submitted")
    assert env.sink.messages == [] and env.store.get(public_id).state is State.HELD  # type: ignore[union-attr]
    env.nothing_queued()


# -- abuse, each its own test ----------------------------------------------------------------------------


@SQLITE_ONLY
def test_another_local_user_forwarding_the_owners_line(reply_env: ReplyEnv) -> None:
    env = reply_env
    public_id = env.hold(ALICE, "Alice's mail")
    recipient, _ = env.button(Action.REPLY, BOB)  # bob's own digest's address
    body = "Could you release this one for me?\n\n" + env.line(public_id, ALICE) + "\n"
    env.reply(new_reply("Fwd: Your quarantine digest", body, sender=BOB), recipient, BOB, login=BOB)
    assert_refused(env, public_id, "wrong-owner", forged=(ALICE,))
    [answer] = env.confirmations(BOB)  # bob logged in as bob: he is told, in plain words
    assert "another mailbox" in answer.message.get_content()


@SQLITE_ONLY
def test_a_token_of_another_user(reply_env: ReplyEnv) -> None:
    env = reply_env
    bobs = env.hold(BOB, "Bob's mail")
    recipient, subject = env.button(Action.RELEASE, BOB, bobs)
    env.reply(new_reply(subject), recipient, ALICE, login=ALICE)
    assert_refused(env, bobs, "wrong-owner", forged=(BOB,))


@SQLITE_ONLY
def test_one_character_of_the_token_changed(reply_env: ReplyEnv) -> None:
    env = reply_env
    public_id = env.hold(ALICE, "Tampered")
    recipient, subject = env.button(Action.RELEASE, ALICE, public_id)
    local, domain = recipient.split("@")
    at = len(local) - 12  # inside the MAC
    changed = local[:at] + ("a" if local[at] != "a" else "b") + local[at + 1:]
    env.reply(new_reply(subject), f"{changed}@{domain}", ALICE, login=ALICE)
    assert_refused(env, public_id, "bad-mac")


@SQLITE_ONLY
def test_an_expired_token(reply_env: ReplyEnv) -> None:
    env = reply_env
    public_id = env.hold(ALICE, "Too late")
    old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=15)
    recipient, subject = env.button(Action.RELEASE, ALICE, public_id, now=old)
    env.reply(new_reply(subject), recipient, ALICE, login=ALICE)
    assert_refused(env, public_id, "expired")
    assert "expired" in env.confirmations(ALICE)[0].message.get_content()


@SQLITE_ONLY
def test_a_virus_is_for_admins_only(reply_env: ReplyEnv) -> None:
    """RELEASE, WHITELIST and PREVIEW of a virus-held message are refused; its owner may BLOCK its sender
    (and so delete it), which lets nothing of it out."""
    env = reply_env
    public_id = env.hold(ALICE, "Invoice attached", kind="virus")
    recipient, subject = env.button(Action.RELEASE, ALICE, public_id)
    env.reply(new_reply(subject), recipient, ALICE, login=ALICE)
    assert_refused(env, public_id, "admin-only")
    recipient, _ = env.button(Action.REPLY, ALICE)
    typed = f"WHITELIST {public_id[:6]}\nPREVIEW {public_id[:6]}\n"
    env.reply(new_reply("Re: Your quarantine digest", typed), recipient, ALICE, login=ALICE)
    refused = env.confirmations(ALICE, 2)[1].message.get_content()
    assert refused.count("only the mail administrators") == 2 and "Preview of" not in refused, refused
    assert [event.reason for event in events(env.store)] == ["admin-only"] * 3
    assert env.store.get(public_id).state is State.HELD  # type: ignore[union-attr]
    recipient, subject = env.button(Action.BLOCK, ALICE, public_id)
    env.reply(new_reply(subject), recipient, ALICE, login=ALICE)
    assert "now blocked for you" in env.confirmations(ALICE, 3)[2].message.get_content()
    assert env.store.get(public_id).state is State.DELETED  # type: ignore[union-attr]
    assert [m for m in env.sink.messages if m.mail_from not in NULL_SENDER] == []


@SQLITE_ONLY
def test_an_id_of_someone_elses_message(reply_env: ReplyEnv) -> None:
    env = reply_env
    bobs = env.hold(BOB, "Bob's secret")
    recipient, _ = env.button(Action.REPLY, ALICE)
    env.reply(new_reply("Re: Your quarantine digest", f"RELEASE {bobs[:6]}\n"), recipient, ALICE, login=ALICE)
    assert_refused(env, bobs, "foreign-id", forged=(BOB,))


@SQLITE_ONLY
def test_an_outside_sender_with_the_owners_address_and_a_valid_token(reply_env: ReplyEnv) -> None:
    env = reply_env
    public_id = env.hold(ALICE, "Forged from outside")
    recipient, subject = env.button(Action.RELEASE, ALICE, public_id)  # a stolen, valid token
    env.reply(new_reply(subject), recipient, ALICE, login=None, client="203.0.113.66")
    assert_refused(env, public_id, "not-authenticated", forged=(ALICE,))
    assert env.sink.messages == [], "no confirmation to a sender who did not log in"


@SQLITE_ONLY
def test_a_local_user_sending_as_the_owner(reply_env: ReplyEnv) -> None:
    env = reply_env
    public_id = env.hold(ALICE, "Bob pretends")
    recipient, subject = env.button(Action.RELEASE, ALICE, public_id)
    env.reply(new_reply(subject), recipient, ALICE, login=BOB)
    assert_refused(env, public_id, "forged-sender", forged=(ALICE, BOB))
    assert env.sink.messages == []


@SQLITE_ONLY
def test_a_display_name_spoof(reply_env: ReplyEnv) -> None:
    env = reply_env
    public_id = env.hold(ALICE, "Spoofed")
    recipient, subject = env.button(Action.RELEASE, ALICE, public_id)
    spoof = new_reply(subject, sender="attacker@evil.example", from_header=f'"{ALICE}" <attacker@evil.example>')
    env.reply(spoof, recipient, "attacker@evil.example", login=None, client="203.0.113.66")
    assert_refused(env, public_id, "not-an-owner", forged=("attacker@evil.example", ALICE))
    assert env.sink.messages == []


# -- through the milters and spamd: what the actions teach and change ------------------------------------


@contextlib.contextmanager
def reply_stack(milter_stack: Callable[..., MilterStack], sink: Sink, directory: Path, settings: dict
                ) -> Iterator[tuple[ReplyEnv, MilterStack]]:
    """The milter stack of ``settings`` (with the reply settings of ``directory``) and the reply transport as
    README documents it, run by the pipe user from ``directory``; the directory removed afterwards."""
    master, main = documented_digest_reply(directory, str(directory / "mailwarden"), PIPE_USER, REPLY_MAILBOX)
    syslog = SyslogReceiver(directory / "log.sock")
    try:
        stack = milter_stack(settings, milters=CHAIN, postfix_main_cf=main, postfix_master_cf=master)
        write_pipe_command(directory, settings)  # the stack filled in its re-injection listener
        store = QuarantineStore(QuarantineSettings.model_validate(settings["quarantine"]))
        digest = store.settings.digest
        assert digest is not None
        try:
            yield ReplyEnv(directory, settings, store, Tokens(digest), syslog, sink, stack.postfix,
                           stack.postfix.smtp_port), stack
        finally:
            store.close()
    finally:
        syslog.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def spam_reply_env(milter_stack: Callable[..., MilterStack], clamd, spamd, sink: Sink
                   ) -> Iterator[tuple[ReplyEnv, MilterStack]]:
    """The milter stack (ClamAV and SpamAssassin milters, clamd, spamd with per-user Bayes) with the reply
    transport; the spam preferences read without a cache, so a WHITELIST or BLOCK applies to the next mail."""
    directory = public_directory()
    settings = spam_settings(clamd, spamd, reject_level=5000, preferences_cache="0s")
    settings.update(reply_settings(directory, f"sqlite:///{directory / 'db' / 'quarantine.sqlite'}", None))
    with reply_stack(milter_stack, sink, directory, settings) as env:
        yield env


def held_for(env: ReplyEnv, stack: MilterStack, mailbox: str, subject: str) -> str:
    stack.milters["spamassassin"].wait_log(f"recipient={mailbox}")
    [record] = [r for r in env.store.find(mailbox=mailbox, state=State.HELD) if r.subject == subject]
    return record.public_id


def test_release_by_reply_teaches_bayes_ham(spam_reply_env: tuple[ReplyEnv, MilterStack], spamd) -> None:
    env, stack = spam_reply_env
    assert stack.send(gtube("rescued"), rcpts=(CAROL,)) is None
    public_id = held_for(env, stack, CAROL, "rescued")
    recipient, subject = env.button(Action.RELEASE, CAROL, public_id)
    env.reply(new_reply(subject, sender=CAROL), recipient, CAROL, login=CAROL)
    env.sink.wait_for_subjects("rescued")
    assert spamd.bayes_counts(CAROL) == (0, 1), "the released message was not learnt as ham"
    [confirmation] = env.confirmations(CAROL)
    assert "Released" in confirmation.message.get_content()
    assert "score" not in confirmation.message.get_content().lower()


def test_whitelist_delivers_the_next_one_and_block_holds_the_next_one(
        spam_reply_env: tuple[ReplyEnv, MilterStack]) -> None:
    env, stack = spam_reply_env
    assert stack.send(gtube("from a friend", sender="friend@partner.example"), rcpts=(DAVE,)) is None
    friend = held_for(env, stack, DAVE, "from a friend")
    recipient, subject = env.button(Action.WHITELIST, DAVE, friend)
    env.reply(new_reply(subject, sender=DAVE), recipient, DAVE, login=DAVE)
    env.sink.wait_for_subjects("from a friend")
    assert stack.send(gtube("from a friend again", sender="friend@partner.example"), rcpts=(DAVE,)) is None
    env.sink.wait_for_subjects("from a friend again")  # whitelisted: delivered whatever its score

    assert stack.send(gtube("bulk offer", sender="offers@bulk.example"), rcpts=(ERIN,)) is None
    bulk = held_for(env, stack, ERIN, "bulk offer")
    recipient, subject = env.button(Action.BLOCK, ERIN, bulk)
    env.reply(new_reply(subject, sender=ERIN), recipient, ERIN, login=ERIN)
    [confirmation] = env.confirmations(ERIN)
    assert "blocked" in confirmation.message.get_content()
    assert env.store.get(bulk).state is State.DELETED  # type: ignore[union-attr]
    assert stack.send(text_message("harmless text", sender="offers@bulk.example", to=ERIN),
                      rcpts=(ERIN,), sender="offers@bulk.example") is None
    stack.milters["spamassassin"].wait_log("kind=blacklisted")
    stack.marker()
    assert env.sink.with_subject("harmless text") == [], "a blocked sender's clean mail was delivered"
    [held] = [r for r in env.store.find(mailbox=ERIN, state=State.HELD)]
    assert held.subject == "harmless text" and held.kind == "blacklisted"


# -- exit codes: decided is 0, "try again" is 75 ---------------------------------------------------------


@SQLITE_ONLY
def test_a_store_that_cannot_be_opened_defers_and_the_retry_acts_once(reply_env: ReplyEnv) -> None:
    env = reply_env
    assert env.postfix is not None
    public_id = env.hold(ALICE, "After the outage")
    recipient, subject = env.button(Action.RELEASE, ALICE, public_id)
    catalogue = env.directory / "db" / "quarantine.sqlite"
    mode = catalogue.stat().st_mode
    catalogue.chmod(0)  # the pipe's user cannot open it: as when the database is down
    try:
        queue_id = env.reply(new_reply(subject), recipient, ALICE, login=ALICE, status="deferred")
        assert [item["queue_id"] for item in env.postfix.queue()] == [queue_id], "Postfix keeps the reply"
        env.syslog.wait_for("digest reply deferred")
    finally:
        catalogue.chmod(mode)
    env.postfix.flush()
    env.wait_delivery(queue_id)
    env.sink.wait_for_subjects("After the outage")
    assert len(released(env, "After the outage")) == 1
    assert len(env.confirmations(ALICE)) == 1
    env.nothing_queued()


def run_reply(config: Path, message: bytes, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), "digest", "reply",
                           *args], input=message.decode(), capture_output=True, text=True, timeout=60)


def test_the_exit_codes_postfix_acts_on(tmp_path: Path) -> None:
    """0 for a refused reply (a bounce would go to a forged sender) and an ignored one, 75 when the database
    cannot be reached for an owner's reply or the config is bad (Postfix keeps the reply and retries)."""
    unreachable = f"mysql+pymysql://root@127.0.0.1:{free_port()}/nothing"
    settings = reply_settings(tmp_path, unreachable, free_port())
    settings["quarantine"]["db_timeout"] = "1s"
    config = tmp_path / "mailwarden.toml"
    config.write_text(render_toml(settings))
    reply = new_reply("RELEASE ab23cd", sender="attacker@evil.example").as_bytes()
    common = ("--recipient", REPLY_MAILBOX, "--client", "203.0.113.66")
    outsider = run_reply(config, reply, "--sender", "attacker@evil.example", *common)
    # refused: decided without the database (its row could not be stored, its log line is written)
    assert outsider.returncode == 0, outsider.stderr
    assert "reason=not-an-owner" in outsider.stderr and "security event not stored" in outsider.stderr
    # a reply from an owner needs the database to act: tried again later
    owner = run_reply(config, new_reply("RELEASE ab23cd").as_bytes(), "--sender", ALICE, "--sasl-user", ALICE,
                      *common)
    assert owner.returncode == 75 and "deferred" in owner.stderr, owner.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[quarantine.digest]\nunknown_key = 1\n")
    assert run_reply(bad, reply, "--sender", ALICE, *common).returncode == 75
    null = run_reply(config, reply, "--sender", "", *common)
    assert null.returncode == 0 and "ignored" in null.stdout, (null.stdout, null.stderr)


def test_digest_events_lists_the_refusals(reply_env: ReplyEnv) -> None:
    env = reply_env
    public_id = env.hold(ALICE, "Listed")
    recipient, subject = env.button(Action.RELEASE, ALICE, public_id)
    env.reply(new_reply(subject, sender="attacker@evil.example"), recipient, "attacker@evil.example",
              client="203.0.113.66")
    env.reply(new_reply(subject), recipient, ALICE, login=BOB)
    config = env.directory / "mailwarden.toml"
    done = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), "digest", "events",
                           "--since", "1h", "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert [event["reason"] for event in listed["events"]] == ["forged-sender", "not-an-owner"]
    assert listed["counts"] == {"forged-sender": 1, "not-an-owner": 1}
    assert listed["events"][0]["sasl_user"] == BOB and listed["events"][1]["client_address"] == "203.0.113.66"


# -- settings: trusted networks ---------------------------------------------------------------------------


def test_a_trusted_network_needs_no_login_and_others_still_do(reply_env_factory: Callable[..., ReplyEnv]) -> None:
    env = reply_env_factory(trusted_networks=["192.0.2.0/28"])  # the webmail host
    from_webmail, from_elsewhere = env.hold(ALICE, "Via webmail"), env.hold(ALICE, "Via elsewhere")
    recipient, subject = env.button(Action.RELEASE, ALICE, from_webmail)
    env.reply(new_reply(subject), recipient, ALICE, client="192.0.2.10")
    env.sink.wait_for_subjects("Via webmail")
    env.confirmations(ALICE)
    recipient, subject = env.button(Action.RELEASE, ALICE, from_elsewhere)
    env.reply(new_reply(subject), recipient, ALICE, client="192.0.2.99")
    env.syslog.wait_for("digest reply refused", "reason=not-authenticated", "client=192.0.2.99")
    assert env.store.get(from_elsewhere).state is State.HELD  # type: ignore[union-attr]
    env.nothing_queued()  # anything the handler had sent would be in the queue or the sink by now
    assert len(env.confirmations(ALICE)) == 1
