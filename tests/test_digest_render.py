"""quarantine/digest/render.py: a digest as reply_parse reads it back. Each test renders a real digest and
feeds replies built from it (kept lines, a ``mailto:`` button, an HTML-only reply) through
``reply_parse.parse_reply``, then verifies the tokens the commands carry; hostile subjects, senders and
attachment names must not inject a marker, a digest line or a command, however a client re-wraps them."""

from __future__ import annotations

import datetime
import email
import email.policy
import re
import textwrap
import urllib.parse
from email.message import EmailMessage
from pathlib import Path

import pytest

from quarantine.digest import reply_parse
from quarantine.digest.render import Entry, Renderer, Section, neutral, short_ids
from quarantine.digest.reply_parse import Source, parse_reply
from quarantine.digest.settings import DigestSettings
from quarantine.digest.tokens import MESSAGE_TOKEN_LENGTH, Action, Tokens

NOW = datetime.datetime(2026, 12, 2, 5, 0, tzinfo=datetime.UTC)
OWNER = "alice@example.test"
SECRET = "q8Vv1yX0mJ3kZ7pR2sT5uW9bC4dE6fG8hI0jK2lM4nO6"
IDS = ["ab23cdefghijklmn", "ab23cdxfghijklmn", "cd34efghijklmnop", "ef56ghijklmnopqr"]
"""The first two share 6 characters: their short ids need 7."""
VIRUS = "vv77ghijklmnopqr"
DELIVERED = "gh72ijklmnopqrst"
HOSTILE_SUBJECTS = [
    "urgent\r\n==== mailwarden held 1 ====\r\n[aaaaaa] 2026 x mailto:quarantine+x@example.test",
    "==== end mailwarden instructions ==== RELEASE ALL",
    "RELEASE ALL DIGEST OFF DELETE ab23cd WHITELIST ab23cd",
    "[bbbbbb] \x1b[31mred\x07 \u202egnp.exe \u2028==== MailWarden delivered 9 ====",
]
TEXT_LINE = re.compile(
    r'^\[(?P<short>[a-z2-7]{6,16})\] \d{4}-\d\d-\d\d \d\d:\d\d <(?P<sender>[^\n]*)> "(?P<subject>[^"\n]*)" '
    r"\((?P<why>[^\n]*)\) mailto:quarantine\+(?P<token>[a-z2-7]+)@example\.test\?subject=(?P<verb>RELEASE|REPORT)"
    r"%20(?P=short)$")


def settings(**extra: object) -> DigestSettings:
    return DigestSettings(from_address="postmaster@example.test", reply_mailbox="quarantine@example.test",
                          token_keys=[{"id": "a", "secret": SECRET}], timezone="Europe/Berlin", **extra)


def entry(public_id: str, subject: str = "Your account is locked", kind: str = "spam",
          reason: str = "score 12.3 >= hold level 6", sender: str = "billing@bank.example.net") -> Entry:
    return Entry(public_id, NOW - datetime.timedelta(hours=1), sender, f"Bank <{sender}>", subject, "spamassassin",
                 kind, reason)


@pytest.fixture
def tokens() -> Tokens:
    return Tokens(settings(), now=lambda: NOW)


def render(tokens: Tokens, held: list[Entry], delivered: list[Entry] | None = None, total: int | None = None,
           **extra: object) -> EmailMessage:
    renderer = Renderer(settings(**extra), tokens)
    delivered = delivered or []
    return renderer.render(OWNER.upper(), Section(held, total or len(held)), Section(delivered, len(delivered)), NOW)


def standard(tokens: Tokens) -> EmailMessage:
    return render(tokens, [entry(IDS[0]), entry(IDS[1], "Parcel waiting"), entry(IDS[2], "50% off", "banned",
                                                                                   'part 2 name="x.exe" rule=exe'),
                           entry(VIRUS, "Invoice", "virus", "Eicar-Test-Signature")],
                  [entry(DELIVERED, "Winter offer", reason="score 4.1 >= tag level 3")])


def text_of(message: EmailMessage) -> str:
    part = message.get_body(("plain",))
    assert part is not None
    return part.get_content()


def html_of(message: EmailMessage) -> str:
    part = message.get_body(("html",))
    assert part is not None
    return part.get_content()


def reply(body: str, *, subject: str = "Re: Quarantine digest", to: str | None = None,
          ctype: str = "text/plain") -> bytes:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = OWNER, to or "quarantine@example.test", subject
    message.set_content(body, subtype=ctype.split("/")[1])
    return message.as_bytes()


def quoted(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in text.splitlines())


def verified(tokens: Tokens, command: reply_parse.Command) -> tuple[Action, str | None]:
    assert command.token is not None, command
    claim = tokens.verify(command.token, OWNER, command.action)
    return claim.action, claim.public_id


# -- the mail ----------------------------------------------------------------------------------------------

def test_the_mail_is_multipart_alternative_utf8_with_an_owner_reply_token(tokens: Tokens) -> None:
    message = standard(tokens)
    parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in parsed.iter_parts()] == ["text/plain", "text/html"]
    assert all(part.get_content_charset() == "utf-8" for part in parsed.iter_parts())
    assert parsed["From"] == "Mail quarantine <postmaster@example.test>"
    assert parsed["To"] == OWNER
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert parsed["Message-ID"].endswith("@example.test>") and parsed["Date"]
    local, _, domain = parsed["Reply-To"].addresses[0].addr_spec.partition("@")
    assert domain == "example.test" and local.startswith("quarantine+")
    assert tokens.verify(local.split("+", 1)[1], OWNER, Action.REPLY).owner == OWNER
    assert parsed["Subject"] == "Quarantine digest: 4 messages held, 1 delivered as suspected spam"


def test_no_remote_content_and_only_mailto_links(tokens: Tokens) -> None:
    html = html_of(render(tokens, [entry(IDS[0], '<img src="https://tracker.example/x.gif"> <script>x()</script>')]))
    assert "<img" not in html and "<script" not in html and "&lt;img" in html
    assert not re.search(r"<[^>]*\b(src|srcset|background|url)\s*[=(]", html)  # no tag loads anything
    assert not re.search(r"https?://", html.replace("https://tracker.example", ""))
    hrefs = re.findall(r'href="([^"]*)"', html)
    assert hrefs and all(href.startswith("mailto:quarantine+") for href in hrefs)


# -- the text part, line by line ---------------------------------------------------------------------------

def test_text_lines_are_exactly_what_reply_parse_reads(tokens: Tokens) -> None:
    text = text_of(standard(tokens))
    lines = text.splitlines()
    held_at = lines.index(reply_parse.section_marker("held", 4))
    delivered_at = lines.index(reply_parse.section_marker("delivered", 1))
    held = lines[held_at + 1:held_at + 5]
    assert [TEXT_LINE.match(line) is not None for line in held] == [True, True, True, False]
    shorts = [line[1:line.index("]")] for line in held]
    assert shorts == ["ab23cde", "ab23cdx", "cd34ef", "vv77gh"]  # the shortest unique prefixes, 6 at least
    for line, public_id in zip(held[:3], IDS[:3], strict=True):
        match = TEXT_LINE.match(line)
        assert match is not None and match.group("verb") == "RELEASE"
        assert len(match.group("token")) == MESSAGE_TOKEN_LENGTH
        assert tokens.verify(match.group("token"), OWNER, Action.RELEASE).public_id == public_id
    assert '<billing@bank.example.net> "Your\u00a0account\u00a0is\u00a0locked" (spam\u00a0score\u00a012.3)' in held[0]
    assert "(blocked\u00a0attachment:\u00a0x.exe)" in held[2]
    # a virus: listed, no release link, the postmaster named instead
    assert "mailto:" not in held[3] and "(virus:\u00a0Eicar-Test-Signature)" in held[3] and "postmaster" in held[3]
    delivered = TEXT_LINE.match(lines[delivered_at + 1])
    assert delivered is not None and delivered.group("verb") == "REPORT"
    assert tokens.verify(delivered.group("token"), OWNER, Action.REPORT).public_id == DELIVERED
    begin, end = lines.index(reply_parse.INSTRUCTIONS_BEGIN), lines.index(reply_parse.INSTRUCTIONS_END)
    assert delivered_at < begin < end
    owner_links = re.findall(r"mailto:quarantine\+([a-z2-7]+)@example\.test\?subject=([A-Z%0-9]+)",
                             "\n".join(lines[begin:end]))
    assert [(tokens.verify(token, OWNER).action, urllib.parse.unquote(verb)) for token, verb in owner_links] == [
        (action, action.value) for action in (Action.RELEASE_ALL, Action.DIGEST_DAILY, Action.DIGEST_WEEKLY,
                                              Action.DIGEST_IMMEDIATE, Action.DIGEST_OFF)]


def test_lines_outside_the_instructions_carry_no_command(tokens: Tokens) -> None:
    lines = reply_parse.split_lines(text_of(standard(tokens)))
    for line in lines:
        if line.zone is reply_parse.Zone.OWN and not re.match(r"\s*\[", line.text) \
                and not re.match(r"\s*=", line.text):
            assert reply_parse.parse_command(line.text) == [], line.text


def test_max_listed_cuts_each_section_and_counts_the_rest(tokens: Tokens) -> None:
    text = text_of(render(tokens, [entry(IDS[0]), entry(IDS[2])], total=14))
    assert reply_parse.section_marker("held", 2) in text.splitlines()
    assert "... and 12 more held messages, not listed" in text
    assert "delivered" not in text.split(reply_parse.INSTRUCTIONS_BEGIN)[0].split("Hello")[1].split("\n\n", 2)[2]


def test_short_ids_are_the_shortest_unique_prefixes() -> None:
    assert short_ids(["aaaaaaaaaaaaaaaa", "aaaaaaabaaaaaaaa", "bbbbbbbbbbbbbbbb"]) == {
        "aaaaaaaaaaaaaaaa": "aaaaaaaa", "aaaaaaabaaaaaaaa": "aaaaaaab", "bbbbbbbbbbbbbbbb": "bbbbbb"}
    assert short_ids(["abcdefghijklmnop"]) == {"abcdefghijklmnop": "abcdef"}


# -- replies built from the digest -------------------------------------------------------------------------

def test_a_reply_keeping_two_lines_releases_those_two(tokens: Tokens) -> None:
    text = text_of(standard(tokens))
    # the user deletes the lines of the messages not wanted (a section kept whole would count too)
    kept = "\n".join(line for line in text.splitlines() if not line.startswith(("[cd34ef]", "[gh72ij]")))
    parsed = parse_reply(reply(f"\nOn Wed, Mail quarantine wrote:\n{quoted(kept)}\n"))
    released = sorted(verified(tokens, command) for command in parsed.commands if command.token)
    assert released == [(Action.RELEASE, IDS[0]), (Action.RELEASE, IDS[1])]
    assert all(command.source is Source.KEPT_LINE for command in parsed.commands)
    # the virus line is kept too: a RELEASE without a token, which the reply handler refuses (admin only)
    assert [command.target for command in parsed.commands if command.token is None] == ["vv77gh"]


def test_a_reply_keeping_every_line_does_nothing(tokens: Tokens) -> None:
    parsed = parse_reply(reply(f"\nOn Wed, Mail quarantine wrote:\n{quoted(text_of(standard(tokens)))}\n"))
    assert parsed.commands == () and parsed.help


def test_every_mailto_button_is_a_command_with_its_token(tokens: Tokens) -> None:
    hrefs = re.findall(r'href="([^"]*)"', html_of(standard(tokens)))
    seen: set[tuple[Action, str | None]] = set()
    for href in hrefs:
        url = urllib.parse.urlsplit(href.replace("&amp;", "&"))
        address = url.path
        subject = urllib.parse.parse_qs(url.query)["subject"][0]
        parsed = parse_reply(reply("", subject=subject, to=address), recipient=address)
        assert parsed.commands, (href, parsed)
        actions = {verified(tokens, command) for command in parsed.commands}
        assert len(actions) == 1, (href, actions)
        seen |= actions
    virus = {action for action, public_id in seen if public_id == VIRUS}
    assert virus == {Action.DELETE, Action.BLOCK}  # no release, no whitelist, no preview
    assert {action for action, public_id in seen if public_id == IDS[0]} == {
        Action.RELEASE, Action.DELETE, Action.WHITELIST, Action.BLOCK, Action.PREVIEW}
    assert {action for action, public_id in seen if public_id == DELIVERED} == {Action.REPORT, Action.BLOCK}
    assert {action for action, public_id in seen if public_id is None} == {
        Action.RELEASE_ALL, Action.DIGEST_DAILY, Action.DIGEST_WEEKLY, Action.DIGEST_IMMEDIATE, Action.DIGEST_OFF}


def test_an_html_only_reply_quoting_the_html_part(tokens: Tokens) -> None:
    html = html_of(standard(tokens))
    body = html.split("<body", 1)[1].split(">", 1)[1].rsplit("</body>", 1)[0]
    # a command of its own above the quote: it wins, and finds its token in the quoted buttons
    parsed = parse_reply(reply(f"<div>DELETE cd34ef</div><blockquote type=\"cite\">{body}</blockquote>",
                               ctype="text/html"))
    assert [verified(tokens, command) for command in parsed.commands] == [(Action.DELETE, IDS[2])]
    # no command: the rows kept (one deleted from the quote) are released
    rows = re.findall(r"<tr>.*?</tr>", body, re.DOTALL)
    without = body.replace(rows[0], "").replace(rows[-1], "")  # the first held row, the delivered row
    parsed = parse_reply(reply(f"<div>ok</div><blockquote type=\"cite\">{without}</blockquote>", ctype="text/html"))
    released = sorted(verified(tokens, command) for command in parsed.commands if command.token)
    assert released == [(Action.RELEASE, IDS[1]), (Action.RELEASE, IDS[2])]


# -- hostile text ------------------------------------------------------------------------------------------

def hostile(tokens: Tokens) -> EmailMessage:
    held = [entry(public_id, subject, sender=sender, reason=f'part 1 name="{subject}" rule=exe', kind="banned")
            for public_id, subject, sender in zip(
                IDS, HOSTILE_SUBJECTS, ["RELEASE", "[cccccc]@x.test", "==== mailwarden held 2 ====", "x\ny@z"],
                strict=True)]
    return render(tokens, held)


@pytest.mark.parametrize("width", [None, 40, 72, 78])
def test_hostile_fields_inject_no_marker_line_or_command(tokens: Tokens, width: int | None) -> None:
    text = text_of(hostile(tokens))
    if width is not None:  # a client re-wraps the text (at ordinary spaces: not at no-break ones)
        text = "\n".join(textwrap.fill(line, width, break_long_words=False, break_on_hyphens=False) or line
                         for line in text.splitlines())
    lines = reply_parse.split_lines(text)
    markers = [line.text for line in lines if reply_parse._SECTION.match(line.text)
               or reply_parse._INSTRUCTIONS.match(line.text)]
    assert markers == [reply_parse.section_marker("held", 4), reply_parse.INSTRUCTIONS_BEGIN,
                       reply_parse.INSTRUCTIONS_END]
    shorts = [reply_parse._DIGEST_LINE.match(line.text) for line in lines]
    assert [match.group(1) for match in shorts if match] == ["ab23cde", "ab23cdx", "cd34ef", "ef56gh"]
    # the whole digest as a reply's own text (a client that does not quote): no command, nothing misread
    parsed = parse_reply(reply(text))
    assert parsed.commands == () and parsed.help
    assert not [note for note in parsed.notes if note.startswith("not understood")]
    # quoted, with one line removed: exactly that line's neighbours are released, nothing else
    kept = "\n".join(line for line in text.splitlines() if not line.startswith("[cd34ef]"))
    parsed = parse_reply(reply(f"\nOn Wed, Mail quarantine wrote:\n{quoted(kept)}\n"))
    assert sorted(command.target or "" for command in parsed.commands) == ["ab23cde", "ab23cdx", "ef56gh"]
    assert {command.action for command in parsed.commands} == {Action.RELEASE}


def test_hostile_fields_in_the_html_part(tokens: Tokens) -> None:
    html = html_of(hostile(tokens))
    text = reply_parse.html_to_text(html)
    lines = reply_parse.split_lines(text)
    assert [line.text for line in lines if reply_parse._SECTION.match(line.text)] == [
        reply_parse.section_marker("held", 4)]
    assert [m.group(1) for line in lines if (m := reply_parse._DIGEST_LINE.match(line.text))] == [
        "ab23cde", "ab23cdx", "cd34ef", "ef56gh"]
    assert "\x1b" not in html and "\x07" not in html and "\u202e" not in html
    # the whole HTML part as a reply's own text (forwarded inline, not quoted): nothing commands, all kept
    parsed = parse_reply(reply(html, ctype="text/html"))
    assert parsed.commands == () and parsed.help
    assert not [note for note in parsed.notes if note.startswith("not understood")]


def test_neutral_clips_and_defuses() -> None:
    assert neutral("a\r\nb\tc\x00d") == "a b c d"
    assert neutral("x" * 200) == "x" * 79 + "…"
    assert neutral('[ab23cd] "q"') == "(ab23cd) 'q'"
    assert "mailwarden" not in neutral("==== MailWarden held 1 ====").lower()


# -- templates ---------------------------------------------------------------------------------------------

def test_a_site_template_directory_overrides_the_shipped_templates(tokens: Tokens, tmp_path: Path) -> None:
    (tmp_path / "digest.txt.j2").write_text(
        "Site digest for {{ owner }}\n{{ held_marker }}\n{% for line in held %}[{{ line.short_id }}] "
        "{{ line.link.url if line.link else '' }}\n{% endfor %}")
    message = render(tokens, [entry(IDS[2])], templates=tmp_path)
    assert text_of(message).startswith(f"Site digest for {OWNER}\n")
    assert "Quarantine digest" in html_of(message)  # the shipped HTML template: not overridden
