"""A screenshot of the review page's snag page for the README: docs/phish-review.png.

    python tools/phish_review_screenshot.py [--out docs/phish-review.png] [--width 1200]

It runs the real thing on loopback: its own redis-server, a SQLite quarantine (``mailwarden quarantine
migrate``), ``mailwarden phish serve`` with the review page and the full GeoLite2 City database of the
test dependency maxminddb-geolite2; a week of a user's logins from Boston (IMAP, webmail, Outlook mobile
through Microsoft's relay range) posted to the intake, then one from Beijing an hour after the last Boston
one, which snags the account. Then Debian's Chromium, driven by Selenium through Debian's chromedriver,
logs in and saves the snag page, as tall as its content.

Also the helpers tests/test_phish_browser.py uses: ``browser`` (headless Chromium that never downloads
anything: Selenium Manager is kept offline), ``log_in``, ``page_png``. Chromium and chromedriver come from
tools/install-system-deps.sh (Debian's chromium and chromium-driver).
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT = 30.0
"""Seconds a browser step may take before the wait fails (a loaded CI machine)."""
DESKTOP = 1200
SAMPLE_USER = "j.doe@example.edu"
SAMPLE_REVIEWER = "secteam"
SAMPLE_PASSWORD = "sample-only-review-password"  # noqa: S105 (the throw-away demo service's account)
INTAKE_TOKEN = "sample-only-intake-token-0123456789abcdef"  # noqa: S105

# Real addresses and what the 2018 GeoLite2 City database says of them (tests/phish_places.py).
BOSTON_BU = "128.197.26.35"
BOSTON_NEU = "129.10.116.51"
CAMBRIDGE_MIT = "18.9.22.169"
OUTLOOK_RELAY = "40.107.0.1"
BEIJING = "166.111.4.100"


def browser(workdir: Path, width: int = DESKTOP, height: int = 900) -> Any:
    """Headless Debian Chromium through Debian's chromedriver. Selenium Manager stays offline
    (SE_OFFLINE=true, the binary and driver paths given), so nothing is ever downloaded."""
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--disable-extensions", "--disable-background-networking",
                     "--disable-sync", "--hide-scrollbars", f"--window-size={width},{height}",
                     f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-', dir=workdir)}"):
        options.add_argument(argument)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER, log_output=str(workdir / "chromedriver.log"))
    return webdriver.Chrome(options=options, service=service)


def wait(driver: Any) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT)


def log_in(driver: Any, base_url: str, name: str, password: str) -> None:
    """Open the login page, log in, and wait for the page that names the reviewer."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    driver.get(f"{base_url}/login")
    wait(driver).until(ec.element_to_be_clickable((By.ID, "name"))).send_keys(name)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "login").click()
    wait(driver).until(ec.text_to_be_present_in_element((By.ID, "who"), name))


def page_png(driver: Any, width: int) -> bytes:
    """The whole page (not only the window) ``width`` CSS pixels wide, as PNG bytes (Chrome DevTools'
    captureBeyondViewport)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False})
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return base64.b64decode(shot["data"])


def sample_settings(redis_url: str, work: Path, password_hash: str) -> dict[str, Any]:
    from _maxminddb_geolite2 import geolite2_database

    return {
        "redis": {"url": redis_url, "key_prefix": "demo:"},
        "quarantine": {"database_url": f"sqlite:///{work / 'quarantine.sqlite'}", "message_dir": str(work / "held")},
        "phishhook": {
            "geo": {"city_database": geolite2_database()},
            "history": {"learning_period": "0s"},
            "intake": {"tokens": {"webmail": INTAKE_TOKEN}},
            "actions": {"run": [{"type": "block-account"}, {"type": "block-address"}]},
            "review": {"accounts": {SAMPLE_REVIEWER: password_hash}},
        },
    }


def post_logins(service: Any, user: str, logins: list[tuple[float, str, str]], token: str = INTAKE_TOKEN
                ) -> dict[str, Any]:
    """Post ``(at, address, service)`` logins to the intake (bearer ``token``) in order; the last answer."""
    answer: dict[str, Any] = {}
    for at, address, via in logins:
        status, answer = service.post("/login", {"user": user, "address": address, "at": at, "service": via},
                                      {"Authorization": f"Bearer {token}"})
        if status != 200:
            raise RuntimeError(f"the intake refused a login: {status} {answer}")
    return answer


def sample_week(now: float) -> list[tuple[float, str, str]]:
    """A week of a Boston user's logins, then Beijing an hour after the last: ``(at, address, service)``."""
    hour, day = 3600.0, 86400.0
    return [(now - 6 * day - 3 * hour, BOSTON_BU, "imap"), (now - 5 * day - 7 * hour, CAMBRIDGE_MIT, "webmail"),
            (now - 3 * day - 2 * hour, BOSTON_NEU, "imap"), (now - 2 * day - 5 * hour, OUTLOOK_RELAY, "imap"),
            (now - 1 * day - 4 * hour, BOSTON_BU, "smtp"), (now - 1 * hour, BOSTON_BU, "imap"),
            (now, BEIJING, "webmail")]


@contextmanager
def sample_service(work: Path) -> Iterator[tuple[Any, str]]:
    """A throw-away redis-server and ``mailwarden phish serve`` with the review page; (service, snag id)."""
    from argon2 import PasswordHasher
    from harness.net import free_port
    from harness.phishhook_proc import PhishhookProcess
    from harness.redis_server import start_redis

    redis_server = start_redis(work / "redis")
    service = None
    try:
        service = PhishhookProcess(work, sample_settings(redis_server.url, work, PasswordHasher().hash(
            SAMPLE_PASSWORD)), review_port=free_port())
        config = service.write_config()
        subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), "quarantine", "migrate"],
                       check=True, capture_output=True)
        service.start()
        answer = post_logins(service, SAMPLE_USER, sample_week(time.time()))
        if not answer.get("snag"):
            raise RuntimeError(f"the sample logins did not snag the account: {answer}")
        yield service, str(answer["snag"])
    finally:
        if service is not None:
            service.stop()
        redis_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "phish-review.png")
    parser.add_argument("--width", type=int, default=DESKTOP)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mw-phish-review-") as temp:
        work = Path(temp)
        with sample_service(work) as (service, snag):
            driver = browser(work, args.width)
            try:
                log_in(driver, service.review_url, SAMPLE_REVIEWER, SAMPLE_PASSWORD)
                driver.get(f"{service.review_url}/snags/{snag}")
                from selenium.webdriver.common.by import By
                from selenium.webdriver.support import expected_conditions as ec

                wait(driver).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#timeline tr.travel-after")))
                png = page_png(driver, args.width)
            finally:
                driver.quit()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(png)
    print(f"{args.out}: {len(png)} bytes, snag {snag}")


if __name__ == "__main__":
    main()
