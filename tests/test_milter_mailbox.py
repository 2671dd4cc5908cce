"""Which mailbox a recipient's mail is filed under: the recipient sources' answer (a file map here; the
SQL and LDAP sources are policyd's, tested there), cached, with a failing source costing only the filing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mailwarden.directory import DirectorySettings
from milters.mailbox import MailboxResolver


def resolver(tmp_path: Path, text: str | None, cache_ttl: float = 60) -> tuple[MailboxResolver, Path]:
    path = tmp_path / "recipients.map"
    if text is not None:
        path.write_text(text)
    settings = DirectorySettings.model_validate({"sources": ["file"], "file": {"paths": [str(path)]}})
    return MailboxResolver(settings, cache_ttl), path


@pytest.mark.parametrize(("recipient", "mailbox"), [("Bob@Example.Test", "bob@example.test"),
                                                     ("bob+lists@example.test", "bob@example.test"),
                                                     ("+x@example.test", "+x@example.test"),
                                                     ("<odd>", "<odd>")])
def test_without_sources_the_mailbox_is_the_address_without_its_extension(recipient, mailbox):
    assert MailboxResolver(DirectorySettings(), 0)(recipient) == mailbox


def test_an_alias_is_filed_under_its_one_mailbox_and_a_list_under_itself(tmp_path):
    resolve, _ = resolver(tmp_path, "carol@example.test\nsales@example.test: Carol@example.test\n"
                                    "team@example.test: carol@example.test, dave@example.test\n@catchall.test\n")
    assert resolve("Sales+q3@Example.Test") == "carol@example.test"
    assert resolve("team@example.test") == "team@example.test"
    assert resolve("anyone@catchall.test") == "anyone@catchall.test"
    assert resolve("stranger@example.test") == "stranger@example.test"


def test_answers_are_cached_for_the_ttl(tmp_path):
    resolve, path = resolver(tmp_path, "sales@example.test: carol@example.test\n")
    assert resolve("sales@example.test") == "carol@example.test"
    path.write_text("sales@example.test: dave@example.test\n# a change of size and content\n")
    assert resolve("sales@example.test") == "carol@example.test", "asked the sources again within the ttl"
    fresh, path = resolver(tmp_path, None, cache_ttl=0)
    assert fresh("sales@example.test") == "dave@example.test"


def test_a_source_that_cannot_answer_files_under_the_address_and_is_asked_again(tmp_path, caplog):
    resolve, path = resolver(tmp_path, None)  # no map: the file source cannot answer
    with caplog.at_level(logging.WARNING, logger="milter"):
        assert resolve("sales@example.test") == "sales@example.test"
    assert "recipient sources cannot answer" in caplog.text
    path.write_text("sales@example.test: carol@example.test\n")
    assert resolve("sales@example.test") == "carol@example.test", "a failure was cached"
