"""The ``[phishhook]`` section: the detector's mode and listener, and one sub-section per concept, each
defined beside the module that uses it."""

from __future__ import annotations

from pydantic import Field, field_validator

from mailwarden.section import Section
from phishhook.actions import ActionsSettings
from phishhook.authpolicy import DovecotSettings
from phishhook.bruteforce import BruteForceSettings
from phishhook.geo import GeoSettings
from phishhook.history import HistorySettings
from phishhook.intake import IntakeSettings
from phishhook.mode import Mode
from phishhook.networks import NetworkSettings
from phishhook.outbound import OutboundSettings
from phishhook.ratelimit_signal import RateLimitSignalSettings
from phishhook.review.settings import ReviewSettings
from phishhook.velocity import VelocitySettings
from quarantine.store import split_host_port


class PhishhookSettings(Section):
    mode: Mode = Mode.ENFORCE
    """``enforce``: snags run every action (the account and its address are blocked). ``alert``: snags are
    recorded and notified for review, nothing is blocked (a first month, or a cautious site)."""
    listen: str = "127.0.0.1:10040"
    """host:port of ``mailwarden phish serve``: Dovecot's auth policy endpoint (``/policy``), the intake
    (``/login``) and ``/metrics``."""
    geo: GeoSettings = Field(default_factory=GeoSettings)
    networks: NetworkSettings = Field(default_factory=NetworkSettings)
    velocity: VelocitySettings = Field(default_factory=VelocitySettings)
    history: HistorySettings = Field(default_factory=HistorySettings)
    outbound: OutboundSettings = Field(default_factory=OutboundSettings)
    bruteforce: BruteForceSettings = Field(default_factory=BruteForceSettings)
    ratelimit: RateLimitSignalSettings = Field(default_factory=RateLimitSignalSettings)
    dovecot: DovecotSettings = Field(default_factory=DovecotSettings)
    intake: IntakeSettings = Field(default_factory=IntakeSettings)
    actions: ActionsSettings = Field(default_factory=ActionsSettings)
    review: ReviewSettings = Field(default_factory=ReviewSettings)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        split_host_port(value)
        return value
