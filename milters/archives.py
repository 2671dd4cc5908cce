"""Member names of zip archives, read from a bounded decoded copy without extracting anything but what is
asked for (a nested archive, up to a byte bound).

The central directory is read entry by entry (``zipfile`` would build every entry of a hostile
directory in memory first); a zip64 end record is followed; data in front of the archive (a
self-extractor stub, junk) is allowed, as unzip allows it. The local file headers are scanned from the
start as well, and the names only they give are added: a truncated or damaged archive (which a mail
client may still offer to open) has no usable directory, and two archives concatenated, or a directory
that names other files than the local headers, show different files to different tools. Encrypted
members are listed like the others: their names are not encrypted.

Nothing here raises on bad input: a listing says whether it is complete and, if not, why.
"""

from __future__ import annotations

import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import IO

_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s6H3L5H2L")
_LOCAL = struct.Struct("<4s5H3L2H")
_MAX_COMMENT = 0xFFFF
_SCAN_CHUNK = 1 << 16
_FLAG_ENCRYPTED = 0x1
_FLAG_DESCRIPTOR = 0x8
_FLAG_UTF8 = 0x800
STORED, DEFLATED = 0, 8
SPOOL_MEMORY = 1 << 20


@dataclass(frozen=True)
class Member:
    name: str
    encrypted: bool
    method: int
    compressed_size: int
    size: int
    header_offset: int
    """Where its local header starts in the file (corrected for data in front of the archive)."""


@dataclass
class Listing:
    members: list[Member] = field(default_factory=list)
    complete: bool = True
    problem: str = ""
    """Why the listing is incomplete: ``members>N``, ``no central directory``, ``damaged``..."""


def _name(raw: bytes, flags: int) -> str:
    if flags & _FLAG_UTF8:
        return raw.decode("utf-8", "replace")
    try:
        return raw.decode("utf-8")  # many archivers write UTF-8 without saying so
    except UnicodeDecodeError:
        return raw.decode("cp437")


def _read_at(f: IO[bytes], offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def list_zip(f: IO[bytes], size: int, max_members: int) -> Listing:
    """At most ``max_members`` members of the zip archive in ``f`` (``size`` bytes): those of the central
    directory, then those of local headers it does not name. Archivers disagree about which to believe
    (Explorer and 7-Zip read the directory at the end, some unpackers walk the local headers, and of two
    archives concatenated each tool opens a different one), so every name either gives is judged."""
    try:
        listing = _central(f, size, max_members)
    except (OSError, struct.error, ValueError, OverflowError):
        listing = None
    scanned = _local_scan(f, size, max_members)
    if listing is None:
        if scanned.complete:
            scanned.complete, scanned.problem = False, "no usable central directory; local headers scanned"
        return scanned
    named = {member.name for member in listing.members}
    for member in scanned.members:
        if member.name in named:
            continue
        if len(listing.members) >= max_members:
            listing.complete, listing.problem = False, f"members>{max_members}"
            break
        listing.members.append(member)
        named.add(member.name)
    return listing


def _central(f: IO[bytes], size: int, max_members: int) -> Listing | None:
    tail_start = max(0, size - _EOCD.size - _MAX_COMMENT)
    tail = _read_at(f, tail_start, size - tail_start)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        return None
    eocd_pos = tail_start + at
    _sig, _disk, _cd_disk, _n_disk, entries, cd_size, cd_offset, _comment = _EOCD.unpack_from(tail, at)
    if entries == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
        locator_pos = eocd_pos - _EOCD64_LOCATOR.size
        if locator_pos < 0:
            return None
        locator = _read_at(f, locator_pos, _EOCD64_LOCATOR.size)
        if len(locator) < _EOCD64_LOCATOR.size or not locator.startswith(b"PK\x06\x07"):
            return None
        record_pos = locator_pos - _EOCD64.size
        record = _read_at(f, record_pos, _EOCD64.size) if record_pos >= 0 else b""
        if len(record) < _EOCD64.size or not record.startswith(b"PK\x06\x06"):
            return None
        (_sig, _size, _made, _needed, _disk, _cd_disk, _n_disk, entries, cd_size,
         cd_offset) = _EOCD64.unpack(record)
        eocd_pos = record_pos
    cd_start = eocd_pos - cd_size
    if cd_start < 0:
        return None
    shift = cd_start - cd_offset
    """Bytes in front of the archive (a self-extractor, junk): offsets in the archive are off by that."""
    listing = Listing()
    position = cd_start
    for index in range(entries):
        if index >= max_members:
            listing.complete, listing.problem = False, f"members>{max_members}"
            break
        header = _read_at(f, position, _CENTRAL.size)
        if len(header) < _CENTRAL.size or not header.startswith(b"PK\x01\x02"):
            if not listing.members:
                return None
            listing.complete, listing.problem = False, "damaged central directory"
            break
        (_sig, _made, _needed, flags, method, _time, _date, _crc, csize, usize, name_len, extra_len,
         comment_len, _disk, _internal, _external, offset) = _CENTRAL.unpack(header)
        name = _name(_read_at(f, position + _CENTRAL.size, name_len), flags)
        listing.members.append(Member(name, bool(flags & _FLAG_ENCRYPTED), method, csize, usize, offset + shift))
        position += _CENTRAL.size + name_len + extra_len + comment_len
    return listing


def _local_scan(f: IO[bytes], size: int, max_members: int) -> Listing:
    listing = Listing()
    position = 0
    carry = b""
    base = 0
    while position < size:
        f.seek(position)
        chunk = carry + f.read(_SCAN_CHUNK)
        base = position - len(carry)
        if len(chunk) == len(carry):
            break
        at = chunk.find(b"PK\x03\x04")
        if at < 0:
            carry = chunk[-3:]
            position = base + len(chunk)
            continue
        header_pos = base + at
        header = _read_at(f, header_pos, _LOCAL.size)
        if len(header) < _LOCAL.size:
            break
        (_sig, _needed, flags, method, _time, _date, _crc, csize, usize, name_len,
         extra_len) = _LOCAL.unpack(header)
        name = _name(_read_at(f, header_pos + _LOCAL.size, name_len), flags)
        if len(listing.members) >= max_members:
            listing.complete, listing.problem = False, f"members>{max_members}"
            break
        listing.members.append(Member(name, bool(flags & _FLAG_ENCRYPTED), method, csize, usize, header_pos))
        data = header_pos + _LOCAL.size + name_len + extra_len
        skip = csize if not flags & _FLAG_DESCRIPTOR and csize != 0xFFFFFFFF else 0
        position = max(data + skip, header_pos + 4)
        carry = b""
    return listing


def extract(f: IO[bytes], member: Member, limit: int) -> tuple[IO[bytes] | None, bool]:
    """The member's content, up to ``limit`` bytes, in a temporary file, and whether it was cut short;
    None when it cannot be read (encrypted, an unsupported method, damaged)."""
    if member.encrypted or member.method not in (STORED, DEFLATED):
        return None, False
    try:
        header = _read_at(f, member.header_offset, _LOCAL.size)
        if len(header) < _LOCAL.size or not header.startswith(b"PK\x03\x04"):
            return None, False
        *_, name_len, extra_len = _LOCAL.unpack(header)
        f.seek(member.header_offset + _LOCAL.size + name_len + extra_len)
        out: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115 (the caller closes it)
        written = 0
        remaining = member.compressed_size if member.compressed_size != 0xFFFFFFFF else limit + 1
        inflater = zlib.decompressobj(-15) if member.method == DEFLATED else None
        while remaining > 0 and written <= limit:
            chunk = f.read(min(_SCAN_CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            if inflater is not None:  # in slices of _SCAN_CHUNK: a bomb's 64 KB could be 64 MB at once
                data = inflater.decompress(chunk, min(_SCAN_CHUNK, limit + 1 - written))
                while data:
                    out.write(data)
                    written += len(data)
                    if written > limit or not inflater.unconsumed_tail:
                        break
                    data = inflater.decompress(inflater.unconsumed_tail, min(_SCAN_CHUNK, limit + 1 - written))
            else:
                out.write(chunk)
                written += len(chunk)
        truncated = written > limit
        if truncated:
            out.truncate(limit)
        out.seek(0)
        return out, truncated
    except (OSError, zlib.error, struct.error, ValueError):
        return None, False
