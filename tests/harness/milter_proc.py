"""A mailwarden milter as a real separate process (``mailwarden milter NAME``), from a TOML config the test
writes, listening on a free loopback port; ready when it logs so (after its socket is bound)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from harness.lifecycle import terminate
from harness.net import free_port, wait_for
from harness.policyd_proc import render_toml

READY = "msg=ready"


@dataclass
class MilterProcess:
    workdir: Path
    settings: dict
    name: str = "clamav"
    port: int = field(default_factory=free_port)
    unix_socket: Path | None = None
    """Listen on this unix socket instead of the TCP port."""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """What Postfix's smtpd_milters says."""
        return f"unix:{self.unix_socket}" if self.unix_socket else f"inet:127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"milter-{self.name}-{self.port}.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / f"milter-{self.name}-{self.port}.toml"

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        settings = {**self.settings}
        milters = dict(settings.get("milters", {}))
        milters[self.name] = {**milters.get(self.name, {}), "listen": self.address}
        settings["milters"] = milters
        self.config_path.write_text(render_toml(settings))
        return self.config_path

    def start(self, timeout: float = 60.0) -> MilterProcess:
        """Start it and wait for its ready line (about a second on an idle machine; the bound is for a
        loaded one, and only a failure waits it out)."""
        self.write_config()
        ready_lines = self.log_text().count(READY)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailwarden.cli", "--config", str(self.config_path), "milter", self.name],
            stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"milter exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            return self.log_text().count(READY) > ready_lines

        try:
            wait_for(ready, timeout, what=f"the {self.name} milter to be ready")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; its log:\n{self.log_text()[-3000:]}") from None
        return self

    def stop(self) -> None:
        terminate(self.proc, grace=15)

    def kill(self) -> None:
        """SIGKILL: the milter dies with whatever it was doing."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def status(self, key: str) -> int:
        """A number from /proc/PID/status, in bytes for the memory lines: ``VmHWM`` (peak resident set),
        ``VmRSS`` (resident now), ``Threads``."""
        assert self.proc is not None and self.proc.poll() is None, "the milter is not running"
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == key:
                number, _, unit = value.strip().partition(" ")
                return int(number) * (1024 if unit == "kB" else 1)
        raise KeyError(f"{key} not in /proc/{self.proc.pid}/status")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 15.0) -> str:
        wait_for(lambda: text in self.log_text(), timeout, what=f"{text!r} in the milter log")
        return self.log_text()
