"""What every private server of the harness does the same way once it can start() and stop()."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from harness.net import wait_for

SOCKET_PATH_MAX = 100
"""sun_path holds 108 bytes; a longer path makes the server fail at bind."""


def process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, T stopped, Z zombie...), None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def terminate(proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    """SIGTERM (the process closes what it holds: a database, its listeners), KILL after ``grace`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def stop_by_pid_file(pid_file: Path, grace: float = 10.0, group: bool = False) -> bool:
    """Stop a server that a command line ``start`` left running, by the pid in its pid file: SIGCONT (it may
    be paused), SIGTERM, SIGKILL after ``grace`` seconds; with ``group``, to its whole process group (a
    server started in a session of its own, whose children must go too). False when none was running."""
    send = os.killpg if group else os.kill
    try:
        pid = int(pid_file.read_text().split()[0])
        send(pid, signal.SIGCONT)
        send(pid, signal.SIGTERM)
    except (OSError, ValueError, IndexError):
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            send(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    send(pid, signal.SIGKILL)
    return True


class ServerLifecycle:
    """Restart, pause/resume (SIGSTOP: the kernel accepts connections, nothing answers), cleanup of a
    directory the instance created, and use as a context manager. Subclasses (dataclasses) provide
    ``start()``, ``stop()``, ``proc``, ``directory`` and ``_owns_directory``."""

    proc: subprocess.Popen[bytes] | None
    directory: Path | None
    _owns_directory: bool
    directory_prefix = "mw-server-"
    """The name of the temporary directory ``workdir`` makes (``tempfile.mkdtemp``) when ``directory`` is None."""
    _socket_dir: Path | None = None

    @property
    def workdir(self) -> Path:
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix=self.directory_prefix))
            self._owns_directory = True
        return self.directory

    def socket_file(self, name: str) -> Path:
        """A unix socket ``name`` in the work directory, or, when that path is too long for a socket (a deep
        pytest tmp dir), in a short temporary directory of its own (removed by ``cleanup()``)."""
        path = self.workdir / name
        if len(str(path)) <= SOCKET_PATH_MAX:
            return path
        if self._socket_dir is None:
            self._socket_dir = Path(tempfile.mkdtemp(prefix=f"{self.directory_prefix}sock-"))
        return self._socket_dir / name

    def start(self) -> Self:
        raise NotImplementedError  # provided by each server

    def stop(self) -> None:
        raise NotImplementedError  # provided by each server

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP, returning once the kernel shows the process stopped: a request sent right after must not
        be answered by a process the signal has not reached yet."""
        assert self.proc
        self.proc.send_signal(signal.SIGSTOP)
        pid = self.proc.pid
        wait_for(lambda: process_state(pid) == "T", timeout=5, interval=0.001, what=f"process {pid} to stop")

    def resume(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def cleanup(self) -> None:
        """Stop, and remove the directory if the instance created it."""
        self.stop()
        if self._owns_directory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()
