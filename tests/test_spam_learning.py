"""``mailwarden spam learn`` and ``spam check`` against the real spamd: what Bayes holds is read with
``sa-learn --dump magic`` from spamd's own files (the harness's ``bayes_counts``), never from our
bookkeeping; and learning ham on a message at the tag level lowers the score of a near-identical one."""

from __future__ import annotations

import json
import mailbox
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.policyd_proc import render_toml
from harness.spamd import SpamdInstance

HAM = """From: Dora Field <dora@partner.example>
To: {to}
Subject: minutes of the {n} planning meeting
Date: Tue, 01 Dec 2026 10:{n:02d}:00 +0000
Message-ID: <minutes-{n}@partner.example>

Hello,
attached are the minutes of the planning meeting: the budget review moves to Thursday,
the glacier survey team reports on the moraine samples, and the sequencing queue is
cleared for the next batch. Please send corrections before Friday.
Dora
"""

SPAM = """From: Winner Desk <desk@lottery.example>
To: {to}
Subject: claim your prize {n} now
Date: Tue, 01 Dec 2026 11:{n:02d}:00 +0000
Message-ID: <prize-{n}@lottery.example>

Congratulations!!! You have been selected for an exclusive cash award. Click now to
claim your guaranteed prize, limited offer, act immediately, wire the processing fee today.
"""


@pytest.fixture(scope="module")
def bayes_spamd() -> Iterator[SpamdInstance]:
    """A spamd whose Bayes is used from the first message learned of each class (stock: 200 of each), so a
    test can show a change of score after a handful."""
    with SpamdInstance(local_cf="bayes_min_ham_num 1\nbayes_min_spam_num 1\n") as instance:
        yield instance


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), "spam", *args],
                          capture_output=True, text=True, timeout=120)


def config_for(tmp_path: Path, spamd: SpamdInstance, **spam: object) -> Path:
    path = tmp_path / "mw.toml"
    path.write_text(render_toml({
        "milters": {"spamassassin": {"spamd": {"address": spamd.tcp_address}, **spam}},
        "quarantine": {"database_url": f"sqlite:///{tmp_path / 'q.sqlite'}", "message_dir": str(tmp_path / "m")}}))
    subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(path), "quarantine", "migrate"],
                   check=True, capture_output=True, timeout=60)
    return path


def test_learn_trains_that_users_bayes_from_files_maildirs_and_mbox(tmp_path, bayes_spamd):
    config = config_for(tmp_path, bayes_spamd)
    single = tmp_path / "one.eml"
    single.write_text(SPAM.format(to="frank@example.test", n=1))
    maildir = mailbox.Maildir(tmp_path / "Maildir")
    for n in (2, 3):
        maildir.add(SPAM.format(to="frank@example.test", n=n).encode())
    box = mailbox.mbox(tmp_path / "spam.mbox")
    for n in (4, 5, 6):
        box.add(SPAM.format(to="frank@example.test", n=n).encode())
    box.flush()
    done = cli(config, "learn", "--spam", "--user", "frank@example.test", "--json", str(single),
               str(tmp_path / "Maildir"), str(tmp_path / "spam.mbox"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["learned"] == 6
    assert bayes_spamd.bayes_counts("frank@example.test") == (6, 0)
    assert bayes_spamd.bayes_counts("grace@example.test") is None, "another user's Bayes was trained"
    again = cli(config, "learn", "--spam", "--user", "frank@example.test", str(single))
    assert again.returncode == 1 and "1 already known" in again.stdout
    assert cli(config, "learn", "--user", "frank@example.test", str(single)).returncode == 2


def test_learning_ham_lowers_the_score_of_a_near_identical_message(tmp_path, bayes_spamd):
    user = "hana@example.test"
    config = config_for(tmp_path, bayes_spamd)
    first = tmp_path / "first.eml"
    first.write_text(HAM.format(to=user, n=1))

    def score(path: Path) -> dict:
        done = cli(config, "check", "--json", "--rcpt", user, str(path))
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    before = score(first)["score"]
    assert cli(config, "levels", "set", "--for", user, "--tag", str(before - 0.05), "--hold", "50",
               "--reject", "60").returncode == 0
    assert score(first)["recipients"][0]["fate"] == "tag", "the message is not at the tag level"

    spam = tmp_path / "spam.eml"
    spam.write_text(SPAM.format(to=user, n=7))
    assert cli(config, "learn", "--spam", "--user", user, str(spam)).returncode == 0
    assert cli(config, "learn", "--ham", "--user", user, str(first)).returncode == 0
    assert bayes_spamd.bayes_counts(user) == (1, 1)

    similar = tmp_path / "similar.eml"
    similar.write_text(HAM.format(to=user, n=2))
    after = score(similar)
    assert after["score"] < before, (before, after)
    assert any(rule["name"].startswith("BAYES_") for rule in after["rules"])
    assert after["recipients"][0]["fate"] == "accept"


def test_check_shows_the_score_the_rules_and_each_recipients_verdict(tmp_path, bayes_spamd):
    config = config_for(tmp_path, bayes_spamd, reject_level=5000)
    gtube = tmp_path / "gtube.eml"
    gtube.write_text("From: x@spam.example\nTo: ivan@example.test, judy@example.test\nSubject: t\n\n"
                     "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\n")
    assert cli(config, "senders", "add", "--for", "judy@example.test", "--white", "x@spam.example").returncode == 0
    done = cli(config, "check", str(gtube))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("score 100") and "GTUBE" in done.stdout
    assert "ivan@example.test: quarantine: score 100" in done.stdout
    assert "judy@example.test: accept: sender whitelisted by the recipient" in done.stdout
    bayes_spamd.stop()
    try:
        down = cli(config, "check", str(gtube))
        assert down.returncode == 69 and "spamd" in down.stderr
    finally:
        bayes_spamd.start()
