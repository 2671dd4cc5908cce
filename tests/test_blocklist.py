"""The block list over the real daemon: a blocked account or client address is refused with the site's
text, and the reason an operator gave stays in the log, never in the reply."""

from __future__ import annotations

import pytest
from conftest import base_settings

from policyd.blocklist import BlockList, BlocklistSettings

USER_TEXT = BlocklistSettings().user_text
CLIENT_TEXT = BlocklistSettings().client_text


@pytest.fixture
def daemon(policyd_factory, redis_server):
    return policyd_factory(base_settings(redis_server.url, checks=["blocklist"]))


@pytest.fixture
def blocks(redis_server) -> BlockList:
    return BlockList(redis_server.client(), "mw:")  # the key prefix the daemon uses by default


def test_a_blocked_account_is_refused_and_the_reason_stays_in_the_log(daemon, blocks):
    blocks.add("user", "mallory", "phished", by="test")
    with daemon.connect() as client:
        answer = client.ask(sasl_username="mallory", sasl_method="PLAIN")
        assert answer == f"550 5.7.1 {USER_TEXT}"
        assert "phished" not in answer
        assert client.ask(sasl_username="alice", sasl_method="PLAIN") == "DUNNO"
    daemon.wait_log('user=mallory check=blocklist action=reject reason="account blocked: phished"')


def test_a_blocked_client_address_is_refused_and_its_neighbour_is_not(daemon, blocks):
    blocks.add("client", "192.0.2.55", "spam run", by="test")
    with daemon.connect() as client:
        answer = client.ask(client_address="192.0.2.55")
        assert answer == f"550 5.7.1 {CLIENT_TEXT}"
        assert "spam run" not in answer
        assert client.ask(client_address="192.0.2.56") == "DUNNO"
        assert client.ask(client_address="192.0.2.55", sasl_username="alice", sasl_method="PLAIN") == \
            f"550 5.7.1 {CLIENT_TEXT}"  # the address is blocked whoever logs in from it
        blocks.remove("client", "192.0.2.55")
        assert client.ask(client_address="192.0.2.55") == "DUNNO"
    daemon.wait_log('client=192.0.2.55 helo=test.client sender=sender@example.org recipient=user@example.test '
                    'check=blocklist action=reject reason="client blocked: spam run"')
