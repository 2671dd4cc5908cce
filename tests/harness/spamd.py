"""A private spamd (SpamAssassin's daemon, Debian's spamd package) with per-user preferences and Bayes.

Its own directory: the site config (``site/``: copies of the package's plugin-loading ``.pre`` files from
/etc/spamassassin and our ``local.cf``, so the host's own local.cf changes nothing), the per-user directories
(``users/USER/``: ``user_prefs`` if a test writes one, and the Bayes database ``bayes_*`` spamd creates on the
first TELL), the pid file and the log (``spamd.log``). The rules are the ones the package ships
(``/usr/share/spamassassin``), never rules sa-update may have fetched into /var/lib/spamassassin, so every host
scores alike. Never the system's spamd, its port 783 or its config.

spamd listens on a free port on 127.0.0.1 (and on a unix socket in the directory), runs local tests only
(``-L``: no DNS, no network), allows TELL (``--allow-tell``: Bayes learning through spamd), and takes each
user's settings from ``users/%u`` (``-x --virtual-config-dir``). Bayes auto-learning is off, so what a
database holds is exactly what a test told it, and Bayes answers after one message of each class
(``bayes_min_spam_num 1``, ``bayes_min_ham_num 1``). As root, spamd's children run as debian-spamd (the user
the package creates) and the directory is theirs; the parent stays root, as with Debian's own spamd.

Ready means a PING answered PONG on TCP and on the unix socket (spamd's own protocol: a bare TCP connect
makes spamd log ``bad protocol: header error`` and occupies a child), never a sleep: the rules compile in
about a second here, the bound is generous. ``stop()`` then ``start()`` again (or ``restart()``) keeps the
port, the socket and the users' databases; ``pause()``/``resume()`` send SIGSTOP/SIGCONT to the whole process
group (spamd's children accept connections themselves, so stopping the parent alone changes nothing): the
kernel still accepts connections and nobody answers, for timeouts.

Command line, for the quick start::

    python tests/harness/spamd.py start DIR --port 7830
    python tests/harness/spamd.py stop DIR
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `harness` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.lifecycle import ServerLifecycle, stop_by_pid_file
from harness.net import free_port

SPAMD = shutil.which("spamd") or "/usr/sbin/spamd"
SA_LEARN = shutil.which("sa-learn") or "/usr/bin/sa-learn"
PACKAGE_SITE_CONFIG = Path("/etc/spamassassin")
"""Where the spamassassin package puts its ``.pre`` files (which plugins load); only those are copied."""
PACKAGE_RULES = Path("/usr/share/spamassassin")
SERVICE_USER = "debian-spamd"

LOCAL_CF = """\
# written by tests/harness/spamd.py: a private spamd for the tests
bayes_auto_learn 0
bayes_min_spam_num 1
bayes_min_ham_num 1
"""


class SpamdNotReady(RuntimeError):
    pass


def ping(family: socket.AddressFamily, address: str | tuple[str, int], timeout: float = 2.0) -> bool:
    """One PING in spamd's protocol; True when spamd answered PONG."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while b"\r\n" not in reply and (chunk := sock.recv(4096)):
            reply += chunk
    status = reply.split(b"\r\n", 1)[0].split()
    return len(status) >= 3 and status[0].startswith(b"SPAMD/") and status[1] == b"0" and status[2] == b"PONG"


@dataclass
class SpamdInstance(ServerLifecycle):
    directory: Path | None = None
    """Where the config, the users' directories, the socket and the log live; a new /tmp/mw-spamd-* when None
    (removed by ``cleanup()``)."""
    port: int = field(default_factory=free_port)
    local_cf: str = ""
    """Further lines for the site's local.cf (e.g. ``"required_score 4.0"``), written at each ``start()``."""
    max_children: int = 3
    allow_tell: bool = True
    """``--allow-tell``: Bayes learning through spamd (TELL); without it spamd refuses TELL."""
    proc: subprocess.Popen[bytes] | None = None
    _owns_directory: bool = field(default=False, init=False, repr=False)
    directory_prefix = "mw-spamd-"

    @property
    def tcp_address(self) -> str:
        """The TCP listener in the form of mailwarden's spamd ``address`` setting."""
        return f"127.0.0.1:{self.port}"

    @property
    def unix_socket(self) -> Path:
        return self.socket_file("spamd.sock")

    @property
    def unix_address(self) -> str:
        return f"unix:{self.unix_socket}"

    @property
    def log_file(self) -> Path:
        return self.workdir / "spamd.log"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "spamd.pid"

    def user_dir(self, user: str) -> Path:
        """The user's own directory (``user_prefs``, ``bayes_*``); spamd creates it on the user's first request."""
        return self.workdir / "users" / user

    def write_user_prefs(self, user: str, text: str) -> None:
        """The user's ``user_prefs`` (``required_score 3.0``, ``whitelist_from ...``); spamd reads it on the user's
        next request."""
        directory = self.user_dir(user)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "user_prefs").write_text(text)
        if os.geteuid() == 0:
            for path in (directory, directory / "user_prefs"):
                shutil.chown(path, SERVICE_USER, SERVICE_USER)

    def write(self) -> None:
        d = self.workdir
        site = d / "site"
        for sub in (site, d / "users", d / "home"):
            sub.mkdir(parents=True, exist_ok=True)
        for old in site.iterdir():
            old.unlink()
        for pre in sorted(PACKAGE_SITE_CONFIG.glob("*.pre")):
            shutil.copy(pre, site / pre.name)
        (site / "local.cf").write_text(LOCAL_CF + self.local_cf + ("\n" if self.local_cf else ""))
        _give_to_service_user(d)

    def command(self) -> list[str]:
        as_service_user = ["-u", SERVICE_USER, "-g", SERVICE_USER] if os.geteuid() == 0 else []
        tell = ["--allow-tell"] if self.allow_tell else []
        return [SPAMD, "--local", *tell, "--nouser-config", f"--virtual-config-dir={self.workdir}/users/%u",
                f"--siteconfigpath={self.workdir}/site", f"--configpath={PACKAGE_RULES}",
                f"--listen=127.0.0.1:{self.port}", f"--listen={self.unix_socket}", "--allowed-ips=127.0.0.1",
                f"--max-children={self.max_children}", "--min-children=1", "--syslog=stderr",
                f"--pidfile={self.pid_file}", *as_service_user,
                # its HOME (~/.spamassassin is made at start-up): ours, not debian-spamd's /var/lib/spamassassin
                f"--helper-home-dir={self.workdir}/home"]

    def start(self, timeout: float = 60.0) -> SpamdInstance:
        if self.proc is not None and self.proc.poll() is None:
            return self
        if not Path(SPAMD).exists():
            raise SpamdNotReady(f"{SPAMD} not found: apt-get install spamd")
        self.write()
        with open(self.log_file, "ab") as log:
            # its own session: pause() stops the parent and its children together (one process group)
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, cwd=self.workdir, stdout=log,
                                         stderr=log, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()  # a spamd that never became ready must not outlive the failed start
            raise
        return self

    def stop(self) -> None:
        """SIGTERM to the parent (it stops its children and removes its socket and pid file), SIGKILL to the
        whole group after a grace; returns once every spamd process of the group is gone."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.resume()  # a stopped process would hold SIGTERM until the KILL
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        _kill_group(self.proc.pid)

    def pause(self) -> None:
        assert self.proc
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def ping(self, timeout: float = 2.0) -> bool:
        """PING answered PONG on both listeners."""
        return (ping(socket.AF_INET, ("127.0.0.1", self.port), timeout)
                and ping(socket.AF_UNIX, str(self.unix_socket), timeout))

    def bayes_counts(self, user: str) -> tuple[int, int] | None:
        """(nspam, nham) of the user's Bayes database, as ``sa-learn --dump magic`` reads it from the files
        (not through spamd); None while the user has no database."""
        dbpath = self.user_dir(user) / "bayes"
        if not Path(f"{dbpath}_toks").exists():
            return None
        prefs = self.workdir / "sa-learn.prefs"
        prefs.touch()
        # sa-learn makes debian-spamd's global state dir (~/.spamassassin of the passwd entry, i.e.
        # /var/lib/spamassassin/.spamassassin; empty) as the package's own tools do: that is all it writes there
        command = [SA_LEARN, f"--siteconfigpath={self.workdir}/site", f"--configpath={PACKAGE_RULES}",
                   f"--prefspath={prefs}", f"--dbpath={dbpath}", "--dump", "magic"]
        if os.geteuid() == 0:  # as the owner of the files, so that nothing root-owned is left in the user's dir
            command = ["runuser", "-u", SERVICE_USER, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"sa-learn --dump magic failed ({result.returncode}): {result.stderr[-2000:]}")
        counts = {}
        for line in result.stdout.splitlines():
            fields = line.split()
            if len(fields) >= 7 and fields[4:6] == ["non-token", "data:"]:
                counts[fields[6]] = int(fields[2])
        return counts["nspam"], counts["nham"]

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SpamdNotReady(f"spamd exited with {self.proc.returncode}: {self.log_text()[-3000:]}")
            if self.unix_socket.exists():  # spamd binds both listeners before it serves either
                try:
                    if self.ping():
                        return
                except OSError:
                    pass
            time.sleep(0.05)
        raise SpamdNotReady(f"spamd not answering PING after {timeout}s: {self.log_text()[-3000:]}")


def _give_to_service_user(directory: Path) -> None:
    """As root: the directory (and what is in it) to debian-spamd, since spamd reads its config and its children
    write the users' directories as debian-spamd; every directory above it must let others through (pytest's
    tmp_path does not: 0700)."""
    directory.chmod(0o755)
    if os.geteuid() != 0:
        return
    try:
        uid = pwd.getpwnam(SERVICE_USER).pw_uid
    except KeyError:
        raise SpamdNotReady(f"no user {SERVICE_USER}: apt-get install spamassassin creates it") from None
    for parent in directory.resolve().parents:
        info = parent.stat()
        if not info.st_mode & 0o001 and info.st_uid != uid:
            raise SpamdNotReady(f"{directory}: {SERVICE_USER} cannot reach it ({parent} has mode "
                                f"{info.st_mode & 0o777:o}); use a directory others can traverse (tempfile.mkdtemp "
                                "directly under /tmp, or the default)")
    for path in (directory, *directory.rglob("*")):
        shutil.chown(path, SERVICE_USER, SERVICE_USER)


def _kill_group(pgid: int) -> None:
    """Whatever is left of the process group (a child the parent did not take down)."""
    try:
        os.killpg(pgid, signal.SIGCONT)
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description="Start or stop a private spamd with per-user Bayes.")
    parser.add_argument("command", choices=["start", "stop"])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--port", type=int, default=7830, help="TCP port on 127.0.0.1")
    args = parser.parse_args()
    directory = args.directory.resolve()
    if args.command == "stop":
        if not stop_by_pid_file(directory / "spamd.pid", group=True):
            print(f"no spamd running from {directory}", file=sys.stderr)
        return
    directory.mkdir(parents=True, exist_ok=True)
    instance = SpamdInstance(directory, args.port)
    instance.start()  # its own session: it outlives this script; `stop DIR` ends it through the pid file
    print(f"spamd ready: {instance.tcp_address} and {instance.unix_address}, log {instance.log_file}")


if __name__ == "__main__":
    main()
