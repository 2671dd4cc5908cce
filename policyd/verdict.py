"""What a check answers, and the policy actions sent back to Postfix (named, never retyped as strings)."""

from __future__ import annotations

from dataclasses import dataclass

from mailwarden.decision import Action

DUNNO = "DUNNO"
"""No opinion: the next check, then Postfix's next restriction, decides."""


def defer_if_permit(text: str) -> str:
    """Temporary failure unless a later restriction rejects outright (greylisting: a hard reject wins)."""
    return f"DEFER_IF_PERMIT {text}"


def defer(text: str, code: str = "450 4.7.1") -> str:
    return f"{code} {text}"


def reject(text: str, code: str = "550 5.7.1") -> str:
    return f"{code} {text}"


def prepend(header: str) -> str:
    return f"PREPEND {header}"


@dataclass(slots=True, frozen=True)
class Verdict:
    action: Action
    reason: str
    reply: str = DUNNO
    """The ``action=`` value for Postfix."""
    decisive: bool = False
    """A decisive verdict ends the pipeline (reject, defer); an accept or a PREPEND lets later checks run."""

    @classmethod
    def accept(cls, reason: str, reply: str = DUNNO) -> Verdict:
        return cls(Action.ACCEPT, reason, reply, decisive=False)

    @classmethod
    def refuse(cls, action: Action, reason: str, reply: str) -> Verdict:
        return cls(action, reason, reply, decisive=True)
