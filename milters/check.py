"""What a milter check sees and returns.

A check looks at a whole message at end of data (``MessageCheck.check``) and returns a verdict for every
recipient or one per recipient (milters/verdict.py). Checks run in libmilter's worker threads, one
message at a time per connection and several connections at once: a check keeps no per-message state on
itself, and what it shares (a connection pool, a rules table) is safe to use from several threads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from milters.spool import Spool
from milters.verdict import CheckResult, Verdict


@dataclass
class Message:
    """One message as Postfix handed it to the milter."""

    queue_id: str
    """Postfix's queue id (macro ``i``), "" if Postfix did not send it."""
    client_address: str
    client_name: str
    helo: str
    sender: str
    """The envelope sender without angle brackets; "" is the null sender."""
    recipients: list[str]
    """Envelope recipients without angle brackets, in the order Postfix gave them."""
    auth_user: str
    """The SASL login (macro ``{auth_authen}``); "" when the client did not authenticate."""
    headers: list[tuple[str, str]] = field(default_factory=list)
    """Header fields in order, as received (value without the leading space, folding kept)."""
    spool: Spool = field(default_factory=lambda: Spool())
    """The whole message (header and body), as bytes with CRLF line ends, in bounded memory."""
    mta_name: str = ""
    """Our Postfix's host name (macro ``j``): the ``by`` of the hop it is receiving."""

    @property
    def authenticated(self) -> bool:
        return bool(self.auth_user)

    def header(self, name: str) -> str | None:
        """The first header field of that name (case-insensitive), or None."""
        lowered = name.lower()
        return next((value for key, value in self.headers if key.lower() == lowered), None)


class MessageCheck(Protocol):
    name: str
    """Its name in config, logs and metrics: ``clamav``, ``banned`` ..."""

    def check(self, message: Message) -> CheckResult: ...

    def close(self) -> None:
        """Release connections and threads; called once at shutdown."""


@runtime_checkable
class HoldListener(Protocol):
    """A check that wants to know where the recipients it held went (the phish check links the held copies
    to its snag): called after the store committed them, best effort (a failure is logged, the message's
    answer stands)."""

    def after_hold(self, message: Message, held: Mapping[str, str], verdicts: Mapping[str, Verdict | None]) -> None:
        """``held``: the public id of each recipient's held copy; ``verdicts``: the merged verdict of each."""
