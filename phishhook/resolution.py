"""The security team's verdicts on a snag, shared by the CLI and the review page: confirm compromised (the
blocks stay), confirm safe (a false positive: unblock everywhere, clear the history so the travel judged does
not snag again, optionally a travel notice or an allow entry so similar logins stop triggering), dismiss
(close it without a verdict: unblocked like a safe one, nothing learnt). Each is one audited transition in
the SQL store (who and when), done once however many people click at once."""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from phishhook.actions import ActionResult, Evidence
from phishhook.detector import Detector
from phishhook.mode import Mode
from phishhook.snags import Snag, SnagState


@dataclass(frozen=True)
class Learn:
    """What a "confirm safe" teaches, so that similar logins stop triggering."""

    travel_days: float = 0
    """A travel notice for the user from now for this many days (0: none)."""
    travel_countries: tuple[str, ...] = ()
    """The countries it covers (none: everywhere)."""
    allow_network: str = ""
    """An allow entry for the user: this network (CIDR) never triggers."""
    allow_country: str = ""
    """An allow entry for the user: this country never triggers."""


@dataclass
class Resolved:
    snag: Snag
    undone: list[ActionResult] = field(default_factory=list)
    learnt: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"snag": self.snag.as_dict(), "undone": [vars(result) for result in self.undone],
                "learnt": self.learnt}


class Resolver:
    def __init__(self, detector: Detector) -> None:
        self.detector = detector
        self.snags = detector.parts.snags

    def confirm_compromised(self, public_id: str, by: str, note: str = "") -> Resolved:
        return Resolved(self.snags.transition(public_id, SnagState.COMPROMISED, by, note))

    def confirm_safe(self, public_id: str, by: str, note: str = "", learn: Learn | None = None) -> Resolved:
        resolved = self._close(public_id, SnagState.SAFE, by, note)
        if learn is not None:
            resolved.learnt = self._learn(resolved.snag, by, note, learn)
        return resolved

    def dismiss(self, public_id: str, by: str, note: str = "") -> Resolved:
        return self._close(public_id, SnagState.DISMISSED, by, note)

    def _close(self, public_id: str, state: SnagState, by: str, note: str) -> Resolved:
        snag = self.snags.transition(public_id, state, by, note)
        undone: list[ActionResult] = []
        for address in snag.source_addresses or ("",):
            evidence = Evidence(snag_id=snag.public_id, user=snag.user, kind=snag.kind, reason=snag.reason,
                                source_address=address, mode=snag.mode, at=self.detector.now(), details={},
                                review_url="")
            if snag.mode == Mode.ENFORCE or state is SnagState.SAFE:
                results = self.detector.parts.actions.undo(evidence)
                undone.extend(result for result in results if result not in undone)
        for result in undone:
            self.detector.record_action(snag, result)
        lifted = ", ".join(result.name for result in undone if result.ok and not result.skipped) or "nothing"
        self.snags.log_audit(by, "unblock", f"lifted: {lifted}", snag_id=snag.public_id)
        self.detector.history.clear(snag.user)
        return Resolved(snag, undone)

    def _learn(self, snag: Snag, by: str, note: str, learn: Learn) -> list[str]:
        learnt = []
        now = datetime.datetime.fromtimestamp(self.detector.now(), datetime.UTC)
        if learn.travel_days > 0:
            notice = self.snags.add_travel(snag.user, list(learn.travel_countries), [], starts_at=now,
                                           ends_at=now + datetime.timedelta(days=learn.travel_days), by=by,
                                           note=note or f"confirmed safe (snag {snag.public_id})",
                                           snag_id=snag.public_id)
            learnt.append(f"travel notice {notice.id}")
        if learn.allow_network or learn.allow_country:
            entry = self.snags.add_allow(snag.user, learn.allow_network or None, learn.allow_country or None, by=by,
                                         note=note or f"confirmed safe (snag {snag.public_id})",
                                         snag_id=snag.public_id)
            learnt.append(f"allow entry {entry.id}")
        return learnt


def parse_countries(text: str | Iterable[str]) -> tuple[str, ...]:
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(item.strip().upper() for item in items if item.strip())
