"""The review page in a real browser: Debian's headless Chromium driven by Selenium through Debian's
chromedriver (never anything downloaded: Selenium Manager is kept offline), against a real
``mailwarden phish serve`` (tests/harness/phishhook_proc.py) with Redis, a migrated SQLite quarantine and
the full GeoLite2 City database.

A snag made for real: two logins posted to the intake an hour apart, from Boston (US) and then from
Beijing (CN). The account is then blocked everywhere (the block list has it, Dovecot's ``allow`` is
refused). In the browser the ticket's link leads a reviewer to the login page, where a wrong password is
refused; then they log in, open the snag from the list, see the timeline (both places, the implied speed,
the travel pair highlighted), confirm it safe with a note, and see the new state and the audit row naming
them. Then, for real again: the block list has no entry for the account and Dovecot's ``allow`` answers
status 0 (the account can log in, and policyd lets it send). Every wait is on an element
or a text (WebDriverWait), never a pause.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import redis
import support
from _maxminddb_geolite2 import geolite2_database
from argon2 import PasswordHasher
from harness.net import free_port
from harness.phishhook_proc import PhishhookProcess
from harness.redis_server import RedisProcess
from phish_places import CN_BEIJING, US_BOSTON_A

from phishhook.geo import GeoLocator, GeoSettings

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "phish_review_screenshot.py"
PREFIX = "phbrowser:"
TOKEN = "intake-token-for-the-browser-test-0123456789"
REVIEWER, PASSWORD = "secteam", "a review password for the browser test"
USER = "walter@example.test"
NOTE = "Walter is at a conference in Beijing (called him)"


def load_tool() -> ModuleType:
    return support.load_tool(TOOL, "phish_review_screenshot")


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    for binary in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        if not os.access(binary, os.X_OK):
            pytest.fail(f"{binary} is missing: tools/install-system-deps.sh installs Debian's chromium and "
                        "chromium-driver")
    return load_tool()


@dataclass
class Stack:
    service: PhishhookProcess
    redis: redis.Redis
    config_path: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(self.config_path), *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done

    def blocked_users(self) -> list[str]:
        entries = json.loads(self.cli("block", "list", "--json").stdout)
        return [entry["value"] for entry in entries if entry["kind"] == "user"]

    def dovecot_allow(self, user: str, address: str) -> int:
        status, answer = self.service.post("/policy?command=allow", {"login": user, "remote": address,
                                                                     "protocol": "imap"})
        assert status == 200, answer
        return int(answer["status"])


@pytest.fixture(scope="module")
def stack(shared_redis: RedisProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("phish-browser")
    settings = {
        "redis": {"url": shared_redis.url, "key_prefix": PREFIX},
        "quarantine": {"database_url": f"sqlite:///{work / 'quarantine.sqlite'}", "message_dir": str(work / "held")},
        "phishhook": {
            "geo": {"city_database": geolite2_database()},
            "history": {"learning_period": "0s"},
            "intake": {"tokens": {"webmail": TOKEN}},
            "actions": {"run": [{"type": "block-account"}, {"type": "block-address"}]},
            "review": {"accounts": {REVIEWER: PasswordHasher().hash(PASSWORD)}},
        },
    }
    service = PhishhookProcess(work, settings, review_port=free_port())
    config_path = service.write_config()
    subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config_path), "quarantine", "migrate"],
                   check=True, capture_output=True)
    client = redis.Redis.from_url(shared_redis.url)
    for key in client.scan_iter(match=f"{PREFIX}*"):
        client.delete(key)
    service.start()
    yield Stack(service, client, config_path)
    service.stop()


def test_the_places_are_where_the_test_says() -> None:
    geo = GeoLocator(GeoSettings(city_database=geolite2_database()))
    try:
        boston, beijing = geo.locate(US_BOSTON_A), geo.locate(CN_BEIJING)
    finally:
        geo.close()
    assert boston is not None and boston.label() == "Boston, US"
    assert beijing is not None and beijing.label() == "Beijing, CN"


def test_review_in_a_browser(stack: Stack, tool: ModuleType, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    now = time.time()
    answer = tool.post_logins(stack.service, USER, [(now - 3600, US_BOSTON_A, "imap"), (now, CN_BEIJING, "webmail")],
                              TOKEN)
    snag = answer["snag"]
    assert snag, answer
    assert USER in stack.blocked_users()
    assert stack.dovecot_allow(USER, "192.0.2.44") == -1

    driver = tool.browser(tmp_path)
    try:
        wait = tool.wait(driver)
        driver.get(f"{stack.service.review_url}/snags/{snag}")  # the ticket's link: to the login first
        wait.until(ec.element_to_be_clickable((By.ID, "name"))).send_keys(REVIEWER)
        driver.find_element(By.ID, "password").send_keys("not the password")
        driver.find_element(By.ID, "login").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "problem"), "Wrong login name or password."))
        tool.log_in(driver, stack.service.review_url, REVIEWER, PASSWORD)
        driver.find_element(By.LINK_TEXT, "Snags").click()
        link = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, f'#waiting a[href="/snags/{snag}"]')))
        link.click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#timeline tr.travel-after")))
        before = driver.find_element(By.CSS_SELECTOR, "#timeline tr.travel-before").text
        after = driver.find_element(By.CSS_SELECTOR, "#timeline tr.travel-after").text
        assert "Boston, US" in before and US_BOSTON_A in before
        assert "Beijing, CN" in after and CN_BEIJING in after
        speed = driver.find_element(By.CSS_SELECTOR, "#timeline tr.travel-after td.speed").text
        assert speed.endswith("km/h") and int(speed.split()[0].replace(",", "")) > 9000, speed
        assert driver.find_element(By.ID, "state").text.startswith("open")

        (tmp_path / "snag.png").write_bytes(tool.page_png(driver, 1200))

        driver.find_element(By.ID, "safe-note").send_keys(NOTE)
        driver.find_element(By.ID, "safe").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "flash"), "Confirmed safe"))
        assert driver.find_element(By.ID, "state").text.startswith(f"safe by review:{REVIEWER}")
        audit = driver.find_element(By.ID, "snag-audit").text
        assert f"review:{REVIEWER} confirm-safe {NOTE}" in audit

        driver.find_element(By.LINK_TEXT, "Audit log").click()
        wait.until(ec.presence_of_element_located((By.ID, "audit")))
        assert f"review:{REVIEWER}" in driver.find_element(By.ID, "audit").text

        # at phone width nothing but the tables' own scroll boxes is wider than the screen
        driver.get(f"{stack.service.review_url}/snags/{snag}")
        wait.until(ec.presence_of_element_located((By.ID, "timeline")))
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
        assert driver.execute_script("return document.documentElement.scrollWidth") <= 390
    finally:
        driver.quit()

    assert png_size(tmp_path / "snag.png")[0] == 1200
    assert USER not in stack.blocked_users()
    assert stack.dovecot_allow(USER, "192.0.2.44") == 0


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_the_readme_shows_the_screenshot() -> None:
    """docs/phish-review.png (made by tools/phish_review_screenshot.py) exists and the README shows it."""
    shot = ROOT / "docs" / "phish-review.png"
    width, height = png_size(shot)
    assert width >= 800 and height >= 800
    assert "docs/phish-review.png" in (ROOT / "README.md").read_text()
    assert shutil.which("chromium") or Path("/usr/bin/chromium").exists()
