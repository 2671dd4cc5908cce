"""Greylisting semantics (Postgrey 1.37's), driven against a real Redis with an injected clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mailwarden.redis_pipe import PipelinedRedis
from mailwarden.redis_settings import RedisSettings
from policyd.greylist import GreylistCheck, GreylistSettings, client_network, human_wait, normalise_sender
from policyd.request import PolicyRequest
from policyd.results import TransactionState
from policyd.service import load_scripts
from policyd.whitelist import ClientWhitelist, RecipientWhitelist, WhitelistError


# Verified against postgrey 1.37's do_sender_substitutions on this machine kind.
@pytest.mark.parametrize(("sender", "normalised"), [
    ("", ""),
    ("bounce-123-456@list.org", "bounce-#-#@list.org"),
    ("a+123@x.org", "a@x.org"),
    ("prvs=1234567890=joe@x.org", "joe@x.org"),
    ("prvs=joe=1234567890@x.org", "joe@x.org"),
    ("prvs=0123abcdef=x123abcdef@d", "x123abcdef@d"),
    ("user.42@x", "user.#@x"),
    ("u42@x", "u42@x"),
    ("a-1_2@x", "a-1_2@x"),
    ("1.2.3@x", "#.#.#@x"),
    ("prvs=a=b=c@x", "prvs=a=b=c@x"),
])
def test_sender_normalisation_matches_postgrey(sender, normalised):
    assert normalise_sender(sender) == normalised


def test_client_network_prefixes():
    import ipaddress
    assert client_network(ipaddress.ip_address("192.0.2.77"), 24, 64) == "192.0.2.0/24"
    assert client_network(ipaddress.ip_address("2001:db8:1:2::5"), 24, 64) == "2001:db8:1:2::/64"
    assert client_network(ipaddress.ip_address("192.0.2.77"), 32, 64) == "192.0.2.77/32"


def test_wait_texts():
    assert human_wait(300) == "5 minutes"
    assert human_wait(42.2) == "43 seconds"
    assert human_wait(0) == "1 seconds"


def test_postgrey_whitelist_formats(tmp_path: Path):
    clients = tmp_path / "clients"
    clients.write_text("# comment\nexample.com\n/^mail\\d+\\.telekom\\.de$/\n192.0.2.5\n198.51.100\n"
                       "203.0.113.0/28\n2001:db8::/32\n")
    wl = ClientWhitelist.load([clients])
    import ipaddress as ip
    assert wl.matches(None, "mx1.example.com") == "example.com"
    assert wl.matches(None, "example.com") == "example.com"
    assert wl.matches(None, "notexample.com") is None
    assert wl.matches(None, "MAIL12.telekom.de") is not None
    assert wl.matches(ip.ip_address("192.0.2.5"), "unknown") == "192.0.2.5/32"
    assert wl.matches(ip.ip_address("198.51.100.200"), "unknown") == "198.51.100.0/24"
    assert wl.matches(ip.ip_address("203.0.113.15"), "") == "203.0.113.0/28"
    assert wl.matches(ip.ip_address("203.0.113.16"), "") is None
    assert wl.matches(ip.ip_address("2001:db8:5::1"), "") == "2001:db8::/32"
    recipients = tmp_path / "recipients"
    recipients.write_text("postmaster@\nabuse@example.test\n@lists.example.test\nexample.net\n/^noreply-/\n")
    rwl = RecipientWhitelist.load([recipients])
    assert rwl.matches("Postmaster+x@anything.org") == "postmaster@"
    assert rwl.matches("abuse@example.test") == "abuse@example.test"
    assert rwl.matches("abuse@other.test") is None
    assert rwl.matches("x@lists.example.test") == "lists.example.test"
    assert rwl.matches("x@sub.example.net") == "example.net"
    assert rwl.matches("noreply-9@x.org") is not None
    assert rwl.matches("user@example.test") is None


def test_bad_whitelist_line_names_file_and_line(tmp_path: Path):
    bad = tmp_path / "clients"
    bad.write_text("ok.example\n/[unclosed/\n")
    with pytest.raises(WhitelistError, match=r"clients:2: bad regular expression"):
        ClientWhitelist.load([bad])


def test_shipped_whitelists_load():
    settings = GreylistSettings()
    assert len(ClientWhitelist.load(settings.whitelist_clients).name_suffixes) > 50
    assert RecipientWhitelist.load(settings.whitelist_recipients).matches("postmaster@example.test")


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def request(client: str = "192.0.2.10", sender: str = "s@example.org", rcpt: str = "u@example.test",
            instance: str = "i1", **attrs: str) -> PolicyRequest:
    return PolicyRequest.from_attrs({"request": "smtpd_access_policy", "protocol_state": "RCPT",
                                     "client_address": client, "client_name": "unknown", "sender": sender,
                                     "recipient": rcpt, "instance": instance, **attrs})


def run_check(redis_url: str, scenario, **settings):
    async def main():
        pipe = PipelinedRedis(RedisSettings(url=redis_url), load_scripts())
        pipe.start()
        assert await pipe.wait_connected(5)
        clock = Clock()
        check = GreylistCheck(GreylistSettings(**settings), [], pipe, "t:", clock, "mx.test")
        try:
            return await scenario(check, clock)
        finally:
            await pipe.close()
    return asyncio.run(main())


def test_delay_early_retry_pass_and_header_once(redis_server):
    async def scenario(check, clock):
        first = await check.on_rcpt(request())
        assert first.decisive and first.reason == "new triplet"
        assert first.reply == "DEFER_IF_PERMIT Greylisted, please try again in 5 minutes"
        clock.now += 299
        early = await check.on_rcpt(request())
        assert early.decisive and early.reason == "early retry, 1s missing"
        clock.now += 1
        passed = await check.on_rcpt(request(instance="i2"))
        assert not passed.decisive and passed.reply.startswith("PREPEND X-Greylist: delayed 300 seconds by ")
        clock.now += 10
        again = await check.on_rcpt(request(instance="i3"))
        assert again.reason == "triplet passed before" and again.reply == "DUNNO"
        # the same sender and recipient from another address in the /24 is the same triplet
        same_net = await check.on_rcpt(request(client="192.0.2.200", instance="i4"))
        assert not same_net.decisive
        other_net = await check.on_rcpt(request(client="192.0.3.1", instance="i5"))
        assert other_net.decisive
    run_check(redis_server.url, scenario)


def test_header_is_added_once_per_message(redis_server):
    async def scenario(check, clock):
        shared = TransactionState()
        for rcpt in ("a@example.test", "b@example.test"):
            r = request(rcpt=rcpt)
            assert (await check.on_rcpt(r)).decisive
        clock.now += 301
        replies = []
        for rcpt in ("a@example.test", "b@example.test"):
            r = request(rcpt=rcpt)
            r.transaction = shared
            replies.append((await check.on_rcpt(r)).reply)
        assert replies[0].startswith("PREPEND X-Greylist") and replies[1] == "DUNNO"
    run_check(redis_server.url, scenario)


def test_retry_after_the_window_starts_over(redis_server):
    async def scenario(check, clock):
        assert (await check.on_rcpt(request())).reason == "new triplet"
        clock.now += 2 * 86400 + 1
        assert (await check.on_rcpt(request())).reason == "new triplet"
    run_check(redis_server.url, scenario)


def test_passed_triplet_is_forgotten_after_max_age(redis_server):
    async def scenario(check, clock):
        await check.on_rcpt(request())
        clock.now += 300
        await check.on_rcpt(request())
        from policyd import keys

        key = keys.greylist_triplet("t:", *check.triplet(request()))
        ttl = await check.redis.call("TTL", key)
        assert 35 * 86400 - 5 <= ttl <= 35 * 86400
    run_check(redis_server.url, scenario)


def test_a_triplet_never_retried_is_forgotten_after_the_retry_window(redis_server):
    """A new triplet expires with the retry window, or the keys of senders that never retry pile up."""
    from policyd import keys

    async def scenario(check, clock):
        key = keys.greylist_triplet("t:", *check.triplet(request()))
        assert (await check.on_rcpt(request())).reason == "new triplet"
        assert 3600 - 5 <= await check.redis.call("TTL", key) <= 3600
        clock.now += 60
        assert (await check.on_rcpt(request(instance="i2"))).reason.startswith("early retry")
        assert 3600 - 5 <= await check.redis.call("TTL", key) <= 3600
    run_check(redis_server.url, scenario, retry_window="1h")


@pytest.mark.parametrize(("first", "retry"), [
    ("prvs=1234abcd=user@example.org", "prvs=9876fedc=user@example.org"),  # BATV: a new tag per message
    ("user+tag1@example.org", "user+tag2@example.org"),
    ("list-bounces-123-user=example.com@lists.example.org",   # VERP: a new number per message
     "list-bounces-456-user=example.com@lists.example.org"),
])
def test_a_retry_with_another_batv_or_verp_sender_is_the_same_triplet(redis_server, first, retry):
    async def scenario(check, clock):
        assert (await check.on_rcpt(request(sender=first))).reason == "new triplet"
        clock.now += 300
        passed = await check.on_rcpt(request(sender=retry, instance="i2"))
        assert not passed.decisive and passed.reply.startswith("PREPEND X-Greylist: delayed 300 seconds by ")
    run_check(redis_server.url, scenario)


def test_client_is_auto_whitelisted_after_five_passes_an_hour_apart(redis_server):
    async def scenario(check, clock):
        for n in range(5):
            triplet = {"sender": f"s{n}x@example.org"}
            assert (await check.on_rcpt(request(**triplet))).decisive
            clock.now += 300
            assert not (await check.on_rcpt(request(**triplet))).decisive
            clock.now += 3600
        fresh = await check.on_rcpt(request(sender="brand-new@example.org"))
        assert not fresh.decisive and fresh.reason.startswith("client auto-whitelisted")
        # a neighbour in the same /24 is not whitelisted: the auto-whitelist is per address
        assert (await check.on_rcpt(request(client="192.0.2.11", sender="brand-new@example.org"))).decisive
    run_check(redis_server.url, scenario)


def test_passes_within_an_hour_count_once_towards_the_auto_whitelist(redis_server):
    async def scenario(check, clock):
        for n in range(6):
            triplet = {"sender": f"t{n}x@example.org"}
            await check.on_rcpt(request(**triplet))
            clock.now += 300
            await check.on_rcpt(request(**triplet))
        assert (await check.on_rcpt(request(sender="brand-new@example.org"))).decisive
    run_check(redis_server.url, scenario, auto_whitelist_clients=2)


def test_exemptions(redis_server):
    async def scenario(check, clock):
        assert (await check.on_rcpt(request(sasl_username="alice"))).reason == "authenticated client"
        assert (await check.on_rcpt(request(rcpt="postmaster@example.test"))).reason.startswith("recipient whitelisted")
        assert (await check.on_rcpt(request(client="garbage"))).reason == "no usable client address"
        r = request()
        r.client_name = "mx.amazon.com"
        assert (await check.on_rcpt(r)).reason == "client whitelisted (amazon.com)"
    run_check(redis_server.url, scenario)


@pytest.mark.parametrize(("name", "listed", "greylisted"), [
    ("unknown", False, True),
    ("", False, True),
    ("dsl-84-12-3-4.isp.example", False, True),
    ("84.12.3.4.customer.example", False, True),
    ("pool-71-3.broadband.example", False, True),
    ("mx1.example.com", False, False),
    ("mail-oi1-f170.google.example", False, False),
    ("mx1.example.com", True, True),
])
def test_only_suspicious_clients_are_greylisted_when_configured(redis_server, name, listed, greylisted):
    from policyd.results import ListAnswer

    async def scenario(check, clock):
        r = request()
        r.client_name = name
        if listed:
            r.transaction.dnsbl = (r.client_ip, [ListAnswer("weak.test", 1.0, ("127.0.0.5",))])
        verdict = await check.on_rcpt(r)
        assert verdict.decisive == greylisted, verdict
    run_check(redis_server.url, scenario, only_suspicious=True)


def test_a_triplet_passed_by_hand_passes_and_keeps_its_first_sighting(redis_server):
    from policyd import keys

    async def scenario(check, clock):
        assert (await check.on_rcpt(request())).reason == "new triplet"
        key = keys.greylist_triplet("t:", *check.triplet(request()))
        first = await check.redis.call("HGET", key, "f")
        await check.redis.call("HSET", key, "p", "1")  # what `greylist pass` does
        clock.now += 3 * 86400  # past the retry window: a triplet not passed would start over
        assert (await check.on_rcpt(request(instance="i2"))).reason == "triplet passed before"
        assert await check.redis.call("HGET", key, "f") == first
        assert 35 * 86400 - 5 <= await check.redis.call("TTL", key) <= 35 * 86400
    run_check(redis_server.url, scenario)


def test_a_client_pass_lets_an_unseen_client_through_and_remembers_the_triplet(redis_server):
    from policyd import keys

    async def scenario(check, clock):
        await check.redis.call("SET", keys.greylist_passed_client("t:", "192.0.2.0/24"), "{}", "EX", "60")
        verdict = await check.on_rcpt(request(client="192.0.2.99"))
        assert not verdict.decisive and verdict.reason == "client let through by 'greylist pass'"
        await check.redis.call("DEL", keys.greylist_passed_client("t:", "192.0.2.0/24"))
        assert (await check.on_rcpt(request(client="192.0.2.99", instance="i2"))).reason == "triplet passed before"
        assert (await check.on_rcpt(request(client="192.0.2.99", sender="new@example.org"))).decisive
    run_check(redis_server.url, scenario)
