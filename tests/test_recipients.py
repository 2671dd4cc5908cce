"""Recipient verification against real sources: a map file, SQLite through SQLAlchemy, OpenLDAP slapd
(active, disabled, alternate addresses, fail-over, outage), with the Redis cache between."""

from __future__ import annotations

import sqlite3
import time

import pytest
from conftest import base_settings
from harness.net import free_port, wait_for

from policyd.recipients import lookup_key

TEMPFAIL = "DEFER_IF_PERMIT 4.3.0 Temporary local problem, please try again later"


def ldap_settings(redis_url: str, *urls: str, **recipients) -> dict:
    return base_settings(redis_url, checks=["recipients"], recipients={
        "domains": ["example.org", "example.net"], "sources": ["ldap"],
        "ldap": {"servers": list(urls), "base": "dc=example,dc=org", "timeout": "1s"}, **recipients})


@pytest.mark.parametrize(("recipient", "key"), [
    ("Alice@Example.ORG", "alice@example.org"),
    ("alice+lists@example.org", "alice@example.org"),
    ('"alice+x"@example.org', '"alice+x"@example.org'),
    ("postmaster", None),
    ("@example.org", None),
    ("alice@", None),
    ("jörg@example.org", "jörg@example.org"),
])
def test_lookup_keys(recipient, key):
    assert lookup_key(recipient, "+") == key


@pytest.mark.parametrize(("recipient", "answer"), [
    ("alice@example.org", "DUNNO"),
    ("Alice+news@Example.org", "DUNNO"),
    ("c.smith@example.org", "DUNNO"),
    ("carol@example.net", "DUNNO"),
    ("team@example.org", "DUNNO"),
    ("bob@example.org", "550 5.2.1 Mailbox disabled"),
    ("nobody@example.org", "550 5.1.1 User unknown"),
    ("nobody@elsewhere.example", "DUNNO"),  # not our domain
    ("x)(mail=*@example.org", "550 5.1.1 User unknown"),  # filter injection is escaped
    ("a" * 65 + "@example.org", "550 5.1.3 Bad recipient address syntax"),
    ("b@" + "x" * 250 + ".org", "550 5.1.3 Bad recipient address syntax"),
    ("postmaster", "DUNNO"),
    ("jörg@example.org", "550 5.1.1 User unknown"),
])
def test_ldap_answers(policyd_factory, redis_server, slapd, recipient, answer):
    daemon = policyd_factory(ldap_settings(redis_server.url, slapd.url))
    with daemon.connect() as c:
        assert c.ask(recipient=recipient) == answer


def test_log_names_the_source_and_the_mailbox_is_resolved(policyd_factory, redis_server, slapd):
    daemon = policyd_factory(ldap_settings(redis_server.url, slapd.url))
    with daemon.connect() as c:
        c.ask(recipient="c.smith@example.org", queue_id="Q1")
    assert 'queue_id=Q1' in daemon.wait_log('reason="recipient known (ldap)"')
    cached = redis_server.client().keys("mw:rcpt:*")
    assert len(cached) == 1 and redis_server.client().get(cached[0]) == b"f:carol@example.org"


def test_directory_outage_gives_a_temporary_failure_not_550_and_recovers(policyd_factory, redis_server, slapd):
    daemon = policyd_factory(ldap_settings(redis_server.url, slapd.url, negative_cache_ttl=0, cache_ttl=0))
    with daemon.connect() as c:
        assert c.ask(recipient="alice@example.org") == "DUNNO"
        slapd.stop()
        started = time.monotonic()
        assert c.ask(recipient="alice@example.org") == TEMPFAIL
        assert c.ask(recipient="nobody@example.org") == TEMPFAIL
        assert time.monotonic() - started < 5
        slapd.start()  # the next lookup reconnects at once (no stale connection or server state is kept)
        assert c.ask(recipient="nobody@example.org") == "550 5.1.1 User unknown"
        assert c.ask(recipient="alice@example.org") == "DUNNO"
    daemon.wait_log("backend=ldap")
    daemon.wait_log("fail mode defer_if_permit")


def test_a_paused_directory_is_bounded_too(policyd_factory, redis_server, slapd):
    daemon = policyd_factory(ldap_settings(redis_server.url, slapd.url, negative_cache_ttl=0, cache_ttl=0))
    with daemon.connect() as c:
        assert c.ask(recipient="alice@example.org") == "DUNNO"
        slapd.pause()
        try:
            started = time.monotonic()
            # the LDAP timeout, or answer_within (2s) at worst, ends the wait: either way ldap's fail mode
            assert c.ask(recipient="carol@example.org") == TEMPFAIL
            assert time.monotonic() - started < 3.0
        finally:
            slapd.resume()
    # which bound ends it first depends on scheduling (the LDAP timeout and its one retry on a fresh connection,
    # or answer_within): each is logged as an LDAP failure answered in ldap's fail mode
    [line] = [line for line in daemon.wait_log("recipient=carol@example.org").splitlines()
              if "recipient=carol@example.org" in line]
    assert ('check=recipients action=defer reason="ldap failed: ' in line
            or 'check=timeout action=defer reason="no decision within 2s (waiting on ldap); fail mode defer_if_permit"'
            in line), line


def test_second_server_takes_over_when_the_first_is_down(policyd_factory, redis_server, slapd):
    dead = f"ldap://127.0.0.1:{free_port()}"
    daemon = policyd_factory(ldap_settings(redis_server.url, dead, slapd.url))
    with daemon.connect() as c:
        assert c.ask(recipient="alice@example.org") == "DUNNO"
        assert c.ask(recipient="nobody@example.org") == "550 5.1.1 User unknown"


def test_cached_answers_survive_a_directory_outage(policyd_factory, redis_server, slapd):
    daemon = policyd_factory(ldap_settings(redis_server.url, slapd.url))
    with daemon.connect() as c:
        assert c.ask(recipient="alice@example.org") == "DUNNO"
        assert c.ask(recipient="nobody@example.org") == "550 5.1.1 User unknown"
        slapd.stop()
        assert c.ask(recipient="alice@example.org") == "DUNNO"
        assert c.ask(recipient="nobody@example.org") == "550 5.1.1 User unknown"
    assert 55 <= redis_server.client().ttl(redis_server.client().keys("mw:rcpt:*")[0]) <= 600


def test_disabling_an_account_in_the_directory_takes_effect_after_the_cache(policyd_factory, redis_server,
                                                                              slapd):
    daemon = policyd_factory(ldap_settings(redis_server.url, slapd.url, cache_ttl=1))
    with daemon.connect() as c:
        assert c.ask(recipient="carol@example.org") == "DUNNO"
        from ldap3 import MODIFY_REPLACE
        admin = slapd.admin_connection()
        admin.modify("uid=carol,ou=people,dc=example,dc=org", {"accountStatus": [(MODIFY_REPLACE, ["disabled"])]})
        time.sleep(1.1)
        assert c.ask(recipient="carol@example.org") == "550 5.2.1 Mailbox disabled"


def test_map_file_with_aliases_and_catch_all(policyd_factory, redis_server, tmp_path):
    recipients = tmp_path / "recipients"
    recipients.write_text("# users\nalice@example.org\nsales@example.org: alice@example.org, bob@example.org\n"
                          "@lists.example.org\n")
    daemon = policyd_factory(base_settings(redis_server.url, checks=["recipients"], recipients={
        "domains": ["example.org", "lists.example.org"], "sources": ["file"], "negative_cache_ttl": 0,
        "file": {"paths": [str(recipients)]}}))
    with daemon.connect() as c:
        assert c.ask(recipient="alice@example.org") == "DUNNO"
        assert c.ask(recipient="SALES@example.org") == "DUNNO"
        assert c.ask(recipient="anything@lists.example.org") == "DUNNO"
        assert c.ask(recipient="carol@example.org") == "550 5.1.1 User unknown"
        recipients.write_text(recipients.read_text() + "carol@example.org\n")
        wait_for(lambda: c.ask(recipient="carol@example.org") == "DUNNO", 5,  # re-read when it changes
                 what="the changed recipients file re-read")


def test_sql_source_with_sqlite(policyd_factory, redis_server, tmp_path):
    db = tmp_path / "users.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE recipients (address TEXT PRIMARY KEY, mailbox TEXT, active INTEGER)")
        conn.executemany("INSERT INTO recipients VALUES (?, ?, ?)", [
            ("alice@example.org", "alice@example.org", 1), ("al@example.org", "alice@example.org", 1),
            ("bob@example.org", "bob@example.org", 0)])
    daemon = policyd_factory(base_settings(redis_server.url, checks=["recipients"], recipients={
        "domains": ["example.org"], "sources": ["sql"],
        "sql": {"url": f"sqlite:///{db}", "query": "SELECT mailbox, active FROM recipients WHERE address = :address"},
    }))
    with daemon.connect() as c:
        assert c.ask(recipient="al@example.org") == "DUNNO"
        assert c.ask(recipient="bob@example.org") == "550 5.2.1 Mailbox disabled"
        assert c.ask(recipient="x'; DROP TABLE recipients; --@example.org") == "550 5.1.1 User unknown"
        assert c.ask(recipient="carol@example.org") == "550 5.1.1 User unknown"
    assert redis_server.client().get(redis_server.client().keys("mw:rcpt:*")[0]) is not None


def test_broken_sql_source_is_a_temporary_failure(policyd_factory, redis_server, tmp_path):
    daemon = policyd_factory(base_settings(redis_server.url, checks=["recipients"], recipients={
        "sources": ["sql"], "sql": {"url": f"sqlite:///{tmp_path}/missing.db",
                                    "query": "SELECT mailbox FROM nowhere WHERE address = :address"}}))
    with daemon.connect() as c:
        assert c.ask(recipient="alice@example.org") == TEMPFAIL
    assert "sql lookup failed: OperationalError" in daemon.wait_log("sql lookup failed")


def test_first_source_that_knows_decides_and_a_down_source_does_not_hide_a_known_address(
        policyd_factory, redis_server, tmp_path):
    recipients = tmp_path / "recipients"
    recipients.write_text("alice@example.org\n")
    dead = f"ldap://127.0.0.1:{free_port()}"
    daemon = policyd_factory(base_settings(redis_server.url, checks=["recipients"], recipients={
        "sources": ["ldap", "file"], "file": {"paths": [str(recipients)]}, "negative_cache_ttl": 0,
        "ldap": {"servers": [dead], "base": "dc=example,dc=org", "timeout": "1s"}}))
    with daemon.connect() as c:
        assert c.ask(recipient="alice@example.org") == "DUNNO"  # LDAP down, the file knows her
        assert c.ask(recipient="nobody@example.org") == TEMPFAIL  # nobody knows, LDAP could not say


def test_sql_source_with_mariadb_and_its_outage(policyd_factory, redis_server, mariadb):
    url = mariadb.create_database("mailusers", drop=True)
    mariadb.run_script(
        "CREATE TABLE mailusers.virtual_users (email VARCHAR(254) PRIMARY KEY, mailbox VARCHAR(254), "
        "enabled TINYINT);"
        "INSERT INTO mailusers.virtual_users VALUES ('alice@example.org', 'alice@example.org', 1),"
        "('postmaster@example.org', 'alice@example.org', 1), ('bob@example.org', 'bob@example.org', 0);")
    daemon = policyd_factory(base_settings(redis_server.url, checks=["recipients"], recipients={
        "domains": ["example.org"], "sources": ["sql"], "cache_ttl": 0, "negative_cache_ttl": 0,
        "sql": {"url": url, "timeout": "1s",
                "query": "SELECT mailbox, enabled FROM virtual_users WHERE email = :address"}}))
    with daemon.connect() as c:
        assert c.ask(recipient="Postmaster@example.org") == "DUNNO"
        assert c.ask(recipient="bob@example.org") == "550 5.2.1 Mailbox disabled"
        assert c.ask(recipient="nobody@example.org") == "550 5.1.1 User unknown"
        mariadb.stop()
        assert c.ask(recipient="alice@example.org") == TEMPFAIL
        assert c.ask(recipient="nobody@example.org") == TEMPFAIL
        mariadb.start()
        assert c.ask(recipient="alice@example.org") == "DUNNO"
    daemon.wait_log("backend=sql")
