"""The milters as a mailwarden capability: the ``[milters]`` section and the ``milter`` command."""

from __future__ import annotations

from pydantic import Field, model_validator

from mailwarden.capability import Capability
from mailwarden.section import Section
from mailwarden.units import Size
from milters.app import CHECKS, MILTERS
from milters.banned import BannedSettings
from milters.clamav import ClamavSettings
from milters.cli import register_cli
from milters.phish import PhishMilterSettings
from milters.spamassassin import SpamAssassinSettings


class MiltersSettings(Section):
    spool_memory: Size = 1 << 20
    """Bytes of a message kept in memory; the rest goes to an unlinked temporary file."""
    clamav: ClamavSettings = Field(default_factory=ClamavSettings)
    """The ClamAV milter (``mailwarden milter clamav``) and its scanner."""
    spamassassin: SpamAssassinSettings = Field(default_factory=SpamAssassinSettings)
    """The SpamAssassin milter (``mailwarden milter spamassassin``)."""
    phish: PhishMilterSettings = Field(default_factory=PhishMilterSettings)
    """The phish milter (``mailwarden milter phish``): SMTP AUTH logins and the outbound rule, judged by
    phishhook (``[phishhook]``)."""
    banned: BannedSettings = Field(default_factory=BannedSettings)
    """The banned-attachments check (``[milters.banned]``), run by the milters whose ``checks`` name it."""

    @model_validator(mode="after")
    def _known_checks(self) -> MiltersSettings:
        for name in MILTERS:
            unknown = [check for check in getattr(self, name).checks if check not in CHECKS]
            if unknown:
                raise ValueError(f"[milters.{name}] checks: unknown {', '.join(map(repr, unknown))}; "
                                 f"known: {', '.join(sorted(CHECKS))}")
        return self


CAPABILITY = Capability(name="milters", settings_model=MiltersSettings, register_cli=register_cli)
