"""The message as received, in bounded memory: in RAM up to a configured size, then in a temporary file
(unlinked at once, so nothing is left behind if the process dies). A 50 MB message costs the in-memory
threshold, not 50 MB."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import BinaryIO

DEFAULT_MEMORY_LIMIT = 1 << 20
"""Bytes kept in memory before the spool moves to a temporary file."""
CHUNK = 1 << 16


class Spool:
    def __init__(self, memory_limit: int = DEFAULT_MEMORY_LIMIT, directory: str | None = None) -> None:
        self._file: tempfile.SpooledTemporaryFile[bytes] = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (closed by close())
            max_size=memory_limit, mode="w+b", dir=directory)
        self.memory_limit = memory_limit
        self.size = 0

    def write(self, data: bytes) -> None:
        self._file.seek(0, 2)
        self._file.write(data)
        self.size += len(data)

    @property
    def on_disk(self) -> bool:
        return self.size > self.memory_limit

    def fileno(self) -> int:
        """The temporary file's descriptor, once the spool is on disk (``on_disk``): another process can be
        handed it (clamd's FILDES) and read the message without a copy."""
        if not self.on_disk:
            raise ValueError("the spool is in memory; it has no file descriptor")
        self._file.flush()
        return self._file.fileno()

    def reader(self) -> BinaryIO:
        """The spool's file, rewound: read it to the end before the next ``reader()`` or ``write``."""
        self._file.seek(0)
        return self._file  # type: ignore[return-value]

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        reader = self.reader()
        while chunk := reader.read(size):
            yield chunk

    def head(self, limit: int) -> bytes:
        """The first ``limit`` bytes."""
        return self.reader().read(limit)

    def close(self) -> None:
        self._file.close()
