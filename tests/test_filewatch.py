"""The core file-change helper every file-watching check uses."""

import logging
import os

import pytest

from mailwarden.filewatch import FileWatch


def test_unread_files_count_as_changed_and_a_read_remembers_them(tmp_path):
    path = tmp_path / "list"
    path.write_text("a\n")
    watch = FileWatch([path])
    assert watch.changed()
    assert watch.read(path.read_text) == "a\n"
    assert not watch.changed()


def test_a_change_of_content_time_inode_or_presence_is_seen(tmp_path):
    path = tmp_path / "list"
    path.write_text("a\n")
    watch = FileWatch([path])
    watch.read(lambda: None)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # same size, a nanosecond later
    assert watch.changed()
    watch.read(lambda: None)
    replacement = tmp_path / "new"
    replacement.write_text("b\n")
    os.utime(replacement, ns=(stat.st_atime_ns, path.stat().st_mtime_ns))
    replacement.replace(path)  # same size and time, another inode
    assert watch.changed()
    watch.read(lambda: None)
    path.unlink()
    assert watch.changed()
    watch.read(lambda: None)
    assert not watch.changed()  # still missing: nothing new
    path.write_text("c\n")
    assert watch.changed()


def test_a_failed_read_leaves_the_files_unread(tmp_path):
    path = tmp_path / "missing"
    watch = FileWatch([path])
    with pytest.raises(FileNotFoundError):
        watch.read(path.read_text)
    assert watch.changed()


def test_a_failed_reread_keeps_the_old_value_logs_once_and_waits_for_a_change(tmp_path, caplog):
    path = tmp_path / "list"
    path.write_text("good\n")
    watch = FileWatch([path])
    value = watch.read(path.read_text)

    def parse() -> str:
        text = path.read_text()
        if "bad" in text:
            raise ValueError(f"{path}: line 1: bad entry")
        return text

    path.write_text("bad one\n")
    logger = logging.getLogger("mailwarden.test.filewatch")
    with caplog.at_level(logging.ERROR, logger=logger.name):
        assert watch.reread(parse, ValueError, logger, "list not reloaded; keeping the one in use",
                            file=str(path)) is None
    assert value == "good\n"
    [record] = caplog.records
    assert record.getMessage() == "list not reloaded; keeping the one in use"
    assert record.kv == {"file": str(path), "error": f"{path}: line 1: bad entry"}
    assert not watch.changed()
    path.write_text("better\n")
    assert watch.changed()
    assert watch.reread(parse, ValueError, logger, "unused") == "better\n"


def test_a_missing_file_is_logged_with_the_system_s_reason(tmp_path, caplog):
    path = tmp_path / "gone"
    logger = logging.getLogger("mailwarden.test.filewatch")
    with caplog.at_level(logging.ERROR, logger=logger.name):
        assert FileWatch([path]).reread(path.read_text, OSError, logger, "unreadable") is None
    assert caplog.records[0].kv == {"error": "No such file or directory"}
