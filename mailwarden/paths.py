"""The system paths mailwarden reads and writes when the config names none, in one place.

``$MAILWARDEN_ROOT`` moves every one of them under one directory (``/etc/mailwarden/rules`` becomes
``$MAILWARDEN_ROOT/etc/mailwarden/rules``), so that a test run, or a second instance on the same host,
reads and writes nothing of the installed one's. The variable is read each time a default is needed,
never at import.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT_ENV_VAR = "MAILWARDEN_ROOT"

CONFIG_FILE = Path("/etc/mailwarden/mailwarden.toml")
"""The main config file (its drop-ins: ``mailwarden.d/*.toml`` beside it)."""
SITE_RULES_DIR = Path("/etc/mailwarden/rules")
"""Where a site installs the shipped rule files (they win over the packaged copies)."""
MANAGED_WHITELIST = Path("/var/lib/mailwarden/whitelist_clients")
"""The client whitelist ``mailwarden greylist whitelist-update`` writes."""


def system_path(path: Path) -> Path:
    """``path`` (one of the absolute paths above), under ``$MAILWARDEN_ROOT`` when that is set."""
    root = os.environ.get(ROOT_ENV_VAR)
    return Path(root) / path.relative_to("/") if root else path
QUARANTINE_DATABASE = Path("/var/lib/mailwarden/quarantine.sqlite")
"""The quarantine catalogue when ``[quarantine] database_url`` is unset (SQLite, the embedded default)."""
QUARANTINE_MESSAGES = Path("/var/lib/mailwarden/quarantine")
"""Where held messages above ``[quarantine] inline_max_size`` are kept as files."""
