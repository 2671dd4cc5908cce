"""Action tokens for digest replies: who may do what to which held message, until when, forgery-proof.

A token binds an action, the owner's mailbox, an expiry and (for message actions) the held message's public
id with an HMAC-SHA-256 under a site key. The reply handler still checks the sender (the owner, through
authenticated submission or a trusted network): a token proves that the reply answers a digest we sent to
that owner, and says which action on which message it allows; it never replaces the sender check.

**Format.** Lower-case RFC 4648 base32 (``a``-``z``, ``2``-``7``: no ``0``/``1``/``8``/``9`` to confuse,
and nothing a mail system that lower-cases local parts can damage; ``verify`` lower-cases its input), so
one token fits an address local part, a subject and a text line unchanged::

    <key id: 1 char> base32( header 1 | expiry 3 | [public id 10] | owner tag 2 | MAC 9 )

- *key id*: the ``id`` of the key that minted it (one base32 character), so keys can be rotated;
- *header*: format version (3 bits, now 1) and the action code (5 bits, ``CODES``);
- *expiry*: hours since the Unix epoch, big-endian (valid while ``now`` is before it; rounded up to the hour);
- *public id*: the store's 80-bit id (``store.new_public_id``), only for message actions;
- *owner tag*: 16 bits of HMAC(key, owner), only so that a valid token of another mailbox is logged as
  ``wrong-owner`` rather than ``bad-mac`` (the owner itself is bound by the MAC);
- *MAC*: the first 72 bits of HMAC-SHA-256(key, domain | key id | the bytes before it | owner). Guessing
  one takes 2^71 replies on average, each a mail through the sender check.

A message token is 41 characters (25 bytes), an owner token 25 (15 bytes): ``quarantine+<token>`` is 52
characters, so the reply mailbox may have up to 22 before the ``+`` within SMTP's 64 (``MAX_LOCAL_PREFIX``).

**Actions.** Message actions (RELEASE, DELETE, WHITELIST, BLOCK, REPORT, PREVIEW) name one held message;
owner actions (RELEASE ALL, DIGEST DAILY|WEEKLY|IMMEDIATE|OFF) and REPLY are bound to the owner only. The
action is in the MAC: a RELEASE token cannot delete. The digest mints, per listed message, one token per
button of the HTML part and the release token at the end of the plain line (``reply_parse`` describes the
line); the digest's Reply-To is ``quarantine+<REPLY token>@``, which does nothing by itself but shows that
a hand-written reply (``DELETE ab23cd`` typed above the quote) answers this owner's digest.

**Keys.** ``TokenSettings.token_keys``: the first mints, the others are previous keys, each accepted until its
``accept_until`` (required: a retired key must stop working some day). Secrets are at least 32 bytes,
kept as ``SecretStr`` (never in a repr or a log line); each is used through a key derived for this purpose.

**Refusals.** ``verify`` raises ``TokenRefused`` with a ``Reason`` for the security log: ``malformed``
(length, alphabet, version, action, padding), ``unknown-key``, ``key-retired``, ``wrong-owner``, ``bad-mac``
(tampered), ``expired``, ``wrong-action`` (a valid token used for another verb). The MAC is checked before
anything it covers is believed (expiry, action), with constant-time comparisons.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from pydantic import SecretStr, field_validator, model_validator

from mailwarden.section import Section
from mailwarden.units import Duration

ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
VERSION = 1
MAC_BYTES = 9
TAG_BYTES = 2
ID_BYTES = 10
"""The store's public ids (``store.ID_BYTES``): 16 characters of base32."""
MESSAGE_TOKEN_LENGTH = 1 + (1 + 3 + ID_BYTES + TAG_BYTES + MAC_BYTES) * 8 // 5
OWNER_TOKEN_LENGTH = 1 + (1 + 3 + TAG_BYTES + MAC_BYTES) * 8 // 5
MAX_LOCAL_PREFIX = 64 - 1 - MESSAGE_TOKEN_LENGTH
"""Characters the reply mailbox's local part may have before the ``+`` (SMTP allows 64 in all)."""
MIN_SECRET_BYTES = 32
DEFAULT_LIFETIME = 14 * 86400.0
_DOMAIN = b"mailwarden digest token v1\0"
_TOKEN = re.compile(rf"[{ALPHABET}]{{{OWNER_TOKEN_LENGTH}}}|[{ALPHABET}]{{{MESSAGE_TOKEN_LENGTH}}}")
_PUBLIC_ID = re.compile(rf"[{ALPHABET}]{{16}}")


class Action(StrEnum):
    RELEASE = "RELEASE"
    DELETE = "DELETE"
    WHITELIST = "WHITELIST"
    BLOCK = "BLOCK"
    REPORT = "REPORT"
    PREVIEW = "PREVIEW"
    RELEASE_ALL = "RELEASE ALL"
    DIGEST_DAILY = "DIGEST DAILY"
    DIGEST_WEEKLY = "DIGEST WEEKLY"
    DIGEST_IMMEDIATE = "DIGEST IMMEDIATE"
    DIGEST_OFF = "DIGEST OFF"
    REPLY = "REPLY"
    """The digest's Reply-To: does nothing itself, shows that a reply answers this owner's digest."""

    @property
    def on_message(self) -> bool:
        return self in MESSAGE_ACTIONS


MESSAGE_ACTIONS = frozenset({Action.RELEASE, Action.DELETE, Action.WHITELIST, Action.BLOCK, Action.REPORT,
                             Action.PREVIEW})
CODES: dict[Action, int] = {
    Action.RELEASE: 1, Action.DELETE: 2, Action.WHITELIST: 3, Action.BLOCK: 4, Action.REPORT: 5,
    Action.PREVIEW: 6, Action.RELEASE_ALL: 16, Action.DIGEST_DAILY: 17, Action.DIGEST_WEEKLY: 18,
    Action.DIGEST_IMMEDIATE: 19, Action.DIGEST_OFF: 20, Action.REPLY: 21,
}
"""Wire codes (5 bits): fixed forever, whatever the enum's order."""
_ACTIONS = {code: action for action, code in CODES.items()}


class Reason(StrEnum):
    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown-key"
    KEY_RETIRED = "key-retired"
    WRONG_OWNER = "wrong-owner"
    BAD_MAC = "bad-mac"
    EXPIRED = "expired"
    WRONG_ACTION = "wrong-action"


class TokenRefused(Exception):
    """The token allows nothing; ``reason`` says why, for the security log (never the token's secret part)."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason
        self.detail = detail


# -- settings ------------------------------------------------------------------------------------------


class TokenKey(Section):
    """One key of ``[[quarantine.digest.token_keys]]``."""

    id: str
    """One character, a-z or 2-7: the first character of every token it mints. A new one at each rotation."""
    secret: SecretStr
    """At least 32 bytes (UTF-8), random: e.g. the output of ``openssl rand -base64 48``."""
    accept_until: datetime.datetime | None = None
    """Previous keys only (required there): tokens of this key are refused from then on; aware, or UTC."""

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if len(value) != 1 or value.lower() not in ALPHABET:
            raise ValueError(f"{value!r}: a key id is one character, a-z or 2-7")
        return value.lower()

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: SecretStr) -> SecretStr:
        secret = value.get_secret_value().encode("utf-8")
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"a token secret must have at least {MIN_SECRET_BYTES} bytes (it has {len(secret)}): "
                             "generate one with 'openssl rand -base64 48'")
        if len(set(secret)) < 8:
            raise ValueError("this token secret is not random (fewer than 8 distinct characters): "
                             "generate one with 'openssl rand -base64 48'")
        return value

    @field_validator("accept_until")
    @classmethod
    def _aware(cls, value: datetime.datetime | None) -> datetime.datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return value


class TokenSettings(Section):
    """The token part of the digest's settings (to join ``[quarantine.digest]`` with the digest itself)::

        token_lifetime = "14d"
        [[quarantine.digest.token_keys]]     # the current key: mints and verifies
        id = "b"
        secret = "..."
        [[quarantine.digest.token_keys]]     # the previous one, accepted for the grace period
        id = "a"
        secret = "..."
        accept_until = 2027-01-15T00:00:00Z
    """

    token_keys: list[TokenKey]
    """The first mints; later ones only verify, each until its accept_until."""
    token_lifetime: Duration = DEFAULT_LIFETIME
    """Seconds ("14d") a token stays valid after the digest that carries it; 1h to 90d."""

    @field_validator("token_lifetime")
    @classmethod
    def _lifetime(cls, value: float) -> float:
        if not 3600 <= value <= 90 * 86400:
            raise ValueError("token_lifetime must be between 1h and 90d")
        return value

    @model_validator(mode="after")
    def _keys(self) -> TokenSettings:
        if not self.token_keys:
            raise ValueError("token_keys needs at least one key (the first mints)")
        ids = [key.id for key in self.token_keys]
        if len(set(ids)) != len(ids):
            raise ValueError(f"token_keys: key ids must differ, got {ids}")
        secrets = [key.secret.get_secret_value() for key in self.token_keys]
        if len(set(secrets)) != len(secrets):
            raise ValueError("token_keys: two keys have the same secret")
        if self.token_keys[0].accept_until is not None:
            raise ValueError(f"token_keys: the first key ({ids[0]!r}) mints, it cannot have accept_until")
        for key in self.token_keys[1:]:
            if key.accept_until is None:
                raise ValueError(f"token_keys: previous key {key.id!r} needs accept_until (when it stops working)")
        return self


# -- tokens --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoded:
    """What a token says before it is verified: to be believed only after ``verify``."""

    key_id: str
    action: Action
    public_id: str | None
    expires_at: datetime.datetime
    owner_tag: bytes
    signed: bytes
    mac: bytes


@dataclass(frozen=True)
class Claim:
    """A verified token: ``owner`` may do ``action`` (to ``public_id``) until ``expires_at``."""

    action: Action
    owner: str
    public_id: str | None
    expires_at: datetime.datetime
    key_id: str


def normalise_owner(owner: str) -> str:
    return owner.strip().lower()


def reply_address(local_part: str, domain: str, token: str, delimiter: str = "+") -> str:
    """``local_part+token@domain``; ValueError when the local part would pass SMTP's 64 characters (a reply
    mailbox longer than MAX_LOCAL_PREFIX; checked at start-up by whoever configures it)."""
    local = f"{local_part}{delimiter}{token}"
    if len(local) > 64:
        raise ValueError(f"{local_part!r}: a reply mailbox may have {MAX_LOCAL_PREFIX + 1 - len(delimiter)} "
                         f"characters at most, so that {local_part}{delimiter}<token> fits SMTP's 64")
    return f"{local}@{domain}"


def find_tokens(text: str) -> list[str]:
    """Candidate tokens in text (whole base32 words of a token's length), lower case, in order."""
    words = re.findall(r"[A-Za-z0-9]+", text)
    return [word.lower() for word in words if _TOKEN.fullmatch(word.lower())]


def decode(token: str) -> Decoded:
    """Split a token into its fields, without a key (raises TokenRefused(MALFORMED))."""
    token = token.strip().lower()
    if len(token) not in (MESSAGE_TOKEN_LENGTH, OWNER_TOKEN_LENGTH) or not _TOKEN.fullmatch(token):
        raise TokenRefused(Reason.MALFORMED, f"{len(token)} characters, not a token")
    key_id, body = token[0], token[1:]
    try:
        raw = base64.b32decode(body.upper() + "=" * (-len(body) % 8))
    except binascii.Error:
        raise TokenRefused(Reason.MALFORMED, "not base32") from None
    if base64.b32encode(raw).decode("ascii").rstrip("=").lower() != body:
        raise TokenRefused(Reason.MALFORMED, "not canonical base32")
    version, code = raw[0] >> 5, raw[0] & 0x1F
    if version != VERSION:
        raise TokenRefused(Reason.MALFORMED, f"version {version}")
    action = _ACTIONS.get(code)
    if action is None:
        raise TokenRefused(Reason.MALFORMED, f"action code {code}")
    if (len(token) == MESSAGE_TOKEN_LENGTH) != action.on_message:
        raise TokenRefused(Reason.MALFORMED, f"length does not fit action {action}")
    hours = int.from_bytes(raw[1:4], "big")
    public_id = None
    if action.on_message:
        public_id = base64.b32encode(raw[4:4 + ID_BYTES]).decode("ascii").lower()
    tag_at = len(raw) - MAC_BYTES - TAG_BYTES
    return Decoded(key_id=key_id, action=action, public_id=public_id,
                   expires_at=datetime.datetime.fromtimestamp(hours * 3600, datetime.UTC),
                   owner_tag=raw[tag_at:tag_at + TAG_BYTES], signed=raw[:-MAC_BYTES], mac=raw[-MAC_BYTES:])


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Tokens:
    """Mints and verifies tokens under the configured keys; ``now`` is the clock (tests pass their own)."""

    def __init__(self, settings: TokenSettings, now: Callable[[], datetime.datetime] = _utcnow) -> None:
        self.settings = settings
        self.now = now
        self._keys = {key.id: (_derive(key.secret), key.accept_until) for key in settings.token_keys}
        self._current = settings.token_keys[0].id

    def __repr__(self) -> str:
        return f"Tokens(keys={list(self._keys)}, current={self._current!r})"

    def mint(self, action: Action, owner: str, public_id: str | None = None,
             now: datetime.datetime | None = None) -> str:
        """A token allowing ``owner`` to do ``action`` (on ``public_id`` for message actions) for the lifetime."""
        if action.on_message != (public_id is not None):
            raise ValueError(f"{action} {'needs' if action.on_message else 'takes no'} public id")
        moment = now or self.now()
        expires = math.ceil((moment.timestamp() + self.settings.token_lifetime) / 3600)
        body = bytes([VERSION << 5 | CODES[action]]) + expires.to_bytes(3, "big")
        if public_id is not None:
            if not _PUBLIC_ID.fullmatch(public_id.lower()):
                raise ValueError(f"{public_id!r} is not a public id (16 characters of base32)")
            body += base64.b32decode(public_id.upper())
        key = self._keys[self._current][0]
        owner = normalise_owner(owner)
        body += _owner_tag(key, owner)
        body += _mac(key, self._current, body, owner)
        return self._current + base64.b32encode(body).decode("ascii").rstrip("=").lower()

    def verify(self, token: str, owner: str, action: Action | None = None,
               now: datetime.datetime | None = None) -> Claim:
        """The claim of a token presented on behalf of ``owner`` (the mailbox the reply comes from), for
        ``action`` when given; raises TokenRefused with the reason otherwise."""
        decoded = decode(token)
        entry = self._keys.get(decoded.key_id)
        if entry is None:
            raise TokenRefused(Reason.UNKNOWN_KEY, f"key {decoded.key_id!r}")
        key, accept_until = entry
        moment = now or self.now()
        if accept_until is not None and moment >= accept_until:
            raise TokenRefused(Reason.KEY_RETIRED, f"key {decoded.key_id!r} retired {accept_until.isoformat()}")
        owner = normalise_owner(owner)
        if not hmac.compare_digest(_mac(key, decoded.key_id, decoded.signed, owner), decoded.mac):
            if not hmac.compare_digest(_owner_tag(key, owner), decoded.owner_tag):
                raise TokenRefused(Reason.WRONG_OWNER, f"not minted for {owner}")
            raise TokenRefused(Reason.BAD_MAC, "tampered or not ours")
        if moment >= decoded.expires_at:
            raise TokenRefused(Reason.EXPIRED, f"expired {decoded.expires_at.isoformat()}")
        if action is not None and action != decoded.action:
            raise TokenRefused(Reason.WRONG_ACTION, f"a {decoded.action} token used for {action}")
        return Claim(action=decoded.action, owner=owner, public_id=decoded.public_id,
                     expires_at=decoded.expires_at, key_id=decoded.key_id)


def _derive(secret: SecretStr) -> bytes:
    return hmac.new(secret.get_secret_value().encode("utf-8"), _DOMAIN + b"key", hashlib.sha256).digest()


def _owner_tag(key: bytes, owner: str) -> bytes:
    return hmac.new(key, _DOMAIN + b"owner\0" + owner.encode("utf-8"), hashlib.sha256).digest()[:TAG_BYTES]


def _mac(key: bytes, key_id: str, body: bytes, owner: str) -> bytes:
    message = _DOMAIN + b"mac\0" + key_id.encode("ascii") + body + b"\0" + owner.encode("utf-8")
    return hmac.new(key, message, hashlib.sha256).digest()[:MAC_BYTES]
