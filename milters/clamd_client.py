"""A small clamd client: INSTREAM and one-line commands (VERSION, PING) over a unix or TCP socket, with
every step (connect included) bounded in time.

Why not PyPI's ``clamd`` (1.0.2, unmaintained since 2017): it sends INSTREAM in 1 KB chunks (20,480 sends
for a 20 MB message; measured, clamd then spends about 50% more CPU per message than with Debian's
clamav-milter), and it connects before it sets its timeout, so an unreachable host or a hung clamd whose
listen queue is full blocks a milter thread with no bound. The protocol is a few lines (clamd(8),
"INSTREAM"): ``nINSTREAM\\n``, then chunks each prefixed by its length as 4 bytes in network order, then a
zero length; clamd answers one line: ``stream: OK``, ``stream: NAME FOUND``, or ``... ERROR``.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterable

CHUNK = 1 << 16
"""Bytes per INSTREAM chunk; clamd reads each into a buffer of StreamMaxLength at most."""
MAX_REPLY = 4096


class ClamdError(Exception):
    """clamd could not be reached, or gave no usable answer in time; the message says which."""


class StreamTooLong(ClamdError):
    """clamd refused the stream as longer than its StreamMaxLength."""


Address = str | tuple[str, int]
"""A unix socket path, or (host, port)."""


def connect(address: Address, timeout: float) -> socket.socket:
    """A connected socket, the connect itself bounded by ``timeout``."""
    try:
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(address)
            except BaseException:
                sock.close()
                raise
            return sock
        return socket.create_connection(address, timeout=timeout)
    except TimeoutError:
        raise ClamdError(f"connecting to {describe(address)} timed out after {timeout:.1f}s") from None
    except OSError as exc:
        raise ClamdError(f"cannot connect to {describe(address)}: {exc.strerror or exc}") from None


def describe(address: Address) -> str:
    return f"unix:{address}" if isinstance(address, str) else f"inet:{address[0]}:{address[1]}"


def command(address: Address, name: str, timeout: float) -> str:
    """One command (``VERSION``, ``PING``) and its one-line answer."""
    deadline = time.monotonic() + timeout
    with connect(address, timeout) as sock:
        try:
            sock.sendall(f"n{name}\n".encode())
            return _read_line(sock, deadline, time.monotonic)
        except TimeoutError:
            raise ClamdError(f"{describe(address)}: no answer to {name} within {timeout:.1f}s") from None
        except OSError as exc:
            raise ClamdError(f"{describe(address)}: {name} failed: {exc.strerror or exc}") from None


def instream(address: Address, chunks: Iterable[bytes], deadline: float,
             now: Callable[[], float] = time.monotonic) -> tuple[str, str]:
    """Stream ``chunks`` and return clamd's verdict: ``("OK", "")`` or ``("FOUND", NAME)``. Raises
    StreamTooLong, or ClamdError when clamd is unreachable, answers ERROR or nothing usable, or the time is
    up (``deadline`` on ``now``'s clock bounds the connect, every send and the wait for the answer)."""
    with connect(address, _left(deadline, now, address)) as sock:
        try:
            sock.sendall(b"nINSTREAM\n")
            for chunk in chunks:
                if chunk:
                    sock.settimeout(_left(deadline, now, address))
                    sock.sendall(struct.pack("!L", len(chunk)) + chunk)
            sock.settimeout(_left(deadline, now, address))
            sock.sendall(b"\0\0\0\0")
        except (BrokenPipeError, ConnectionResetError) as exc:
            # clamd closes a stream over its StreamMaxLength, after saying so: read what it said
            reply = _read_after_close(sock)
            if "size limit exceeded" in reply:
                raise StreamTooLong(reply) from None
            raise ClamdError(f"{describe(address)} closed the connection while the message was sent: "
                             f"{exc.strerror or exc}") from None
        except TimeoutError:
            raise ClamdError(f"{describe(address)}: timed out while sending the message") from None
        except OSError as exc:
            raise ClamdError(f"{describe(address)}: sending failed: {exc.strerror or exc}") from None
        return _verdict(sock, address, deadline, now)


def fildes(path: str, fd: int, deadline: float, now: Callable[[], float] = time.monotonic) -> tuple[str, str]:
    """Hand clamd an open file to scan (FILDES, unix sockets only): clamd reads the file itself, so nothing
    is copied through the socket and no StreamMaxLength applies (its MaxScanSize and friends do). Returns
    and raises as ``instream``."""
    with connect(path, _left(deadline, now, path)) as sock:
        try:
            sock.sendall(b"nFILDES\n")
            socket.send_fds(sock, [b"\0"], [fd])
        except OSError as exc:
            raise ClamdError(f"{describe(path)}: FILDES failed: {exc.strerror or exc}") from None
        return _verdict(sock, path, deadline, now)


def _verdict(sock: socket.socket, address: Address, deadline: float, now: Callable[[], float]) -> tuple[str, str]:
    """clamd's one-line answer to a scan, read by ``deadline``, as ``parse_reply`` makes it."""
    try:
        reply = _read_line(sock, deadline, now)
    except TimeoutError:
        raise ClamdError(f"{describe(address)}: no answer within the scan's time") from None
    except OSError as exc:
        raise ClamdError(f"{describe(address)}: reading the answer failed: {exc.strerror or exc}") from None
    return parse_reply(reply, address)


def parse_reply(reply: str, address: Address) -> tuple[str, str]:
    if "size limit exceeded" in reply:
        raise StreamTooLong(reply)
    _, _, result = reply.partition(": ")
    if result == "OK":
        return "OK", ""
    if result.endswith(" FOUND") and (name := result[:-6].strip()):
        return "FOUND", name
    if not reply:
        raise ClamdError(f"{describe(address)} closed the connection without an answer")
    raise ClamdError(f"{describe(address)} answered {reply[:200]!r}")


def _left(deadline: float, now: Callable[[], float], address: Address) -> float:
    left = deadline - now()
    if left <= 0:
        raise ClamdError(f"{describe(address)}: the scan's time is up")
    return left


def _read_line(sock: socket.socket, deadline: float, now: Callable[[], float]) -> str:
    data = b""
    while not data.endswith((b"\n", b"\0")) and len(data) < MAX_REPLY:
        left = deadline - now()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(MAX_REPLY)
        if not chunk:
            break
        data += chunk
    return data.rstrip(b"\n\0").decode("utf-8", "replace").strip()


def _read_after_close(sock: socket.socket) -> str:
    try:
        sock.settimeout(1.0)
        return sock.recv(MAX_REPLY).decode("utf-8", "replace").strip()
    except OSError:
        return ""
