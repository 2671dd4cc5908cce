"""Snag actions against real things: the test's own redis-server read back by policyd's BlocklistCheck, a
real HTTP server for the webhook, the aiosmtpd sink for the ticket, site commands as scripts in tmp_path."""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.lifecycle import process_state
from harness.net import free_port, wait_for
from prometheus_client import REGISTRY
from pydantic import ValidationError

from mailwarden.redis_pipe import PipelinedRedis
from mailwarden.redis_settings import RedisSettings
from phishhook.actions import (
    OUTPUT_KEPT,
    ActionResult,
    ActionRunner,
    ActionsSettings,
    ActionWorker,
    Evidence,
    public_address,
    run_bounded,
)
from policyd.blocklist import BlockList, BlocklistCheck, BlocklistSettings
from policyd.request import PolicyRequest

PREFIX = "mw:"
US, CN = "216.160.83.56", "1.0.16.1"  # real public addresses (MaxMind's test US entry; an APNIC CN range)
SIGHTINGS = [
    {"at": 1764590400.0, "address": US, "place": "Milton, WA, US", "distance_km": None, "hours": None,
     "speed_kmh": None},
    {"at": 1764594000.0, "address": CN, "place": "Fuzhou, CN", "distance_km": 9876.5, "hours": 1.0,
     "speed_kmh": 9876.5},
]


def evidence(mode: str = "enforce", user: str = "alice", address: str = CN, **details: object) -> Evidence:
    return Evidence(snag_id="SNAG42", user=user, kind="geo-velocity", reason="login from CN 1.0 h after US",
                    source_address=address, mode=mode, at=1764594000.0,
                    details={"sightings": SIGHTINGS, **details}, review_url="https://review.example.org/snags/SNAG42")


def runner(redis_server, *actions: dict) -> ActionRunner:
    return ActionRunner(ActionsSettings(run=list(actions)), redis_server.client(), PREFIX)


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def python_script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n{body}\n")
    path.chmod(0o755)
    return str(path)


def policyd_refuses(redis_url: str, user: str = "", client: str = "") -> str | None:
    """What policyd's own BlocklistCheck says at RCPT, reading the same Redis (None: accepted)."""
    async def main() -> str | None:
        pipe = PipelinedRedis(RedisSettings(url=redis_url))
        pipe.start()
        assert await pipe.wait_connected(5)
        try:
            check = BlocklistCheck(BlocklistSettings(), pipe, PREFIX)
            verdict = await check.on_rcpt(PolicyRequest.from_attrs({
                "request": "smtpd_access_policy", "protocol_state": "RCPT", "client_address": client,
                "sasl_username": user, "sasl_method": "PLAIN" if user else "", "sender": "a@example.org",
                "recipient": "b@example.net"}))
            return verdict.reason if verdict else None
        finally:
            await pipe.close()
    return asyncio.run(main())


def counted(action: str, result: str) -> float:
    return REGISTRY.get_sample_value("mailwarden_phish_actions_total", {"action": action, "result": result}) or 0.0


# -- settings ------------------------------------------------------------------------------------------


def test_settings_parse_each_type_and_refuse_mistakes() -> None:
    settings = ActionsSettings(run=[
        {"type": "block-account"},
        {"type": "block-address", "expires": "7d", "firewall_command": ["nft", "add", "element", "inet", "filter",
                                                                         "phish_block", "{", "{address}", "timeout",
                                                                         "{expires_s}", "}"]},
        {"type": "command", "name": "scramble", "argv": ["/usr/local/sbin/scramble", "--user", "{user}"]},
        {"type": "ticket", "to": ["security@example.org"], "from_address": "phishhook@example.org"},
        {"type": "webhook", "url": "https://hooks.example.org/phish", "headers": {"Authorization": "Bearer x"}},
    ])
    assert [action.type for action in settings.run] == ["block-account", "block-address", "command", "ticket",
                                                         "webhook"]
    assert settings.run[1].expires == 7 * 86400
    assert [action.type for action in ActionsSettings().run] == ["block-account", "block-address"]
    assert ActionsSettings().run[1].expires == 30 * 86400

    bad = [
        ({"type": "command", "name": "x", "argv": ["/bin/x", "--user={user}"]}, "whole argument"),
        ({"type": "command", "name": "x", "argv": ["/bin/x", "{password}"]}, "unknown placeholder"),
        ({"type": "command", "name": "x", "argv": []}, "command is empty"),
        ({"type": "command", "name": "two words", "argv": ["/bin/x"]}, "pattern"),
        ({"type": "webhook", "url": "file:///etc/passwd"}, "not an http"),
        ({"type": "webhook", "url": "https://x.example/", "headers": {"X": "a\r\nB: c"}}, "one line"),
        ({"type": "ticket", "to": ["security"], "from_address": "p@example.org"}, "not an email address"),
        ({"type": "ticket", "to": ["s@example.org"], "from_address": "p@example.org", "smtp": "nohostport"},
         "host:port"),
        ({"type": "ticket", "to": ["s@example.org"], "from_address": "p@example.org", "subject": "{who}"},
         "unknown placeholder"),
        ({"type": "block-address", "expires": "soon"}, "not a duration"),
        ({"type": "block-account", "expires": 0}, "more than 0"),
        ({"type": "block-all"}, "does not match any of the expected tags"),
    ]
    for action, message in bad:
        with pytest.raises(ValidationError, match=message):
            ActionsSettings(run=[action])
    with pytest.raises(ValidationError, match="two snag actions are named 'webhook'"):
        ActionsSettings(run=[{"type": "webhook", "url": "http://a.example/"},
                             {"type": "webhook", "url": "http://b.example/"}])


def test_public_address() -> None:
    assert public_address(CN) == (CN, "")
    assert public_address("::ffff:1.0.16.1") == (CN, "")
    assert public_address("2001:4860:4860::8888") == ("2001:4860:4860::8888", "")
    for private in ("10.1.2.3", "127.0.0.1", "::1", "fe80::1", "192.168.0.7", "100.64.1.1", "0.0.0.0"):
        assert public_address(private)[0] is None, private
    assert public_address("") == (None, "no source address to block")
    assert "not an IP address" in public_address("unknown")[1]


# -- blocks --------------------------------------------------------------------------------------------


def test_blocks_are_read_back_by_policyd(redis_server) -> None:
    run = runner(redis_server, {"type": "block-account"}, {"type": "block-address"})
    assert policyd_refuses(redis_server.url, user="Alice", client=CN) is None
    results = run.immediate(evidence(user="Alice"))
    assert [(r.name, r.ok, r.skipped) for r in results] == [("block-account", True, False),
                                                            ("block-address", True, False)]
    assert "account alice blocked until confirmed safe" in results[0].detail
    assert results[1].detail == f"address {CN} blocked for 30d"
    assert policyd_refuses(redis_server.url, user="alice") == "account blocked: phishhook snag SNAG42: login " \
                                                              "from CN 1.0 h after US"
    assert (policyd_refuses(redis_server.url, user="bob", client=CN) or "").startswith("client blocked")
    entries = {(e.kind, e.value): e for e in BlockList(redis_server.client(), PREFIX).entries()}
    assert entries[("user", "alice")].by == "phishhook" and entries[("user", "alice")].expires_in is None
    assert 30 * 86400 - 5 < (entries[("client", CN)].expires_in or 0) <= 30 * 86400


def test_private_or_missing_addresses_are_skipped_not_blocked(redis_server) -> None:
    run = runner(redis_server, {"type": "block-address"})
    for address in ("", "10.0.0.5", "127.0.0.1"):
        [result] = run.run(evidence(address=address))
        assert (result.ok, result.skipped) == (True, True)
        assert "not blocked" in result.detail or "no source address" in result.detail
    assert BlockList(redis_server.client(), PREFIX).entries() == []


def test_an_ipv6_or_ipv4_mapped_source_is_blocked_in_the_form_policyd_reads(redis_server) -> None:
    run = runner(redis_server, {"type": "block-address"})
    assert run.run(evidence(address="2001:4860:4860:0::8888"))[0].detail == \
        "address 2001:4860:4860::8888 blocked for 30d"
    assert run.run(evidence(address="::ffff:1.0.16.1"))[0].detail == f"address {CN} blocked for 30d"
    assert (policyd_refuses(redis_server.url, client="2001:4860:4860::8888") or "").startswith("client blocked")
    assert (policyd_refuses(redis_server.url, client=CN) or "").startswith("client blocked")


def test_an_account_block_may_expire(redis_server) -> None:
    [result] = runner(redis_server, {"type": "block-account", "expires": "2h"}).run(evidence())
    assert "blocked for 2h" in result.detail
    assert 0 < redis_server.client().ttl(f"{PREFIX}block:user:alice") <= 7200


def test_alert_mode_blocks_nothing_and_still_notifies(redis_server, tmp_path, webhook_server) -> None:
    marker = tmp_path / "ran"
    run = runner(redis_server,
                 {"type": "block-account"}, {"type": "block-address", "firewall_command": [script(
                     tmp_path, "fw", f"touch {tmp_path / 'fw-ran'}"), "{address}"]},
                 {"type": "command", "name": "scramble", "argv": [script(tmp_path, "scramble", f"touch {marker}")]},
                 {"type": "command", "name": "notify", "in_alert_mode": True,
                  "argv": [script(tmp_path, "notify", f"cat > {tmp_path / 'notified'}")]},
                 {"type": "webhook", "url": webhook_server.url("/ok")})
    results = run.run(evidence(mode="alert"))
    assert [(r.name, r.outcome.value, r.detail) for r in results[:4]] == [
        ("block-account", "skipped", "alert-only: not blocked"),
        ("block-address", "skipped", "alert-only: not blocked"),
        ("block-address/firewall", "skipped", "alert-only: not blocked"),
        ("scramble", "skipped", "alert-only: not run")]
    assert [(r.name, r.outcome.value) for r in results[4:]] == [("notify", "ok"), ("webhook", "ok")]
    assert BlockList(redis_server.client(), PREFIX).entries() == []
    assert not marker.exists() and not (tmp_path / "fw-ran").exists()
    assert json.loads((tmp_path / "notified").read_text())["mode"] == "alert"
    assert len(webhook_server.received) == 1


def test_undo_lifts_the_blocks_and_says_commands_are_not_undone(redis_server, tmp_path) -> None:
    calls = tmp_path / "calls"
    firewall = script(tmp_path, "fw", f'echo "$*" >> {calls}')
    run = runner(redis_server, {"type": "block-account"},
                 {"type": "block-address", "firewall_command": [firewall, "add", "{address}", "{expires}",
                                                                "{expires_s}"],
                  "firewall_remove_command": [firewall, "delete", "{address}"]},
                 {"type": "command", "name": "scramble", "argv": ["/bin/true"]})
    run.run(evidence())
    assert policyd_refuses(redis_server.url, user="alice") is not None
    results = run.undo(evidence())
    assert [(r.name, r.outcome.value) for r in results] == [
        ("block-account/undo", "ok"), ("block-address/undo", "ok"), ("block-address/firewall-undo", "ok"),
        ("scramble/undo", "skipped")]
    assert results[0].detail == "account alice unblocked"
    assert results[1].detail == f"address {CN} unblocked"
    assert "not undone" in results[3].detail and "by hand" in results[3].detail
    assert calls.read_text().splitlines() == [f"add {CN} 2592000 2592000s", f"delete {CN}"]
    assert policyd_refuses(redis_server.url, user="alice", client=CN) is None
    assert BlockList(redis_server.client(), PREFIX).entries() == []
    again = run.undo(evidence())
    assert "was not blocked" in again[0].detail


def test_immediate_runs_only_the_blocks_and_deferred_the_rest_in_order(redis_server, tmp_path) -> None:
    log = tmp_path / "log"
    run = runner(redis_server,
                 {"type": "command", "name": "first", "argv": [script(tmp_path, "a", f"echo first >> {log}")]},
                 {"type": "block-account"},
                 {"type": "block-address", "firewall_command": [script(tmp_path, "fw", f"echo fw >> {log}"),
                                                                "{address}"]},
                 {"type": "command", "name": "last", "argv": [script(tmp_path, "b", f"echo last >> {log}")]})
    assert [r.name for r in run.immediate(evidence())] == ["block-account", "block-address"]
    assert not log.exists()
    assert [r.name for r in run.deferred(evidence())] == ["first", "block-address/firewall", "last"]
    assert log.read_text().split() == ["first", "fw", "last"]
    assert run.has_deferred()


# -- order and failures --------------------------------------------------------------------------------


def test_a_failure_in_the_middle_stops_nothing_and_each_is_logged(redis_server, tmp_path, webhook_server,
                                                                   caplog) -> None:
    log = tmp_path / "log"
    stored: list[ActionResult] = []
    before = counted("broken", "failed")
    run = runner(redis_server,
                 {"type": "command", "name": "one", "argv": [script(tmp_path, "one", f"echo one >> {log}")]},
                 {"type": "command", "name": "broken", "argv": [script(
                     tmp_path, "broken", f"echo two >> {log}\necho 'noise' >&2\necho 'ldap: no such user' >&2\n"
                                         "exit 3")]},
                 {"type": "webhook", "name": "hook", "url": webhook_server.url("/fail")},
                 {"type": "command", "name": "three", "argv": [script(tmp_path, "three", f"echo three >> {log}")]})
    with caplog.at_level(logging.INFO, logger="mailwarden.phishhook.actions"):
        results = run.run(evidence(), on_result=stored.append)
    assert [(r.name, r.ok) for r in results] == [("one", True), ("broken", False), ("hook", False), ("three", True)]
    assert stored == results
    assert log.read_text().split() == ["one", "two", "three"]
    assert results[1].detail.endswith("failed with exit 3: ldap: no such user")
    assert results[2].detail == f"{webhook_server.url('/fail')} answered 500 Internal Server Error"
    assert counted("broken", "failed") == before + 1
    lines = [(r.getMessage(), r.kv["snag"], r.kv["action"], r.kv["result"]) for r in caplog.records]  # type: ignore[attr-defined]
    assert lines == [("snag action", "SNAG42", name, result) for name, result in
                     (("one", "ok"), ("broken", "failed"), ("hook", "failed"), ("three", "ok"))]


def test_redis_down_is_a_failed_block_and_the_rest_still_runs(own_redis, tmp_path) -> None:
    marker = tmp_path / "ran"
    run = runner(own_redis, {"type": "block-account"},
                 {"type": "command", "name": "after", "argv": [script(tmp_path, "after", f"touch {marker}")]})
    own_redis.stop()
    results = run.run(evidence())
    assert (results[0].ok, results[0].detail.startswith("Redis:")) == (False, True)
    assert results[1].ok and marker.exists()


def test_an_action_that_raises_is_a_failure_logged_with_its_traceback(redis_server, tmp_path, sink, caplog) -> None:
    (tmp_path / "ticket.txt.j2").write_text("{{ user }} {{ no_such_field }}\n")  # a site's template with a typo
    run = runner(redis_server, {"type": "ticket", "to": ["s@example.org"], "from_address": "p@example.org",
                                "smtp": f"127.0.0.1:{sink.port}", "templates": str(tmp_path)},
                 {"type": "block-account"})
    with caplog.at_level(logging.ERROR, logger="mailwarden.phishhook.actions"):
        ticket, block = run.run(evidence())
    assert not ticket.ok and ticket.detail == "UndefinedError: 'no_such_field' is undefined"
    assert block.ok
    [record] = caplog.records
    assert record.exc_info and record.kv == {"snag": "SNAG42", "action": "ticket"}  # type: ignore[attr-defined]


def test_a_result_store_that_raises_does_not_stop_the_actions(redis_server) -> None:
    seen = []

    def store(result: ActionResult) -> None:
        seen.append(result.name)
        raise RuntimeError("database gone")

    results = runner(redis_server, {"type": "block-account"}, {"type": "block-address"}).run(evidence(), store)
    assert seen == ["block-account", "block-address"] and all(r.ok for r in results)


# -- site commands -------------------------------------------------------------------------------------


def test_command_gets_the_evidence_on_stdin_and_a_minimal_environment(redis_server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MAILWARDEN_REDIS_PASSWORD", "secret")
    out = tmp_path / "out.json"
    command = python_script(tmp_path, "record", f"""
import json, os, sys
json.dump({{"stdin": sys.stdin.read(), "argv": sys.argv[1:], "env": dict(os.environ)}}, open({str(out)!r}, "w"))
""")
    odd = "o'brien $(reboot) jr"
    [result] = runner(redis_server, {"type": "command", "name": "record",
                                     "argv": [command, "--user", "{user}", "{snag}"]}).run(evidence(user=odd))
    assert result.ok and result.detail == f"done ({command}: exit 0)"
    got = json.loads(out.read_text())
    assert json.loads(got["stdin"]) == json.loads(evidence(user=odd).to_json())
    assert json.loads(got["stdin"])["details"]["sightings"][1]["address"] == CN
    assert got["argv"] == ["--user", odd, "SNAG42"]
    assert got["env"] == {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                          "MAILWARDEN_SNAG": "SNAG42", "MAILWARDEN_USER": odd}


def test_a_command_that_ignores_a_large_stdin_does_not_hang(redis_server, tmp_path) -> None:
    big = evidence(padding="x" * 1_000_000)
    [result] = runner(redis_server, {"type": "command", "name": "deaf", "timeout": 20,
                                     "argv": [script(tmp_path, "deaf", "head -c 200000 /dev/zero\nexit 0")]}).run(big)
    assert result.ok and result.seconds < 5


def test_a_hanging_command_is_killed_with_its_child_within_the_timeout(redis_server, tmp_path) -> None:
    pidfile = tmp_path / "child.pid"
    hang = script(tmp_path, "hang", f"sleep 600 &\necho $! > {pidfile}\nwait")
    run = runner(redis_server, {"type": "command", "name": "hang", "timeout": "1s", "argv": [hang]},
                 {"type": "block-account"})
    start = time.monotonic()
    results = run.run(evidence())
    elapsed = time.monotonic() - start
    assert results[0].ok is False
    assert results[0].detail == f"timed out after 1s: {hang} and the processes it started were killed"
    assert 1.0 <= elapsed < 1.0 + 2.0
    assert results[1].ok  # the next action still ran
    child = int(pidfile.read_text())
    wait_for(lambda: gone(child), timeout=5, what=f"the command's child {child} to be killed")


def gone(pid: int) -> bool:
    """Dead, or a zombie waiting for a reaper (killed all the same)."""
    return process_state(pid) in (None, "Z", "X")


def test_a_chatty_command_is_drained_with_its_output_bounded(tmp_path) -> None:
    chatty = script(tmp_path, "chatty", "head -c 52428800 /dev/zero\necho 'the last words' >&2\nexit 1")
    start = time.monotonic()
    completed = run_bounded([chatty], b"", {"PATH": "/usr/bin:/bin"}, timeout=30)
    assert time.monotonic() - start < 20
    assert completed.returncode == 1 and not completed.timed_out
    assert len(completed.stdout) == OUTPUT_KEPT
    assert completed.judge(chatty, 30, "done").detail == f"{chatty} failed with exit 1: the last words"


def test_a_long_stderr_line_is_bounded_and_a_missing_program_is_a_failure(redis_server, tmp_path) -> None:
    shout = python_script(tmp_path, "shout", "import sys\nsys.stderr.write('E' * 5000 + '\\n')\nsys.exit(2)")
    run = runner(redis_server, {"type": "command", "name": "shout", "argv": [shout]},
                 {"type": "command", "name": "missing", "argv": [str(tmp_path / "nowhere")]},
                 {"type": "command", "name": "killed", "argv": [script(tmp_path, "killed", "kill -TERM $$")]})
    shouted, missing, killed = run.run(evidence())
    assert not shouted.ok and len(shouted.detail) <= 500 + len(shout) + 40
    assert not missing.ok and missing.detail == f"cannot run {tmp_path / 'nowhere'}: No such file or directory"
    assert not killed.ok and "killed by SIGTERM" in killed.detail


# -- webhook -------------------------------------------------------------------------------------------


class WebhookServer:
    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.release = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.received.append((self.path, dict(self.headers), body))
                if self.path == "/slow":
                    owner.release.wait(30)
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "http://elsewhere.example/x?token=t")
                    self.end_headers()
                    return
                self.send_response(500 if self.path == "/fail" else 202)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # serve_forever accepts after its poll said a connection waits; should the connection be gone by then
        # (a client that gave up), a blocking accept would wait for the next one and stop() with it, forever
        self.server.socket.settimeout(1.0)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook_server() -> Iterator[WebhookServer]:
    server = WebhookServer()
    yield server
    server.stop()


def test_webhook_posts_the_evidence_with_its_headers_never_logged(redis_server, webhook_server, caplog) -> None:
    run = runner(redis_server, {"type": "webhook", "url": webhook_server.url("/ok?token=hidden"),
                                "headers": {"Authorization": "Bearer sekrit-token"}})
    with caplog.at_level(logging.DEBUG, logger="mailwarden"):
        [result] = run.run(evidence())
    assert result.ok and result.detail == f"posted to {webhook_server.url('/ok')} (202)"
    [(path, headers, body)] = webhook_server.received
    assert path == "/ok?token=hidden"
    assert headers["Authorization"] == "Bearer sekrit-token" and headers["Content-Type"] == "application/json"
    assert json.loads(body) == json.loads(evidence().to_json())
    assert "sekrit" not in caplog.text and "hidden" not in caplog.text


def test_webhook_failures(redis_server, webhook_server) -> None:
    refused = f"http://127.0.0.1:{free_port()}/hook"
    run = runner(redis_server, {"type": "webhook", "name": "refused", "url": refused},
                 {"type": "webhook", "name": "moved", "url": webhook_server.url("/redirect")},
                 {"type": "webhook", "name": "slow", "url": webhook_server.url("/slow"), "timeout": "500ms"})
    start = time.monotonic()
    refused_result, moved, slow = run.run(evidence())
    elapsed = time.monotonic() - start
    assert not refused_result.ok and refused_result.detail == f"cannot reach {refused}: Connection refused"
    assert not moved.ok and moved.detail == (f"{webhook_server.url('/redirect')} answered 302 Found (redirect to "
                                             f"http://elsewhere.example/x: not followed)")
    assert not slow.ok and slow.detail == f"{webhook_server.url('/slow')} timed out after 500ms"
    assert elapsed < 0.5 + 2.0
    assert [path for path, _headers, _body in webhook_server.received] == ["/redirect", "/slow"]


# -- ticket --------------------------------------------------------------------------------------------


def test_ticket_mails_the_evidence_to_the_security_team(redis_server, sink) -> None:
    run = runner(redis_server, {"type": "ticket", "to": ["security@example.org", "rt@example.org"],
                                "from_address": "phishhook@example.org", "smtp": f"127.0.0.1:{sink.port}"})
    held = {"queue_id": "4AbCdE", "sender": "alice@example.org", "header_from": "ceo@bank.example",
            "recipients": 101, "subject": "Urgent: verify your account", "at": 1764594100.0}
    [result] = run.run(evidence(messages=[held]))
    assert result.ok and result.detail == "ticket sent to security@example.org, rt@example.org"
    received = sink.wait_for(2)
    assert sorted(r.rcpt_tos[0] for r in received) == ["rt@example.org", "security@example.org"]
    assert {r.mail_from for r in received} == {"phishhook@example.org"}
    message = received[0].message
    assert message["Subject"] == "[phishhook] geo-velocity snag of alice (SNAG42)"
    assert message["Auto-Submitted"] == "auto-generated"
    body = message.get_body(("plain",)).get_content().replace("\r\n", "\n")  # type: ignore[union-attr]
    assert "phishhook snagged the account alice." in body
    assert "Reason:         login from CN 1.0 h after US" in body
    assert f"Source address: {CN}" in body
    table = body.split("Logins:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert table[0].split() == ["time", "address", "place", "distance", "hours", "speed"]
    assert US in table[1] and "Milton, WA, US" in table[1]
    assert CN in table[2] and "Fuzhou, CN" in table[2] and "9,876 km" in table[2] and table[2].endswith("9,876 km/h")
    assert "queue id 4AbCdE: envelope sender alice@example.org, From ceo@bank.example, 101 recipient(s)" in body
    assert "Subject: Urgent: verify your account" in body
    assert "Review: https://review.example.org/snags/SNAG42" in body
    [attachment] = list(message.iter_attachments())
    assert attachment.get_filename() == "evidence.json" and attachment.get_content_type() == "application/json"
    assert json.loads(attachment.get_content()) == json.loads(evidence(messages=[held]).to_json())


def test_ticket_in_alert_mode_and_without_a_listener(redis_server, sink) -> None:
    dead = f"127.0.0.1:{free_port()}"
    run = runner(redis_server,
                 {"type": "ticket", "name": "down", "to": ["s@example.org"], "from_address": "p@example.org",
                  "smtp": dead, "timeout": "2s"},
                 {"type": "ticket", "to": ["s@example.org"], "from_address": "p@example.org",
                  "smtp": f"127.0.0.1:{sink.port}", "subject": "[{mode}] {user} from {address}"})
    down, sent = run.run(evidence(mode="alert", address=""))
    assert not down.ok and down.detail.startswith(f"no ticket sent; cannot send through {dead} (the smtp setting "
                                                  f"of the ticket action 'down')")
    assert sent.ok
    [received] = sink.wait_for(1)
    assert received.message["Subject"] == "[alert] alice from no address"
    body = received.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "alert-only: nothing was blocked" in body and "Source address: none" in body


# -- the worker ----------------------------------------------------------------------------------------


def test_worker_runs_snags_in_order_and_drains_on_close() -> None:
    done: list[str] = []
    worker = ActionWorker()
    for number in range(5):
        worker.submit(Evidence(f"S{number}", "u", "k", "r", "", "enforce", 0.0, {}),
                      lambda e: done.append(e.snag_id))
    worker.submit(Evidence("boom", "u", "k", "r", "", "enforce", 0.0, {}), lambda e: 1 / 0)
    worker.submit(Evidence("S5", "u", "k", "r", "", "enforce", 0.0, {}), lambda e: done.append(e.snag_id))
    assert worker.close(timeout=10) == []
    assert done == ["S0", "S1", "S2", "S3", "S4", "S5"]
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit(evidence(), lambda e: None)


def test_worker_close_is_bounded_and_reports_what_was_left(caplog) -> None:
    started, release = threading.Event(), threading.Event()
    done: list[str] = []

    def stuck(e: Evidence) -> None:
        started.set()
        release.wait(30)
        done.append(e.snag_id)

    worker = ActionWorker()
    worker.submit(Evidence("running", "u", "k", "r", "", "enforce", 0.0, {}), stuck)
    for name in ("next", "last"):
        worker.submit(Evidence(name, "u", "k", "r", "", "enforce", 0.0, {}), lambda e: done.append(e.snag_id))
    assert started.wait(10)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mailwarden.phishhook.actions"):
        left = worker.close(timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 1.5
    assert [e.snag_id for e in left] == ["running", "next", "last"]
    assert [r.kv["snag"] for r in caplog.records] == ["running", "next", "last"]  # type: ignore[attr-defined]
    release.set()
    worker._thread.join(10)
    assert done == ["running"]  # the abandoned snags were not started after close


def test_the_runner_and_the_worker_together(redis_server, tmp_path) -> None:
    log = tmp_path / "log"
    run = runner(redis_server, {"type": "block-account"},
                 {"type": "command", "name": "note", "argv": [script(tmp_path, "note", f'echo "$1" >> {log}'),
                                                              "{snag}"]})
    stored: list[tuple[str, str]] = []
    worker = ActionWorker()
    def slow_part(snag: Evidence) -> None:
        run.deferred(snag, lambda result: stored.append((snag.snag_id, result.name)))

    for snag_id in ("A", "B", "C"):
        snag = Evidence(snag_id, f"user-{snag_id}", "outbound", "101 recipients", CN, "enforce", 0.0, {})
        assert [result.name for result in run.immediate(snag)] == ["block-account"]
        assert policyd_refuses(redis_server.url, user=f"user-{snag_id}") is not None  # blocked before the rest
        worker.submit(snag, slow_part)
    assert worker.close(timeout=30) == []
    assert log.read_text().split() == ["A", "B", "C"]
    assert stored == [("A", "note"), ("B", "note"), ("C", "note")]


def test_evidence_refuses_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="evidence mode 'block'"):
        evidence(mode="block")
    assert os.environ.get("MAILWARDEN_REDIS_PASSWORD") is None
