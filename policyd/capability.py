"""policyd as a mailwarden capability: its config section, its subcommands and its service."""

from mailwarden.capability import Capability
from policyd.cli import register_cli
from policyd.preflight import preflight
from policyd.service import RESTART_KEYS, make_service
from policyd.settings import PolicydSettings

CAPABILITY = Capability(name="policyd", settings_model=PolicydSettings, register_cli=register_cli,
                        make_service=make_service, restart_keys=RESTART_KEYS, preflight=preflight)
