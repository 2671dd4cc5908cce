"""Every Redis key policyd reads or writes: prefix, owner, content and lifetime, in one place.

All keys start with ``[redis] key_prefix`` (default ``mw:``). Bodies built from mail addresses are hashed
to a fixed length so a hostile address cannot make a huge key; the block list keeps readable bodies
because operators list and edit it, and other capabilities (the phish detector) write to it.

- ``gl:t:<hash(origin/sender/rcpt)>`` hash, greylist: f = first seen, l = last seen (epoch seconds);
  o, s, r = origin (client network or spf:domain), normalised sender, recipient (read by the CLI);
  p = 1 when let through by hand (``greylist pass``), which keeps f the real first sighting.
  Lives retry_window; max_age once the triplet passed.
- ``gl:x:<sender domain>`` and ``gl:x:<sender domain>/<recipient>`` strings, greylist: an expect window
  opened by ``mailwarden greylist expect`` (who opened it, why). Lives the window's length.
- ``gl:c:<client address>`` hash, greylist: n = passes counted, l = when last counted.
  Lives max_age after the last count (the client auto-whitelist).
- ``gl:p:<client network>`` string, greylist: a client pass set by ``mailwarden greylist pass --client IP``
  (JSON: who, when): every triplet from the network (the configured prefix) passes, and is remembered as
  passed. Lives GREYLIST_PASSED_CLIENT_TTL (one day).
- ``rl:<limit>:<hash(key value)>`` hash, ratelimit: i = window index, c = count, p = previous window's count.
  Lives 2 x the window.
- ``rlo:<limit>:<hash(key value)>`` string, ratelimit: "exempt" or a new max for one key (CLI override).
  No expiry, or the override's own.
- ``rln:<limit>:<hash(key value)>`` string, ratelimit: when the key was first refused in this window (the
  user and the admin were notified). Lives one window.
- ``ev:ratelimit`` stream, ratelimit: one entry per refusal (limit, key, count); capped at ~10,000 entries.
- ``dnsbl:<zone>:<ip address>`` string, dnsbl: the list's return codes, comma-separated ("" = not listed).
  Lives the answer's TTL (capped by max_ttl), or negative_ttl for "not listed".
- ``rcpt:<hash(address)>`` string, recipients: "f:<mailboxes>" known, "d:<mailbox>" disabled, "u:" unknown.
  Lives cache_ttl (negative_cache_ttl for unknown).
- ``spf:<hash(client ip/sender domain or helo)>`` string, spf: "result|identity|domain".
  Lives cache_ttl (temperror is not cached).
- ``qn:<hash(mailbox)>`` string, quota: when the over-quota notice was sent. Lives notify.interval.
- ``block:user:<sasl user>`` string, blocklist: JSON {reason, by, at}. No expiry, or the block's own.
- ``block:client:<ip address>`` or ``block:client:<network>/<prefix length>`` string, blocklist: JSON
  {reason, by, at}. No expiry, or the block's own.
- ``block:nets`` string, blocklist: the prefix lengths of blocked networks in use, e.g. "4/24 6/48",
  rewritten by every ``block add`` and ``block remove``; the check reads it in the same MGET as the
  blocks and looks up the client's covering networks of those lengths only. No expiry.
"""

from __future__ import annotations

import hashlib
import ipaddress

GREYLIST_TRIPLET = "gl:t:"
GREYLIST_CLIENT = "gl:c:"
GREYLIST_EXPECT = "gl:x:"
GREYLIST_PASSED_CLIENT = "gl:p:"
GREYLIST_PASSED_CLIENT_TTL = 86400
RATELIMIT = "rl:"
RATELIMIT_EVENTS = "ev:ratelimit"
RATELIMIT_OVERRIDE = "rlo:"
RATELIMIT_NOTIFIED = "rln:"
DNSBL = "dnsbl:"
RECIPIENT = "rcpt:"
SPF = "spf:"
QUOTA_NOTIFIED = "qn:"
BLOCK_USER = "block:user:"
BLOCK_CLIENT = "block:client:"
BLOCK_NETS = "block:nets"

RATELIMIT_EVENTS_MAXLEN = 10_000


def digest(text: str) -> str:
    """Fixed-length key body: 20 hex characters of BLAKE2b (80 bits; collisions are not a concern here)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=10).hexdigest()


def ratelimit_bucket(prefix: str, limit: str, key_value: str) -> str:
    return f"{prefix}{RATELIMIT}{limit}:{digest(key_value)}"


def ratelimit_override(prefix: str, limit: str, key_value: str) -> str:
    return f"{prefix}{RATELIMIT_OVERRIDE}{limit}:{digest(key_value)}"


def ratelimit_notified(prefix: str, limit: str, key_value: str) -> str:
    return f"{prefix}{RATELIMIT_NOTIFIED}{limit}:{digest(key_value)}"


def greylist_triplet(prefix: str, origin: str, sender: str, recipient: str) -> str:
    return f"{prefix}{GREYLIST_TRIPLET}{digest(f'{origin}/{sender}/{recipient}')}"


def greylist_expect(prefix: str, domain: str, recipient: str | None = None) -> str:
    body = f"{domain}/{recipient}" if recipient else domain
    return f"{prefix}{GREYLIST_EXPECT}{body}"


def block_user(prefix: str, user: str) -> str:
    return f"{prefix}{BLOCK_USER}{user.strip().lower()}"


def greylist_passed_client(prefix: str, network: str) -> str:
    return f"{prefix}{GREYLIST_PASSED_CLIENT}{network}"


def block_client(prefix: str, address: str) -> str:
    """An address, or a network (``203.0.113.0/24``; host bits are dropped, a /32 or /128 is the address)."""
    return f"{prefix}{BLOCK_CLIENT}{block_client_body(address)}"


def block_client_body(address: str) -> str:
    try:
        network = ipaddress.ip_network(address.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{address!r} does not appear to be an IPv4 or IPv6 address or network") from None
    if network.prefixlen == network.max_prefixlen:
        return network.network_address.compressed
    return network.compressed
