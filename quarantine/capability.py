"""The quarantine as a mailwarden capability: the ``[quarantine]`` section and the ``quarantine`` commands."""

from __future__ import annotations

from mailwarden.capability import Capability
from quarantine.cli import register_cli
from quarantine.preflight import preflight
from quarantine.store import QuarantineSettings

__all__ = ["CAPABILITY", "QuarantineSettings"]

CAPABILITY = Capability(name="quarantine", settings_model=QuarantineSettings, register_cli=register_cli,
                        preflight=preflight)
