"""The digest's HTML part in a real browser (Debian's headless Chromium): screenshots at desktop and phone
width saved under the test's tmp_path, read back as PNGs (zlib and struct, no image library), and the
layout measured at phone width: nothing overflows sideways, no text below 11 px. The digest has long and
hostile subjects and senders, the worst case for a narrow screen."""

from __future__ import annotations

import datetime
import shutil
import struct
import zlib
from pathlib import Path
from types import ModuleType

import pytest
import support

from quarantine.digest.render import Entry, Renderer, Section
from quarantine.digest.tokens import Tokens

TOOL = Path(__file__).parent.parent / "tools" / "digest_screenshot.py"
RELEASE_GREEN = (0x15, 0x80, 0x3D)
"""The Release button's background (templates/digest.html.j2)."""


def load_tool() -> ModuleType:
    return support.load_tool(TOOL, "digest_screenshot")


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    if not shutil.which("chromium"):
        pytest.fail("Debian's chromium is not installed (tools/install-system-deps.sh installs it)")
    return load_tool()


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit RGB or RGBA PNG, its filters undone."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    at, idat = 8, b""
    width = height = channels = 0
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6), (depth, colour)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        at += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            left = line[x - channels] if x >= channels else 0
            up = previous[x]
            corner = previous[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + left) & 0xFF
            elif kind == 2:
                line[x] = (line[x] + up) & 0xFF
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 0xFF
            elif kind == 4:
                estimate = left + up - corner
                pa, pb, pc = abs(estimate - left), abs(estimate - up), abs(estimate - corner)
                line[x] = (line[x] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, [bytes(b for i, b in enumerate(row) if i % channels < 3) for row in rows]


def colours(rows: list[bytes]) -> set[tuple[int, int, int]]:
    return {(row[x], row[x + 1], row[x + 2]) for row in rows[::7] for x in range(0, len(row), 3 * 5)}


def hostile_digest() -> str:
    settings = load_tool().sample_settings()
    now = datetime.datetime(2026, 12, 2, 5, 0, tzinfo=datetime.UTC)
    long_word = "Überweisungsbestätigungsbenachrichtigungsdienst" * 3
    held = [Entry(f"ab{index}cdefghijklmnop"[:16], now, sender, sender, subject, "spamassassin", "spam",
                  "score 12.0 >= hold level 6")
            for index, (sender, subject) in enumerate([
                ("a" * 60 + "@" + "very-long-subdomain." * 4 + "example.net", long_word),
                ("spam@example.net", "<b>bold?</b> " + "words that wrap " * 10),
                ("x@example.net", "\u202eevil.exe ==== mailwarden held 1 ==== [aaaaaa]")], start=2)]
    renderer = Renderer(settings, Tokens(settings, now=lambda: now))
    message = renderer.render("alice@example.org", Section(held, 30), Section([], 0), now)
    part = message.get_body(("html",))
    assert part is not None
    return str(part.get_content())


@pytest.mark.parametrize(("width", "name"), [(390, "phone"), (900, "desktop")])
def test_the_digest_renders_readably_in_chromium(tool: ModuleType, tmp_path: Path, width: int, name: str) -> None:
    page = hostile_digest()
    png = tmp_path / f"digest-{name}.png"
    measures = tool.screenshot(page, png, width, tmp_path)
    assert measures["scrollWidth"] <= measures["width"] == width, measures  # nothing wider than the screen
    assert measures["minFont"] >= 11, measures
    assert png.stat().st_size > 20_000
    png_width, png_height, rows = png_pixels(png)
    assert (png_width, png_height) == (width, int(measures["height"]))
    assert png_height > 600
    seen = colours(rows)
    assert len(seen) > 50  # text, buttons, borders: not a blank page
    assert RELEASE_GREEN in seen  # the Release buttons were drawn
    assert any(max(colour) < 60 for colour in seen)  # dark text


def test_the_phone_measure_sees_an_overflow(tool: ModuleType, tmp_path: Path) -> None:
    """The control: a page wider than the phone is reported as such (so the check above can fail)."""
    page = hostile_digest().replace("overflow-wrap:anywhere;word-break:break-word", "white-space:nowrap")
    measures = tool.measure(page, 390, tmp_path)
    assert measures["scrollWidth"] > measures["width"], measures


def test_the_readme_images_are_the_sample_digest(tool: ModuleType) -> None:
    """docs/digest.png and docs/digest-phone.png, shown in the README, exist at the tool's widths."""
    docs = TOOL.parent.parent / "docs"
    for name, width in (("digest.png", tool.DESKTOP), ("digest-phone.png", tool.PHONE)):
        data = (docs / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">II", data[16:24])[0] == width
