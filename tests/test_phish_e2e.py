"""phishhook end to end through the real Postfix: XCLIENT presents real public client addresses and a SASL
login; the phish milter (a separate process) judges each authenticated message as a login and by the
outbound rule; policyd (a separate process) refuses a snagged account at RCPT; a full (2018) GeoLite2 City
database places the addresses (tests/phish_places.py says which address is where).

"An hour later" is an hour in the login history: the test ages the user's recorded logins in Redis by an
hour (``age_history``) instead of waiting, and the detector judges the next login against them.
"""

from __future__ import annotations

import json
import shutil
import smtplib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest
import redis
import support
from _maxminddb_geolite2 import geolite2_database
from conftest import need_postfix
from harness.milter_proc import MilterProcess
from harness.net import free_port, wait_for, wait_port
from harness.policyd_proc import PolicydProcess
from harness.postfix import PostfixInstance
from harness.redis_server import RedisProcess
from harness.sink import Sink
from phish_places import CN_BEIJING, CN_BEIJING_B, MS_OUTLOOK, US_BOSTON_A, US_BOSTON_B, US_CAMBRIDGE

pytestmark = pytest.mark.e2e

PREFIX = "phe2e:"
SECURITY = "security@example.test"
LIST_ACCOUNT = "lists"


@dataclass
class PhishStack:
    postfix: PostfixInstance
    policyd: PolicydProcess
    milter: MilterProcess
    sink: Sink
    redis: redis.Redis

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(self.milter.config_path),
                               *args], capture_output=True, text=True, timeout=60)
        assert not check or done.returncode == 0, (args, done.returncode, done.stdout, done.stderr)
        return done

    def send(self, address: str, login: str, subject: str, rcpts: list[str] | None = None,
             sender: str | None = None, header_from: str | None = None) -> str:
        """One message in its own SMTP session from ``address`` logged in as ``login``: "accepted", or the
        refusal ("rcpt 550 ..." / "data 4xx ...")."""
        sender = sender or f"{login}@example.test"
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = header_from or sender, "many@example.test", subject
        msg.set_content("hello\n")
        conn = smtplib.SMTP("127.0.0.1", self.postfix.smtp_port, timeout=120)
        try:
            conn.ehlo("client.example")
            code, text = conn.docmd("XCLIENT", f"ADDR={address} NAME=unknown LOGIN={login}")
            assert code == 220, (code, text)
            conn.ehlo("client.example")
            conn.sendmail(sender, rcpts or ["user@example.test"], msg.as_bytes())
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = next(iter(exc.recipients.values()))
            return f"rcpt {code} {text.decode(errors='replace')}"
        except smtplib.SMTPDataError as exc:
            return f"data {exc.smtp_code} {exc.smtp_error.decode(errors='replace')}"
        finally:
            conn.close()
        return "accepted"

    def age_history(self, user: str, seconds: float) -> None:
        support.age_history(self.redis, PREFIX, user, seconds)

    def snags(self, user: str) -> list[dict]:
        return json.loads(self.cli("phish", "list", "--user", user, "--json").stdout)

    def arrived(self, subject: str) -> bool:
        """The message arrived (waited for: a message to many recipients may arrive after a later one)."""
        return bool(self.sink.wait_for_subjects(subject, timeout=60))

    def delivered(self, subject: str) -> bool:
        """Whether the message arrived, after a marker sent later arrived (a positive signal, no pause): for
        showing that it did not."""
        marker = f"marker after {subject}"
        assert self.send("192.0.2.10", "marker", marker) == "accepted"
        self.sink.wait_for_subjects(marker, timeout=60)
        return bool(self.sink.with_subject(subject))


@pytest.fixture(scope="module")
def phish_stack(shared_redis: RedisProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PhishStack]:
    need_postfix()
    work = tmp_path_factory.mktemp("phish-e2e")
    sink = Sink().start()
    settings = {
        "redis": {"url": shared_redis.url, "key_prefix": PREFIX},
        "policyd": {"checks": ["blocklist"]},
        "quarantine": {"database_url": f"sqlite:///{work / 'quarantine.sqlite'}", "message_dir": str(work / "held")},
        "phishhook": {
            "geo": {"city_database": geolite2_database()},
            "history": {"learning_period": "0s"},
            "outbound": {"list_accounts": [LIST_ACCOUNT]},
            "actions": {"run": [
                {"type": "block-account"}, {"type": "block-address"},
                {"type": "ticket", "to": [SECURITY], "from_address": "phishhook@example.test",
                 "smtp": f"127.0.0.1:{sink.port}"}]},
        },
    }
    policyd = PolicydProcess(work, settings).start()
    milter = MilterProcess(work, settings, name="phish")
    milter.write_config()
    subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(milter.config_path), "quarantine",
                    "migrate"], check=True, capture_output=True)
    milter.start()
    directory = Path(tempfile.mkdtemp(prefix="mw-postfix-"))
    directory.chmod(0o755)
    postfix = PostfixInstance(directory, free_port(), sink.port, policyd.port, milters=milter.address,
                              extra_main_cf="smtpd_recipient_limit = 1000\n").start()
    wait_port(postfix.smtp_port)
    client = redis.Redis.from_url(shared_redis.url)
    for key in client.scan_iter(match=f"{PREFIX}*"):
        client.delete(key)
    yield PhishStack(postfix, policyd, milter, sink, client)
    postfix.stop()
    shutil.rmtree(directory, ignore_errors=True)
    milter.kill()
    policyd.stop()
    sink.stop()


def test_a_login_from_china_an_hour_after_one_from_the_us_snags_the_account(phish_stack: PhishStack) -> None:
    stack = phish_stack
    assert stack.send(US_BOSTON_A, "alice", "alice at home") == "accepted"
    stack.age_history("alice", 3600)
    assert stack.send(CN_BEIJING, "alice", "alice from beijing") == "accepted"  # held, not delivered
    [snag] = stack.snags("alice")
    assert snag["state"] == "open" and snag["mode"] == "enforce", snag
    assert snag["source_address"] == CN_BEIJING
    assert not stack.delivered("alice from beijing")
    held = json.loads(stack.cli("quarantine", "list", "--kind", "phish", "--json").stdout)
    assert [row["auth_user"] for row in held] == ["alice"], held

    refused = stack.send(US_BOSTON_A, "alice", "alice again")
    assert refused.startswith("rcpt 550"), refused
    assert "help desk" in refused and "CN" not in refused  # the user's text says what to do, not why
    blocks = json.loads(stack.cli("block", "list", "--json").stdout)
    blocked = {(entry["kind"], entry["value"]) for entry in blocks}
    assert ("user", "alice") in blocked and ("client", CN_BEIJING) in blocked, blocks

    tickets = stack.sink.wait_for(1, timeout=60)
    ticket = next(m for m in tickets if SECURITY in m.rcpt_tos)
    body = ticket.message.get_body(("plain",))
    assert body is not None and "alice" in body.get_content() and CN_BEIJING in body.get_content()

    # the security team finds alice was travelling: confirmed safe, she can send again, from Beijing too
    stack.cli("phish", "release", snag["public_id"], "--note", "at a conference", "--travel-days", "7",
              "--countries", "CN")
    assert stack.send(CN_BEIJING, "alice", "alice after the review") == "accepted"
    assert stack.arrived("alice after the review")


def test_an_address_in_the_same_city_an_hour_later_does_not_snag(phish_stack: PhishStack) -> None:
    stack = phish_stack
    assert stack.send(US_BOSTON_A, "bob", "bob at the office") == "accepted"
    stack.age_history("bob", 3600)
    assert stack.send(US_BOSTON_B, "bob", "bob at home") == "accepted"
    assert stack.arrived("bob at home")
    assert stack.snags("bob") == []


def test_a_registered_travel_notice_prevents_the_snag(phish_stack: PhishStack) -> None:
    stack = phish_stack
    stack.cli("phish", "travel", "add", "carol", "--countries", "CN", "--until", "14d", "--note", "conference")
    assert stack.send(US_BOSTON_A, "carol", "carol before the flight") == "accepted"
    stack.age_history("carol", 3600)
    assert stack.send(CN_BEIJING_B, "carol", "carol in beijing") == "accepted"
    assert stack.arrived("carol in beijing")
    assert stack.snags("carol") == []
    assert "exempt: travel notice" in stack.milter.log_text()


def test_an_address_in_a_relay_network_does_not_snag(phish_stack: PhishStack) -> None:
    stack = phish_stack
    assert stack.send(US_BOSTON_A, "dave", "dave at home") == "accepted"
    stack.age_history("dave", 600)
    assert stack.send(MS_OUTLOOK, "dave", "dave through outlook") == "accepted"
    assert stack.arrived("dave through outlook")
    assert stack.snags("dave") == []


def recipients(count: int) -> list[str]:
    return [f"r{n}@example.test" for n in range(count)]


def test_a_forged_from_to_101_recipients_snags_and_is_held(phish_stack: PhishStack) -> None:
    stack = phish_stack
    assert stack.send(US_CAMBRIDGE, "erin", "urgent invoice", recipients(101),
                      header_from="ceo@bank.example") == "accepted"
    [snag] = stack.snags("erin")
    assert snag["kind"] == "outbound" and snag["state"] == "open", snag
    assert not stack.delivered("urgent invoice")
    held = json.loads(stack.cli("quarantine", "list", "--kind", "phish", "--json").stdout)
    erins = {row["public_id"] for row in held if row["auth_user"] == "erin"}
    assert len(erins) == 101
    shown = json.loads(stack.cli("phish", "show", snag["public_id"], "--json").stdout)
    assert set(shown["snag"]["message_ids"]) == erins  # the review page lists the held copies


def test_a_forged_from_to_100_recipients_is_not_snagged(phish_stack: PhishStack) -> None:
    stack = phish_stack
    assert stack.send(US_BOSTON_A, "frank", "team newsletter", recipients(100),
                      header_from="newsletter@partner.example") == "accepted"
    assert stack.arrived("team newsletter")
    assert stack.snags("frank") == []


def test_a_list_servers_500_recipient_mail_is_not_snagged(phish_stack: PhishStack) -> None:
    stack = phish_stack
    assert stack.send("192.0.2.25", LIST_ACCOUNT, "[staff] minutes", recipients(500),
                      sender="staff-bounces@lists.example.test", header_from="someone@example.test") == "accepted"
    assert stack.arrived("[staff] minutes")
    assert stack.snags(LIST_ACCOUNT) == []
    wait_for(lambda: "outbound exempt: a list server account" in stack.milter.log_text(), 10,
             what="the exemption in the decision line")
