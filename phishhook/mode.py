"""Whether snags block (``enforce``) or only alert."""

from enum import StrEnum


class Mode(StrEnum):
    ENFORCE = "enforce"
    """Snags run every action: the account and the address are blocked."""
    ALERT = "alert"
    """Snags are recorded and notified (ticket, webhook) for review; nothing is blocked."""
