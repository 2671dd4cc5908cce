"""The directory-side harness works: test DNS (DNSBL, DNSWL, SPF), private slapd, private Dovecot quota-status."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import aiodns
import dns.exception
import dns.message
import dns.query
import dns.resolver
import pytest
import spf
from harness.dns_server import TEST_ZONE, DnsServer, dnsbl_query_name
from harness.dovecot import OVERQUOTA, DovecotInstance, _group_alive
from harness.slapd import SlapdInstance
from ldap3.core.exceptions import LDAPCommunicationError
from ldap3.utils.conv import escape_filter_chars
from pydnsbl import DNSBLIpChecker
from pydnsbl.providers import Provider

# --- DNS ---------------------------------------------------------------------------------------------------


# dns_server: the fixture in conftest.py (DnsServer() serving TEST_ZONE, one per test)


def resolver_for(server: DnsServer, lifetime: float = 2.0) -> dns.resolver.Resolver:
    resolver = dns.resolver.Resolver(configure=False)  # never /etc/resolv.conf
    resolver.nameservers = [server.host]
    resolver.port = server.port
    resolver.lifetime = lifetime
    return resolver


def a(resolver: dns.resolver.Resolver, name: str) -> list[str]:
    return [r.to_text() for r in resolver.resolve(name, "A")]


def test_dns_lists_answer_a_and_txt(dns_server: DnsServer) -> None:
    r = resolver_for(dns_server)
    assert a(r, "2.0.0.127.bl.test") == ["127.0.0.2"]
    assert a(r, dnsbl_query_name("192.0.2.99", "bl.test")) == ["127.0.0.2"]
    txt = [t.to_text() for t in r.resolve("99.2.0.192.bl.test", "TXT")]
    assert len(txt) == 1 and "192.0.2.99" in txt[0]
    assert a(r, dnsbl_query_name("2001:db8::99", "bl.test")) == ["127.0.0.2"]
    assert a(r, dnsbl_query_name("::ffff:127.0.0.2", "bl.test")) == ["127.0.0.2"]
    assert a(r, dnsbl_query_name("192.0.2.98", "weak.test")) == ["127.0.0.5"]
    assert a(r, dnsbl_query_name("192.0.2.77", "wl.test")) == ["127.0.10.1"]


def test_dns_nxdomain_only_for_names_without_records(dns_server: DnsServer) -> None:
    r = resolver_for(dns_server)
    with pytest.raises(dns.resolver.NXDOMAIN):
        r.resolve(dnsbl_query_name("192.0.2.1", "bl.test"), "A")
    with pytest.raises(dns.resolver.NXDOMAIN):
        r.resolve(dnsbl_query_name("127.0.0.1", "bl.test"), "A")  # RFC 5782: never listed
    with pytest.raises(dns.resolver.NoAnswer):  # example.test has TXT and MX, no A: NODATA
        r.resolve("example.test", "A")
    with pytest.raises(dns.resolver.NoAnswer):  # empty non-terminal above 99.2.0.192.bl.test
        r.resolve("2.0.192.bl.test", "A")


def test_dns_tcp_on_the_same_port(dns_server: DnsServer) -> None:
    reply = dns.query.tcp(dns.message.make_query("_spf.example.test", "TXT"), dns_server.host,
                          port=dns_server.port, timeout=2)
    assert "ip4:198.51.100.11" in reply.answer[0].to_text()
    assert {q.protocol for q in dns_server.queries} == {"tcp"}


def test_dns_silent_name_times_out(dns_server: DnsServer) -> None:
    dns_server.silent_names.add("bl.test")  # the whole list stops answering
    r = resolver_for(dns_server, lifetime=0.5)
    started = time.monotonic()
    with pytest.raises(dns.exception.Timeout):
        r.resolve("99.2.0.192.bl.test", "A")
    assert time.monotonic() - started >= 0.4
    assert a(r, "98.2.0.192.weak.test") == ["127.0.0.5"]  # other names still answer


def test_dns_garbage_name_raises_at_once(dns_server: DnsServer) -> None:
    dns_server.garbage_names.add("99.2.0.192.bl.test")
    r = resolver_for(dns_server, lifetime=5)
    started = time.monotonic()
    with pytest.raises(dns.resolver.NoNameservers):
        r.resolve("99.2.0.192.bl.test", "A")
    assert time.monotonic() - started < 1  # a bad answer, not a timeout


def test_dns_zone_replaced_while_running(dns_server: DnsServer) -> None:
    r = resolver_for(dns_server)
    with pytest.raises(dns.resolver.NXDOMAIN):
        r.resolve("5.2.0.192.bl.test", "A")
    dns_server.set_zone(TEST_ZONE + "5.2.0.192.bl.test. IN A 127.0.0.2\n")
    assert a(r, "5.2.0.192.bl.test") == ["127.0.0.2"]
    dns_server.stop()
    dns_server.start()  # again, on the same port
    assert a(r, "5.2.0.192.bl.test") == ["127.0.0.2"]


@pytest.mark.parametrize(("ip", "sender", "helo", "expected"), [
    ("192.0.2.5", "alice@example.test", "client.test", "pass"),
    ("198.51.100.11", "alice@example.test", "client.test", "pass"),  # via include:_spf.example.test
    ("203.0.113.7", "alice@example.test", "client.test", "fail"),
    ("203.0.113.7", "x@softfail.test", "client.test", "softfail"),
    ("192.0.2.1", "x@fail.test", "client.test", "fail"),
    ("203.0.113.7", "x@nospf.test", "client.test", "none"),
    ("192.0.2.10", "postmaster@mx.example.test", "mx.example.test", "pass"),  # HELO identity, "a -all"
    ("192.0.2.11", "postmaster@mx.example.test", "mx.example.test", "fail"),
])
def test_spf_records_through_pyspf(dns_server: DnsServer, monkeypatch: pytest.MonkeyPatch,
                                   ip: str, sender: str, helo: str, expected: str) -> None:
    # pyspf has no resolver argument: it uses dnspython's process-wide default resolver
    monkeypatch.setattr(dns.resolver, "default_resolver", resolver_for(dns_server))
    assert spf.check2(i=ip, s=sender, h=helo)[0] == expected


def test_dnsbl_through_pydnsbl(dns_server: DnsServer) -> None:
    loop = asyncio.new_event_loop()  # pydnsbl's sync API runs on a loop of its own
    checker = DNSBLIpChecker(providers=[Provider("bl.test"), Provider("weak.test")], timeout=2, tries=1, loop=loop)
    # pydnsbl takes no nameserver port: swap in an aiodns resolver on its loop (pydnsbl internals)
    checker._resolver = aiodns.DNSResolver(nameservers=[dns_server.host], udp_port=dns_server.port,
                                           tcp_port=dns_server.port, timeout=2, tries=1, loop=checker._loop)
    assert checker.check("192.0.2.99").detected_by == {"bl.test": ["unknown"]}
    assert checker.check("192.0.2.98").detected_by == {"weak.test": ["unknown"]}
    assert checker.check("2001:db8::99").detected_by == {"bl.test": ["unknown"]}
    assert not checker.check("192.0.2.1").blacklisted
    dns_server.garbage_names.add("bl.test")
    dns_server.silent_names.add("weak.test")
    result = checker.check("192.0.2.99")  # TTL 0: the c-ares cache does not hide the change
    assert not result.blacklisted
    assert {p.host for p in result.failed_providers} == {"bl.test", "weak.test"}
    loop.close()


# --- LDAP --------------------------------------------------------------------------------------------------


@pytest.fixture
def slapd() -> Iterator[SlapdInstance]:
    with SlapdInstance() as instance:
        yield instance


def lookup(slapd: SlapdInstance, address: str) -> list[tuple[str, dict]]:
    conn = slapd.connection()
    a = escape_filter_chars(address.lower())
    _status, _result, response, _ = conn.search(
        slapd.base, f"(|(mail={a})(mailAlternateAddress={a}))",
        attributes=["mail", "mailAlternateAddress", "accountStatus", "mailForwardingAddress"])
    return [(e["dn"], dict(e["attributes"])) for e in response if e["type"] == "searchResEntry"]


def test_ldap_directory_content(slapd: SlapdInstance) -> None:
    assert slapd.base == "dc=example,dc=org"
    [(dn, carol)] = lookup(slapd, "C.Smith@example.org")
    assert dn == "uid=carol,ou=people,dc=example,dc=org"
    assert carol["mail"] == ["carol@example.org"]
    assert carol["mailAlternateAddress"] == ["c.smith@example.org", "carol@example.net"]
    [(_, bob)] = lookup(slapd, "bob@example.org")
    assert bob["accountStatus"] == "disabled"  # SINGLE-VALUE: a str, not a list
    [(_, alice)] = lookup(slapd, "alice@example.org")
    assert alice["accountStatus"] == "active"
    [(_, team)] = lookup(slapd, "team@example.org")
    assert team["mailForwardingAddress"] == ["alice@example.org", "carol@example.org"]
    assert lookup(slapd, "nobody@example.org") == []
    assert slapd.connection("uid=alice,ou=people,dc=example,dc=org", "alicepw").extend.standard.who_am_i()


def test_ldap_stop_and_restart_on_the_same_port(slapd: SlapdInstance) -> None:
    conn = slapd.connection()
    port = slapd.port
    slapd.stop()
    assert slapd.proc is not None and slapd.proc.poll() is not None
    with pytest.raises(LDAPCommunicationError):  # LDAPSessionTerminatedByServerError
        conn.search(slapd.base, "(mail=alice@example.org)")
    with pytest.raises(LDAPCommunicationError):  # LDAPSocketOpenError: connection refused
        lookup(slapd, "alice@example.org")
    slapd.start()
    assert slapd.port == port
    assert lookup(slapd, "alice@example.org")[0][1]["accountStatus"] == "active"


def test_ldap_paused_server_times_out(slapd: SlapdInstance) -> None:
    conn = slapd.connection(timeout=1)
    slapd.pause()  # hung, not down: the kernel still accepts, nothing answers
    with pytest.raises(LDAPCommunicationError):  # LDAPSocketReceiveError after receive_timeout
        conn.search(slapd.base, "(mail=alice@example.org)")
    slapd.resume()


# --- Dovecot quota-status ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dovecot() -> Iterator[DovecotInstance]:
    with DovecotInstance() as instance:
        yield instance


@pytest.mark.parametrize(("recipient", "size", "action"), [
    ("alice@example.org", 1000, "DUNNO"),
    ("alice@example.org", 2_000_000, OVERQUOTA),  # would not fit in 1M
    ("carol@example.org", 1000, "DUNNO"),
    ("full@example.org", 1000, OVERQUOTA),
    ("full@example.org", None, OVERQUOTA),  # over quota already, whatever the size
    ("three@example.org", 5_000_000, OVERQUOTA),
    ("three@example.org", 1_000_000, "DUNNO"),
    ("nobody@example.org", 1000, "DUNNO"),  # unknown user: no verdict
])
def test_quota_status_verdicts(dovecot: DovecotInstance, recipient: str, size: int | None, action: str) -> None:
    assert dovecot.quota_status(recipient, size) == action


def test_quota_usage_as_filled(dovecot: DovecotInstance) -> None:
    assert 1800 < dovecot.quota_used_kib("three@example.org") < 2100
    assert dovecot.quota_used_kib("full@example.org") > 20
    assert dovecot.quota_used_kib("carol@example.org") == 0


def test_dovecot_stop_leaves_nothing_running() -> None:
    instance = DovecotInstance().start()
    try:
        assert instance.quota_status("alice@example.org", 1000) == "DUNNO"
        assert instance.proc is not None
        pgid = instance.proc.pid
        instance.stop()
        assert not _group_alive(pgid)
        for port in (instance.quota_port, instance.imap_port):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
    finally:
        instance.cleanup()
