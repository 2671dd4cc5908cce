"""quarantine/tokens.py: minting and verifying digest action tokens, key rotation, every refusal reason."""

from __future__ import annotations

import base64
import datetime

import pytest
from pydantic import ValidationError

from quarantine.digest import tokens
from quarantine.digest.tokens import (
    MAX_LOCAL_PREFIX,
    MESSAGE_TOKEN_LENGTH,
    OWNER_TOKEN_LENGTH,
    Action,
    Reason,
    TokenRefused,
    Tokens,
    TokenSettings,
)
from quarantine.store import new_public_id

T0 = datetime.datetime(2026, 12, 1, 6, 0, tzinfo=datetime.UTC)
SECRET_A = "q8Vv1yX0mJ3kZ7pR2sT5uW9bC4dE6fG8hI0jK2lM4nO6"
SECRET_B = "Zr7Yp3Lk9Hq2Wv6Ts1Nx5Bm8Dc4Fg0Jh2Kl6Qw9Er3Ty"
OWNER = "alice@example.org"
PID = "abcdefghijklmn23"


class Clock:
    def __init__(self, moment: datetime.datetime = T0) -> None:
        self.moment = moment

    def __call__(self) -> datetime.datetime:
        return self.moment


def settings(*keys: dict, **extra) -> TokenSettings:
    return TokenSettings(token_keys=list(keys) or [{"id": "a", "secret": SECRET_A}], **extra)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def minter(clock) -> Tokens:
    return Tokens(settings(), now=clock)


def refusal(minter: Tokens, token: str, owner: str = OWNER, action: Action | None = None) -> Reason:
    with pytest.raises(TokenRefused) as raised:
        minter.verify(token, owner, action)
    return raised.value.reason


@pytest.mark.parametrize("action", sorted(tokens.MESSAGE_ACTIONS))
def test_message_tokens_round_trip_and_fit_an_address(minter, action):
    public_id = new_public_id()
    token = minter.mint(action, OWNER, public_id)
    assert len(token) == MESSAGE_TOKEN_LENGTH == 41
    assert token == token.lower() and set(token) <= set(tokens.ALPHABET)
    assert len(f"quarantine+{token}") <= 64 and MAX_LOCAL_PREFIX >= 20
    claim = minter.verify(token, OWNER, action)
    assert (claim.action, claim.owner, claim.public_id, claim.key_id) == (action, OWNER, public_id, "a")


@pytest.mark.parametrize("action", [a for a in Action if not a.on_message])
def test_owner_tokens_round_trip(minter, action):
    token = minter.mint(action, OWNER)
    assert len(token) == OWNER_TOKEN_LENGTH == 25
    claim = minter.verify(token, OWNER)
    assert (claim.action, claim.public_id) == (action, None)


def test_case_and_owner_spelling_do_not_matter(minter):
    token = minter.mint(Action.RELEASE, "Alice@Example.ORG", PID)
    assert minter.verify(f"  {token.upper()} ", " alice@example.org").public_id == PID


def test_wire_codes_are_fixed():
    assert tokens.CODES[Action.RELEASE] == 1 and tokens.CODES[Action.REPLY] == 21
    assert len(set(tokens.CODES.values())) == len(Action) and max(tokens.CODES.values()) < 32


def test_expiry_default_14_days_rounded_up_to_the_hour(minter, clock):
    token = minter.mint(Action.DELETE, OWNER, PID)
    claim = minter.verify(token, OWNER)
    assert claim.expires_at == T0 + datetime.timedelta(days=14)
    clock.moment = T0 + datetime.timedelta(days=14) - datetime.timedelta(seconds=1)
    minter.verify(token, OWNER)
    clock.moment = T0 + datetime.timedelta(days=14)
    assert refusal(minter, token) is Reason.EXPIRED
    odd = Tokens(settings(token_lifetime="2h"), now=Clock(T0 + datetime.timedelta(minutes=1)))
    assert odd.verify(odd.mint(Action.PREVIEW, OWNER, PID), OWNER).expires_at == T0 + datetime.timedelta(hours=3)


def test_the_action_is_bound(minter):
    token = minter.mint(Action.RELEASE, OWNER, PID)
    assert refusal(minter, token, action=Action.DELETE) is Reason.WRONG_ACTION
    # rewriting the action code in the header breaks the MAC
    raw = bytearray(base64.b32decode(token[1:].upper()))
    raw[0] = (raw[0] & 0xE0) | tokens.CODES[Action.DELETE]
    forged = token[0] + base64.b32encode(bytes(raw)).decode().lower()
    assert refusal(minter, forged) is Reason.BAD_MAC


def test_another_owners_token_is_refused_as_wrong_owner(minter):
    token = minter.mint(Action.RELEASE, "bob@example.org", PID)
    assert refusal(minter, token) is Reason.WRONG_OWNER
    assert refusal(minter, minter.mint(Action.RELEASE_ALL, "bob@example.org")) is Reason.WRONG_OWNER


def test_every_single_character_change_is_refused(minter):
    token = minter.mint(Action.WHITELIST, OWNER, PID)
    for at in range(1, len(token)):
        for replacement in "a7":
            if token[at] == replacement:
                continue
            changed = token[:at] + replacement + token[at + 1:]
            reason = refusal(minter, changed)
            assert reason in (Reason.BAD_MAC, Reason.MALFORMED, Reason.WRONG_OWNER), (at, reason)


def test_expiry_cannot_be_extended(minter, clock):
    token = minter.mint(Action.RELEASE, OWNER, PID)
    raw = bytearray(base64.b32decode(token[1:].upper()))
    raw[1:4] = (int.from_bytes(raw[1:4], "big") + 24 * 365).to_bytes(3, "big")
    clock.moment = T0 + datetime.timedelta(days=20)
    assert refusal(minter, token[0] + base64.b32encode(bytes(raw)).decode().lower()) is Reason.BAD_MAC


def test_message_id_cannot_be_swapped(minter):
    token = minter.mint(Action.RELEASE, OWNER, PID)
    raw = bytearray(base64.b32decode(token[1:].upper()))
    raw[4:14] = base64.b32decode(new_public_id().upper())
    assert refusal(minter, token[0] + base64.b32encode(bytes(raw)).decode().lower()) is Reason.BAD_MAC


@pytest.mark.parametrize("text", [
    "", "x", "a" * 40, "a" * 42, "a" * 41 + "=", "b0ad" + "a" * 37, "bé" + "a" * 39, "release", "a\0" * 20 + "a",
])
def test_malformed_input(minter, text):
    assert refusal(minter, text) is Reason.MALFORMED


def test_malformed_header_version_action_and_length(minter):
    def forge(first: int, length: int) -> str:
        return "a" + base64.b32encode(bytes([first]) + bytes(length - 1)).decode().lower()
    assert refusal(minter, forge(2 << 5 | 1, 25)) is Reason.MALFORMED  # version 2
    assert refusal(minter, forge(1 << 5 | 9, 25)) is Reason.MALFORMED  # no action 9
    assert refusal(minter, forge(1 << 5 | 16, 25)) is Reason.MALFORMED  # RELEASE ALL has no id
    assert refusal(minter, forge(1 << 5 | 1, 15)) is Reason.MALFORMED  # RELEASE needs one


def test_unknown_key(minter):
    other = Tokens(settings({"id": "c", "secret": SECRET_B}))
    assert refusal(minter, other.mint(Action.RELEASE, OWNER, PID)) is Reason.UNKNOWN_KEY


def test_same_id_other_secret_is_bad_mac_or_wrong_owner(minter):
    other = Tokens(settings({"id": "a", "secret": SECRET_B}))
    assert refusal(minter, other.mint(Action.RELEASE, OWNER, PID)) in (Reason.BAD_MAC, Reason.WRONG_OWNER)


def test_rotation_previous_key_accepted_until_its_date(clock):
    old = Tokens(settings({"id": "a", "secret": SECRET_A}), now=clock)
    token = old.mint(Action.RELEASE, OWNER, PID)
    until = T0 + datetime.timedelta(days=3)
    rotated = Tokens(settings({"id": "b", "secret": SECRET_B},
                              {"id": "a", "secret": SECRET_A, "accept_until": until}), now=clock)
    assert rotated.mint(Action.RELEASE, OWNER, PID)[0] == "b"
    assert rotated.verify(token, OWNER).key_id == "a"
    clock.moment = until
    assert refusal(rotated, token) is Reason.KEY_RETIRED
    assert rotated.verify(rotated.mint(Action.RELEASE, OWNER, PID), OWNER).key_id == "b"


def test_mint_refuses_bad_arguments(minter):
    with pytest.raises(ValueError, match="needs public id"):
        minter.mint(Action.RELEASE, OWNER)
    with pytest.raises(ValueError, match="takes no public id"):
        minter.mint(Action.DIGEST_OFF, OWNER, PID)
    with pytest.raises(ValueError, match="not a public id"):
        minter.mint(Action.RELEASE, OWNER, "abc")


@pytest.mark.parametrize(("keys", "extra", "message"), [
    ([], {}, "at least one key"),
    ([{"id": "a", "secret": "short"}], {}, "at least 32 bytes"),
    ([{"id": "a", "secret": "ab" * 20}], {}, "not random"),
    ([{"id": "k2", "secret": SECRET_A}], {}, "one character"),
    ([{"id": "1", "secret": SECRET_A}], {}, "one character"),
    ([{"id": "a", "secret": SECRET_A, "accept_until": T0}], {}, "cannot have accept_until"),
    ([{"id": "a", "secret": SECRET_A}, {"id": "b", "secret": SECRET_B}], {}, "needs accept_until"),
    ([{"id": "a", "secret": SECRET_A}, {"id": "a", "secret": SECRET_B, "accept_until": T0}], {}, "must differ"),
    ([{"id": "a", "secret": SECRET_A}, {"id": "b", "secret": SECRET_A, "accept_until": T0}], {}, "same secret"),
    ([{"id": "a", "secret": SECRET_A}], {"token_lifetime": "10m"}, "between 1h and 90d"),
    ([{"id": "a", "secret": SECRET_A}], {"tokens_lifetime": "1d"}, "Extra inputs"),
])
def test_settings_are_validated(keys, extra, message):
    with pytest.raises(ValidationError, match=message):
        TokenSettings(token_keys=keys, **extra)


def test_secrets_never_show(minter):
    config = settings({"id": "b", "secret": SECRET_B}, {"id": "a", "secret": SECRET_A, "accept_until": T0})
    for text in (repr(config), str(config), repr(minter), repr(Tokens(config)), config.model_dump_json()):
        assert SECRET_A not in text and SECRET_B not in text
    with pytest.raises(ValidationError) as raised:
        TokenSettings(token_keys=[{"id": "a", "secret": SECRET_A}, {"id": "b", "secret": SECRET_A,
                                                                    "accept_until": T0}])
    assert SECRET_A not in str(raised.value)


def test_naive_accept_until_is_utc():
    config = settings({"id": "b", "secret": SECRET_B},
                      {"id": "a", "secret": SECRET_A, "accept_until": "2027-01-15T00:00:00"})
    assert config.token_keys[1].accept_until == datetime.datetime(2027, 1, 15, tzinfo=datetime.UTC)


def test_find_tokens_in_text(minter):
    release = minter.mint(Action.RELEASE, OWNER, PID)
    reply = minter.mint(Action.REPLY, OWNER)
    text = f"[abcdef] x mailto:quarantine+{release.upper()}@example.org?subject=RELEASE%20abcdef <{reply}> " + "a" * 30
    assert tokens.find_tokens(text) == [release, reply]
    decoded = tokens.decode(release)
    assert (decoded.action, decoded.public_id) == (Action.RELEASE, PID)


def test_reply_address_keeps_the_local_part_within_64(minter):
    token = minter.mint(Action.RELEASE, OWNER, PID)
    assert minter.verify(tokens.reply_address("quarantine", "example.org", token).split("+")[1].split("@")[0],
                         OWNER).public_id == PID
    assert len(tokens.reply_address("q" * MAX_LOCAL_PREFIX, "example.org", token).split("@")[0]) == 64
    with pytest.raises(ValueError, match="22 characters at most"):
        tokens.reply_address("q" * (MAX_LOCAL_PREFIX + 1), "example.org", token)
