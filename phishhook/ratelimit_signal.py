"""The policy daemon's rate-limit hits as a phish signal: an account that runs into its sending limit is
often one that was taken and is blasting spam.

policyd appends one entry per refusal to the ``ev:ratelimit`` stream (policyd/keys.py): the limit's name, the
key counted (a SASL user for ``key = "sasl_user"`` limits), the count and the maximum. ``mailwarden phish
serve`` follows the stream and, for a hit of a limit counted per SASL user, raises a ``rate-limit`` snag of
that account: alert-only by default (a user who mailed their whole class is not a thief), enforcing when the
site says so. A hit per user and limit is taken once per ``quiet`` period, however many refusals the blast
causes; the stream is read from its end at start (what happened while the service was down is policyd's
log's)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import redis

from mailwarden.logs import get_logger, log_kv
from mailwarden.section import Section
from mailwarden.units import Duration
from phishhook.events import BadEvent, normalise_user
from phishhook.mode import Mode
from policyd import keys as policyd_keys

log = get_logger("phishhook")


class RateLimitSignalSettings(Section):
    """``[phishhook.ratelimit]``."""

    action: Literal["off", "alert", "enforce"] = "alert"
    """What a per-user rate-limit hit does: nothing, an alert-only snag for review, or a snag that blocks."""
    quiet: Duration = 3600
    """Seconds during which further hits of the same user and limit add nothing (one finding per blast)."""


class RateLimitWatcher:
    """Follows the stream on a thread of its own (``start``/``stop``) and hands hits to ``snag``."""

    def __init__(self, client: redis.Redis, prefix: str, settings: RateLimitSignalSettings,
                 user_limits: set[str], snag: Callable[[str, str, dict[str, Any], Mode], object],
                 now: Callable[[], float] = time.time) -> None:
        self.client = client
        self.stream = f"{prefix}{policyd_keys.RATELIMIT_EVENTS}"
        self.settings = settings
        self.user_limits = user_limits
        """The names of the limits counted per SASL user (from ``[policyd.ratelimit]``)."""
        self.snag = snag
        self.now = now
        self.last_id = "$"
        self._seen: dict[tuple[str, str], float] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def handle(self, fields: dict[bytes, bytes]) -> bool:
        """One stream entry; True when it raised (or added to) a snag."""
        limit = fields.get(b"limit", b"").decode(errors="replace")
        if self.settings.action == "off" or limit not in self.user_limits:
            return False
        try:
            user = normalise_user(fields.get(b"key", b"").decode(errors="replace"))
        except BadEvent:
            return False
        now = self.now()
        if now - self._seen.get((user, limit), float("-inf")) < self.settings.quiet:
            return False
        self._seen = {k: at for k, at in self._seen.items() if now - at < self.settings.quiet}
        self._seen[(user, limit)] = now
        count, most = fields.get(b"count", b"?").decode(), fields.get(b"max", b"?").decode()
        mode = Mode.ENFORCE if self.settings.action == "enforce" else Mode.ALERT
        self.snag(user, f"hit the rate limit {limit}: {count} counted, {most} allowed",
                  {"finding": "rate-limit", "limit": limit, "count": count, "max": most}, mode)
        return True

    def poll(self, block_ms: int = 5000) -> int:
        """Read what arrived (waiting up to ``block_ms``); the number of snags raised."""
        found: Any = self.client.xread({self.stream: self.last_id}, count=500, block=block_ms)
        raised = 0
        for _stream, entries in found or []:
            for entry_id, fields in entries:
                self.last_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                raised += self.handle(fields)
        return raised

    def start(self) -> None:
        if self.settings.action == "off" or not self.user_limits:
            return
        self._thread = threading.Thread(target=self._run, name="phish-ratelimit", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.poll(block_ms=1000)
            except redis.RedisError as exc:
                log_kv(log, logging.WARNING, "cannot read policyd's rate-limit events; retrying", error=str(exc))
                self._stopping.wait(5)
            except Exception:  # a bug must not end the watch silently
                log.exception("rate-limit watcher failed; retrying")
                self._stopping.wait(5)


def user_limits(policyd_section: Any) -> set[str]:
    """The names of policyd's limits counted per SASL user."""
    return {limit.name for limit in policyd_section.ratelimit.limits if limit.key == "sasl_user"}
