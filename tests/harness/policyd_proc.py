"""policyd as a real separate process, started from a TOML config the test writes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.lifecycle import terminate
from harness.net import free_port, wait_for, wait_port
from mailwarden.config import to_toml


def render_toml(data: dict) -> str:
    """A test config as TOML, written by the product's own renderer (the one `config show` uses)."""
    return to_toml(data)


@dataclass
class PolicydProcess:
    workdir: Path
    settings: dict
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"policyd-{self.port}.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / f"policyd-{self.port}.toml"

    def write_config(self) -> Path:
        """The config file the daemon is started with: the test's settings plus the port to wait on."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        settings = {**self.settings}
        policyd = dict(settings.get("policyd", {}))
        # the TCP port the harness waits on, beside any listener the test asks for (a unix socket...)
        policyd["listen"] = [f"127.0.0.1:{self.port}", *policyd.get("listen", [])]
        settings["policyd"] = policyd
        self.config_path.write_text(render_toml(settings))
        return self.config_path

    def start(self) -> PolicydProcess:
        self.write_config()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailwarden.cli", "--config", str(self.config_path), "policyd"],
            stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        wait_port(self.port, 15)
        return self

    def stop(self) -> None:
        terminate(self.proc)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        wait_for(lambda: text in self.log_text(), timeout, what=f"{text!r} in policyd log")
        return self.log_text()

    def connect(self) -> PolicyClient:
        return PolicyClient(("127.0.0.1", self.port))


BASE_REQUEST = {
    # copied from a real Postfix 3.7 RCPT-stage request (XCLIENT ADDR=192.0.2.10), as the recipes show
    "request": "smtpd_access_policy",
    "protocol_state": "RCPT",
    "protocol_name": "ESMTP",
    "client_address": "192.0.2.10",
    "client_name": "unknown",
    "client_port": "51102",
    "reverse_client_name": "unknown",
    "server_address": "127.0.0.1",
    "server_port": "12525",
    "helo_name": "test.client",
    "sender": "sender@example.org",
    "recipient": "user@example.test",
    "recipient_count": "0",
    "queue_id": "",
    "instance": "6c3b.6751f2a3.a1b2c.0",
    "size": "0",
    "etrn_domain": "",
    "stress": "",
    "sasl_method": "",
    "sasl_username": "",
    "sasl_sender": "",
    "ccert_subject": "",
    "ccert_issuer": "",
    "ccert_fingerprint": "",
    "ccert_pubkey_fingerprint": "",
    "encryption_protocol": "",
    "encryption_cipher": "",
    "encryption_keysize": "0",
    "policy_context": "",
    "compatibility_level": "3.6",
    "mail_version": "3.7.11",
}


def encode_request(**overrides: str) -> bytes:
    attrs = {**BASE_REQUEST, **overrides}
    return ("".join(f"{k}={v}\n" for k, v in attrs.items()) + "\n").encode()


class PolicyClient:
    """A blocking policy-protocol client, as Postfix's smtpd is: one request at a time, persistent."""

    def __init__(self, address: tuple[str, int], timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.buf = b""

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_answer(self) -> str | None:
        """The next ``action=`` value, or None when the server closed the connection."""
        while b"\n\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        answer, self.buf = self.buf.split(b"\n\n", 1)
        text = answer.decode()
        assert text.startswith("action="), text
        return text[len("action="):]

    def ask(self, **overrides: str) -> str | None:
        self.send_raw(encode_request(**overrides))
        return self.read_answer()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def timed_ask(client: PolicyClient, **overrides: str) -> tuple[str | None, float]:
    started = time.monotonic()
    answer = client.ask(**overrides)
    return answer, time.monotonic() - started
