"""The whole digest cycle through the real Postfix, the ClamAV and SpamAssassin milters, the real clamd and spamd
(per-user Bayes) and the real store (SQLite and MariaDB): GTUBE mail held for two users, ``mailwarden digest
send`` (the CLI) putting one digest per user in the sink, a rerun sending nothing, then replies BUILT FROM
THOSE DIGESTS as mail clients write them (a ``mailto:`` link with an empty body, an inline quote keeping two
of three lines, a top-posted command above the full quote, an HTML-only reply quoting the HTML part, a
base64 body, a German Outlook ``AW:`` in ISO-8859-1), each submitted through Postfix with the owner's SASL
login to the reply mailbox and handled by the documented pipe transport.

``test_digest_reply_e2e.py`` checks each rule with hand-built digest lines; here the point is that the real
digest round-trips: its ``mailto:`` links, its Reply-To, its text and HTML parts quoted back.

A third user shows the digest's second section and the virus rule: tagged mail (between her tag and hold
levels) listed as delivered and REPORTed (learnt as spam by spamd for her, the row reported, a second REPORT
changing nothing), and a virus-held message listed with Delete and Block only: PREVIEW of it refused as
``admin-only``, its Delete button deleting it.

One Postfix, one milter pair and one clamd per store (the expensive part); spamd is the module's, so each
store's users have names of their own. MariaDB runs a shorter variant (``Cycle.full``): the replies whose
point is only how they are read are left to the SQLite run."""

from __future__ import annotations

import base64
import re
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage

import pytest
from conftest import MilterStack, mailwarden, text_message
from harness.net import wait_for
from harness.sink import Received, Sink
from test_clamav import EICAR
from test_digest_reply_e2e import NULL_SENDER, REPLY_MAILBOX, ReplyEnv, public_directory, reply_settings, reply_stack
from test_e2e_spam import GTUBE, spam_settings

from quarantine.digest.subscribers import events
from quarantine.models import State
from quarantine.preferences import SpamPreferences
from quarantine.store import HeldRecord, QuarantineStore

pytestmark = pytest.mark.e2e

FRIEND, BULK = "friend@partner.example", "offers@bulk.example"


@dataclass
class Cycle:
    env: ReplyEnv
    stack: MilterStack
    alice: str
    bob: str
    tina: str
    """Tagged mail between her levels and a virus: the digest's second section and the virus rule."""
    full: bool
    """SQLite: every reply. MariaDB: those that read or change the store differently; the replies whose point
    is only how they are read (a top-posted command, Outlook's block with PREVIEW, the virus row's two) are
    left to the SQLite run, to keep the suite's time down."""

    @property
    def store(self) -> QuarantineStore:
        return self.env.store

    def send(self, subject: str, owner: str, sender: str = "sender@example.org", body: str = "") -> None:
        # a body of its own: Bayes takes two messages with the same body and Date for one (and Postfix dates
        # them to the second)
        message = text_message(subject, f"Hello,\n{GTUBE}\nAbout {subject}.\n{body}", sender=sender, to=owner)
        assert self.stack.send(message, rcpts=(owner,), sender=sender) is None

    def held(self, owner: str, count: int, state: State = State.HELD) -> dict[str, HeldRecord]:
        """The owner's rows in ``state`` by subject, once there are ``count`` of them (the milter writes them
        before Postfix's 250: this waits only for the store's readers)."""
        rows: dict[str, HeldRecord] = {}

        def enough() -> bool:
            rows.clear()
            rows.update({r.subject: r for r in self.store.find(mailbox=owner, state=state)})
            return len(rows) >= count

        wait_for(enough, timeout=30, what=f"{count} {state} row(s) of {owner}: {sorted(rows)}")
        return dict(rows)

    def state(self, public_id: str) -> State:
        record = self.store.get(public_id)
        assert record is not None
        return record.state

    def answers(self, owner: str, count: int) -> list[str]:
        """The texts of the handler's answers to ``owner`` (null sender, not a digest), once ``count`` came."""
        sink = self.env.sink

        def arrived() -> list[Received]:
            return [m for m in sink.messages if m.rcpt_tos == (owner,) and m.mail_from in NULL_SENDER
                    and not str(m.message["Subject"]).startswith("Quarantine digest")]

        with sink.cond:
            if not sink.cond.wait_for(lambda: len(arrived()) >= count, 30):
                raise TimeoutError(f"fewer than {count} answer(s) to {owner}: {len(arrived())}")
            return [m.message.get_content() for m in arrived()]

    def delivered(self, subject: str) -> list[Received]:
        """Copies of ``subject`` delivered (released or passed), not confirmations."""
        return [m for m in self.env.sink.with_subject(subject) if m.mail_from not in NULL_SENDER]


@pytest.fixture(params=["sqlite", "mariadb"])
def cycle(request: pytest.FixtureRequest, milter_stack: Callable[..., MilterStack], clamd, spamd, sink: Sink
          ) -> Iterator[Cycle]:
    """The milter stack with the ClamAV milter quarantining viruses, the SpamAssassin milter holding GTUBE
    (rejecting nothing), the reply transport as README documents it, the store on SQLite or MariaDB, and
    digests ``immediate`` (due at once, whatever the time of day)."""
    db = request.param
    alice, bob, tina = (f"{name}.{db}@example.test" for name in ("alice", "bob", "tina"))
    directory = public_directory()
    url = (f"sqlite:///{directory / 'db' / 'quarantine.sqlite'}" if db == "sqlite"
           else str(request.getfixturevalue("mariadb").create_database("digest_cycle", drop=True)))
    settings = spam_settings(clamd, spamd, reject_level=5000, preferences_cache="0s")
    settings["milters"]["clamav"]["virus"] = "quarantine"
    settings.update(reply_settings(directory, url, None, interval="immediate", immediate_every="1h"))
    (directory / "recipients.map").write_text(f"{alice}\n{bob}\n{tina}\n")
    with reply_stack(milter_stack, sink, directory, settings) as (env, stack):
        yield Cycle(env, stack, alice, bob, tina, full=db == "sqlite")


# -- reading the real digest -----------------------------------------------------------------------------


@dataclass
class Digest:
    received: Received

    @property
    def text(self) -> str:
        return self.received.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]

    @property
    def html(self) -> str:
        return self.received.message.get_body(("html",)).get_content()  # type: ignore[union-attr]

    @property
    def reply_to(self) -> str:
        return str(self.received.message["Reply-To"])

    @property
    def subject(self) -> str:
        return str(self.received.message["Subject"])

    def line(self, subject: str) -> str:
        """The text part's line of the message ``subject`` (subjects here have no spaces)."""
        [line] = [line for line in self.text.splitlines() if line.startswith("[") and f'"{subject}"' in line]
        return line

    def short_id(self, subject: str) -> str:
        match = re.match(r"\[([0-9a-z]+)\]", self.line(subject))
        assert match is not None
        return match.group(1)

    def buttons(self, subject: str) -> dict[str, str]:
        """The HTML row of ``subject``: its buttons' mailto links by command word."""
        rows = [row.split("</tr>", 1)[0] for row in self.html.split("<tr>")[1:]]
        [row] = [row for row in rows if f">{subject}<" in row]
        links = re.findall(r'href="(mailto:[^"]+)"', row)
        return {mailto(link.replace("&amp;", "&"))[1].split()[0]: link.replace("&amp;", "&") for link in links}


def mailto(url: str) -> tuple[str, str]:
    """(address, subject) of a digest's ``mailto:`` link, as a mail client opens it."""
    parsed = urllib.parse.urlsplit(url)
    assert parsed.scheme == "mailto", url
    [subject] = urllib.parse.parse_qs(parsed.query)["subject"]
    return urllib.parse.unquote(parsed.path), subject


def line_link(line: str) -> tuple[str, str]:
    match = re.search(r"(mailto:\S+)$", line)
    assert match is not None, line
    return mailto(match.group(1))


def reply_message(owner: str, subject: str, body: str = "\n") -> EmailMessage:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = owner, REPLY_MAILBOX, subject
    message.set_content(body)
    return message


def digests(sink: Sink) -> dict[str, list[Digest]]:
    found: dict[str, list[Digest]] = {}
    for received in sink.messages:
        if str(received.message["Subject"]).startswith("Quarantine digest"):
            found.setdefault(received.rcpt_tos[0], []).append(Digest(received))
    return found


# -- the cycle ---------------------------------------------------------------------------------------------


def test_the_real_digest_round_trips(cycle: Cycle, spamd) -> None:
    env, stack = cycle.env, cycle.stack
    alice, bob, tina = cycle.alice, cycle.bob, cycle.tina
    SpamPreferences(cycle.store).set_levels(tina, tag=5, hold=2000, reject=3000, by="test")
    for subject in ("alice-link", "alice-top", "alice-stays"):
        cycle.send(subject, alice)
    cycle.send("alice-html", alice, sender=FRIEND)
    cycle.send("alice-preview", alice, body="Log in now at https://bank.example.evil.example/login?id=7\n")
    for subject in ("bob-one", "bob-two"):
        cycle.send(subject, bob)
    cycle.send("bob-block", bob, sender=BULK)
    cycle.send("tina-tagged", tina)
    virus = text_message("tina-virus", "See the attachment.\n", to=tina)
    virus.add_attachment(EICAR, maintype="application", subtype="octet-stream", filename="invoice.txt")
    assert stack.send(virus, rcpts=(tina,)) is None
    stack.sink.wait_for_subjects("tina-tagged")
    held = {**cycle.held(alice, 5), **cycle.held(bob, 3), **cycle.held(tina, 1)}
    held.update(cycle.held(tina, 1, State.DELIVERED))
    assert held["tina-virus"].kind == "virus" and held["tina-tagged"].state is State.DELIVERED

    # digest send, the CLI: one digest per user, both parts; a rerun sends nothing new
    first = mailwarden(stack.milter, "digest", "send", "--json").stdout
    assert '"sent": 3' in first and '"failed": 0' in first, first
    rerun = mailwarden(stack.milter, "digest", "send", "--json").stdout
    assert '"sent": 0' in rerun and '"failed": 0' in rerun, rerun
    # not only the interval: asked to send alice's now, whatever her interval, there is nothing new for her
    forced = mailwarden(stack.milter, "digest", "send", "--owner", alice, "--json").stdout
    assert '"sent": 0' in forced and '"failed": 0' in forced, forced
    stack.marker("after the rerun")
    sent = digests(env.sink)
    assert sorted(sent) == sorted([alice, bob, tina]) and all(len(each) == 1 for each in sent.values()), sent
    for [digest] in sent.values():
        assert digest.received.mail_from in NULL_SENDER
        assert [p.get_content_type() for p in digest.received.message.iter_parts()] == ["text/plain", "text/html"]
    [alices], [bobs], [tinas] = sent[alice], sent[bob], sent[tina]

    # 1. alice opens the RELEASE link of a line: a mailto: with an empty body
    address, subject = line_link(alices.line("alice-link"))
    env.reply(reply_message(alice, subject), address, alice, login=alice)
    env.sink.wait_for_subjects("alice-link")

    # 2. bob replies inline-quoting his digest, keeping two of its three lines (the third deleted)
    dropped = bobs.line("bob-block")
    quoted = "\n".join(f"> {line}" if line else ">" for line in bobs.text.splitlines() if line != dropped)
    env.reply(reply_message(bob, f"Re: {bobs.subject}", f"On Tue, Mail quarantine wrote:\n{quoted}\n"),
              bobs.reply_to, bob, login=bob)
    env.sink.wait_for_subjects("bob-one", "bob-two")

    # 3. alice top-posts RELEASE <id> above the full quote (every line kept: the command wins)
    if cycle.full:
        full = "\n".join(f"> {line}" for line in alices.text.splitlines())
        top = reply_message(alice, f"Re: {alices.subject}", f"RELEASE {alices.short_id('alice-top')}\n\n{full}\n")
        env.reply(top, alices.reply_to, alice, login=alice)
        env.sink.wait_for_subjects("alice-top")

    # 4. alice answers in HTML only, WHITELIST typed above the quoted HTML part
    body = alices.html.split("<body", 1)[1].split(">", 1)[1].rsplit("</body>", 1)[0]
    html = EmailMessage()
    html["From"], html["To"], html["Subject"] = alice, REPLY_MAILBOX, f"Re: {alices.subject}"
    html.set_content(f"<html><body><div>WHITELIST {alices.short_id('alice-html')}</div><br>"
                     f"<blockquote type=\"cite\">{body}</blockquote></body></html>", subtype="html")
    env.reply(html, alices.reply_to, alice, login=alice)
    env.sink.wait_for_subjects("alice-html")

    # 5. bob's client sends base64: BLOCK above the quote
    text = f"BLOCK {bobs.short_id('bob-block')}\n\n" + "\n".join(f"> {line}" for line in bobs.text.splitlines())
    b64 = EmailMessage()
    b64["From"], b64["To"], b64["Subject"] = bob, REPLY_MAILBOX, f"Re: {bobs.subject}"
    b64.set_content(text.encode(), maintype="text", subtype="plain", cte="base64", params={"charset": "utf-8"})
    assert base64.b64encode(b"BLOCK ")[:6] in b64.as_bytes()
    env.reply(b64, bobs.reply_to, bob, login=bob)

    # 6. German Outlook: AW:, ISO-8859-1, PREVIEW above an unquoted "Ursprüngliche Nachricht" block
    if cycle.full:
        outlook = EmailMessage()
        outlook["From"], outlook["To"], outlook["Subject"] = alice, REPLY_MAILBOX, f"AW: {alices.subject}"
        german = (f"PREVIEW {alices.short_id('alice-preview')}\n\nViele Grüße\nAlice\n\n"
                  "-----Ursprüngliche Nachricht-----\nVon: Mail quarantine <postmaster@example.test>\n"
                  f"Gesendet: Dienstag, 1. Dezember 2026 06:00\nAn: {alice}\nBetreff: {alices.subject}\n\n"
                  f"{alices.text}")
        outlook.set_content(german.encode("iso-8859-1"), maintype="text", subtype="plain", cte="quoted-printable",
                            params={"charset": "iso-8859-1"})
        env.reply(outlook, alices.reply_to, alice, login=alice)

    # one confirmation a reply, only to the owner (they arrive in any order: Postfix queues them)
    texts = {owner: cycle.answers(owner, count) for owner, count in ((alice, 4 if cycle.full else 2), (bob, 2))}
    if cycle.full:
        [preview] = [text for text in texts[alice] if "Preview of" in text]
        assert "hxxps://bank[.]example[.]evil[.]example/login?id=7" in preview
        assert not re.search(r"https?://", preview), preview
    assert sum("is now blocked for you" in text for text in texts[bob]) == 1, texts[bob]

    # exactly the chosen messages reached their recipient, once; the rest are where the replies left them
    stack.marker("after the replies")
    chosen = {"alice-link", "alice-html", "bob-one", "bob-two", *(["alice-top"] if cycle.full else [])}
    for subject in (*chosen, "alice-top", "alice-stays", "alice-preview", "bob-block", "tina-virus"):
        copies = cycle.delivered(subject)
        assert len(copies) == (subject in chosen), (subject, len(copies))
        assert all(copy.rcpt_tos == (held[subject].recipient,) for copy in copies)
    states = {subject: cycle.state(record.public_id) for subject, record in held.items()}
    assert states == {"alice-top": State.HELD, **{subject: State.RELEASED for subject in chosen},
                      "alice-stays": State.HELD, "alice-preview": State.HELD, "bob-block": State.DELETED,
                      "tina-virus": State.HELD, "tina-tagged": State.DELIVERED}
    # spamd's own Bayes databases (sa-learn reads the files): released as ham, blocked as spam
    assert spamd.bayes_counts(alice) == (0, len(chosen) - 2)
    assert spamd.bayes_counts(bob) == (1, 2)

    # after WHITELIST the sender's next spam is delivered; after BLOCK the sender's next clean mail is held
    cycle.send("alice-after-whitelist", alice, sender=FRIEND)
    env.sink.wait_for_subjects("alice-after-whitelist")
    assert stack.send(text_message("bob-after-block", "Just a note.\n", sender=BULK, to=bob), rcpts=(bob,),
                      sender=BULK) is None
    after = cycle.held(bob, 1)
    assert after["bob-after-block"].kind == "blacklisted"
    assert events(cycle.store) == [], "the owners' own replies are no security events"

    report_from_the_digest(cycle, tinas, spamd)
    if cycle.full:
        virus_rows_allow_delete_and_block_only(cycle, tinas, held["tina-virus"], spamd)
    env.nothing_queued()


def report_from_the_digest(cycle: Cycle, tinas: Digest, spamd) -> None:
    """The tagged message is in the digest's delivered section; its REPORT link learns it as spam for tina and
    moves the row to reported; the same REPORT again changes nothing more."""
    env, tina = cycle.env, cycle.tina
    text = tinas.text
    delivered_at = text.index("==== mailwarden delivered 1 ====")
    assert text.index(tinas.line("tina-tagged")) > delivered_at
    address, subject = line_link(tinas.line("tina-tagged"))
    assert subject.startswith("REPORT ")
    assert set(tinas.buttons("tina-tagged")) == {"REPORT", "BLOCK"}
    [record] = cycle.store.find(mailbox=tina, state=State.DELIVERED)
    env.reply(reply_message(tina, subject), address, tina, login=tina)
    [confirmation] = cycle.answers(tina, 1)
    assert "Reported as spam" in confirmation
    assert spamd.bayes_counts(tina) == (1, 0), "the reported message was not learnt as spam for its owner"
    assert cycle.state(record.public_id) is State.REPORTED
    env.reply(reply_message(tina, subject), address, tina, login=tina)  # a second REPORT: a new Message-ID
    assert "Already reported" in cycle.answers(tina, 2)[1]
    assert spamd.bayes_counts(tina) == (1, 0) and cycle.state(record.public_id) is State.REPORTED


def virus_rows_allow_delete_and_block_only(cycle: Cycle, tinas: Digest, virus: HeldRecord, spamd) -> None:
    """The virus row has Delete and Block sender, nothing that releases or shows it; a PREVIEW typed for it
    is refused (admin-only, nothing sent of it), its Delete button deletes it (and teaches Bayes nothing)."""
    env, tina = cycle.env, cycle.tina
    line = tinas.line("tina-virus")
    assert "mailto:" not in line and "postmaster" in line
    buttons = tinas.buttons("tina-virus")
    assert set(buttons) == {"DELETE", "BLOCK"}, buttons
    env.reply(reply_message(tina, f"Re: {tinas.subject}", f"PREVIEW {tinas.short_id('tina-virus')}\n"),
              tinas.reply_to, tina, login=tina)
    refused = cycle.answers(tina, 3)[2]
    assert "only the mail administrators" in refused and "Preview of" not in refused
    env.syslog.wait_for("digest reply refused", "reason=admin-only")
    address, subject = mailto(buttons["DELETE"])
    env.reply(reply_message(tina, subject), address, tina, login=tina)
    assert "Deleted" in cycle.answers(tina, 4)[3]
    assert cycle.state(virus.public_id) is State.DELETED
    assert spamd.bayes_counts(tina) == (1, 0)
    assert cycle.delivered("tina-virus") == []
