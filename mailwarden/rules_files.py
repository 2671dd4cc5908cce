"""Where the rule files shipped in ``rules/`` are found: a site's copy in /etc/mailwarden/rules (under
$MAILWARDEN_ROOT when set), installed under <prefix>/share/mailwarden/rules, or in the source tree when
running from a checkout or an editable install."""

from __future__ import annotations

import sys
from pathlib import Path

from mailwarden.paths import SITE_RULES_DIR, system_path


def shipped_rules_file(name: str) -> Path:
    candidates = [
        system_path(SITE_RULES_DIR) / name,
        Path(sys.prefix) / "share/mailwarden/rules" / name,
        Path(__file__).resolve().parents[1] / "rules" / name,
    ]
    for path in candidates:
        if path.exists():
            return path
    return candidates[-1]
