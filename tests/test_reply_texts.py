"""What an SMTP client is told, end to end through Postfix: by default the category and what to do, never
a score or an internal rule or limit name (those stay in the log line); a site's template replaces it."""

from __future__ import annotations

import re

import pytest
from conftest import base_settings, dns_settings
from test_e2e_policyd import send

pytestmark = pytest.mark.e2e

INTERNAL = re.compile(r"secret-rule-17|internal-limit-9|score|weight|threshold|\(\+?\d", re.IGNORECASE)


@pytest.fixture
def config(redis_server, dns_server, tmp_path):
    rules = tmp_path / "access.toml"
    rules.write_text('[[rule]]\nname = "secret-rule-17"\nclient = ["203.0.113.66/32"]\naction = "reject"\n')
    settings = base_settings(
        redis_server.url, checks=["access", "ratelimit", "dnsbl", "spf", "greylist"],
        access={"files": [str(rules)]},
        ratelimit={"limits": [{"name": "internal-limit-9", "key": "sasl_user", "count": "messages", "max": 1,
                               "window": "1h"}]},
        dnsbl={"lists": [{"zone": "bl.test", "weight": 2.5}, {"zone": "weak.test", "weight": 0.5}],
               "threshold": 3})
    settings["dns"] = dns_settings(dns_server)
    return settings


def refusals(stack) -> list[tuple[int, str]]:
    answers = [
        send(stack, "rule", client_address="203.0.113.66"),
        send(stack, "listed", client_address="192.0.2.99", sender="x@nospf.test"),
        send(stack, "spf", client_address="203.0.113.7", sender="x@example.test"),
        send(stack, "greylisted", client_address="203.0.113.8", sender="x@nospf.test"),
        send(stack, "first", login="alice"),
        send(stack, "second", login="alice"),
    ]
    return [answer["user@example.test"] for answer in answers if answer is not None]


def test_default_texts_carry_no_scores_and_no_internal_names(stack_factory, config):
    stack = stack_factory(config)
    replies = refusals(stack)
    # rule; the listed client (score 2.5 below 3) and the unlisted one greylisted; SPF fail; rate limit
    assert len(replies) == 5, replies
    for _code, text in replies:
        assert not INTERNAL.search(text), text
    texts = " | ".join(text for _, text in replies)
    assert "Access denied" in texts and "Greylisted, please try again in 5 minutes" in texts
    assert "Sending limit reached" in texts and "does not allow 203.0.113.7" in texts
    # the detail is in the log line (written just after the answer: waited for)
    for detail in ("access rule secret-rule-17: reject", "rate limit internal-limit-9 reached", "score 2.5 below 3"):
        stack.policyd.wait_log(detail)


def test_site_templates_replace_the_texts(stack_factory, config):
    config["policyd"]["greylist"] = {"text": "Temporarily deferred: come back in {retry_in} (see https://mx.example/gl)"}
    config["policyd"]["ratelimit"]["defer_text"] = "Quota of outgoing mail used up; call 1234"
    stack = stack_factory(config)
    texts = " | ".join(text for _, text in refusals(stack))
    assert "Temporarily deferred: come back in 5 minutes (see https://mx.example/gl)" in texts
    assert "Quota of outgoing mail used up; call 1234" in texts
