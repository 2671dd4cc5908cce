# ruff: noqa: E501, RUF001
"""The decision line, byte for byte (issue 14).

Every expected line below was rendered once by ``Decision.logfmt()`` as it was before the one-pass
rewrite (commit fd37e19) and pasted in as a literal, so any change to the rendering (order, quoting,
escapes, omitted empties, the ``-`` and ``<>`` placeholders, the ms rounding) fails here. Do not
regenerate these with the code under test.
"""

from __future__ import annotations

import pytest

from mailwarden.decision import Action, Decision

B: dict[str, object] = dict(service="policyd", stage="rcpt", check="greylist", action=Action.DEFER, reason="new",
                            seconds=0.000123)

CASES: dict[str, dict[str, object]] = {
 "minimal_all_empty": dict(service="policyd", stage="rcpt", check="", action=Action.ACCEPT, reason="", seconds=0.0),
 "typical_defer": dict(B, queue_id="4BXk2L0abcz1", client="192.0.2.10", helo="mail.example.org", sender="alice@example.org", recipient="bob@example.net", reply="DEFER_IF_PERMIT 4.7.1 Greylisted, see https://example.org/grey", extra={"checks": "access:0.01,greylist:0.09"}),
 "null_sender": dict(B, client="2001:db8::1", helo="[192.0.2.1]", sender="", recipient="postmaster@example.net"),
 "empty_queue_id_user": dict(B, action=Action.ACCEPT, reason="sasl", user="alice", sender="a@b.c", recipient="d@e.f"),
 "quotes_backslash": dict(B, helo='he said "hi"', sender='"odd local"@example.org', recipient="back\\slash@example.net", reason='a=b'),
 "newline_tab_cr": dict(B, helo="line1\nline2", sender="tab\there@x", recipient="cr\r@x", reason="sp ace"),
 "control_chars": dict(B, helo="\x00\x01\x1b[31m\x7f", sender="bell\x07@x", recipient="\x1f"),
 "non_ascii": dict(B, helo="héllo.例え.jp", sender="усер@пример.рф", recipient="ünïcode@ex.de", reason="日本語", extra={"notes": "naïve café"}),
 "non_ascii_with_space": dict(B, helo="héllo wörld", sender="\u00a0nbsp@x", recipient="\u2028ls@x"),
 "very_long": dict(B, helo="h" * 600, sender="s" * 1000 + "@example.org", recipient=("r" * 300 + " ") * 3, reply="REJECT " + "x" * 2000),
 "extras_types": dict(B, extra={"count": 3, "zero": 0, "ratio": 0.25, "big": 1e20, "neg": -1.5, "none": None, "empty": "", "s": "plain", "q": "two words", "b": True, "f": False}),
 "extras_quote_needed": dict(B, extra={"notes": 'dnsbl: "zen" listed; spf=fail', "degraded": "redis,dnsbl", "weird key": "v"}),
 "reply_with_quotes": dict(B, action=Action.REJECT, reason="listed", reply='REJECT 5.7.1 Client "192.0.2.9" listed at zen.spamhaus.org\\x'),
 "reply_only_space": dict(B, reply=" "),
 "every_action_hold": dict(B, action=Action.HOLD, reason="x", seconds=1.23456),
 "fail_open_big_ms": dict(B, action=Action.FAIL_OPEN, check="ratelimit", reason="redis down", seconds=12.3456789, extra={"degraded": "ratelimit"}),
 "tag_quarantine_snag": dict(B, action=Action.SNAG, service="phishhook", stage="other", seconds=0.0000049, extra={"score": 0.995}),
 "equals_in_values": dict(B, sender="a=b@x", recipient="=", queue_id="Q=1", client="1.2.3.4=5"),
 "queue_id_needing_quotes": dict(B, queue_id="has space"),
 "stage_service_raw": dict(B, service="pol icyd", stage='st"age', check="chk"),
 "rounding": dict(B, seconds=0.000005),
 "rounding2": dict(B, seconds=0.000015),
 "negative_seconds": dict(B, seconds=-0.001),
 "plain_values_quoted_check_reason": dict(B, client="192.0.2.1", sender="a@b", check="my check", reason='say "no"\\', reply="DUNNO"),
 "reply_with_tab_and_control": dict(B, client="192.0.2.1", reply="REJECT\tbad\x01"),
 "greylist_new_triplet": dict(B, client="10.0.19.172", helo="mx.example.org", sender="s-hkf@example.org", recipient="u-hkf@example.test", reason="new triplet", seconds=0.00069, reply="DEFER_IF_PERMIT Greylisted, please try again in 5 minutes", extra={"checks": "greylist:0.33"}),
}

EXPECTED = {
    'minimal_all_empty':
        'event=decision service=policyd stage=rcpt queue_id=- sender=<> action=accept ms=0.00',
    'typical_defer':
        'event=decision service=policyd stage=rcpt queue_id=4BXk2L0abcz1 client=192.0.2.10 helo=mail.example.org sender=alice@example.org recipient=bob@example.net check=greylist action=defer reason=new ms=0.12 checks=access:0.01,greylist:0.09 reply="DEFER_IF_PERMIT 4.7.1 Greylisted, see https://example.org/grey"',
    'null_sender':
        'event=decision service=policyd stage=rcpt queue_id=- client=2001:db8::1 helo=[192.0.2.1] sender=<> recipient=postmaster@example.net check=greylist action=defer reason=new ms=0.12',
    'empty_queue_id_user':
        'event=decision service=policyd stage=rcpt queue_id=- sender=a@b.c recipient=d@e.f user=alice check=greylist action=accept reason=sasl ms=0.12',
    'quotes_backslash':
        'event=decision service=policyd stage=rcpt queue_id=- helo="he said \\"hi\\"" sender="\\"odd local\\"@example.org" recipient="back\\\\slash@example.net" check=greylist action=defer reason="a=b" ms=0.12',
    'newline_tab_cr':
        'event=decision service=policyd stage=rcpt queue_id=- helo="line1\\nline2" sender="tab\\there@x" recipient="cr\\r@x" check=greylist action=defer reason="sp ace" ms=0.12',
    'control_chars':
        'event=decision service=policyd stage=rcpt queue_id=- helo="\\x00\\x01\\x1b[31m\\x7f" sender="bell\\x07@x" recipient="\\x1f" check=greylist action=defer reason=new ms=0.12',
    'non_ascii':
        'event=decision service=policyd stage=rcpt queue_id=- helo=héllo.例え.jp sender=усер@пример.рф recipient=ünïcode@ex.de check=greylist action=defer reason=日本語 ms=0.12 notes="naïve café"',
    'non_ascii_with_space':
        'event=decision service=policyd stage=rcpt queue_id=- helo="héllo wörld" sender=\xa0nbsp@x recipient=\u2028ls@x check=greylist action=defer reason=new ms=0.12',
    'very_long':
        'event=decision service=policyd stage=rcpt queue_id=- helo=' + 'h' * 600 + ' sender=' + 's' * 1000 + '@example.org recipient="' + ('r' * 300 + ' ') * 3 + '" check=greylist action=defer reason=new ms=0.12 reply="REJECT ' + 'x' * 2000 + '"',
    'extras_types':
        'event=decision service=policyd stage=rcpt queue_id=- sender=<> check=greylist action=defer reason=new ms=0.12 count=3 zero=0 ratio=0.25 big=1e+20 neg=-1.5 s=plain q="two words" b=True f=False',
    'extras_quote_needed':
        'event=decision service=policyd stage=rcpt queue_id=- sender=<> check=greylist action=defer reason=new ms=0.12 notes="dnsbl: \\"zen\\" listed; spf=fail" degraded=redis,dnsbl weird key=v',
    'reply_with_quotes':
        'event=decision service=policyd stage=rcpt queue_id=- sender=<> check=greylist action=reject reason=listed ms=0.12 reply="REJECT 5.7.1 Client \\"192.0.2.9\\" listed at zen.spamhaus.org\\\\x"',
    'reply_only_space':
        'event=decision service=policyd stage=rcpt queue_id=- sender=<> check=greylist action=defer reason=new ms=0.12 reply=" "',
    'every_action_hold':
        'event=decision service=policyd stage=rcpt queue_id=- sender=<> check=greylist action=hold reason=x ms=1234.56',
    'fail_open_big_ms':
        'event=decision service=policyd stage=rcpt queue_id=- sender=<> check=ratelimit action=fail_open reason="redis down" ms=12345.68 degraded=ratelimit',
    'tag_quarantine_snag':
        'event=decision service=phishhook stage=other queue_id=- sender=<> check=greylist action=snag reason=new ms=0.00 score=0.995',
    'equals_in_values':
        'event=decision service=policyd stage=rcpt queue_id="Q=1" client="1.2.3.4=5" sender="a=b@x" recipient="=" check=greylist action=defer reason=new ms=0.12',
    'queue_id_needing_quotes':
        'event=decision service=policyd stage=rcpt queue_id="has space" sender=<> check=greylist action=defer reason=new ms=0.12',
    'stage_service_raw':
        'event=decision service=pol icyd stage=st"age queue_id=- sender=<> check=chk action=defer reason=new ms=0.12',
    'rounding':
        'event=decision service=policyd stage=rcpt queue_id=- sender=<> check=greylist action=defer reason=new ms=0.01',
    'rounding2':
        'event=decision service=policyd stage=rcpt queue_id=- sender=<> check=greylist action=defer reason=new ms=0.02',
    'negative_seconds':
        'event=decision service=policyd stage=rcpt queue_id=- sender=<> check=greylist action=defer reason=new ms=-1.00',
    'plain_values_quoted_check_reason':
        'event=decision service=policyd stage=rcpt queue_id=- client=192.0.2.1 sender=a@b check="my check" action=defer reason="say \\"no\\"\\\\" ms=0.12 reply=DUNNO',
    'reply_with_tab_and_control':
        'event=decision service=policyd stage=rcpt queue_id=- client=192.0.2.1 sender=<> check=greylist action=defer reason=new ms=0.12 reply="REJECT\\tbad\\x01"',
    'greylist_new_triplet':
        'event=decision service=policyd stage=rcpt queue_id=- client=10.0.19.172 helo=mx.example.org sender=s-hkf@example.org recipient=u-hkf@example.test check=greylist action=defer reason="new triplet" ms=0.69 checks=greylist:0.33 reply="DEFER_IF_PERMIT Greylisted, please try again in 5 minutes"',
}


@pytest.mark.parametrize("name", list(CASES))
def test_decision_line_is_unchanged(name: str) -> None:
    assert Decision(**CASES[name]).logfmt() == EXPECTED[name]  # type: ignore[arg-type]


def test_every_case_has_an_expected_line() -> None:
    assert set(CASES) == set(EXPECTED)


def test_rendering_does_not_mutate_the_decision() -> None:
    decision = Decision(**CASES["extras_types"])  # type: ignore[arg-type]
    before = (decision.extra.copy(), decision.sender, decision.reply)
    assert decision.logfmt() == decision.logfmt() == EXPECTED["extras_types"]
    assert (decision.extra, decision.sender, decision.reply) == before
