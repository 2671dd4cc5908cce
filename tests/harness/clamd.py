"""A private clamd (ClamAV's daemon, Debian's clamav-daemon package) with only the local test signatures.

Its own config file, DatabaseDirectory (tests/fixtures/clamav/local-test.hdb and .ndb, nothing else:
loading takes a tenth of a second), unix socket, TCP port on 127.0.0.1, log file and temporary
directory; never the system's clamd, its socket (/run/clamav/clamd.ctl) or its config. clamd runs in the
foreground (``Foreground yes``) as a child of the harness, as whoever runs the harness: there is no
``User`` line, so as root on a fresh Debian it stays root and needs no clamav user or /run/clamav.

Ready means a PING answered PONG on both sockets, never a sleep. ``stop()`` then ``start()`` again (or
``restart()``) keeps the port, the socket path and the signatures, so tests can take clamd away and bring
it back; ``pause()``/``resume()`` (SIGSTOP/SIGCONT) leave the sockets accepting with nobody answering, for
timeouts. ``stream_max_length`` and ``options`` (any clamd.conf line, e.g. ``AlertEncrypted``) are
written at each ``start()``.

Command line, for the quick start::

    python tests/harness/clamd.py start DIR --port 3310 [--stream-max-length 25M]
    python tests/harness/clamd.py stop DIR
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `harness` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.lifecycle import ServerLifecycle, stop_by_pid_file, terminate
from harness.net import free_port

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "clamav"
SIGNATURES = (FIXTURES / "local-test.hdb", FIXTURES / "local-test.ndb")
CLAMD = shutil.which("clamd") or "/usr/sbin/clamd"

CLAMD_CONF = """\
# written by tests/harness/clamd.py: a private clamd with the local test signatures only
DatabaseDirectory {d}/db
LocalSocket {socket}
LocalSocketMode 660
FixStaleSocket yes
TCPSocket {port}
TCPAddr 127.0.0.1
Foreground yes
PidFile {d}/clamd.pid
LogFile {d}/clamd.log
LogTime yes
TemporaryDirectory {d}/tmp
StreamMaxLength {stream_max_length}
"""


class ClamdNotReady(RuntimeError):
    pass


@dataclass
class ClamdInstance(ServerLifecycle):
    directory: Path | None = None
    """Where the config, database, socket and log live; a new /tmp/mw-clamd-* when None (removed by
    ``cleanup()``)."""
    tcp_port: int = field(default_factory=free_port)
    stream_max_length: str = "25M"
    """clamd's StreamMaxLength (clamd.conf syntax: "64K", "25M")."""
    options: dict[str, str] = field(default_factory=dict)
    """Further clamd.conf lines, e.g. ``{"AlertEncrypted": "yes", "MaxFileSize": "20K"}``."""
    signatures: tuple[Path, ...] = SIGNATURES
    proc: subprocess.Popen[bytes] | None = None
    _owns_directory: bool = field(default=False, init=False, repr=False)
    directory_prefix = "mw-clamd-"

    @property
    def unix_socket(self) -> Path:
        return self.socket_file("clamd.sock")

    @property
    def unix_address(self) -> str:
        """The socket in the form of mailwarden's ``clamd`` setting."""
        return f"unix:{self.unix_socket}"

    @property
    def tcp_address(self) -> str:
        return f"inet:127.0.0.1:{self.tcp_port}"

    @property
    def config_file(self) -> Path:
        return self.workdir / "clamd.conf"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "clamd.pid"

    def write(self) -> None:
        d = self.workdir
        for sub in ("db", "tmp"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        for old in (d / "db").iterdir():
            old.unlink()
        for signature in self.signatures:
            shutil.copy(signature, d / "db" / signature.name)
        text = CLAMD_CONF.format(d=d, socket=self.unix_socket, port=self.tcp_port,
                                 stream_max_length=self.stream_max_length)
        text += "".join(f"{key} {value}\n" for key, value in self.options.items())
        self.config_file.write_text(text)

    def start(self, timeout: float = 30.0) -> ClamdInstance:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.write()
        with open(self.workdir / "clamd.out", "ab") as out:
            # cwd: clamd 1.4 writes its log to a garbage-named file in its working directory after a RELOAD
            # (the LogFile name freed): keep that in its own directory, never the checkout
            self.proc = subprocess.Popen([CLAMD, f"--config-file={self.config_file}"], stdin=subprocess.DEVNULL,
                                         cwd=self.workdir, stdout=out, stderr=out, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()  # a clamd that never became ready must not outlive the failed start
            raise
        return self

    def stop(self) -> None:
        """SIGTERM (clamd removes its socket and pid file), SIGKILL after a grace; returns once it is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.resume()  # a stopped process would hold SIGTERM until the KILL
        terminate(self.proc, grace=10.0)

    def reload(self, timeout: float = 30.0) -> None:
        """RELOAD the signatures (clamd answers RELOADING, loads in the background, keeps serving)."""
        assert self.command("RELOAD") == "RELOADING"
        self._wait_ready(timeout)

    def command(self, command: str, tcp: bool = False, timeout: float = 2.0) -> str:
        """One clamd command over the unix socket (or TCP), its reply without the terminator."""
        family, address = ((socket.AF_INET, ("127.0.0.1", self.tcp_port)) if tcp
                           else (socket.AF_UNIX, str(self.unix_socket)))
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(address)
            sock.sendall(f"z{command}\0".encode())
            reply = b""
            while not reply.endswith(b"\0") and (chunk := sock.recv(4096)):
                reply += chunk
        return reply.rstrip(b"\0").decode(errors="replace")

    def log_text(self) -> str:
        parts = [self.workdir / name for name in ("clamd.out", "clamd.log")]
        return "".join(path.read_text(errors="replace") for path in parts if path.exists())

    def _wait_ready(self, timeout: float) -> None:
        """Ready = PING answered PONG on the unix socket and on TCP (clamd binds both once the database is
        loaded)."""
        assert self.proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ClamdNotReady(f"clamd exited with {self.proc.returncode}: {self.log_text()[-3000:]}")
            try:
                if self.command("PING", timeout=1) == "PONG" and self.command("PING", tcp=True, timeout=1) == "PONG":
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise ClamdNotReady(f"clamd not answering PING after {timeout}s: {self.log_text()[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Start or stop a private clamd with the local test signatures.")
    parser.add_argument("command", choices=["start", "stop"])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--port", type=int, default=3310, help="TCP port on 127.0.0.1")
    parser.add_argument("--stream-max-length", default="25M", help="clamd's StreamMaxLength (default 25M)")
    args = parser.parse_args()
    directory = args.directory.resolve()
    if args.command == "stop":
        if not stop_by_pid_file(directory / "clamd.pid"):
            print(f"no clamd running from {directory}", file=sys.stderr)
        return
    instance = ClamdInstance(directory, args.port, args.stream_max_length)
    instance.start()  # its own session: it outlives this script; `stop DIR` ends it through the pid file
    print(f"clamd ready: {instance.unix_address} and {instance.tcp_address}, log {directory / 'clamd.log'}")


if __name__ == "__main__":
    main()
