"""quarantine/reply_parse.py: replies to a digest as mail clients write them, and the rules that pick the
commands (explicit beats kept lines, everything kept unchanged does nothing, instructions never count)."""

from __future__ import annotations

import base64
import datetime
import quopri
import time
from pathlib import Path

import pytest

from quarantine.digest import reply_parse
from quarantine.digest.reply_parse import Reply, Source, Zone, parse_reply, split_lines
from quarantine.digest.tokens import Action, Tokens, TokenSettings

T0 = datetime.datetime(2026, 12, 1, 6, 0, tzinfo=datetime.UTC)
OWNER = "alice@example.org"
MINTER = Tokens(TokenSettings(token_keys=[{"id": "a", "secret": "q8Vv1yX0mJ3kZ7pR2sT5uW9bC4dE6fG8hI0jK2lM4nO6"}]),
                now=lambda: T0)
IDS = ["ab23cdefghijklmn", "cd34efghijklmnop", "ef56ghijklmnopqr"]
SHORT = [public_id[:6] for public_id in IDS]
DELIVERED = "gh72ijklmnopqrst"
CORPUS = Path(__file__).parent / "fixtures" / "banned" / "mime-tricky"
"""The malformed-MIME corpus, copied into the tests (its SOURCE.md says from where, and the licences)."""
FIXTURES = Path(__file__).parent / "fixtures" / "replies"


def token(action: Action, public_id: str | None = None) -> str:
    return MINTER.mint(action, OWNER, public_id)


REPLY_TOKEN = token(Action.REPLY)
REPLY_TO = f"quarantine+{REPLY_TOKEN}@example.org"
SENDERS = ["billing@bank-secure.example.net", "promo@shop.example.com", "noreply@dhl-track.example.biz"]
SUBJECTS = ["Your account is locked", "50% off everything", "Parcel waiting: pay customs"]


def digest_line(index: int) -> str:
    link = f"mailto:quarantine+{token(Action.RELEASE, IDS[index])}@example.org?subject=RELEASE%20{SHORT[index]}"
    when = f"2026-12-01 0{index + 3}:14"
    return f"[{SHORT[index]}] {when} {SENDERS[index]} \"{SUBJECTS[index]}\" (score 1{index}.2) {link}"


def delivered_line() -> str:
    link = f"mailto:quarantine+{token(Action.REPORT, DELIVERED)}@example.org?subject=REPORT%20{DELIVERED[:6]}"
    return f"[{DELIVERED[:6]}] 2026-12-01 10:02 news@example.com \"Winter offer\" (score 4.1) {link}"


INSTRUCTIONS = [
    reply_parse.INSTRUCTIONS_BEGIN,
    "Reply to this mail and keep only the lines of the messages you want delivered, or write one",
    "command a line above the quote:",
    f"RELEASE {SHORT[0]}      deliver it to you",
    f"DELETE {SHORT[0]}       delete it now",
    f"WHITELIST {SHORT[0]}    deliver it, and always accept its sender",
    "RELEASE ALL         deliver every message listed",
    "DIGEST WEEKLY       one digest a week (DAILY, IMMEDIATE, OFF)",
    reply_parse.INSTRUCTIONS_END,
]


def digest_text(delivered: bool = False) -> list[str]:
    lines = ["Hello alice@example.org,", "", "3 messages were held for you since yesterday.", "", *INSTRUCTIONS, "",
             reply_parse.section_marker("held", 3), *[digest_line(index) for index in range(3)]]
    if delivered:
        lines += ["", reply_parse.section_marker("delivered", 1), delivered_line()]
    return [*lines, "", "-- ", "mailwarden at example.org"]


def quoted(lines: list[str]) -> list[str]:
    return [f"> {line}" if line else ">" for line in lines]


def digest_html(rows: list[int]) -> str:
    cells = []
    for index in rows:
        buttons = "".join(
            f'<td><a href="mailto:quarantine+{token(action, IDS[index])}@example.org?subject={action}%20'
            f'{SHORT[index]}" style="background:#2a6">{action.value.title()}</a></td>'
            for action in (Action.RELEASE, Action.DELETE, Action.WHITELIST, Action.BLOCK))
        cells.append(f"<tr><td>[{SHORT[index]}]</td><td>2026-12-01</td><td>{SENDERS[index]}</td>"
                     f"<td>{SUBJECTS[index]}</td>{buttons}</tr>")
    instructions = "<br>".join(INSTRUCTIONS)
    return (f'<div style="font-size:small;color:#666">{instructions}</div>'
            f"<p>{reply_parse.section_marker('held', 3)}</p><table>{''.join(cells)}</table>")


def mail(body: bytes | str, *, subject: str = f"Re: Quarantine: 3 messages held for {OWNER}",
         ctype: str = 'text/plain; charset="utf-8"', encoding: str = "7bit", headers: str = "") -> bytes:
    head = (f"From: Alice <{OWNER}>\r\nTo: {REPLY_TO}\r\nSubject: {subject}\r\n"
            "Date: Tue, 01 Dec 2026 08:12:45 +0100\r\nMessage-ID: <r1@mail.example.org>\r\nMIME-Version: 1.0\r\n"
            f"{headers}Content-Type: {ctype}\r\nContent-Transfer-Encoding: {encoding}\r\n\r\n")
    data = body.encode("utf-8") if isinstance(body, str) else body
    return head.encode("ascii") + data


def crlf(lines: list[str]) -> str:
    return "\r\n".join(lines) + "\r\n"


# -- the samples -----------------------------------------------------------------------------------------


def thunderbird_inline_two_of_three() -> bytes:
    """Thunderbird, format=flowed: the whole digest quoted, the user deleted the second line; Thunderbird
    had soft-wrapped the long first line of the quote (trailing space, continuation at the same depth)."""
    lines = digest_text()
    first = digest_line(0)
    cut = first.index(" mailto:")
    held = lines.index(digest_line(0))
    lines[held:held + 3] = [first[:cut + 1], first[cut + 1:], digest_line(2)]
    body = ["On 01/12/2026 07:00, Mailwarden wrote:", *quoted(lines), ""]
    return mail(crlf(body), ctype='text/plain; charset=UTF-8; format=flowed')


def gmail_top_posted() -> bytes:
    """Gmail: RELEASE typed above the full quote, the attribution wrapped over two lines, both parts."""
    plain = crlf([f"RELEASE {SHORT[1]}", "", "On Tue, Dec 1, 2026 at 7:00 AM Mailwarden <",
                  "quarantine@example.org> wrote:", "", *quoted(digest_text())])
    html = (f'<div dir="ltr">RELEASE {SHORT[1]}</div><br><div class="gmail_quote"><div dir="ltr" '
            'class="gmail_attr">On Tue, Dec 1, 2026 at 7:00 AM Mailwarden &lt;quarantine@example.org&gt; '
            f'wrote:<br></div><blockquote class="gmail_quote">{digest_html([0, 1, 2])}</blockquote></div>')
    body = crlf(["--000000000000a1b2c3", 'Content-Type: text/plain; charset="UTF-8"', "", plain,
                 "--000000000000a1b2c3", 'Content-Type: text/html; charset="UTF-8"',
                 "Content-Transfer-Encoding: quoted-printable", "",
                 quopri.encodestring(html.encode()).decode(), "--000000000000a1b2c3--"])
    return mail(body, ctype='multipart/alternative; boundary="000000000000a1b2c3"')


def apple_mail_html_only(command: str = "") -> bytes:
    """Apple Mail (iOS), HTML only: the quote in <blockquote type="cite">; without a command, the user
    removed the second row of the quoted table."""
    own = f"<div>{command}</div>" if command else "<div><br></div>"
    html = (f'<html><head><meta http-equiv="content-type" content="text/html; charset=utf-8"><style>p{{}}</style>'
            f'</head><body dir="auto">{own}<div><br></div><div dir="ltr">Sent from my iPhone</div>'
            '<div dir="ltr"><br><blockquote type="cite">On 1 Dec 2026, at 07:00, Mailwarden '
            '&lt;quarantine@example.org&gt; wrote:<br><br></blockquote></div>'
            f'<blockquote type="cite"><div dir="ltr">{digest_html([0, 2] if not command else [0, 1, 2])}</div>'
            "</blockquote></body></html>")
    return mail(quopri.encodestring(html.encode()), ctype="text/html; charset=utf-8",
                encoding="quoted-printable")


def outlook_german(separator: bool = True) -> bytes:
    """Outlook (German), ISO-8859-1 quoted-printable, AW:, the original unquoted below the separator (or,
    newer Outlook, below a line of underscores and the Von:/Gesendet: block); a line of an earlier
    confirmation in the original must not count."""
    head = ["-----Ursprüngliche Nachricht-----"] if separator else ["________________________________"]
    body = [f"RELEASE {SHORT[2]}", "", "Mit freundlichen Grüßen", "Jürgen Müller", "", *head,
            "Von: Mailwarden <quarantine@example.org>", "Gesendet: Dienstag, 1. Dezember 2026 07:00",
            f"An: {OWNER}", "Betreff: Quarantäne: 3 Nachrichten", "", f"DELETE {SHORT[0]}: gelöscht", "",
            *digest_text()]
    return mail(quopri.encodestring(crlf(body).encode("iso-8859-1")),
                subject="=?iso-8859-1?Q?AW:_Quarant=E4ne:_3_Nachrichten?=",
                ctype='text/plain; charset="iso-8859-1"', encoding="quoted-printable")


def base64_body() -> bytes:
    text = crlf([f"WHITELIST {SHORT[0]}", "", "Le 1 déc. 2026 à 07:00, Mailwarden a écrit :", *quoted(digest_text())])
    return mail(base64.encodebytes(text.encode("utf-8")), encoding="base64")


def mailto_empty() -> bytes:
    """A mailto: button: To is quarantine+<release token>@, the subject RELEASE <short id>, no body."""
    release = token(Action.RELEASE, IDS[1])
    return mail(b"", subject=f"RELEASE {SHORT[1]}").replace(REPLY_TO.encode(),
                                                             f"quarantine+{release}@example.org".encode())


def everything_unchanged() -> bytes:
    body = crlf(["On 01/12/2026 07:00, Mailwarden wrote:", *quoted(digest_text(delivered=True))])
    return mail(body)


def instructions_only() -> bytes:
    """The user deleted the lines and kept only the quoted instructions, which hold example commands."""
    body = crlf(["Thanks!", "", "On 01/12/2026 07:00, Mailwarden wrote:", *quoted(INSTRUCTIONS)])
    return mail(body)


def flowed_delsp() -> bytes:
    body = crlf([f"RELEASE {SHORT[0]}  ", f"{SHORT[2]}", "", *quoted(digest_text())])
    return mail(body, ctype="text/plain; charset=utf-8; format=flowed; delsp=yes")


def windows_1252() -> bytes:
    body = crlf([f"DELETE {SHORT[1]}", "Merci \u2013 5 \u20ac l\u2019an", "", *quoted(digest_text())])
    return mail(body.encode("windows-1252"), ctype="text/plain; charset=windows-1252", encoding="8bit")


def delivered_kept() -> bytes:
    """Both sections quoted; the user removed the held lines but kept the delivered one: REPORT it."""
    lines = [line for line in digest_text(delivered=True) if not line.startswith("[" + SHORT[0][:2])
             and not line.startswith(tuple(f"[{short}]" for short in SHORT))]
    return mail(crlf(["", *quoted(lines)]))


def cmd(action: Action, target: str | None, source: Source) -> tuple[Action, str | None, Source]:
    return (action, target, source)


SAMPLES = [
    ("thunderbird inline keeps 2 of 3", thunderbird_inline_two_of_three, None,
     [cmd(Action.RELEASE, SHORT[0], Source.KEPT_LINE), cmd(Action.RELEASE, SHORT[2], Source.KEPT_LINE)]),
    ("gmail top-posted", gmail_top_posted, None, [cmd(Action.RELEASE, SHORT[1], Source.OWN_TEXT)]),
    ("apple mail html only, command", lambda: apple_mail_html_only(f"DELETE {SHORT[1]}"), None,
     [cmd(Action.DELETE, SHORT[1], Source.OWN_TEXT)]),
    ("apple mail html only, kept rows", apple_mail_html_only, None,
     [cmd(Action.RELEASE, SHORT[0], Source.KEPT_LINE), cmd(Action.RELEASE, SHORT[2], Source.KEPT_LINE)]),
    ("outlook german AW: iso-8859-1 qp", outlook_german, None, [cmd(Action.RELEASE, SHORT[2], Source.OWN_TEXT)]),
    ("outlook german, Von:/Gesendet: block", lambda: outlook_german(separator=False), None,
     [cmd(Action.RELEASE, SHORT[2], Source.OWN_TEXT)]),
    ("base64 body, french attribution", base64_body, None, [cmd(Action.WHITELIST, SHORT[0], Source.OWN_TEXT)]),
    ("format=flowed delsp=yes", flowed_delsp, None,
     [cmd(Action.RELEASE, SHORT[0], Source.OWN_TEXT), cmd(Action.RELEASE, SHORT[2], Source.OWN_TEXT)]),
    ("windows-1252 8bit", windows_1252, None, [cmd(Action.DELETE, SHORT[1], Source.OWN_TEXT)]),
    ("mailto: link, empty body", mailto_empty, None, [cmd(Action.RELEASE, IDS[1], Source.ADDRESS)]),
    ("everything quoted unchanged", everything_unchanged, None, []),
    ("only the quoted instructions", instructions_only, None, []),
    ("delivered line kept", delivered_kept, None, [cmd(Action.REPORT, DELIVERED[:6], Source.KEPT_LINE)]),
]


def summary(reply: Reply) -> list[tuple[Action, str | None, Source]]:
    return [(command.action, command.target, command.source) for command in reply.commands]


@pytest.mark.parametrize(("name", "build", "recipient", "expected"), SAMPLES, ids=[s[0] for s in SAMPLES])
def test_client_samples(name, build, recipient, expected):
    raw = build()
    to = recipient or next(line.split(b": ", 1)[1].decode() for line in raw.split(b"\r\n") if line.startswith(b"To:"))
    reply = parse_reply(raw, to)
    assert summary(reply) == expected, (name, reply)
    assert reply.help is (not expected)
    for command in reply.commands:  # the digest has links for these: each found its token in the reply
        if command.action not in (Action.RELEASE, Action.REPORT) and b"text/html" not in raw:
            assert command.token is None
            continue
        assert command.token is not None, command
        claim = MINTER.verify(command.token, OWNER, command.action)
        assert claim.public_id is not None and command.target is not None
        assert claim.public_id.startswith(command.target)


def test_sample_fixtures_are_current():
    """tests/fixtures/replies/ holds each sample as a .eml, to open in a mail client or feed to the handler."""
    for name, build, _recipient, _expected in SAMPLES:
        path = FIXTURES / (name.replace(" ", "-").replace(":", "").replace("/", "-").replace(",", "") + ".eml")
        assert path.read_bytes() == build(), f"{path} is stale: run python tests/test_reply_parse.py"


def test_reply_token_of_the_address():
    reply = parse_reply(gmail_top_posted(), REPLY_TO)
    assert reply.reply_token == REPLY_TOKEN
    assert parse_reply(gmail_top_posted(), "quarantine@example.org").reply_token is None
    bad = parse_reply(gmail_top_posted(), "quarantine+nonsense@example.org")
    assert bad.reply_token is None and any("no valid token" in note for note in bad.notes)


@pytest.mark.parametrize(("action", "subject"), [
    (Action.DIGEST_OFF, "DIGEST OFF"), (Action.RELEASE_ALL, "RELEASE ALL"), (Action.DIGEST_IMMEDIATE, ""),
])
def test_owner_action_buttons(action, subject):
    owner_token = token(action)
    raw = mail(b"", subject=subject).replace(REPLY_TO.encode(), f"quarantine+{owner_token}@example.org".encode())
    reply = parse_reply(raw, f"quarantine+{owner_token.upper()}@example.org")
    assert [(c.action, c.target, c.token, c.source) for c in reply.commands] == \
        [(action, None, owner_token, Source.ADDRESS)]
    assert MINTER.verify(reply.commands[0].token, OWNER, action).action is action
    # another recipient delimiter
    assert parse_reply(raw, f"quarantine-{owner_token}@example.org", delimiter="-").commands[0].action is action


def test_unchanged_note_and_help():
    reply = parse_reply(everything_unchanged(), REPLY_TO)
    assert reply.help and not reply.commands
    assert any("kept every line" in note for note in reply.notes)


def test_explicit_command_beats_kept_lines_with_a_note():
    lines = digest_text()
    lines.remove(digest_line(1))
    reply = parse_reply(mail(crlf([f"DELETE {SHORT[1]}", "", *quoted(lines)])), REPLY_TO)
    assert summary(reply) == [cmd(Action.DELETE, SHORT[1], Source.OWN_TEXT)]
    assert any("were not used" in note for note in reply.notes)
    # the subject is explicit too
    reply = parse_reply(mail(crlf(quoted(lines)), subject="Re: AW: SV: Fwd: RE: DIGEST weekly"), REPLY_TO)
    assert summary(reply) == [cmd(Action.DIGEST_WEEKLY, None, Source.SUBJECT)]


KEPT = [cmd(Action.RELEASE, SHORT[0], Source.KEPT_LINE), cmd(Action.RELEASE, SHORT[2], Source.KEPT_LINE)]


@pytest.mark.parametrize(("own", "expected", "note"), [
    ([f"RELEASE {SHORT[0]}", f"release [{SHORT[0]}]"], [cmd(Action.RELEASE, SHORT[0], Source.OWN_TEXT)], None),
    ([f"RELEASE {SHORT[0]}", f"WHITELIST {SHORT[0]}"], [cmd(Action.WHITELIST, SHORT[0], Source.OWN_TEXT)], None),
    ([f"BLOCK {SHORT[0]}", f"DELETE {IDS[0]}"], [cmd(Action.BLOCK, SHORT[0], Source.OWN_TEXT)], None),
    ([f"RELEASE {SHORT[0]}", f"DELETE {SHORT[0]}"], [], "neither was done"),
    ([f"PREVIEW {SHORT[0]}", f"DELETE {SHORT[0]}"],
     [cmd(Action.PREVIEW, SHORT[0], Source.OWN_TEXT), cmd(Action.DELETE, SHORT[0], Source.OWN_TEXT)], None),
    (["DIGEST WEEKLY", "digest off"], [], "interval was not changed"),
    (["Release all."], [cmd(Action.RELEASE_ALL, None, Source.OWN_TEXT)], None),
    ([f"RELEASE {SHORT[0]}, {SHORT[2]}"],
     [cmd(Action.RELEASE, SHORT[0], Source.OWN_TEXT), cmd(Action.RELEASE, SHORT[2], Source.OWN_TEXT)], None),
    (["Block everything from that bank please"], [], "not understood"),
    (["RELEASE"], [], "not understood"),
    (["DIGEST MONTHLY"], [], "not understood"),
    (["DIGEST WEEKLY", "RELEASE please now"], [cmd(Action.DIGEST_WEEKLY, None, Source.OWN_TEXT)], "not understood"),
    # no command word first, or a command in the signature: the kept lines count
    ([f"Please release {SHORT[0]}"], KEPT, None),
    (["Thanks", "-- ", "Alice", f"RELEASE {SHORT[1]}"], KEPT, None),
])
def test_rules_of_the_own_text(own, expected, note):
    lines = digest_text()
    lines.remove(digest_line(1))
    reply = parse_reply(mail(crlf([*own, "", *quoted(lines)])), REPLY_TO)
    assert summary(reply) == expected
    if note:
        assert any(note in text for text in reply.notes), reply.notes


def test_command_pairs_a_short_id_with_a_token_and_checks_its_action():
    release = token(Action.RELEASE, IDS[0])
    reply = parse_reply(mail(crlf([f"RELEASE {SHORT[0]} {release}"])), REPLY_TO)
    assert [(c.target, c.token) for c in reply.commands] == [(SHORT[0], release)]
    reply = parse_reply(mail(crlf([f"RELEASE {release.upper()}"])), REPLY_TO)
    assert [(c.target, c.token) for c in reply.commands] == [(IDS[0], release)]
    # a DELETE token is no target of RELEASE
    reply = parse_reply(mail(crlf([f"RELEASE {token(Action.DELETE, IDS[0])}"])), REPLY_TO)
    assert not reply.commands and any("not understood" in note for note in reply.notes)
    # a kept line's token must be its section's action on its own message
    wrong = digest_line(0).replace(token(Action.RELEASE, IDS[0]), token(Action.RELEASE, IDS[1]))
    reply = parse_reply(mail(crlf(quoted([reply_parse.section_marker("held", 3), wrong]))), REPLY_TO)
    assert [(c.target, c.token) for c in reply.commands] == [(SHORT[0], None)]


@pytest.mark.parametrize(("text", "expected"), [
    ("Re: RELEASE ab23cd", "RELEASE ab23cd"),
    ("RE: re: Re[2]: AW: Aw: SV: VS: Fwd: FW: WG: TR: RV: DIGEST OFF", "DIGEST OFF"),
    ("Re:DELETE ab23cd", "DELETE ab23cd"),
    ("Réponse", "Réponse"),
    ("Regarding RELEASE", "Regarding RELEASE"),
])
def test_subject_prefixes(text, expected):
    assert reply_parse.strip_subject(text) == expected


def test_zones():
    text = "\n".join([
        "DELETE abcdef", "", "-- ", "Alice", "RELEASE abcdef", "> quoted", "after quote",
        "Am 01.12.26 um 07:00 schrieb Mailwarden:", reply_parse.INSTRUCTIONS_BEGIN, "RELEASE ALL",
        reply_parse.INSTRUCTIONS_END, "mine", "-----Message d'origine-----", "De : Mailwarden",
        "RELEASE ALL",
    ])
    zones = [(line.zone, line.text) for line in split_lines(text)]
    assert zones == [
        (Zone.OWN, "DELETE abcdef"), (Zone.OWN, ""), (Zone.SIGNATURE, "--"), (Zone.SIGNATURE, "Alice"),
        (Zone.SIGNATURE, "RELEASE abcdef"), (Zone.QUOTED, "quoted"), (Zone.OWN, "after quote"),
        (Zone.ATTRIBUTION, "Am 01.12.26 um 07:00 schrieb Mailwarden:"),
        (Zone.INSTRUCTIONS, reply_parse.INSTRUCTIONS_BEGIN), (Zone.INSTRUCTIONS, "RELEASE ALL"),
        (Zone.INSTRUCTIONS, reply_parse.INSTRUCTIONS_END), (Zone.OWN, "mine"),
        (Zone.QUOTED, "-----Message d'origine-----"), (Zone.QUOTED, "De : Mailwarden"), (Zone.QUOTED, "RELEASE ALL"),
    ]


@pytest.mark.parametrize("separator", [
    "-----Original Message-----", "-----Ursprüngliche Nachricht-----", "-----Message d'origine-----",
    "-----Mensaje original-----", "-----Oorspronkelijk bericht-----", "-----Ursprungligt meddelande-----",
    "-----Messaggio originale-----", "-----Opprinnelig melding-----", "-------- Original Message --------",
    "---------- Forwarded message ---------",
])
def test_outlook_separators(separator):
    lines = split_lines(f"RELEASE ALL\n{separator}\nRELEASE ALL")
    assert [line.zone for line in lines] == [Zone.OWN, Zone.QUOTED, Zone.QUOTED]


@pytest.mark.parametrize("block", [
    ["From: Mailwarden <q@example.org>", "Sent: Tuesday, December 1, 2026 7:00 AM"],
    ["Von: Mailwarden <q@example.org>", "Gesendet: Dienstag, 1. Dezember 2026 07:00"],
    ["De : Mailwarden <q@example.org>", "Envoyé : mardi 1 décembre 2026 07:00"],
    ["Från: Mailwarden <q@example.org>", "Skickat: den 1 december 2026 07:00"],
    ["*From:* Mailwarden <q@example.org>", "*Date:* Tuesday, 1 December 2026 at 07:00"],
    ["From: Mailwarden <q@example.org>", "To: Alice", "Date: Tue, 1 Dec 2026 07:00"],
])
def test_outlook_header_blocks(block):
    lines = split_lines("\n".join(["RELEASE ALL", *block, "RELEASE ALL"]))
    assert lines[0].zone is Zone.OWN and all(line.zone is Zone.QUOTED for line in lines[1:])
    assert split_lines("From: here on, please\nRELEASE ALL")[1].zone is Zone.OWN  # no Sent: line follows


@pytest.mark.parametrize("attribution", [
    ["On Tue, Dec 1, 2026 at 7:00 AM Mailwarden <q@example.org> wrote:"],
    ["On Tue, Dec 1, 2026 at 7:00 AM Mailwarden <", "q@example.org> wrote:"],
    ["Am 01.12.2026 um 07:00 schrieb Mailwarden <q@example.org>:"],
    ["Le mar. 1 déc. 2026 à 07:00, Mailwarden <q@example.org> a écrit :"],
    ["El mar, 1 dic 2026 a las 7:00, Mailwarden (<q@example.org>) escribió:"],
    ["Op di 1 dec. 2026 om 07:00 schreef Mailwarden <q@example.org>:"],
    ["Den tis 1 dec. 2026 kl 07:00 skrev Mailwarden <q@example.org>:"],
])
def test_attributions(attribution):
    lines = split_lines("\n".join(["RELEASE ALL", *attribution, "> x"]))
    assert [line.zone for line in lines] == [Zone.OWN, *[Zone.ATTRIBUTION] * len(attribution), Zone.QUOTED]


def test_unflow():
    text = "RELEASE ab23cd \r\ncd34ef\n> quoted \n> more\n>> deeper \n> back\n-- \nsig"
    assert reply_parse.unflow(text.replace("\r\n", "\n")) == \
        "RELEASE ab23cd cd34ef\n> quoted more\n>> deeper \n> back\n-- \nsig"
    assert reply_parse.unflow(" From stuffed\nword \nbroken", delsp=True) == "From stuffed\nwordbroken"


@pytest.mark.parametrize(("charset", "text"), [
    ("koi8-r", "\u0421\u043f\u0430\u0441\u0438\u0431\u043e"),
    ("iso-8859-15", "5 \u20ac"),
    ("iso-8859-1", "5 \u20ac"),  # read as windows-1252, as the client meant: 0x80 is the euro sign
    ("us-ascii", "Gr\u00fc\u00dfe"),  # 8-bit UTF-8 under a wrong label
    ("utf-8", "Gr\u00fc\u00dfe \u2013 \u00e9"),
])
def test_charsets(charset, text):
    data = text.encode("windows-1252" if charset == "iso-8859-1" else "utf-8" if charset == "us-ascii" else charset)
    raw = mail(b"DELETE abcdef\r\n" + data + b"\r\n", ctype=f"text/plain; charset={charset}", encoding="8bit")
    notes: list[str] = []
    message = reply_parse.email.message_from_bytes(raw, policy=reply_parse.email.policy.default)
    assert reply_parse.body_text(message, notes).split("\n")[1] == text


def test_html_rendering():
    html = ("<html><head><title>RELEASE ALL</title><script>RELEASE ALL</script></head><body>"
            "<p>RELEASE&nbsp;abcdef</p>Line<br>two<blockquote>q1<blockquote>q2</blockquote>q3</blockquote>"
            '<table><tr><td>[abcdef]</td><td>x</td><td><a href="mailto:q+t@x">Release</a></td>'
            '<td><a href="https://evil.example/">web</a></td></tr></table><pre>a\n  b</pre></body></html>')
    assert [line for line in reply_parse.html_to_text(html).split("\n") if line] == [
        "RELEASE abcdef", "Line", "two", "> q1", "> > q2", "> q3",
        "[abcdef] x Release <mailto:q+t@x> web", "a", "b"]


# -- hostile input ---------------------------------------------------------------------------------------


def test_huge_body_is_bounded_and_fast():
    body = (f"RELEASE {SHORT[0]}\r\n" + "x" * 998 + "\r\n") * 10_000 + f"RELEASE {SHORT[2]}\r\n"
    start = time.process_time()  # CPU, not wall time: a complexity guard, not a speed figure
    reply = parse_reply(mail(body), REPLY_TO)
    assert time.process_time() - start < 5
    assert summary(reply) == [cmd(Action.RELEASE, SHORT[0], Source.OWN_TEXT)]
    assert any("KB of your reply" in note for note in reply.notes)
    long_lines = crlf([f"DELETE {SHORT[1]}", *["z" * 990] * 200, f"DELETE {SHORT[2]}"])  # 200 KB, 202 lines
    assert summary(parse_reply(mail(long_lines), REPLY_TO)) == [cmd(Action.DELETE, SHORT[1], Source.OWN_TEXT)]
    reply = parse_reply(mail("RELEASE ALL\r\n" + "y" * (8 << 20)), REPLY_TO)
    assert any("only its beginning" in note for note in reply.notes)
    assert summary(reply) == [cmd(Action.RELEASE_ALL, None, Source.OWN_TEXT)]


def _kept_flood() -> bytes:
    ids = [base64.b32encode(number.to_bytes(10, "big")).decode().lower() for number in range(1, 3001)]
    lines = [f"[{public_id[-8:]}] x mailto:quarantine+{token(Action.RELEASE, public_id)}@x" for public_id in ids]
    return mail(crlf(quoted([reply_parse.section_marker("held", 9999), *lines])))


def _parts_bomb() -> bytes:
    return b"Subject: x\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n" + \
        b"--x\r\nContent-Type: text/plain\r\n\r\nRELEASE ALL\r\n" * 100_000


@pytest.mark.parametrize(("name", "raw"), [
    ("html lone <", lambda: mail("<" * (1 << 20), ctype="text/html")),
    ("html <a<a<a", lambda: mail("<a" * (1 << 19) + ">", ctype="text/html")),
    ("html <!<!<!", lambda: mail("<!" * (1 << 19), ctype="text/html")),
    ("encoded-words in Subject", lambda: b"Subject: " + b"=?utf-8?q?a?= " * 200_000 + b"\r\n\r\nx\r\n"),
    ("parameters in Content-Type", lambda: b"Content-Type: text/plain; " + b"a=b; " * 200_000 + b"\r\n\r\nx\r\n"),
    ("100,000 parts", _parts_bomb),
    ("3000 kept lines with tokens", _kept_flood),
    ("3,000,000 empty lines", lambda: mail("\r\n" * 3_000_000)),
])
def test_pathological_input_is_fast(name, raw):
    data = raw()
    start = time.process_time()  # CPU, not wall time: a complexity guard, not a speed figure
    reply = parse_reply(data, REPLY_TO)
    assert time.process_time() - start < 2, name
    assert len(reply.commands) <= reply_parse.MAX_COMMANDS


def test_thousands_of_commands_are_bounded():
    ids = [base64.b32encode(number.to_bytes(5, "big")).decode().lower()[-7:] for number in range(3000)]
    reply = parse_reply(mail(crlf([f"DELETE a{short}" for short in ids])), REPLY_TO)
    assert len(reply.commands) == reply_parse.MAX_COMMANDS
    assert any("more than" in note for note in reply.notes)
    lines = "\r\n".join(["ok"] * (reply_parse.MAX_LINES + 10) + ["RELEASE ALL"])
    assert parse_reply(mail(lines), REPLY_TO).help


@pytest.mark.parametrize("raw", [
    b"",
    b"\0\0\0",
    b"Subject: RELEASE ALL\0\r\n\r\n\0",
    b"Subject: hi\r\nContent-Type: multipart/mixed\r\n\r\nRELEASE ALL\r\n",
    b"Subject: hi\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Type: text/plain\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nUkVMRUFTRSBBTEwK!!!*\r\n",
    b"Subject: hi\r\nContent-Type: text/plain; charset=x-no-such-charset\r\n\r\nRELEASE ALL\r\n\xff\xfe",
    b"Subject: =?utf-8?B?broken?=\r\nContent-Type: text/html\r\n\r\n<blockquote><<<<div>RELEASE ALL</p></table>",
    b"Subject: hi\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n" + b"--x\r\nContent-Type: multipart/mixed; "
    b"boundary=x\r\n\r\n" * 500 + b"RELEASE ALL",
])
def test_broken_input_never_raises(raw):
    reply = parse_reply(raw, "quarantine@example.org")
    assert isinstance(reply, Reply)
    assert all(command.action is Action.RELEASE_ALL for command in reply.commands)


def test_nul_bytes_do_not_hide_commands():
    assert summary(parse_reply(mail(f"REL\0EASE {SHORT[0]}\r\n"), REPLY_TO)) == \
        [cmd(Action.RELEASE, SHORT[0], Source.OWN_TEXT)]


def test_attached_mail_is_not_read():
    attached = mail(f"RELEASE {SHORT[0]}\r\n").decode()
    for disposition in ("Content-Disposition: attachment", "Content-Disposition: inline"):
        body = crlf(["--b", "Content-Type: message/rfc822", disposition, "", attached, "--b--"])
        assert parse_reply(mail(body, ctype="multipart/mixed; boundary=b"), REPLY_TO).help


def test_tricky_mime_corpus_never_raises():
    files = [path for path in CORPUS.rglob("*") if path.is_file() and path.suffix not in (".md", ".tsv")
             and not path.name.startswith("LICENSE")]
    assert len(files) > 50
    for path in files:
        reply = parse_reply(path.read_bytes()[:1 << 20], "quarantine@example.org")
        assert isinstance(reply, Reply), path


if __name__ == "__main__":  # writes the sample fixtures
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for name, build, _recipient, _expected in SAMPLES:
        path = FIXTURES / (name.replace(" ", "-").replace(":", "").replace("/", "-").replace(",", "") + ".eml")
        path.write_bytes(build())


def test_a_section_kept_whole_does_nothing_when_another_is_trimmed():
    """Two of three held lines deleted, the delivered section left as it was: the kept held line is
    released, and the untouched delivered line is not reported (as spam, teaching Bayes)."""
    text = [line for line in digest_text(delivered=True)
            if not line.startswith((f"[{SHORT[1]}]", f"[{SHORT[2]}]"))]
    reply = parse_reply(mail(crlf(["Just this one please", "", *quoted(text)])))
    assert [(c.action, c.target) for c in reply.commands] == [(Action.RELEASE, SHORT[0])]
    assert any("unchanged" in note for note in reply.notes)
