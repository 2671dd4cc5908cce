"""The check pipeline and the server around it, in-process: order, first decisive answer, PREPEND, a check
that breaks (a bug must give a temporary failure, not a crash), and a Redis that answers nonsense."""

from __future__ import annotations

import asyncio
import io

from conftest import base_settings
from harness.policyd_proc import encode_request

from mailwarden.decision import Action
from mailwarden.logs import DecisionLog
from policyd.check import Check, Pipeline
from policyd.request import PolicyRequest
from policyd.results import TransactionState
from policyd.server import PolicyServer
from policyd.settings import PolicydSettings
from policyd.verdict import Verdict, prepend


class Fixed(Check):
    dependency = None

    def __init__(self, name: str, verdict: Verdict | None = None, error: Exception | None = None) -> None:
        self.name = name  # type: ignore[misc]
        self.verdict = verdict
        self.error = error
        self.calls = 0

    async def on_rcpt(self, request: PolicyRequest) -> Verdict | None:
        self.calls += 1
        if self.error:
            raise self.error
        return self.verdict


def decide(checks, **attrs):
    pipeline = Pipeline(PolicydSettings(), checks)
    request = PolicyRequest.from_attrs({"protocol_state": "RCPT", "client_address": "192.0.2.1", **attrs})
    return asyncio.run(pipeline.decide(request))


def test_first_decisive_answer_wins_and_later_checks_do_not_run():
    later = Fixed("later", Verdict.refuse(Action.REJECT, "no", "550 5.7.1 no"))
    outcome = decide([Fixed("a", Verdict.accept("fine")), Fixed("b", Verdict.refuse(Action.DEFER, "wait", "450 wait")),
                      later])
    assert outcome.check == "b" and outcome.verdict.reply == "450 wait" and later.calls == 0
    assert [name for name, _ in outcome.timings] == ["a", "b"]


def test_prepend_survives_later_accepts_but_not_a_later_refusal():
    header = Fixed("h", Verdict.accept("passed", prepend("X-Test: 1")))
    assert decide([header, Fixed("z", Verdict.accept("ok"))]).verdict.reply == "PREPEND X-Test: 1"
    refused = decide([header, Fixed("z", Verdict.refuse(Action.REJECT, "no", "550 5.7.1 no"))])
    assert refused.verdict.reply == "550 5.7.1 no"


def test_no_check_for_the_stage_is_dunno():
    outcome = decide([Fixed("a", Verdict.refuse(Action.REJECT, "no", "550 no"))], protocol_state="DATA")
    assert outcome.verdict.reply == "DUNNO" and outcome.check == "none"


def serve_once(checks, payload: bytes) -> tuple[bytes, str]:
    """Run a PolicyServer in-process on an ephemeral port, send ``payload``, return the answer and the log."""
    async def main():
        stream = io.StringIO()
        server = PolicyServer(PolicydSettings(), Pipeline(PolicydSettings(), checks), DecisionLog(stream=stream))
        await server.start(["127.0.0.1:0"])
        port = server.servers[0].sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        answer = await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
        writer.close()
        await server.stop(1)
        return answer, stream.getvalue()
    return asyncio.run(main())


def test_a_check_that_raises_gives_a_temporary_failure_and_the_log_says_why(caplog):
    answer, log = serve_once([Fixed("buggy", error=KeyError("boom"))], encode_request())
    assert answer == b"action=DEFER_IF_PERMIT 4.3.0 Temporary local problem, please try again later\n\n"
    assert 'reason="internal error: KeyError"' in log
    assert any("internal error deciding a request" in r.getMessage() for r in caplog.records)


def test_redis_error_reply_is_a_backend_failure_with_the_fail_mode(policyd_factory, redis_server):
    daemon = policyd_factory(base_settings(redis_server.url, checks=["greylist"]))
    redis_server.client().set("mw:gl:c:192.0.2.10", "not a hash")  # WRONGTYPE for the greylist script
    with daemon.connect() as client:
        assert client.ask() == "DUNNO"
        assert client.ask(client_address="192.0.2.11").startswith("DEFER_IF_PERMIT")
    log = daemon.wait_log("backend failed; applying fail mode")
    assert "WRONGTYPE" in log


def test_a_header_found_for_a_refused_recipient_goes_out_with_the_next_answer():
    header = Fixed("h", Verdict.accept("tagged", prepend("X-Test: 1")))
    refuse_first = Fixed("r", Verdict.refuse(Action.REJECT, "no", "550 5.1.1 no"))
    pipeline = Pipeline(PolicydSettings(), [header, refuse_first])
    shared = TransactionState()
    first = PolicyRequest.from_attrs({"protocol_state": "RCPT", "client_address": "192.0.2.1"}, shared)
    assert asyncio.run(pipeline.decide(first)).verdict.reply == "550 5.1.1 no"
    data = PolicyRequest.from_attrs({"protocol_state": "DATA", "client_address": "192.0.2.1"}, shared)
    assert asyncio.run(pipeline.decide(data)).verdict.reply == "PREPEND X-Test: 1"
