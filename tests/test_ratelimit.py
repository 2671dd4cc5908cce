"""Rate limits against a real Redis with an injected clock: what is counted, when, and atomically."""

from __future__ import annotations

import asyncio
import time

from mailwarden.redis_pipe import PipelinedRedis
from mailwarden.redis_settings import RedisSettings
from policyd.ratelimit import RateLimit, RateLimitCheck, RateLimitSettings
from policyd.request import PolicyRequest
from policyd.results import TransactionState
from policyd.service import load_scripts


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0  # a multiple of 3600: windows start here

    def __call__(self) -> float:
        return self.now


def req(user: str = "alice", rcpt: str = "r@example.test", state: str = "RCPT", message=None, rcpt_number=1,
        **attrs: str) -> PolicyRequest:
    r = PolicyRequest.from_attrs({"protocol_state": state, "sasl_username": user, "recipient": rcpt,
                                  "sender": f"{user}@example.org", "client_address": "192.0.2.10", **attrs})
    r.transaction = TransactionState() if message is None else message
    r.rcpt_number = rcpt_number
    return r


def with_check(redis_url: str, limits: list[dict], scenario, clients: int = 1, **settings):
    async def main():
        pipes = [PipelinedRedis(RedisSettings(url=redis_url), load_scripts()) for _ in range(clients)]
        for pipe in pipes:
            pipe.start()
            assert await pipe.wait_connected(5)
        clock = Clock()
        checks = [RateLimitCheck(RateLimitSettings(limits=[RateLimit(**limit) for limit in limits], **settings),
                                 pipe, "t:", clock) for pipe in pipes]
        try:
            return await scenario(checks if clients > 1 else checks[0], clock)
        finally:
            for pipe in pipes:
                await pipe.close()
    return asyncio.run(main())


HOURLY = {"name": "msgs", "key": "sasl_user", "count": "messages", "max": 3, "window": "1h"}


def test_message_counted_once_at_its_first_recipient(redis_server):
    async def scenario(check, clock):
        for _message in range(3):
            shared = TransactionState()
            for n in range(1, 6):  # five recipients each
                assert await check.on_rcpt(req(message=shared, rcpt_number=n)) is None
        refused = await check.on_rcpt(req())
        assert refused.decisive and refused.reply == ("450 4.7.1 Sending limit reached; please try again later or "
                                                      "contact the help desk")
        assert refused.reason == "rate limit msgs reached: sasl_user=alice at 3 of 3"
        assert "sasl_user=alice at 3 of 3" in refused.reason
        assert await check.on_rcpt(req(user="bob")) is None
    with_check(redis_server.url, [HOURLY], scenario)


def test_refused_first_recipient_does_not_let_the_next_one_through(redis_server):
    async def scenario(check, clock):
        for _ in range(3):
            assert await check.on_rcpt(req()) is None
        shared = TransactionState()
        assert (await check.on_rcpt(req(message=shared))).decisive
        assert (await check.on_rcpt(req(message=shared, rcpt_number=2))).decisive
    with_check(redis_server.url, [HOURLY], scenario)


def test_sliding_window_forgets_gradually(redis_server):
    async def scenario(check, clock):
        for _ in range(3):
            assert await check.on_rcpt(req()) is None
        clock.now += 3600 + 1800  # half of the previous window still overlaps: estimate 1.5
        assert await check.on_rcpt(req()) is None  # 1.5 + 1 <= 3
        assert (await check.on_rcpt(req())).decisive  # 1.5 + 1 + 1 > 3
        clock.now += 2 * 3600
        assert await check.on_rcpt(req()) is None
    with_check(redis_server.url, [HOURLY], scenario)


def test_recipient_limit_counts_each_recipient(redis_server):
    limit = {"name": "rcpts", "key": "sasl_user", "count": "recipients", "max": 4, "window": "1d", "action": "reject"}

    async def scenario(check, clock):
        shared = TransactionState()
        for n in range(1, 5):
            assert await check.on_rcpt(req(message=shared, rcpt_number=n)) is None
        refused = await check.on_rcpt(req(message=shared, rcpt_number=5))
        assert refused.reply == "550 5.7.1 Sending limit reached; please contact the help desk"
    with_check(redis_server.url, [limit], scenario)


def test_per_message_recipient_cap(redis_server):
    limit = {"name": "per-msg", "key": "sasl_user", "count": "recipients", "max": 20, "window": "message"}

    async def scenario(check, clock):
        assert await check.on_rcpt(req(rcpt_number=20)) is None
        assert (await check.on_rcpt(req(rcpt_number=21))).reason.startswith("rate limit per-msg reached")
        assert await check.on_rcpt(req(user="", rcpt_number=50)) is None  # applies to authenticated only
    with_check(redis_server.url, [limit], scenario)


def test_end_of_message_stage_counts_recipient_count_after_acceptance(redis_server):
    limit = {"name": "eom", "key": "sasl_user", "count": "recipients", "max": 10, "window": "1h",
             "stage": "end-of-message"}

    async def scenario(check, clock):
        for _ in range(3):
            assert await check.on_rcpt(req()) is None  # checked, not counted
        assert await check.on_eom(req(state="END-OF-MESSAGE", recipient_count="6")) is None
        assert (await check.on_eom(req(state="END-OF-MESSAGE", recipient_count="6"))).decisive
        assert await check.on_rcpt(req()) is None  # 6 of 10 used
    with_check(redis_server.url, [limit], scenario)


def test_keys_other_than_the_user(redis_server):
    limits = [{"name": "dom", "key": "sender_domain", "count": "messages", "max": 1, "window": "1h"},
              {"name": "net", "key": "client_address", "count": "messages", "max": 2, "window": "1h"}]

    async def scenario(check, clock):
        assert await check.on_rcpt(req(user="", sender="a@one.example")) is None
        assert (await check.on_rcpt(req(user="", sender="b@one.example"))).reason.startswith("rate limit dom")
        assert await check.on_rcpt(req(user="", sender="c@two.example")) is None
        assert (await check.on_rcpt(req(user="", sender="d@three.example"))).reason.startswith("rate limit net")
    with_check(redis_server.url, limits, scenario)


def test_a_refusal_is_recorded_in_the_event_stream(redis_server):
    async def scenario(check, clock):
        for _ in range(4):
            await check.on_rcpt(req())
        entries = await check.redis.call("XRANGE", "t:ev:ratelimit", "-", "+")
        assert len(entries) == 1
        fields = dict(zip(entries[0][1][::2], entries[0][1][1::2], strict=True))
        assert fields[b"limit"] == b"msgs" and fields[b"key"] == b"alice" and fields[b"count"] == b"3"
    with_check(redis_server.url, [HOURLY], scenario)


class Notices:
    """Stands in for the LimitNotifier: records each notice the check asks for."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, int]] = []

    def limit_reached(self, limit, key_value: str, request: PolicyRequest, cap: int) -> None:
        self.sent.append((limit.name, key_value, cap))


def test_buckets_and_the_notice_marker_expire(redis_server):
    """Every rate-limit key has a TTL: a bucket lives two windows (this one and the next one's 'previous'),
    the once-per-window notice marker one window."""
    from policyd import keys

    async def scenario(check, clock):
        check.notifier = Notices()
        for _ in range(3):
            assert await check.on_rcpt(req()) is None
        bucket = keys.ratelimit_bucket("t:", "msgs", "alice")
        assert 2 * 3600 - 5 <= await check.redis.call("TTL", bucket) <= 2 * 3600
        assert (await check.on_rcpt(req())).decisive
        marker = keys.ratelimit_notified("t:", "msgs", "alice")
        assert 3600 - 5 <= await check.redis.call("TTL", marker) <= 3600
        assert check.notifier.sent == [("msgs", "alice", 3)]
    with_check(redis_server.url, [HOURLY], scenario)


def test_the_first_refusal_of_each_window_notifies_once(redis_server):
    """Told once per window, not once per message, and told again in a later window. Redis expires the
    marker in real time: the window is one second and the test waits for the marker to go."""
    from policyd import keys

    async def scenario(check, clock):
        check.notifier = Notices()
        marker = keys.ratelimit_notified("t:", "msgs", "alice")
        assert await check.on_rcpt(req()) is None
        assert (await check.on_rcpt(req())).decisive
        assert (await check.on_rcpt(req())).decisive
        assert check.notifier.sent == [("msgs", "alice", 1)]
        deadline = time.monotonic() + 5
        while await check.redis.call("EXISTS", marker):
            assert time.monotonic() < deadline, "the notice marker never expired"
            await asyncio.sleep(0.05)
        clock.now += 2  # a later window: the buckets are empty again
        assert await check.on_rcpt(req()) is None
        assert (await check.on_rcpt(req())).decisive
        assert check.notifier.sent == [("msgs", "alice", 1), ("msgs", "alice", 1)]
    with_check(redis_server.url, [{**HOURLY, "max": 1, "window": "1s"}], scenario)


def test_two_connections_racing_never_exceed_the_limit(redis_server):
    limit = {**HOURLY, "max": 50}

    async def scenario(checks, clock):
        results = await asyncio.gather(*(checks[n % 2].on_rcpt(req()) for n in range(200)))
        assert sum(1 for r in results if r is None) == 50
    with_check(redis_server.url, [limit], scenario, clients=2)


def test_config_overrides_raise_or_lift_one_key(redis_server):
    from policyd.ratelimit import RateOverride

    async def scenario(check, clock):
        check.overrides = {("msgs", "newsletter"): RateOverride(limit="msgs", key="newsletter", max=5),
                           ("msgs", "backup"): RateOverride(limit="msgs", key="backup", exempt=True)}
        for _ in range(5):
            assert await check.on_rcpt(req(user="newsletter")) is None
        assert (await check.on_rcpt(req(user="newsletter"))).reason.endswith("at 5 of 5")
        for _ in range(20):
            assert await check.on_rcpt(req(user="backup")) is None
        for _ in range(3):
            assert await check.on_rcpt(req(user="alice")) is None
        assert (await check.on_rcpt(req(user="alice"))).decisive
    with_check(redis_server.url, [HOURLY], scenario)


def test_redis_overrides_from_the_cli_apply_on_the_next_request(redis_server):
    from policyd import keys

    async def scenario(check, clock):
        for _ in range(3):
            assert await check.on_rcpt(req()) is None
        assert (await check.on_rcpt(req())).decisive
        await check.redis.call("SET", keys.ratelimit_override("t:", "msgs", "alice"), "6")
        for _ in range(3):
            assert await check.on_rcpt(req()) is None
        assert (await check.on_rcpt(req())).reason.endswith("at 6 of 6")
        await check.redis.call("SET", keys.ratelimit_override("t:", "msgs", "alice"), "exempt")
        assert await check.on_rcpt(req()) is None
        assert (await check.on_rcpt(req(user="bob"))) is None
    with_check(redis_server.url, [HOURLY], scenario)


def test_a_global_cap_stops_a_burst_spread_over_many_users(redis_server):
    cap = {"name": "all-users", "key": "global", "count": "messages", "max": 10, "window": "1h"}

    async def scenario(check, clock):
        answers = [await check.on_rcpt(req(user=f"user{n}")) for n in range(15)]
        assert sum(1 for a in answers if a is None) == 10
        assert await check.on_rcpt(req(user="")) is None  # unauthenticated mail is not counted
    with_check(redis_server.url, [HOURLY, cap], scenario)


def test_overrides_file_is_read_and_reread_and_bad_lines_are_skipped(redis_server, tmp_path):
    path = tmp_path / "overrides"
    path.write_text("# site overrides\nmsgs newsletter 5\nmsgs backup exempt\nnosuch alice 9\nmsgs bob lots\n")

    async def scenario(check, clock):
        assert check.configured_max(check.windowed[0], "newsletter") == 5
        assert check.configured_max(check.windowed[0], "backup") is None
        assert check.configured_max(check.windowed[0], "bob") == 3  # the bad line is skipped
        assert check.configured_max(check.windowed[0], "carol") == 1  # the config wins
        path.write_text("msgs newsletter 50\nmsgs carol 100\n")
        check._read_overrides_file()
        assert check.configured_max(check.windowed[0], "newsletter") == 50
        assert check.configured_max(check.windowed[0], "backup") == 3
        assert check.configured_max(check.windowed[0], "carol") == 1
    with_check(redis_server.url, [HOURLY], scenario, overrides_file=path,
               overrides=[{"limit": "msgs", "key": "carol", "max": 1}])


def test_overrides_from_an_ldap_attribute(policyd_factory, redis_server, slapd):
    from conftest import base_settings
    from ldap3 import MODIFY_REPLACE

    admin = slapd.admin_connection()
    admin.modify("uid=alice,ou=people,dc=example,dc=org", {"employeeType": [(MODIFY_REPLACE, ["user-msgs=5"])]})
    admin.modify("uid=carol,ou=people,dc=example,dc=org", {"employeeType": [(MODIFY_REPLACE, ["exempt"])]})
    limits = [{"name": "user-msgs", "key": "sasl_user", "count": "messages", "max": 2, "window": "1h"}]
    daemon = policyd_factory(base_settings(redis_server.url, checks=["ratelimit"], ratelimit={
        "limits": limits, "ldap_attribute": "employeeType", "ldap_filter": "(uid=%u)"},
        recipients={"ldap": {"servers": [slapd.url], "base": "dc=example,dc=org"}}))

    def sent(user: str, count: int) -> int:
        with daemon.connect() as c:
            return sum(c.ask(sasl_username=user, instance=f"{user}{n}") == "DUNNO" for n in range(count))

    assert sent("alice", 8) == 5
    assert sent("carol", 8) == 8
    assert sent("dave", 4) == 2  # no entry: the limit as configured
    slapd.stop()
    assert sent("erin", 4) == 2  # the directory is down: the limit as configured, and the log says so
    assert sent("alice", 1) == 0  # alice's override is cached; she is still at 5 of 5
    daemon.wait_log("rate-limit overrides from LDAP unavailable; limits as configured")
