"""What every private server of the harness does the same way once it can start() and stop()."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Self


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


class ServerLifecycle:
    """Restart, pause/resume (SIGSTOP: the kernel accepts connections, nothing answers), cleanup of a
    directory the instance created, and use as a context manager. Subclasses (dataclasses) provide
    ``start()``, ``stop()``, ``proc``, ``directory`` and ``_owns_directory``."""

    proc: subprocess.Popen[bytes] | None
    directory: Path | None
    _owns_directory: bool

    def start(self) -> Self:
        raise NotImplementedError  # provided by each server

    def stop(self) -> None:
        raise NotImplementedError  # provided by each server

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def pause(self) -> None:
        assert self.proc
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def cleanup(self) -> None:
        """Stop, and remove the directory if the instance created it."""
        self.stop()
        if self._owns_directory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()
