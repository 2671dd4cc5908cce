"""The pipeline's deferred reads (pure logic; Redis is a dict here, the real daemon is in
test_policyd_round_trips.py): a check whose read rides on the next check's script still decides in its
place, whatever the carrier does: uses the guard, trips it, skips Redis, refuses, or fails."""

from __future__ import annotations

import asyncio

from mailwarden.backend import BackendError
from mailwarden.decision import Action
from mailwarden.redis_guard import Guard, GuardTripped
from policyd.check import Check, DeferringCheck, Pipeline
from policyd.request import PolicyRequest
from policyd.settings import PolicydSettings
from policyd.verdict import Verdict

BLOCKED = Verdict.refuse(Action.REJECT, "client blocked: test", "550 5.7.1 blocked")


class Down(BackendError):
    backend = "redis"


class Blocks(DeferringCheck):
    """Reads ``block:<client>``; expects it absent."""

    name = "blocklist"

    def __init__(self, store: dict[str, bytes], down: bool = False) -> None:
        self.store = store
        self.down = down
        self.own_reads = 0
        self.judged = 0

    def rcpt_read(self, request: PolicyRequest) -> Guard | None:
        return Guard([f"block:{request.client_address}"], [None])

    async def rcpt_check(self, request: PolicyRequest, read: Guard) -> Verdict | None:
        self.own_reads += 1
        if self.down:
            raise Down("redis down")
        return await self.rcpt_judge(request, read, [self.store.get(key) for key in read.keys])

    async def rcpt_judge(self, request: PolicyRequest, read: Guard, found: list[bytes | None]) -> Verdict | None:
        self.judged += 1
        return BLOCKED if any(found) else None


class Carrier(Check):
    """A script-running check: with ``uses_redis`` it takes the guard as the real ones do."""

    name = "greylist"
    carries_reads = True

    def __init__(self, store: dict[str, bytes], verdict: Verdict | None, uses_redis: bool = True,
                 down: bool = False) -> None:
        self.store = store
        self.verdict = verdict
        self.uses_redis = uses_redis
        self.down = down
        self.runs = 0
        self.scripts_run = 0

    async def on_rcpt(self, request: PolicyRequest) -> Verdict | None:
        self.runs += 1
        if not self.uses_redis:
            return self.verdict
        guard = request.take_guard()
        if self.down:
            raise Down("redis down")
        if guard is not None:
            found = [self.store.get(key) for key in guard.keys]
            if found != guard.expected:
                raise GuardTripped(found)
        self.scripts_run += 1
        return self.verdict


class Plain(Check):
    name = "dnsbl"
    dependency = None

    def __init__(self) -> None:
        self.calls = 0

    async def on_rcpt(self, request: PolicyRequest) -> Verdict | None:
        self.calls += 1
        return Verdict.accept("score 0")


def decide(checks: list[Check], settings: PolicydSettings | None = None, client: str = "192.0.2.1"):
    pipeline = Pipeline(settings or PolicydSettings(), checks)
    request = PolicyRequest.from_attrs({"protocol_state": "RCPT", "client_address": client})
    return asyncio.run(pipeline.decide(request)), request


DEFER = Verdict.refuse(Action.DEFER, "new triplet", "DEFER_IF_PERMIT greylisted")


def test_the_read_rides_on_the_script_and_nothing_else_is_read():
    store: dict[str, bytes] = {}
    blocks, carrier = Blocks(store), Carrier(store, DEFER)
    outcome, request = decide([blocks, carrier])
    assert outcome.check == "greylist" and outcome.verdict is DEFER
    assert blocks.own_reads == 0 and blocks.judged == 0 and carrier.scripts_run == 1
    assert [name for name, _ in outcome.timings] == ["blocklist", "greylist"] and request.guard is None


def test_a_tripped_guard_lets_the_block_list_decide_and_the_script_never_ran():
    store = {"block:192.0.2.1": b"{}"}
    blocks, carrier = Blocks(store), Carrier(store, DEFER)
    outcome, _ = decide([blocks, carrier])
    assert outcome.check == "blocklist" and outcome.verdict is BLOCKED
    assert carrier.scripts_run == 0 and carrier.runs == 1 and blocks.own_reads == 0
    assert [name for name, _ in outcome.timings] == ["blocklist"] and outcome.notes == []


def test_a_tripped_guard_that_finds_nothing_to_refuse_runs_the_script_again_without_it():
    store = {"block:192.0.2.1": b""}  # held something else than expected, but nothing the judge refuses
    blocks, carrier = Blocks(store), Carrier(store, DEFER)
    outcome, _ = decide([blocks, carrier])
    assert outcome.check == "greylist" and carrier.runs == 2 and carrier.scripts_run == 1 and blocks.judged == 1


def test_a_carrier_that_makes_no_call_leaves_the_read_to_the_block_list_at_the_end():
    store = {"block:192.0.2.1": b"{}"}
    blocks, carrier = Blocks(store), Carrier(store, Verdict.accept("trusted network"), uses_redis=False)
    outcome, _ = decide([blocks, carrier])
    assert outcome.check == "blocklist" and outcome.verdict is BLOCKED and blocks.own_reads == 1
    assert outcome.notes == [] and [name for name, _ in outcome.timings] == ["blocklist"]
    store.clear()
    outcome, _ = decide([blocks, carrier])
    assert outcome.check == "greylist" and outcome.verdict.reason == "trusted network" and blocks.own_reads == 2


def test_a_carrier_refusing_without_redis_waits_for_the_block_list_first():
    store = {"block:192.0.2.1": b"{}"}
    cap = Verdict.refuse(Action.DEFER, "too many recipients", "450 4.7.1 limit")
    outcome, _ = decide([Blocks(store), Carrier(store, cap, uses_redis=False)])
    assert outcome.check == "blocklist" and outcome.verdict is BLOCKED
    store.clear()
    outcome, _ = decide([Blocks(store), Carrier(store, cap, uses_redis=False)])
    assert outcome.check == "greylist" and outcome.verdict is cap


def test_the_read_is_made_before_a_check_that_cannot_carry_it_runs():
    store = {"block:192.0.2.1": b"{}"}
    blocks, plain = Blocks(store), Plain()
    carrier = Carrier(store, None, uses_redis=False)
    outcome, _ = decide([blocks, carrier, plain, Carrier(store, DEFER)])
    assert outcome.check == "blocklist" and plain.calls == 0 and blocks.own_reads == 1


def test_a_block_list_with_no_carrier_next_reads_on_its_own():
    store: dict[str, bytes] = {}
    blocks, plain, carrier = Blocks(store), Plain(), Carrier(store, DEFER)
    outcome, _ = decide([blocks, plain, carrier])
    assert blocks.own_reads == 1 and carrier.scripts_run == 1 and outcome.check == "greylist"
    assert outcome.notes == ["dnsbl: score 0"]


def test_a_failed_carrier_fails_the_block_list_first_in_its_place():
    store: dict[str, bytes] = {}
    outcome, _ = decide([Blocks(store), Carrier(store, DEFER, down=True)])
    assert outcome.check == "greylist" and outcome.verdict.action is Action.FAIL_OPEN
    assert outcome.degraded == ["blocklist", "greylist"]
    assert len(outcome.notes) == 1 and outcome.notes[0].startswith("blocklist: redis failed: redis down")
    assert outcome.fail_mode == ("redis", "fail_open")


def test_a_failed_carrier_with_a_closing_fail_mode_answers_for_the_block_list():
    settings = PolicydSettings.model_validate({"on_error": {"redis": {"inbound": "defer"}}})
    store: dict[str, bytes] = {}
    outcome, _ = decide([Blocks(store), Carrier(store, DEFER, down=True)], settings)
    assert outcome.check == "blocklist" and outcome.verdict.action is Action.DEFER
    assert outcome.degraded == ["blocklist"] and outcome.notes == []


def test_a_failed_own_read_after_a_carrier_decided_is_a_note_before_it():
    store: dict[str, bytes] = {}
    blocks = Blocks(store, down=True)
    outcome, _ = decide([blocks, Carrier(store, Verdict.accept("trusted network"), uses_redis=False)])
    assert outcome.check == "greylist" and outcome.degraded == ["blocklist"]
    assert len(outcome.notes) == 1 and outcome.notes[0].startswith("blocklist: redis failed")
