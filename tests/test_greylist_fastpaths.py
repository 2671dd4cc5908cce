"""The greylist hot path's short cuts answer exactly as the plain code they replace (issue 14).

Each short cut (trusted networks as integers, the client key and /24 cut from the address text, the
whitelists' suffix walk and joined regex screen, the sender's no-substitution exit, kept deferral answers)
is checked here against the obvious form, over the address, name and sender forms that could tell them
apart. No Redis: the script call is answered by a stand-in that records the keys.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from pathlib import Path

import pytest

from policyd import keys
from policyd.greylist import GreylistCheck, GreylistSettings, client_network, normalise_sender
from policyd.request import PolicyRequest
from policyd.whitelist import ClientWhitelist, RecipientWhitelist


class RecordingRedis:
    """Answers the greylist script with "new" and keeps the keys it was given."""

    def __init__(self) -> None:
        self.keys: tuple[str, ...] = ()

    async def run_script(self, name: str, script_keys: tuple[str, ...], args: tuple[object, ...],
                         guard: object = None) -> list[bytes]:
        self.keys = script_keys
        return [b"new", b"300"]


def make_check(tmp_path: Path, trusted: Sequence[str] = (), **settings: object) -> tuple[GreylistCheck, RecordingRedis]:
    """A greylist check with no whitelists (so every address form reaches the script) and ``trusted``."""
    redis = RecordingRedis()
    values = {"whitelist_clients": [], "whitelist_recipients": [], "managed_whitelist": tmp_path / "none", **settings}
    check = GreylistCheck(GreylistSettings(**values), [ipaddress.ip_network(n) for n in trusted],
                          redis, "t:", lambda: 1_800_000_000.0, "mx.test")  # type: ignore[arg-type]
    return check, redis


def request(client: str, name: str = "unknown", sender: str = "s@example.org",
            rcpt: str = "u@example.test") -> PolicyRequest:
    return PolicyRequest.from_attrs({"request": "smtpd_access_policy", "protocol_state": "RCPT",
                                     "client_address": client, "client_name": name, "sender": sender,
                                     "recipient": rcpt, "instance": "i1"})


ADDRESS_FORMS = [
    "192.0.2.1", "0.0.0.0", "255.255.255.255", "10.0.0.1", "198.51.100.255",
    "::ffff:192.0.2.1", "::FFFF:192.0.2.1", "0:0:0:0:0:ffff:c000:0201", "::ffff:c000:201",
    "2001:db8::1", "2001:DB8::1", "2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8:0:0:1::1",
    "::1", "::", "::192.0.2.1", "64:ff9b::192.0.2.1", "fe80::1%eth0", "FE80::1%25", "192.0.2.1%eth0",
    # not addresses parse_ip takes today (no key at all); listed so that a looser parser shows up here
    "192.0.2.01", "0192.0.2.1", " 192.0.2.1", "192.0.2.1 ", "1.2.3", "1.2.3.4.5", "\u0661.2.3.4", "192.0.2.1/32",
]


@pytest.mark.parametrize("prefixes", [(24, 64), (16, 48), (32, 128)])
@pytest.mark.parametrize("address", ADDRESS_FORMS)
def test_client_keys_are_the_text_of_the_parsed_address(tmp_path, address, prefixes):
    """gl:c: is str() of the client address and gl:p: client_network() of it, whatever form Postfix sent."""
    check, redis = make_check(tmp_path, ipv4_prefix=prefixes[0], ipv6_prefix=prefixes[1])
    r = request(address)
    verdict = asyncio.run(check.on_rcpt(r))
    if r.client_ip is None:
        assert verdict is not None and verdict.reason == "no usable client address"
        return
    assert verdict is not None and verdict.reason == "new triplet"
    network = client_network(r.client_ip, *prefixes)
    assert redis.keys[1] == f"t:{keys.GREYLIST_CLIENT}{r.client_ip}"
    assert redis.keys[4] == keys.greylist_passed_client("t:", network)
    assert redis.keys[0] == keys.greylist_triplet("t:", network, "s@example.org", "u@example.test")


TRUSTED = ["127.0.0.0/8", "10.0.0.0/8", "10.1.0.0/16", "192.0.2.128/25", "192.0.2.1/32", "::1/128",
           "2001:db8::/32", "2001:db8:1::/48", "::ffff:0:0/96", "0.0.0.0/0"]


@pytest.mark.parametrize("trusted", [TRUSTED[:-1], TRUSTED[::-1], ["::/0"], []])
@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "10.2.0.1", "192.0.2.1", "192.0.2.200",
                                     "192.0.2.2", "198.51.100.1", "::1", "::2", "2001:db8:1::5", "2001:db8:2::5",
                                     "2001:db9::1", "::ffff:10.1.2.3", "::ffff:198.51.100.1", "fe80::1%eth0"])
def test_trusted_networks_as_integers_name_the_network_ip_in_network_finds_first(tmp_path, trusted, address):
    check, _redis = make_check(tmp_path, trusted)
    r = request(address)
    assert r.client_ip is not None
    ip = r.client_ip
    first = next((n for n in check.trusted if ip.version == n.version and ip in n), None)
    why = check.exemption(r)
    assert why == (f"trusted network {first}" if first is not None else None)


CLIENT_LIST = """\
example.com
.dotted.example.
/^mail\\d+\\.telekom\\.de$/
/tiscali/
/^(mx|smtp)\\d+\\.backref\\.example$/
/^(a)\\1\\.example$/
/(?i)^CASE\\.example$/
/(?x) ^ spaced \\. example $/
/^mail\\d*\\.first\\.example$/
/^mail7\\.first\\.example$/
192.0.2.5
"""


def naive_client_match(wl: ClientWhitelist, name: str) -> str | None:
    """ClientWhitelist.matches for names as it was: suffixes re-joined, then each pattern in order."""
    lowered = name.lower().rstrip(".")
    parts = lowered.split(".")
    for i in range(len(parts)):
        if ".".join(parts[i:]) in wl.name_suffixes:
            return ".".join(parts[i:])
    return next((f"/{p.pattern}/" for p in wl.name_patterns if p.search(lowered)), None)


@pytest.mark.parametrize("name", [
    "example.com", "mx.example.com", "notexample.com", "EXAMPLE.COM.", "a..example.com", ".example.com",
    "dotted.example", "x.dotted.example", "mail12.telekom.de", "MAIL12.TELEKOM.DE", "mail.telekom.de",
    "smtp.tiscali.it", "mx3.backref.example", "aa.example", "ab.example", "case.example", "spaced.example",
    "mail7.first.example", "mail.first.example", "mail.example.org", "com", "", ".", "..",
    "unknown-198-51-100-23.dyn.isp.example.net",
])
def test_client_name_lookup_answers_as_suffix_join_then_patterns_in_order(tmp_path, name):
    path = tmp_path / "clients"
    path.write_text(CLIENT_LIST)
    wl = ClientWhitelist.load([path])
    shipped = ClientWhitelist.load(GreylistSettings().whitelist_clients)
    for whitelist in (wl, shipped):
        expected = naive_client_match(whitelist, name) if name and name != "unknown" else None
        assert whitelist.matches(None, name) == expected


@pytest.mark.parametrize("name", ["mail12.telekom.de", "ms-smtp-01.southeast.rr.com", "smtp3.orange.fr",
                                  "postfix12-g3.free.fr", "mail-in-7.arcor-online.net"])
def test_shipped_patterns_still_match_their_hosts(name):
    shipped = ClientWhitelist.load(GreylistSettings().whitelist_clients)
    assert shipped.matches(None, name) == naive_client_match(shipped, name) is not None


@pytest.mark.parametrize(("recipient", "entry"), [
    ("u@example.test", None), ("u@sub.listed.example", "listed.example"), ("u@listed.example", "listed.example"),
    ("u@notlisted.example", None), ("postmaster@anything", "postmaster@"), ("nodomain", None),
    ("u@a..listed.example", "listed.example"), ("u@", None), ("u@.", None),
])
def test_recipient_domain_lookup_walks_the_suffixes(tmp_path, recipient, entry):
    path = tmp_path / "recipients"
    path.write_text("postmaster@\n@listed.example\n")
    assert RecipientWhitelist.load([path]).matches(recipient) == entry


@pytest.mark.parametrize(("sender", "normalised"), [
    ("Plain.Name@Example.org", "Plain.Name@Example.org"),
    ("no-at-sign", "no-at-sign"),
    ("a@b@c", "a@b@c"),
    ("a+b@c@d", "a@c@d"),
    ("a.\u0663@x", "a.#@x"),  # \d is any Unicode decimal digit, in the short cut's test too
    ("prvs=abc@x", "prvs=abc@x"),
    ("PRVS=1234567890=joe@x", "PRVS=#=joe@x"),
    ("+@x", "@x"),
])
def test_senders_with_nothing_to_substitute_come_back_unchanged(sender, normalised):
    assert normalise_sender(sender) == normalised


def test_kept_deferral_answers_are_the_ones_formatted_for_each_request(tmp_path):
    check, _redis = make_check(tmp_path, text="Greylisted for {recipient_domain}, retry in {retry_in} ({seconds}s)")
    first = check.deferral("new", 300, "a.example")
    assert first.reply == "DEFER_IF_PERMIT Greylisted for a.example, retry in 5 minutes (300s)"
    assert first.reason == "new triplet" and first.decisive
    assert check.deferral("new", 300, "b.example").reply.startswith("DEFER_IF_PERMIT Greylisted for b.example,")
    assert check.deferral("new", 300, "a.example") == first
    early = check.deferral("early", 300, "a.example")
    assert early.reason == "early retry, 300s missing" and early.reply == first.reply
    assert check.deferral("early", 42, "a.example").reply.endswith("retry in 42 seconds (42s)")
    plain, _redis = make_check(tmp_path)
    assert plain.deferral("new", 300, "a.example") is plain.deferral("new", 300, "b.example")
