"""Every Redis key phishhook reads or writes: prefix, content and lifetime, in one place (policyd's are in
``policyd/keys.py``; phishhook writes policyd's block list through ``policyd.blocklist.BlockList`` and reads
its ``block:user:``/``block:client:`` keys to answer Dovecot).

All keys start with ``[redis] key_prefix`` (default ``mw:``). Bodies built from login names and addresses
are hashed to a fixed length (``policyd.keys.digest``), so a hostile login name cannot make a huge key.

- ``ph:h:<hash(user)>`` list, history: the user's recent successful logins, newest first, each a JSON
  sighting (time, address, place, address class, service). At most ``history_size`` entries. Lives
  ``history_ttl`` after the last login.
- ``ph:p:<hash(user)>`` hash, history: the places the user logged in from (field ``CC|City``), each
  "days seen:last day" (days since the epoch, UTC). Lives ``history_ttl`` after the last login.
- ``ph:o:<hash(place)>`` HyperLogLog, history: the users seen at a place (the organisation's usual places).
  Lives ``history_ttl`` after the last login there.
- ``ph:f:<hash(user)>`` string, history: when phishhook first saw the user log in (the learning period).
  Lives ``history_ttl`` after the last login (a returning account after that starts learning again).
- ``ph:c:<hash(user)>`` string, history: when the security team last confirmed the account safe; logins
  before it are not compared with later ones. Lives ``history_ttl``.
- ``ph:fa:<address>`` string, brute force: failed logins from the address in the current window.
  Lives one ``failed_window``.
- ``ph:fu:<hash(user)>`` string, brute force: failed logins of the user in the current window.
  Lives one ``failed_window``.
- ``ph:fs:<address>`` HyperLogLog, brute force: the distinct login names an address failed with (password
  spraying). Lives one ``failed_window``.
- ``ph:fn:<address or hash(user)>`` string, brute force: the window's alert was already raised. Lives one
  ``failed_window``.
- ``ph:rl:a:<address>`` string, the review page: failed (and refused) review logins from the address in the
  current window. Lives ``[phishhook.review] failed_window`` from the first failure.
- ``ph:rl:u:<hash(login name)>`` string, the review page: failed (and refused) review logins with the login
  name (lower case; unknown names too) in the current window. Lives ``[phishhook.review] failed_window``.
"""

from __future__ import annotations

from policyd.keys import digest

HISTORY = "ph:h:"
PLACES = "ph:p:"
ORG_PLACE = "ph:o:"
FIRST_SEEN = "ph:f:"
CLEARED = "ph:c:"
FAILED_ADDRESS = "ph:fa:"
FAILED_USER = "ph:fu:"
FAILED_SPRAY = "ph:fs:"
FAILED_NOTIFIED = "ph:fn:"
REVIEW_FAILED_ADDRESS = "ph:rl:a:"
REVIEW_FAILED_ACCOUNT = "ph:rl:u:"


def user_key(prefix: str, kind: str, user: str) -> str:
    """The key of one user's record of ``kind`` (``HISTORY``, ``PLACES`` ...)."""
    return f"{prefix}{kind}{digest(user)}"


def address_key(prefix: str, kind: str, address: str) -> str:
    """The key of one address's record (the address is normalised and bounded by the caller)."""
    return f"{prefix}{kind}{address}"


def place_key(prefix: str, place: str) -> str:
    return f"{prefix}{ORG_PLACE}{digest(place)}"
