"""`mailwarden greylist import-postgrey` against databases written by Debian's real postgrey 1.37.

postgrey runs privately (own port, own --dbdir, in the foreground as the test's user), learns a few
triplets over the policy protocol, is stopped, and its Berkeley DB files are imported into the test's
Redis; then a real policyd on that Redis must let the triplet postgrey had passed through at once, still
greylist the one postgrey was greylisting, and greylist a triplet neither has seen.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import base_settings
from harness.lifecycle import terminate
from harness.net import free_port, wait_port
from harness.policyd_proc import PolicyClient, render_toml

from policyd.greylist import GreylistSettings
from policyd.postgrey_import import ImportReport, PostgreyImport, parse_dump

POSTGREY = shutil.which("postgrey") or "/usr/sbin/postgrey"
INSTALL_HINT = "Debian's postgrey is not installed: apt-get install postgrey db-util (tools/install-system-deps.sh)"
POSTGREY_DELAY = 1
DEADLINE = 20.0

# postgrey lets this triplet through; policyd must then pass the same message from another host of the /24,
# with another VERP number in the sender (both normalise to the same triplet)
PASSED = {"client_address": "192.0.2.10", "sender": "list+bounce-123@lists.example.org",
          "recipient": "User@example.test"}
SAME_IN_MAILWARDEN = {"client_address": "192.0.2.44", "sender": "list+bounce-789@lists.example.org",
                      "recipient": "user@example.test"}
GREYLISTED = {"client_address": "198.51.100.7", "sender": "b@example.net", "recipient": "user@example.test"}
NEVER_SEEN = {"client_address": "192.0.2.10", "sender": "someone@else.example", "recipient": "user@example.test"}


@dataclass
class Postgrey:
    dbdir: Path
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def ask(self, **attrs: str) -> str:
        with PolicyClient(("127.0.0.1", self.port)) as client:
            answer = client.ask(**attrs)
        assert answer is not None, self.log.read_text()
        return answer

    def stop(self) -> None:
        """SIGTERM: postgrey closes its databases (the pages reach postgrey.db)."""
        terminate(self.proc, 15)


def start_postgrey(workdir: Path, *options: str) -> Postgrey:
    if not Path(POSTGREY).exists():  # a missing component fails, as a missing Postfix does: never a silent skip
        pytest.fail(INSTALL_HINT)
    dbdir = workdir / "dbdir"
    dbdir.mkdir(parents=True)
    empty = workdir / "empty-whitelist"
    empty.write_text("")
    port = free_port()
    log = workdir / "postgrey.log"
    # no --daemonize: Net::Server stays in the foreground and logs to stderr; it switches to --user/--group,
    # so run it as ourselves (the default user postgrey could not enter pytest's private tmp dir)
    command = [POSTGREY, f"--inet=127.0.0.1:{port}", f"--dbdir={dbdir}", f"--delay={POSTGREY_DELAY}",
               f"--user={pwd.getpwuid(os.getuid()).pw_name}", f"--group={grp.getgrgid(os.getgid()).gr_name}",
               f"--whitelist-clients={empty}", f"--whitelist-recipients={empty}", *options]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    server = Postgrey(dbdir, port, proc, log)
    try:
        wait_port(port, 15)
    except BaseException:
        server.stop()
        raise
    return server


def greylisted(answer: str) -> bool:
    return answer.startswith("DEFER_IF_PERMIT") and "Greylisted" in answer


def let_through(postgrey: Postgrey, triplet: dict[str, str]) -> str:
    """Retry ``triplet`` until postgrey lets it through (its delay is one second), within a deadline."""
    deadline = time.monotonic() + DEADLINE
    while True:
        answer = postgrey.ask(**triplet)
        if answer == "DUNNO" or answer.startswith("PREPEND X-Greylist"):
            return answer
        assert greylisted(answer), answer
        assert time.monotonic() < deadline, f"postgrey still greylists after {DEADLINE}s: {answer}"
        time.sleep(0.2)


@dataclass(frozen=True)
class PostgreyDb:
    dbdir: Path
    greylisted_at: float
    """When postgrey first saw GREYLISTED."""


@pytest.fixture(scope="module")
def postgrey_db(tmp_path_factory: pytest.TempPathFactory) -> PostgreyDb:
    """Postgrey's --dbdir after it passed PASSED (so PASSED's client is counted once in its auto-whitelist)
    and greylisted GREYLISTED; postgrey is stopped."""
    postgrey = start_postgrey(tmp_path_factory.mktemp("postgrey"))
    try:
        assert greylisted(postgrey.ask(**PASSED))
        assert let_through(postgrey, PASSED).startswith("PREPEND X-Greylist: delayed")
        assert greylisted(postgrey.ask(**GREYLISTED))
        greylisted_at = time.time()
    finally:
        postgrey.stop()
    return PostgreyDb(postgrey.dbdir, greylisted_at)


def cli(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), "greylist",
                           "import-postgrey", *args], capture_output=True, text=True, timeout=60,
                          env=env or {**os.environ}, check=False)


def write_config(path: Path, settings: dict) -> Path:
    path.write_text(render_toml(settings))
    return path


def greylist_keys(redis_server) -> list[bytes]:
    return sorted(redis_server.client().scan_iter(match="mw:gl:*"))


def test_postgrey_memory_carries_over_to_policyd(postgrey_db, redis_server, policyd_factory, tmp_path):
    settings = base_settings(redis_server.url)
    config = write_config(tmp_path / "mailwarden.toml", settings)

    dry = cli(config, str(postgrey_db.dbdir), f"--postgrey-delay={POSTGREY_DELAY}", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["triplets"]["imported"] == 2
    assert greylist_keys(redis_server) == []  # a dry run writes nothing

    done = cli(config, str(postgrey_db.dbdir), f"--postgrey-delay={POSTGREY_DELAY}", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["triplets"] == {"imported": 2, "passed": 1, "spf_triplets": 0, "skipped": {}}
    assert report["clients"] == {"imported": 1, "skipped": {}, "database": True}
    client = redis_server.client()
    assert client.hgetall("mw:gl:c:192.0.2.10")[b"n"] == b"1"
    assert 35 * 86400 - 60 < client.ttl("mw:gl:c:192.0.2.10") <= 35 * 86400  # max_age from its last sighting

    daemon = policyd_factory(settings)  # mailwarden's own delay: 300 s
    with daemon.connect() as c:
        assert c.ask(**SAME_IN_MAILWARDEN) == "DUNNO"  # passes at once, as it would have in postgrey
        assert greylisted(c.ask(**NEVER_SEEN, instance="2"))
        assert greylisted(c.ask(**GREYLISTED, instance="3"))  # was being greylisted: still is ...
    log = daemon.wait_log("early retry")  # ... as a retry of postgrey's first attempt, not as a new triplet
    assert "triplet passed before" in log and "new triplet" in log

    again = cli(config, str(postgrey_db.dbdir), f"--postgrey-delay={POSTGREY_DELAY}")
    assert again.returncode == 1  # nothing new: every key is there already, and none is overwritten
    assert "skipped 2: 2 already in mailwarden" in again.stdout and "skipped 1: 1 already in mailwarden" in again.stdout


def test_with_postgreys_default_delay_a_short_wait_is_not_a_pass(postgrey_db, redis_server, tmp_path):
    """postgrey passed the triplet after ~1 s; under the default --postgrey-delay (300) that is not a pass."""
    config = write_config(tmp_path / "mailwarden.toml", base_settings(redis_server.url))
    done = cli(config, str(postgrey_db.dbdir), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["triplets"]["passed"] == 0


def test_auto_whitelist_off_and_old_entries_are_skipped_with_a_reason(postgrey_db, redis_server, tmp_path):
    settings = base_settings(redis_server.url,
                             greylist={"auto_whitelist_clients": 0, "delay": "1s", "retry_window": "2s"})
    config = write_config(tmp_path / "mailwarden.toml", settings)
    # past the retry window of the still-greylisted triplet (postgrey stores whole seconds)
    time.sleep(max(0.0, postgrey_db.greylisted_at + 3.1 - time.time()))
    done = cli(config, str(postgrey_db.dbdir), f"--postgrey-delay={POSTGREY_DELAY}")
    assert done.returncode == 0, done.stderr
    assert "imported 1 triplet(s) (1 passed, 0 still greylisted); skipped 1: 1 not retried within " \
           "retry_window" in done.stdout
    assert "skipped 1: 1 auto_whitelist_clients is 0 in mailwarden" in done.stdout


def test_exit_codes(postgrey_db, redis_server, tmp_path):
    config = write_config(tmp_path / "mailwarden.toml", base_settings(redis_server.url))
    down = write_config(tmp_path / "down.toml", base_settings(f"redis://127.0.0.1:{free_port()}/0"))
    assert cli(down, str(postgrey_db.dbdir)).returncode == os.EX_UNAVAILABLE
    assert cli(config, "--no-such-option").returncode == 2
    missing = cli(config, str(tmp_path / "nothing-here"))
    assert missing.returncode == 1 and "no such directory" in missing.stderr
    not_postgrey = cli(config, str(tmp_path))
    assert not_postgrey.returncode == 1 and "no postgrey.db" in not_postgrey.stderr
    bare = tmp_path / "bin"
    bare.mkdir()
    no_tool = cli(config, str(postgrey_db.dbdir), env={**os.environ, "PATH": str(bare)})
    assert no_tool.returncode == 1 and "apt-get install db-util" in no_tool.stderr
    assert len(no_tool.stderr.strip().splitlines()) == 1
    assert greylist_keys(redis_server) == []


def test_a_privacy_database_cannot_be_imported_and_the_command_says_so(redis_server, tmp_path):
    postgrey = start_postgrey(tmp_path / "privacy", "--privacy")
    try:
        assert greylisted(postgrey.ask(**GREYLISTED))
    finally:
        postgrey.stop()
    config = write_config(tmp_path / "mailwarden.toml", base_settings(redis_server.url))
    done = cli(config, str(postgrey.dbdir))
    assert done.returncode == 1
    assert "skipped 1: 1 hashed by Postgrey's --privacy" in done.stdout
    assert "--privacy: its keys are one-way hashes and cannot be imported" in done.stdout


def test_db_dump_print_format_escapes():
    dump = (b"VERSION=3\nformat=print\ntype=btree\nHEADER=END\n"
            b" 192.0.2.0/a\\\\b@x/caf\\c3\\a9@y\n 1,2\nDATA=END\n")
    assert parse_dump(dump) == [(b"192.0.2.0/a\\b@x/caf\xc3\xa9@y", b"1,2")]


def test_mapping_without_postgrey():
    """Key and lifetime arithmetic on hand-made entries (the end-to-end test above covers real files)."""
    now = 2_000_000_000
    settings = GreylistSettings()
    importer = PostgreyImport(settings, "mw:", spf_triplets=True, now=now)
    report = ImportReport("x", dry_run=True)
    pairs = [
        (b"2001:db8:0:0:0:0:0:0/a@x.org/u@y", f"{now - 4000},{now - 100}".encode()),  # passed
        (b"192.0.2.5/a@x.org/u@y", f"{now - 40 * 86400},{now - 36 * 86400}".encode()),  # passed, too old
        (b"192.0.2.0/a/b@x.org/u@y", b"1,2"),
        (b"192.0.2.0/a@x.org/u@y", b"garbage"),
        (b"da39a3ee5e6b4b0d3255bfef95601890afd80709", b"1,2"),
    ]
    writes = list(importer.triplet_writes(pairs, report))
    assert [(w.kind, w.fields["o"]) for w in writes] == [("passed", "2001:db8::/64"), ("spf", "spf:x.org")]
    assert writes[0].ttl == settings.max_age - 100
    assert int(writes[0].fields["l"]) - int(writes[0].fields["f"]) >= settings.delay
    assert report.triplets_skipped == {"older than max_age": 1, "ambiguous ('/' inside an address)": 1,
                                       "unreadable entry": 1, "hashed by Postgrey's --privacy": 1}
    clients = list(importer.client_writes([(b"2001:DB8:0:0:0:0:0:1", f"7,{now}".encode())], report))
    assert [(c.key, c.fields, c.ttl) for c in clients] == [("mw:gl:c:2001:db8::1", {"n": "7", "l": str(now)},
                                                            settings.max_age)]
