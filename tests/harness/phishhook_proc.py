"""``mailwarden phish serve`` as a real separate process, from a TOML config the test writes: Dovecot's auth
policy endpoint, the intake and (when the settings give it a listen address) the review page, on free
loopback ports. Ready when ``/health`` answers (a positive signal, after its sockets are bound)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from harness.lifecycle import terminate
from harness.net import free_port, wait_for
from harness.policyd_proc import render_toml


@dataclass
class PhishhookProcess:
    workdir: Path
    settings: dict
    port: int = field(default_factory=free_port)
    review_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def review_url(self) -> str:
        assert self.review_port is not None, "started without a review page"
        return f"http://127.0.0.1:{self.review_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"phishhook-{self.port}.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / f"phishhook-{self.port}.toml"

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        settings = json.loads(json.dumps(self.settings))
        phishhook = settings.setdefault("phishhook", {})
        phishhook["listen"] = f"127.0.0.1:{self.port}"
        if self.review_port is not None:
            phishhook.setdefault("review", {})["listen"] = f"127.0.0.1:{self.review_port}"
        self.config_path.write_text(render_toml(settings))
        return self.config_path

    def start(self, timeout: float = 60.0) -> PhishhookProcess:
        self.write_config()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailwarden.cli", "--config", str(self.config_path), "phish", "serve"],
            stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})

        def healthy() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"phishhook exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                    return bool(answer.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        try:
            wait_for(healthy, timeout, what="phishhook to answer /health")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; its log:\n{self.log_text()[-3000:]}") from None
        return self

    def stop(self) -> None:
        terminate(self.proc, grace=15)

    def pause(self) -> None:
        """SIGSTOP: its sockets stay open but nothing answers (a hung service)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def post(self, path: str, body: object, headers: dict[str, str] | None = None) -> tuple[int, dict]:
        """POST JSON (or raw bytes) to the policy listener; (HTTP status, the JSON answer)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, json.loads(answer.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 15.0) -> str:
        wait_for(lambda: text in self.log_text(), timeout, what=f"{text!r} in the phishhook log")
        return self.log_text()
