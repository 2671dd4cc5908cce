"""The review page served for real: ``mailwarden phish serve`` (a separate process, uvicorn on free loopback
ports) with its review listener, Redis from the tests' fixture, the quarantine's SQLite database migrated,
the full GeoLite2 City database; snags made for real through the intake (two logins an hour apart, Boston
then Beijing), driven over HTTP with httpx.

What it shows: every page needs a login; a right password logs in, a wrong one is refused (401) and, after
``failed_logins`` failures from one address or for one account, every attempt is refused (429) without the
password being looked at until the window passes, each failure and the first refusal in the audit log; the
proxy's login header is believed from a trusted proxy only; a POST without the session's CSRF token (or
with another session's) is refused 403 and changes nothing; hostile login names, reasons and notes come out
escaped; the verdicts call the Resolver (the account unblocked, the audit row naming the reviewer) and a
second verdict on a decided snag is a clear 409.

The server trusts the proxy address 127.0.0.2 only (Linux answers all of 127.0.0.0/8 on the loopback): a
client bound to 127.0.0.2 is "the proxy", one on 127.0.0.1 is anyone else.
"""

from __future__ import annotations

import html
import re
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from _maxminddb_geolite2 import geolite2_database
from argon2 import PasswordHasher
from harness.net import free_port, wait_for
from harness.phishhook_proc import PhishhookProcess
from harness.redis_server import RedisProcess
from phish_places import CN_BEIJING, US_BOSTON_A

from mailwarden.config import load_config
from phishhook import keys
from phishhook.snags import SnagStore
from policyd.blocklist import BlockList

PREFIX = "phrev:"
TOKEN = "intake-token-for-the-review-tests-0123456789"
PASSWORD = "correct horse battery staple"
SECRET = "review-tests-session-secret-0123456789abcdef"
PROXY = "127.0.0.2"
FAILED_LOGINS = 3
WINDOW = 4
"""Seconds of the failed-login window (short, so the test can see it pass)."""
HOSTILE_USER = "<script>alert(1)</script>@x"
CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Review:
    service: PhishhookProcess
    redis: redis.Redis
    store: SnagStore
    config_path: Path

    def client(self, proxy: bool = False) -> httpx.Client:
        """A browser-like client (keeps cookies, does not follow redirects), from 127.0.0.1 or the proxy."""
        transport = httpx.HTTPTransport(local_address=PROXY if proxy else "127.0.0.1")
        return httpx.Client(base_url=self.service.review_url, transport=transport, follow_redirects=False,
                            timeout=30)

    def login(self, name: str = "alice", password: str = PASSWORD, proxy: bool = False,
              forwarded: str | None = None) -> tuple[httpx.Client, httpx.Response]:
        client = self.client(proxy)
        answer = self.post_login(client, name, password, forwarded)
        return client, answer

    def post_login(self, client: httpx.Client, name: str, password: str,
                   forwarded: str | None = None) -> httpx.Response:
        page = client.get("/login")
        assert page.status_code == 200, page.text
        headers = {"X-Forwarded-For": forwarded} if forwarded else {}
        return client.post("/login", data={"csrf": csrf_of(page.text), "name": name, "password": password},
                           headers=headers)

    def snag(self, user: str, when: float | None = None) -> str:
        """Snag ``user`` for real: a login from Boston, then one from Beijing an hour later (the intake's
        ``at``); the new snag's public id."""
        now = when if when is not None else time.time()
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        status, first = self.service.post("/login", {"user": user, "address": US_BOSTON_A, "at": now - 3600,
                                                     "service": "imap"}, bearer)
        assert status == 200 and first["snag"] is None, first
        status, second = self.service.post("/login", {"user": user, "address": CN_BEIJING, "at": now,
                                                      "service": "webmail"}, bearer)
        assert status == 200 and second["snag"], second
        return str(second["snag"])

    def audit(self, action: str) -> list:
        return [entry for entry in self.store.audit(limit=500) if entry.action == action]


def csrf_of(page: str) -> str:
    found = CSRF_FIELD.search(page)
    assert found, f"no CSRF field in the page:\n{page[:2000]}"
    return html.unescape(found.group(1))


@pytest.fixture(scope="module")
def review(shared_redis: RedisProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Review]:
    work = tmp_path_factory.mktemp("phish-review")
    settings = {
        "redis": {"url": shared_redis.url, "key_prefix": PREFIX},
        "quarantine": {"database_url": f"sqlite:///{work / 'quarantine.sqlite'}", "message_dir": str(work / "held")},
        "phishhook": {
            "geo": {"city_database": geolite2_database()},
            "history": {"learning_period": "0s"},
            "intake": {"tokens": {"webmail": TOKEN}},
            "actions": {"run": [{"type": "block-account"}, {"type": "block-address"}]},
            "review": {"accounts": {"alice": PasswordHasher().hash(PASSWORD),
                                    "bob": PasswordHasher().hash(PASSWORD + "-bob")},
                       "session_secret": SECRET, "trusted_header": "X-Remote-User", "trusted_proxies": [f"{PROXY}/32"],
                       "failed_logins": FAILED_LOGINS, "failed_window": f"{WINDOW}s"},
        },
    }
    service = PhishhookProcess(work, settings, review_port=free_port())
    config_path = service.write_config()
    subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config_path), "quarantine", "migrate"],
                   check=True, capture_output=True)
    client = redis.Redis.from_url(shared_redis.url)
    for key in client.scan_iter(match=f"{PREFIX}*"):
        client.delete(key)
    service.start()
    store = SnagStore.open(load_config(config_path).section("quarantine"))
    yield Review(service, client, store, config_path)
    service.stop()
    store.close()


@pytest.fixture
def fresh(review: Review) -> Review:
    """No failed-login counts left by an earlier test."""
    for key in review.redis.scan_iter(match=f"{PREFIX}{keys.REVIEW_FAILED_ADDRESS[:-2]}*"):
        review.redis.delete(key)
    return review


def test_every_page_needs_a_login(fresh: Review) -> None:
    snag = fresh.snag("carol")
    client = fresh.client()
    for path in ("/", "/audit", f"/snags/{snag}", "/logins/carol", "/snags/nosuchsnag"):
        answer = client.get(path)
        assert answer.status_code == 303, (path, answer.status_code)
        assert answer.headers["location"] == "/login"
    token = csrf_of(client.get("/login").text)  # a pre-login session with a valid token: still not logged in
    for path in (f"/snags/{snag}/confirm", f"/snags/{snag}/safe", f"/snags/{snag}/dismiss", "/logout"):
        answer = client.post(path, data={"csrf": token, "note": "x"})
        assert answer.status_code == 401, (path, answer.status_code)
        assert "Log in first" in answer.text
    assert str(fresh.store.get(snag).state) == "open"
    assert client.get("/static/review.css").status_code == 200  # the login page's stylesheet
    # a ticket's link: the login leads back to the snag asked for
    assert client.get(f"/snags/{snag}").status_code == 303
    answer = fresh.post_login(client, "alice", PASSWORD)
    assert answer.status_code == 303 and answer.headers["location"] == f"/snags/{snag}"


def test_login_and_logout(fresh: Review) -> None:
    client, answer = fresh.login()
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    cookie = answer.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "max-age=28800" in cookie
    page = client.get("/")
    assert page.status_code == 200 and '<span class="who" id="who">alice</span>' in page.text
    assert any(entry.actor == "review:alice" and entry.action == "login" for entry in fresh.audit("login"))
    out = client.post("/logout", data={"csrf": csrf_of(page.text)})
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert client.get("/").status_code == 303


def test_wrong_password_refused(fresh: Review) -> None:
    for name, password in (("alice", "wrong password"), ("nobody", PASSWORD), ("alice", "")):
        client, answer = fresh.login(name, password)
        assert answer.status_code == 401, (name, answer.status_code)
        assert "Wrong login name or password." in answer.text
        assert client.get("/").status_code == 303, "a failed login must not log in"
    failed = [entry.detail for entry in fresh.audit("login-failed")]
    assert any("'nobody'" in detail for detail in failed), failed


def test_failed_logins_rate_limited_by_address(fresh: Review) -> None:
    """Three wrong passwords from one address (for three names): the fourth attempt, even with the right
    password, is refused 429 until the window passes; each failure and the first refusal are audited."""
    before_failed, before_limited = len(fresh.audit("login-failed")), len(fresh.audit("login-rate-limited"))
    address = "198.51.100.7"
    for name in ("alice", "bob", "mallory"):
        _, answer = fresh.login(name, "wrong password", proxy=True, forwarded=address)
        assert answer.status_code == 401
    _, answer = fresh.login("alice", PASSWORD, proxy=True, forwarded=address)
    assert answer.status_code == 429, answer.text
    assert "Too many failed logins" in answer.text
    assert 0 < int(answer.headers["retry-after"]) <= WINDOW
    _, again = fresh.login("alice", PASSWORD, proxy=True, forwarded=address)
    assert again.status_code == 429
    assert len(fresh.audit("login-failed")) == before_failed + 3
    limited = fresh.audit("login-rate-limited")
    assert len(limited) == before_limited + 1, "only the window's first refusal is audited"
    assert address in limited[0].detail and "by address" in limited[0].detail
    key = f"{PREFIX}{keys.REVIEW_FAILED_ADDRESS}{address}"
    assert 0 < fresh.redis.ttl(key) <= WINDOW
    # another address is not limited (bob: one failure of three)
    _, other = fresh.login("bob", PASSWORD + "-bob", proxy=True, forwarded="198.51.100.8")
    assert other.status_code == 303
    # once the window has passed, the right password logs in again (polled: no fixed pause)
    wait_for(lambda: fresh.login("alice", PASSWORD, proxy=True, forwarded=address)[1].status_code == 303,
             timeout=WINDOW + 10, interval=0.5, what="the failed-login window to pass")


def test_failed_logins_rate_limited_by_account(fresh: Review) -> None:
    """Three wrong passwords for one name from three addresses: a fourth address is refused for that name,
    and not for another name."""
    for address in ("203.0.113.1", "203.0.113.2", "203.0.113.3"):
        _, answer = fresh.login("Bob", "wrong password", proxy=True, forwarded=address)
        assert answer.status_code == 401
    _, answer = fresh.login("bob", PASSWORD + "-bob", proxy=True, forwarded="203.0.113.4")
    assert answer.status_code == 429
    assert "by account" in fresh.audit("login-rate-limited")[0].detail
    _, alice = fresh.login("alice", PASSWORD, proxy=True, forwarded="203.0.113.4")
    assert alice.status_code == 303


def test_rate_limited_attempt_checks_no_password(fresh: Review) -> None:
    """Once limited, a wrong password is answered 429 like a right one, so guessing on learns nothing."""
    for _ in range(FAILED_LOGINS):
        fresh.login("alice", "wrong", proxy=True, forwarded="192.0.2.99")
    _, wrong = fresh.login("alice", "still wrong", proxy=True, forwarded="192.0.2.99")
    _, right = fresh.login("alice", PASSWORD, proxy=True, forwarded="192.0.2.99")
    assert wrong.status_code == right.status_code == 429


def test_proxy_header_only_from_a_trusted_proxy(fresh: Review) -> None:
    proxy = fresh.client(proxy=True)
    page = proxy.get("/", headers={"X-Remote-User": "dana"})
    assert page.status_code == 200 and '<span class="who" id="who">dana</span>' in page.text
    stranger = fresh.client()
    refused = stranger.get("/", headers={"X-Remote-User": "dana"})
    assert refused.status_code == 303 and refused.headers["location"] == "/login"
    # and the proxy's X-Forwarded-For is not believed from elsewhere: failures count against 127.0.0.1
    _, answer = fresh.login("alice", "wrong", forwarded="192.0.2.200")
    assert answer.status_code == 401
    assert fresh.redis.get(f"{PREFIX}{keys.REVIEW_FAILED_ADDRESS}127.0.0.1") == b"1"
    assert fresh.redis.get(f"{PREFIX}{keys.REVIEW_FAILED_ADDRESS}192.0.2.200") is None


def test_a_verdict_needs_the_sessions_csrf_token(fresh: Review) -> None:
    snag = fresh.snag("erin")
    alice, _ = fresh.login()
    bob, _ = fresh.login("bob", PASSWORD + "-bob")
    bobs_token = csrf_of(bob.get(f"/snags/{snag}").text)
    alices_token = csrf_of(alice.get(f"/snags/{snag}").text)
    assert bobs_token != alices_token
    for data in ({"note": "no token"}, {"note": "bob's token", "csrf": bobs_token}, {"csrf": "", "note": "empty"}):
        answer = alice.post(f"/snags/{snag}/dismiss", data=data)
        assert answer.status_code == 403, data
        assert "security token is missing or wrong" in answer.text
    assert str(fresh.store.get(snag).state) == "open"
    done = alice.post(f"/snags/{snag}/dismiss", data={"csrf": alices_token, "note": "checked"})
    assert done.status_code == 303 and done.headers["location"] == f"/snags/{snag}"
    assert str(fresh.store.get(snag).state) == "dismissed"


def test_login_needs_the_login_pages_token(fresh: Review) -> None:
    client = fresh.client()
    answer = client.post("/login", data={"name": "alice", "password": PASSWORD})
    assert answer.status_code == 403
    other = fresh.client()
    token = csrf_of(other.get("/login").text)
    answer = client.post("/login", data={"name": "alice", "password": PASSWORD, "csrf": token})
    assert answer.status_code == 403
    assert client.get("/").status_code == 303
    assert fresh.redis.get(f"{PREFIX}{keys.REVIEW_FAILED_ADDRESS}127.0.0.1") is None, "refused before counting"


def test_confirm_safe_unblocks_and_audits(fresh: Review) -> None:
    snag = fresh.snag("frank")
    blocks = BlockList(fresh.redis, PREFIX)
    assert any(entry.kind == "user" and entry.value == "frank" for entry in blocks.entries())
    client, _ = fresh.login()
    listing = client.get("/").text
    assert listing.index('id="waiting"') < listing.index(f"/snags/{snag}") < listing.index('id="decided"')
    page = client.get(f"/snags/{snag}")
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-store"
    assert "Boston, US" in page.text and "Beijing, CN" in page.text
    assert page.text.count('class="travel travel-') == 2
    answer = client.post(f"/snags/{snag}/safe", data={"csrf": csrf_of(page.text), "note": "on a trip"})
    assert answer.status_code == 303
    after = client.get(f"/snags/{snag}")
    assert "Confirmed safe: the account is unblocked everywhere." in after.text
    assert str(fresh.store.get(snag).state) == "safe"
    assert not any(entry.kind == "user" and entry.value == "frank" for entry in blocks.entries())
    assert any(entry.actor == "review:alice" and entry.action == "confirm-safe" and entry.detail == "on a trip"
               for entry in fresh.store.audit(snag))
    assert "review:alice" in client.get("/audit").text
    listing = client.get("/").text
    assert listing.index(f"/snags/{snag}") > listing.index('id="decided"'), "a decided snag is listed as decided"
    # a second verdict on the decided snag: a clear conflict, nothing changed
    conflict = client.post(f"/snags/{snag}/dismiss", data={"csrf": csrf_of(after.text), "note": "late"})
    assert conflict.status_code == 409
    assert f"snag {snag} is safe" in conflict.text
    assert str(fresh.store.get(snag).state) == "safe"


def test_a_bad_learn_field_is_refused(fresh: Review) -> None:
    snag = fresh.snag("gina")
    client, _ = fresh.login()
    token = csrf_of(client.get(f"/snags/{snag}").text)
    for field, value, text in (("allow_country", "China", "not a two-letter country code"),
                               ("allow_network", "10.0.0.0/33", "is not an address or CIDR network"),
                               ("travel_days", "forever", "expected a number of days"),
                               ("travel_days", "14", "name the countries the user travels to"),
                               ("travel_countries", "CN", "given without days")):
        answer = client.post(f"/snags/{snag}/safe", data={"csrf": token, field: value})
        assert answer.status_code == 400, field
        assert text in html.unescape(answer.text)
    assert str(fresh.store.get(snag).state) == "open"


def test_confirm_safe_can_learn(fresh: Review) -> None:
    """A travel notice and an allow entry recorded with the verdict, by the reviewer; the next impossible
    travel from Boston to Beijing no longer snags."""
    snag = fresh.snag("hank")
    client, _ = fresh.login()
    token = csrf_of(client.get(f"/snags/{snag}").text)
    answer = client.post(f"/snags/{snag}/safe", data={"csrf": token, "note": "semester in Beijing",
                                                      "travel_days": "30", "travel_countries": "cn, jp",
                                                      "allow_network": "166.111.0.0/16"})
    assert answer.status_code == 303
    flash = client.get(f"/snags/{snag}").text
    assert re.search(r"Learnt: travel notice \d+, allow entry \d+\.", flash), flash
    [notice] = fresh.store.list_travel("hank")
    assert notice.countries == ("CN", "JP") and notice.created_by == "review:alice"
    assert [entry.network for entry in fresh.store.list_allow("hank")] == ["166.111.0.0/16"]
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    now = time.time()  # logins before the verdict are not compared with later ones: these two come after it
    fresh.service.post("/login", {"user": "hank", "address": US_BOSTON_A, "at": now + 1}, bearer)
    status, again = fresh.service.post("/login", {"user": "hank", "address": CN_BEIJING, "at": now + 240}, bearer)
    assert status == 200 and again["travel"] and again["snag"] is None, again
    assert "travel notice" in again["exempt"], again


def test_hostile_text_is_escaped(fresh: Review) -> None:
    snag = fresh.snag(HOSTILE_USER)
    reason = '<img src=x onerror="alert(2)"><b>bold</b>'
    odd = fresh.store.create("odd-reason", "outbound", reason, {"finding": "outbound", "messages": [
        {"queue_id": "4Q<b>", "sender": "a@x", "header_from": "<script>alert(3)</script>", "recipients": 101,
         "subject": "<i>hi</i>"}]}, "alert", "192.0.2.1")
    client, _ = fresh.login()
    pages = [client.get("/"), client.get(f"/snags/{snag}"), client.get(f"/snags/{odd.public_id}"),
             client.get("/logins/" + urllib.parse.quote(HOSTILE_USER, safe=""))]
    token = csrf_of(pages[1].text)
    client.post(f"/snags/{odd.public_id}/dismiss", data={"csrf": token, "note": "<script>alert(4)</script>"})
    pages.append(client.get("/audit"))
    for page in pages:
        assert page.status_code == 200, page.url
        assert "<script>alert" not in page.text and "<img src=x" not in page.text and "<b>bold" not in page.text
        assert "<i>hi" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;@x" in pages[0].text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;@x" in pages[3].text and "Beijing, CN" in pages[3].text
    assert "&lt;img src=x onerror=&#34;alert(2)&#34;&gt;" in pages[2].text
    assert "&lt;script&gt;alert(4)&lt;/script&gt;" in pages[4].text


def test_security_headers(fresh: Review) -> None:
    client, _ = fresh.login()
    for path in ("/", "/audit", "/login"):
        answer = client.get(path)
        policy = answer.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "style-src 'self'" in policy and "unsafe-inline" not in policy
        assert "frame-ancestors 'none'" in policy
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers["x-content-type-options"] == "nosniff"
    assert "style=" not in client.get("/").text, "no inline style: the policy would block it"


def test_review_page_only_on_its_own_port(fresh: Review) -> None:
    with httpx.Client(base_url=fresh.service.url) as policy:
        assert policy.get("/login").status_code in (404, 405)
        assert policy.get("/audit").status_code == 404


def test_a_backend_down_is_a_clear_503(review: Review, own_redis: RedisProcess, tmp_path: Path) -> None:
    """Redis gone: a login is answered 503 saying so (never let in, never a bare 500), and works again once
    Redis is back."""
    settings = {**review.service.settings, "redis": {"url": own_redis.url, "key_prefix": PREFIX}}
    service = PhishhookProcess(tmp_path, settings, review_port=free_port()).start()
    try:
        client = httpx.Client(base_url=service.review_url, follow_redirects=False, timeout=30)
        token = csrf_of(client.get("/login").text)
        own_redis.stop()
        answer = client.post("/login", data={"csrf": token, "name": "alice", "password": PASSWORD})
        assert answer.status_code == 503
        assert "Redis did not answer" in answer.text
        assert client.get("/").status_code == 303
        own_redis.start()
        answer = client.post("/login", data={"csrf": token, "name": "alice", "password": PASSWORD})
        assert answer.status_code == 303
    finally:
        service.stop()


# --- small pure cases ------------------------------------------------------------------------------------------


def test_an_unknown_name_costs_one_argon2_verification() -> None:
    """So the answer's timing does not tell which names exist."""
    from phishhook.review.auth import PasswordCheck

    check = PasswordCheck({"alice": PasswordHasher().hash(PASSWORD)})
    calls: list[str] = []
    real = check.hasher

    class Counting:
        def verify(self, hashed: str, password: str) -> bool:
            calls.append(hashed)
            return real.verify(hashed, password)

    check.hasher = Counting()  # type: ignore[assignment]
    assert not check.verify("nobody", PASSWORD)
    assert calls == [check.dummy]
    assert not check.verify("alice", "wrong") and check.verify("alice", PASSWORD)
    assert len(calls) == 3


def test_timeline_marks_the_travel_and_measures_each_step() -> None:
    from phishhook.geo import Place
    from phishhook.networks import AddressClass
    from phishhook.review.web import _number, timeline
    from phishhook.velocity import Sighting

    boston = Place(country="US", city="Boston", latitude=42.3451, longitude=-71.0993, radius_km=5)
    beijing = Place(country="CN", city="Beijing", latitude=39.9289, longitude=116.3883, radius_km=1)
    home = Sighting(1000.0, US_BOSTON_A, boston, AddressClass.PUBLIC, "", "imap")
    nowhere = Sighting(2000.0, "192.0.2.1", None, AddressClass.PUBLIC, "", "imap")
    away = Sighting(1000.0 + 3600, CN_BEIJING, beijing, AddressClass.PUBLIC, "", "webmail")
    travel = {"before": home.as_dict(), "after": away.as_dict()}
    rows = timeline([away, nowhere], [travel])  # the history lost the Boston login: the evidence has it
    assert [row.address for row in rows] == [US_BOSTON_A, "192.0.2.1", CN_BEIJING]
    assert [row.mark for row in rows] == ["before", "", "after"]
    assert rows[0].distance_km is None
    assert _number(rows[1].distance_km) == "unknown" and _number(rows[2].speed_kmh) == "unknown"
    direct = timeline([home, away])
    assert direct[1].distance_km is not None and 10_700 < direct[1].distance_km < 10_900
    assert direct[1].hours == 1.0 and _number(direct[1].speed_kmh).replace(",", "").isdigit()


def test_a_session_ends_with_its_lifetime_or_its_account() -> None:
    from phishhook.review.auth import Gate, Identity
    from phishhook.review.settings import ReviewSettings

    clock = [1000.0]
    settings = ReviewSettings(accounts={"alice": PasswordHasher().hash(PASSWORD)}, session_lifetime="1h")
    gate = Gate(settings, now=lambda: clock[0])
    nobody = Identity(peer="127.0.0.1", address="127.0.0.1", proxy_user="")
    session: dict = {"csrf": "pre-login token"}
    gate.log_in(session, "alice")
    assert "csrf" not in session, "the pre-login session's token does not survive the login"
    clock[0] += 3599
    assert gate.user(nobody, session) == "alice"
    clock[0] += 1
    assert gate.user(nobody, session) is None and "user" not in session
    gone: dict = {"user": "zed", "login_at": clock[0]}
    assert gate.user(nobody, gone) is None and gone == {}
