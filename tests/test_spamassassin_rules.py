"""The SpamAssassin rules we ship (rules/spamassassin/*.cf) are read by the real SpamAssassin without an
error: `spamassassin --lint` with them in the site config, as an admin's /etc/spamassassin would hold them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parent.parent / "rules" / "spamassassin"
PACKAGE_SITE = Path("/etc/spamassassin")


def lint(site: Path) -> subprocess.CompletedProcess[str]:
    """``spamassassin --lint`` with ``site`` as the site config; HOME beside it (it makes ~/.spamassassin)."""
    return subprocess.run(["spamassassin", "--lint", "-L", f"--siteconfigpath={site}",
                           "--configpath=/usr/share/spamassassin"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(site.parent)})


def site_with(tmp_path: Path, files: dict[str, str]) -> Path:
    site = tmp_path / "site"
    site.mkdir(parents=True)
    for pre in sorted(PACKAGE_SITE.glob("*.pre")):
        shutil.copy(pre, site / pre.name)
    for name, text in files.items():
        (site / name).write_text(text)
    return site


@pytest.mark.parametrize("rules", sorted(RULES.glob("*.cf")), ids=lambda p: p.name)
def test_shipped_rules_pass_spamassassins_lint(tmp_path, rules):
    if not shutil.which("spamassassin"):
        pytest.fail("Debian's spamassassin is not installed (`bash tools/test.sh` installs it)")
    assert lint(site_with(tmp_path, {rules.name: rules.read_text()})).returncode == 0
    broken = lint(site_with(tmp_path / "broken", {rules.name: rules.read_text() + "score NO_SUCH_RULE_ZZ oops\n"}))
    assert broken.returncode != 0, "lint passes anything: the test above proves nothing"
