"""Screenshots of a sample digest's HTML part in Debian's headless Chromium, for the README:
docs/digest.png (desktop) and docs/digest-phone.png (390 px, a phone).

    python tools/digest_screenshot.py [--out docs]

Also the helpers tests/test_digest_browser.py uses: ``measure`` lays a page out at a given width (in an
iframe, as Chromium's window is at least 500 px wide) and reports its scroll width, height and smallest text;
``screenshot`` writes a PNG of it. Chromium comes from tools/install-system-deps.sh.
"""

from __future__ import annotations

import argparse
import datetime
import html
import json
import shutil
import subprocess
import sys
import tempfile
from email.message import EmailMessage
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from quarantine.digest.render import Entry, Renderer, Section  # noqa: E402
from quarantine.digest.settings import DigestSettings  # noqa: E402
from quarantine.digest.tokens import Tokens  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NOW = datetime.datetime(2026, 12, 2, 5, 0, tzinfo=datetime.UTC)
SAMPLE_SECRET = "sample-only-not-a-real-key-8c1f4e2a9b7d3c6e"  # noqa: S105 (the sample digest's links, for screenshots)
PHONE, DESKTOP = 390, 900


def sample_settings() -> DigestSettings:
    return DigestSettings.model_validate({
        "from_address": "postmaster@example.org", "reply_mailbox": "quarantine@example.org",
        "timezone": "Europe/Berlin", "token_keys": [{"id": "a", "secret": SAMPLE_SECRET}]})


def sample_digest() -> EmailMessage:
    """The digest a user at example.org might get one morning: spam, a banned attachment, a virus, and a
    delivered message that looked like spam."""
    def entry(public_id: str, hours: float, sender: str, subject: str, kind: str, reason: str) -> Entry:
        return Entry(public_id, NOW - datetime.timedelta(hours=hours), sender, sender, subject, "spamassassin", kind,
                     reason)

    held = [
        entry("k7dqz2mfa4n6vbxe", 9.2, "security@paypa1-alerts.example.net", "Your account has been limited",
              "spam", "score 14.2 >= hold level 6"),
        entry("p3wr5tyu7iop2asd", 6.5, "dhl-tracking@parcel-info.example.biz",
              "Parcel waiting: customs fee of 1.99 EUR unpaid", "spam", "score 9.8 >= hold level 6"),
        entry("m4nb5vcx6zlk7jhg", 3.1, "accounts@supplier.example.com", "Invoice 2026-1187 (overdue)", "banned",
              'part 1.2 name="Invoice_2026-1187.pdf.exe" rule=double-extension'),
        entry("q2we3rt4yu5io6pa", 1.4, "hr@payroll.example.net", "Salary adjustment - please review",
              "virus", "Win.Trojan.Agent-1234567"),
    ]
    delivered = [entry("z7xc6vb5nm4as3df", 2.0, "newsletter@shop.example.com", "Winter sale: 50% off everything",
                       "spam", "score 4.1 >= tag level 3")]
    renderer = Renderer(sample_settings(), Tokens(sample_settings(), now=lambda: NOW))
    return renderer.render("alice@example.org", Section(held, len(held)), Section(delivered, 1), NOW)


def html_part(message: EmailMessage) -> str:
    part = message.get_body(("html",))
    assert part is not None
    return str(part.get_content())


def chromium(*args: str, timeout: float = 120) -> str:
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", "--disable-extensions", "--disable-background-networking",
                           "--user-data-dir=" + tempfile.mkdtemp(prefix="mw-chromium-"), *args],
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


PROBE = """<!DOCTYPE html><html><head><title>pending</title></head><body style="margin:0">
<iframe id="page" style="width:{width}px;height:1200px;border:0" srcdoc="{page}"></iframe>
<script>
document.getElementById("page").addEventListener("load", function () {{
  var doc = this.contentDocument, win = this.contentWindow;
  var sizes = Array.from(doc.querySelectorAll("body *")).filter(function (element) {{
    return Array.from(element.childNodes).some(function (node) {{
      var text = node.nodeType === 3 ? node.textContent.trim() : "";
      return text && text.indexOf("====") !== 0;  // the reply markers are small on purpose
    }});
  }}).map(function (element) {{ return parseFloat(win.getComputedStyle(element).fontSize); }});
  document.title = JSON.stringify({{scrollWidth: doc.documentElement.scrollWidth, width: win.innerWidth,
                                   height: doc.documentElement.scrollHeight, minFont: Math.min.apply(null, sizes)}});
}});
</script></body></html>"""


def measure(page: str, width: int, workdir: Path) -> dict[str, float]:
    """Lay ``page`` out ``width`` pixels wide: its scroll width (more than width: it overflows sideways),
    the width it had, its height, and the smallest font size of its text (markers excepted)."""
    probe = workdir / f"probe-{width}.html"
    probe.write_text(PROBE.format(width=width, page=html.escape(page, quote=True)))
    dom = chromium(f"--window-size={max(width, 500) + 40},1000", "--virtual-time-budget=10000", "--dump-dom",
                   probe.as_uri())
    title = dom.split("<title>", 1)[1].split("</title>", 1)[0]
    return dict(json.loads(html.unescape(title)))


def screenshot(page: str, png: Path, width: int, workdir: Path) -> dict[str, float]:
    """A PNG of ``page`` ``width`` pixels wide and as high as its content; returns its measures."""
    measures = measure(page, width, workdir)
    source = workdir / f"page-{width}.html"
    source.write_text(page)
    png.parent.mkdir(parents=True, exist_ok=True)
    chromium(f"--screenshot={png}", f"--window-size={width},{int(measures['height'])}", source.as_uri())
    return measures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    page = html_part(sample_digest())
    with tempfile.TemporaryDirectory(prefix="mw-digest-") as work:
        for name, width in (("digest.png", DESKTOP), ("digest-phone.png", PHONE)):
            measures = screenshot(page, args.out / name, width, Path(work))
            print(f"{args.out / name}: {width} x {int(measures['height'])} px")


if __name__ == "__main__":
    main()
