"""Listening sockets that cannot be opened: one line naming the address, the listener and the likely
cause, and an exit code that tells systemd (and the postmaster) whether trying again can help.

Exit codes (sysexits.h, documented in the README): 69 (EX_UNAVAILABLE) the address is taken or not on
this host, a restart may succeed later; 77 (EX_NOPERM) not allowed (a port below 1024, a directory the
service user may not write); 78 (EX_CONFIG) the socket's directory does not exist.
"""

from __future__ import annotations

import errno
import os

EX_UNAVAILABLE = os.EX_UNAVAILABLE
EX_NOPERM = os.EX_NOPERM
EX_CONFIG = os.EX_CONFIG

_EXIT_CODES = {
    errno.EACCES: EX_NOPERM,
    errno.EPERM: EX_NOPERM,
    errno.ENOENT: EX_CONFIG,
    errno.ENOTDIR: EX_CONFIG,
}


def exit_code_for(exc: OSError) -> int:
    """The exit code for a system error met at start-up: 77, 78, else 69 (a restart may help)."""
    return _EXIT_CODES.get(exc.errno or 0, EX_UNAVAILABLE)


class ListenError(Exception):
    """A listener could not be opened; ``str()`` is the one line for the postmaster."""

    def __init__(self, address: str, exc: OSError, listener: str = "", in_use_by: str = "") -> None:
        super().__init__(address)
        self.address = address
        self.error = exc
        self.listener = listener
        """What listens there, when it is not obvious: "the metrics listener, [metrics] listen"."""
        self.in_use_by = in_use_by
        """Who probably holds the address when it is in use; the default points at ss(8)."""

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.error)

    def __str__(self) -> str:
        what = f" ({self.listener})" if self.listener else ""
        reason, hint = self._reason()
        return f"cannot listen on {self.address}{what}: {reason}" + (f" ({hint})" if hint else "")

    def _reason(self) -> tuple[str, str]:
        code = self.error.errno
        unix_path = self.address[5:] if self.address.startswith("unix:") else None
        port = self.address.rpartition(":")[2]
        if code == errno.EADDRINUSE:
            if unix_path is not None:
                return "address already in use", "the path exists and is not a socket"
            return "address already in use", self.in_use_by or f"see which program holds it: ss -ltnp 'sport = :{port}'"
        if code in (errno.EACCES, errno.EPERM):
            if unix_path is not None:
                return "permission denied", f"the service user may not create {unix_path}"
            if port.isdigit() and int(port) < 1024:
                return "permission denied", "ports below 1024 need root or CAP_NET_BIND_SERVICE"
            return "permission denied", ""
        if code in (errno.ENOENT, errno.ENOTDIR) and unix_path is not None:
            directory = os.path.dirname(unix_path) or "."
            if os.path.isdir(directory):
                return "cannot create the socket there", f"{directory} takes no new files"
            return "no such directory", f"{directory} does not exist; systemd's RuntimeDirectory= can create it"
        if code == errno.EADDRNOTAVAIL:
            return "the address is not on this host", "is the network up, or the address mistyped?"
        return (self.error.strerror or str(self.error)).lower(), ""
