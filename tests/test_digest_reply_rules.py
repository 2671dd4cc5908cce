"""The reply handler's pure rules: single-use senders and what BLOCK lists, who the owner is and whether the
login is theirs, the loop guard, short ids, and the preview's sanitising (bounded on hostile input)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mailwarden.directory import DirectorySettings
from quarantine.digest.actions import block_pattern, single_use
from quarantine.digest.preview import MAX_ATTACHMENTS, MAX_LINES, MAX_TEXT, defang, preview
from quarantine.digest.reply import DirectoryOwners, login_is_owner, loop_reason, matching, redacted, trusted
from quarantine.digest.settings import BlockDomain, DigestSettings


@pytest.mark.parametrize(("address", "expected"), [
    ("bounce-123-bob=example.org@lists.example.com", True),       # VERP
    ("bounces+bob=example.org@mail.example.com", True),           # VERP with +
    ("prvs=0123abcd4e=alice@example.com", True),                  # BATV
    ("SRS0=HHH=TT=example.org=bob@forwarder.example", True),      # SRS
    ("bounces+7a3f9c2e1b4d@em.example.com", True),                # a random run
    ("0102018c5e9a7f3b-4d1e@amazonses.example", True),
    ("msg-20261201093412557@mailer.example", True),               # a long number
    ("alice@example.com", False),
    ("first.last@example.com", False),
    ("newsletter2024@shop.example", False),
    ("no-reply@bank.example", False),
    ("", False),
    ("not an address", False),
])
def test_single_use_senders(address: str, expected: bool) -> None:
    assert single_use(address) is expected


def test_block_lists_the_domain_by_policy() -> None:
    verp = "bounce-123-bob=example.org@lists.example.com"
    assert block_pattern(verp, BlockDomain.AUTO) == "lists.example.com"
    assert block_pattern("Spammer@Shop.Example", BlockDomain.AUTO) == "spammer@shop.example"
    assert block_pattern("spammer@shop.example", BlockDomain.ALWAYS) == "shop.example"
    assert block_pattern(verp, BlockDomain.NEVER) == verp


class _Map:
    """A recipient source in a dict: address -> its one mailbox."""

    def __init__(self, known: dict[str, str]) -> None:
        self.known = known

    def mailbox_of(self, address: str) -> str | None:
        return self.known.get(address.lower())


def test_the_owner_is_the_mailbox_the_sources_know(tmp_path: Path) -> None:
    recipients = tmp_path / "recipients.map"
    recipients.write_text("alice@example.org\na.smith@example.org: alice@example.org\n"
                          "team@example.org: alice@example.org, bob@example.org\n")
    owners = DirectoryOwners(DirectorySettings(sources=["file"], file={"paths": [recipients]}))
    try:
        assert owners.mailbox_of("Alice@Example.org") == "alice@example.org"
        assert owners.mailbox_of("alice+digest@example.org") == "alice@example.org"
        assert owners.mailbox_of("a.smith@example.org") == "alice@example.org"  # an alias
        assert owners.mailbox_of("team@example.org") is None                    # a list: no one owner
        assert owners.mailbox_of("mallory@evil.example") is None                # not ours
        assert owners.mailbox_of("") is None
    finally:
        owners.close()
    unconfigured = DirectoryOwners(DirectorySettings())  # no sources: the address itself
    assert unconfigured.mailbox_of("Bob+x@Example.org") == "bob@example.org"


def test_the_login_must_be_the_owner() -> None:
    owners = _Map({"alice@example.org": "alice@example.org", "a.smith@example.org": "alice@example.org",
                   "bob@example.org": "bob@example.org"})
    assert login_is_owner("alice@example.org", "alice@example.org", None, owners)
    assert login_is_owner("ALICE@example.org", "alice@example.org", None, owners)
    assert login_is_owner("a.smith@example.org", "alice@example.org", None, owners)  # an alias of hers
    assert login_is_owner("alice", "alice@example.org", "example.org", owners)       # login_domain
    assert not login_is_owner("alice", "alice@example.org", None, owners)            # no domain to add
    assert not login_is_owner("bob@example.org", "alice@example.org", None, owners)
    assert not login_is_owner("bob", "alice@example.org", "example.org", owners)
    assert not login_is_owner("", "alice@example.org", "example.org", owners)
    assert not login_is_owner("alice@example.org.evil.example", "alice@example.org", None, owners)


def test_trusted_networks() -> None:
    networks = DigestSettings.model_validate(_digest(trusted_networks=["192.0.2.0/24", "2001:db8::/32"])).networks()
    assert trusted("192.0.2.7", networks)
    assert trusted("IPv6:2001:db8::1", networks)
    assert not trusted("198.51.100.7", networks)
    assert not trusted("unknown", networks)
    assert not trusted("", networks)


@pytest.mark.parametrize(("head", "sender", "ignored"), [
    (b"Subject: x\r\n\r\n", "", True),
    (b"Subject: x\r\n\r\n", "MAILER-DAEMON", True),
    (b"Auto-Submitted: auto-replied\r\n\r\n", "alice@example.org", True),
    (b"Auto-Submitted: auto-generated; owner-email=x@y\r\n\r\n", "alice@example.org", True),
    (b"Auto-Submitted: no\r\n\r\n", "alice@example.org", False),
    (b"Precedence: bulk\r\n\r\n", "alice@example.org", True),
    (b"Precedence: list\r\n\r\n", "alice@example.org", True),
    (b"Precedence: junk\r\n\r\n", "alice@example.org", True),
    (b"Subject: Re: your digest\r\n\r\nRELEASE ab23cd\r\n", "alice@example.org", False),
])
def test_the_loop_guard(head: bytes, sender: str, ignored: bool) -> None:
    assert (loop_reason(head, sender) is not None) is ignored


def test_tokens_are_cut_from_logged_recipients() -> None:
    token = "b" + "a" * 40
    assert redacted(f"quarantine+{token}@example.org") == "quarantine+baaa...@example.org"
    assert redacted(f"quarantine-{token}@example.org", "-") == "quarantine-baaa...@example.org"
    assert redacted("quarantine@example.org") == "quarantine@example.org"


def test_short_ids_match_prefixes_only() -> None:
    ids = ["ab23cdefghijklmn", "ab23cdzzzzzzzzzz", "cd45efghijklmnop"]
    assert matching(ids, "AB23CD") == ids[:2]
    assert matching(ids, "ab23cde") == ids[:1]
    assert matching(ids, "cd45ef") == ids[2:]
    assert matching(ids, "23cdef") == []


def test_defang_leaves_no_live_link() -> None:
    text = defang("Go to https://bank.example.net/login?x=1 or http://1.2.3.4/ or www.evil.example, "
                  "mailto:boss@corp.example, ftp://files.example/a, javascript:alert(1)")
    assert "http" not in text.replace("hxxp", "")
    assert "bank[.]example[.]net" in text and "www[.]evil[.]example" in text
    assert "mailto:" not in text and "mailto[:]" in text and "javascript[:]" in text
    assert "ftp[:]" in text


def test_a_preview_is_text_with_attachments_listed() -> None:
    raw = (b"From: Bank <alerts@bank.example.net>\r\nTo: alice@example.org\r\n"
           b"Subject: =?utf-8?q?Your_acc=C3=B6unt?=\r\n"
           b"Date: Tue, 1 Dec 2026 09:00:00 +0000\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n"
           b"--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
           b"<html><head><style>p{}</style></head><body><p>Log in at <a href='https://evil.example/x'>"
           b"https://bank.example.net.evil.example/login</a></p><img src='http://track.example/p.gif'>"
           b"<script>steal()</script></body></html>\r\n"
           b"--b1\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; "
           b"filename=\"invoice.pdf.exe\"\r\nContent-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n--b1--\r\n")
    shown = preview(raw).render()
    assert "Subject: Your accöunt" in shown
    assert "From: Bank <alerts@bank[.]example[.]net>" in shown
    assert "hxxps://bank[.]example[.]net[.]evil[.]example/login" in shown
    assert "<" not in shown.split("\n\n", 1)[1].split("Attachments")[0], "markup in the text"
    assert "steal" not in shown and "track" not in shown and "style" not in shown
    assert "- invoice[.]pdf[.]exe (application/octet-stream, 12 bytes)" in shown
    assert "https://" not in shown and "http://" not in shown


def test_a_preview_of_hostile_input_is_bounded() -> None:
    part = b"--b\r\nContent-Type: application/x-foo\r\nContent-Disposition: attachment; filename=f%d\r\n\r\nx\r\n"
    parts = b"".join(part % n for n in range(3000))
    raw = (b"Subject: " + b"=?utf-8?q?a?= " * 5000 + b"\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\n" + b"line http://x.example/\x1b[31m\r\n" * 50_000
           + parts + b"--b--\r\n")
    started = time.process_time()
    result = preview(raw)
    assert time.process_time() - started < 10
    assert len(result.text) <= MAX_TEXT and result.text.count("\n") < MAX_LINES
    assert len(result.attachments) <= MAX_ATTACHMENTS
    assert "\x1b" not in result.render() and "http://" not in result.render()
    assert preview(b"\0\xff\xfe garbage").render()  # something, never an exception


def _digest(**extra: object) -> dict:
    return {"from_address": "postmaster@example.org", "reply_mailbox": "quarantine@example.org",
            "token_keys": [{"id": "b", "secret": "0123456789abcdefghijklmnopqrstuvwxyzABCDEF"}], **extra}
