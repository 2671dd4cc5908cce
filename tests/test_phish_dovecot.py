"""phishhook behind the real Dovecot's auth policy interface (``auth_policy_server_url``): IMAP logins, their
originating address passed by a proxy with IMAP ID (believed because loopback is in login_trusted_networks),
recorded and judged; a snagged account refused at its next login; Dovecot failing open when phishhook is
stopped or hangs. And the endpoint's answers to bad requests, asked directly."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis
import support
from _maxminddb_geolite2 import geolite2_database
from harness.dovecot import AuthPolicy, DovecotInstance, MailUser, imap_login
from harness.phishhook_proc import PhishhookProcess
from harness.redis_server import RedisProcess
from phish_places import CN_BEIJING, JP_TOKYO, US_BOSTON_A, US_BOSTON_B

pytestmark = pytest.mark.e2e

PREFIX = "phdove:"
API_HEADER = "X-API-Key: dovecot-test-key-3c1e"
USERS = (MailUser("alice@example.org", "alicepw"), MailUser("bob@example.org", "bobpw"),
         MailUser("carol@example.org", "carolpw"))


@dataclass
class DovecotStack:
    phishhook: PhishhookProcess
    dovecot: DovecotInstance
    redis: redis.Redis

    def login(self, user: str, password: str, address: str | None) -> tuple[bool, str]:
        return imap_login(self.dovecot.imap_port, user, password, address)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config",
                               str(self.phishhook.config_path), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (args, done.returncode, done.stdout, done.stderr)
        return done

    def logins(self, user: str) -> list[dict]:
        return json.loads(self.cli("phish", "logins", user, "--json").stdout)

    def age_history(self, user: str, seconds: float) -> None:
        support.age_history(self.redis, PREFIX, user, seconds)


@pytest.fixture(scope="module")
def dovecot_stack(shared_redis: RedisProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DovecotStack]:
    work = tmp_path_factory.mktemp("phish-dovecot")
    settings = {
        "redis": {"url": shared_redis.url, "key_prefix": PREFIX},
        "quarantine": {"database_url": f"sqlite:///{work / 'quarantine.sqlite'}", "message_dir": str(work / "held")},
        "phishhook": {"geo": {"city_database": geolite2_database()}, "history": {"learning_period": "0s"},
                      "dovecot": {"api_header": API_HEADER},
                      "actions": {"run": [{"type": "block-account"}, {"type": "block-address"}]}},
    }
    phishhook = PhishhookProcess(work, settings)
    phishhook.write_config()
    subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(phishhook.config_path), "quarantine",
                    "migrate"], check=True, capture_output=True)
    phishhook.start()
    dovecot = DovecotInstance(users=USERS, auth_policy=AuthPolicy(f"{phishhook.url}/policy", API_HEADER,
                                                                  timeout_ms=2000)).start()
    client = redis.Redis.from_url(shared_redis.url)
    yield DovecotStack(phishhook, dovecot, client)
    dovecot.stop()
    dovecot.cleanup()
    phishhook.stop()


def test_an_imap_login_is_recorded_with_the_address_the_proxy_passed(dovecot_stack: DovecotStack) -> None:
    ok, _text = dovecot_stack.login("bob@example.org", "bobpw", US_BOSTON_A)
    assert ok
    [login] = dovecot_stack.logins("bob@example.org")
    assert login["address"] == US_BOSTON_A and login["service"] == "imap", login
    assert login["place"]["country"] == "US"


def test_an_imap_snag_refuses_the_accounts_next_login(dovecot_stack: DovecotStack) -> None:
    stack = dovecot_stack
    assert stack.login("alice@example.org", "alicepw", US_BOSTON_A)[0]
    stack.age_history("alice@example.org", 3600)
    assert stack.login("alice@example.org", "alicepw", CN_BEIJING)[0]  # judged after it succeeded
    snags = json.loads(stack.cli("phish", "list", "--user", "alice@example.org", "--json").stdout)
    assert [s["state"] for s in snags] == ["open"], snags
    ok, text = stack.login("alice@example.org", "alicepw", US_BOSTON_B)
    assert not ok and "help desk" in text, text


def test_a_failed_login_is_counted_not_located(dovecot_stack: DovecotStack) -> None:
    stack = dovecot_stack
    ok, _ = stack.login("carol@example.org", "wrong", CN_BEIJING)
    assert not ok
    stack.phishhook.wait_log("check=brute-force")
    assert stack.logins("carol@example.org") == []


@pytest.mark.parametrize("how", ["stopped", "hung"])
def test_logins_go_on_within_dovecots_timeout_without_phishhook(dovecot_stack: DovecotStack, how: str) -> None:
    stack = dovecot_stack
    if how == "stopped":
        stack.phishhook.stop()
    else:
        stack.phishhook.pause()
    try:
        started = time.monotonic()
        ok, text = stack.login("bob@example.org", "bobpw", US_BOSTON_B)
        took = time.monotonic() - started
        assert ok, text
        # before and after authentication: two policy requests, each bounded by the 2 s timeout
        assert took < 3 * 2.0 + 3.0, took  # allow, allow after auth, report: each at most 2 s
    finally:
        if how == "stopped":
            stack.phishhook.start()
        else:
            stack.phishhook.resume()


BAD_BODIES = [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({"remote": "203.0.113.9"}).encode(), "login name"),
    (json.dumps({"login": "alice"}).encode(), "no remote"),
    (json.dumps({"login": "alice", "remote": "unknown"}).encode(), "not an IP address"),
    (json.dumps({"login": "", "remote": "203.0.113.9"}).encode(), "empty"),
    (json.dumps({"login": "a\x00b", "remote": "203.0.113.9"}).encode(), "control characters"),
    (json.dumps({"login": "x" * 400, "remote": "203.0.113.9"}).encode(), "longer than"),
    (b"{" * 100_000, "larger than"),
]


@pytest.mark.parametrize(("body", "reason"), BAD_BODIES, ids=[r for _b, r in BAD_BODIES])
def test_a_bad_request_gets_400_with_the_reason(dovecot_stack: DovecotStack, body: bytes, reason: str) -> None:
    key = API_HEADER.split(": ")
    status, answer = dovecot_stack.phishhook.post("/policy?command=allow", body, {key[0]: key[1]})
    assert status == 400 and reason in answer["error"], (status, answer)


def test_without_the_api_header_a_request_is_refused(dovecot_stack: DovecotStack) -> None:
    status, answer = dovecot_stack.phishhook.post("/policy?command=allow", {"login": "bob", "remote": "203.0.113.9"})
    assert status == 401, answer


@pytest.mark.parametrize("user", ["Dora@Example.ORG", "o'brien@example.org", "名前@example.org", "a b\"c"])
def test_odd_login_names_and_ipv6_are_answered(dovecot_stack: DovecotStack, user: str) -> None:
    key = API_HEADER.split(": ")
    body = {"login": user, "remote": "2001:db8::7", "protocol": "imap", "success": True}
    assert dovecot_stack.phishhook.post("/policy?command=allow", body, {key[0]: key[1]}) == (
        200, {"status": 0, "msg": ""})
    status, _ = dovecot_stack.phishhook.post("/policy?command=report", body, {key[0]: key[1]})
    assert status == 200
    [login] = dovecot_stack.logins(user)
    assert login["address"] == "2001:db8::7"


def test_the_log_follower_takes_dovecots_login_lines(dovecot_stack: DovecotStack, tmp_path) -> None:
    """`mailwarden phish follow` on the real Dovecot's log file, for a site that cannot use the auth policy:
    its logins are judged from the lines Dovecot writes (its own Redis prefix here, so that what the policy
    endpoint recorded of the same login is not what the test reads)."""
    from harness.net import wait_for
    from harness.policyd_proc import render_toml

    settings = json.loads(json.dumps(dovecot_stack.phishhook.settings))
    settings["redis"]["key_prefix"] = "phfollow:"
    config = tmp_path / "follow.toml"
    config.write_text(render_toml(settings))
    log_path = tmp_path / "follow.log"
    with log_path.open("wb") as log:
        follower = subprocess.Popen([sys.executable, "-m", "mailwarden.cli", "--config", str(config), "phish",
                                     "follow", "--poll", "50ms", str(dovecot_stack.dovecot.workdir / "dovecot.log")],
                                    stdout=log, stderr=log)
    try:
        wait_for(lambda: "following logins in the logs" in log_path.read_text(), 30, what="the follower to start")
        assert dovecot_stack.login("carol@example.org", "carolpw", JP_TOKYO)[0]

        def logged() -> list[dict]:
            done = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), "phish",
                                   "logins", "carol@example.org", "--json"], capture_output=True, text=True, timeout=60)
            return json.loads(done.stdout) if done.returncode == 0 else []

        wait_for(lambda: any(entry["address"] == JP_TOKYO for entry in logged()), 30,
                 what="the login from Dovecot's log in the history")
        [entry] = [entry for entry in logged() if entry["address"] == JP_TOKYO]
        assert entry["service"] == "imap" and entry["place"]["country"] == "JP"
    finally:
        follower.terminate()
        follower.wait(15)
