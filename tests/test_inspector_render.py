"""The layer picture: rendered standalone, then opened in headless Chromium (screenshot and DOM)."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from lamina.inspector.analysis import LayerInput, analyze
from lamina.inspector.render import band_height, human_size, render_html, render_svg
from unionfs.core import ondisk

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def make_layers(tmp_path: Path) -> list[LayerInput]:
    base, mid, top = tmp_path / "base", tmp_path / "mid", tmp_path / "top"
    (base / "etc").mkdir(parents=True)
    (base / "etc/motd").write_bytes(b"m" * 300_000)
    (base / "bin").mkdir()
    (base / "bin/sh").write_bytes(b"s" * 1_000_000)
    (mid / "etc").mkdir(parents=True)
    (mid / "etc/motd").write_bytes(b"<script>alert(1)</script>")
    (top / "etc").mkdir(parents=True)
    fd = os.open(top / "etc", os.O_RDONLY | os.O_DIRECTORY)
    try:
        ondisk.make_whiteout(fd, "motd")
    finally:
        os.close(fd)
    return [LayerInput(base, "sha256:" + "a" * 64, "ADD rootfs.tar /"),
            LayerInput(mid, "sha256:" + "b" * 64, "COPY motd </etc/>"),
            LayerInput(top, "sha256:" + "c" * 64, "RUN rm /etc/motd")]


def test_human_size_and_band_height() -> None:
    assert human_size(0) == "0 B" and human_size(999) == "999 B"
    assert human_size(1500) == "1.5 kB" and human_size(133_000_000) == "133 MB"
    # log-ish: a 100 MB band is taller than a 1 kB one, but not 100000 times taller
    assert band_height(0) < band_height(1000) < band_height(10**8) < 4 * band_height(1000)


def test_svg_and_html_are_self_contained(tmp_path: Path) -> None:
    analysis = analyze(make_layers(tmp_path))
    svg = render_svg(analysis, "demo")
    html = render_html(analysis, "demo <image>")
    for text in (svg, html):
        assert text.count('class="band layer"') == 3
        assert text.count('class="band container-layer"') == 1
        assert "<script>" not in text               # instructions and paths are escaped
        assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)   # nothing fetched
    assert "whiteout: /etc/motd" in svg
    assert "demo &lt;image&gt;" in html
    # the newest layer is drawn first (on top), the base last
    assert svg.index('data-layer="3"') < svg.index('data-layer="2"') < svg.index('data-layer="1"')


# --- headless Chromium ---------------------------------------------------------------------------


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA PNG into rows of raw pixels (enough for a screenshot check)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and color in (2, 6), f"unexpected PNG format {depth}/{color}"
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        filt = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - channels] if x >= channels else 0
            b = prev[x]
            c = prev[x - channels] if x >= channels else 0
            if filt == 1:
                line[x] = (line[x] + a) & 0xFF
            elif filt == 2:
                line[x] = (line[x] + b) & 0xFF
            elif filt == 3:
                line[x] = (line[x] + (a + b) // 2) & 0xFF
            elif filt == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, channels, rows


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "HOME": str(tmp_path)})


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package chromium)")
def test_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    page = tmp_path / "layers.html"
    page.write_text(render_html(analyze(make_layers(tmp_path)), "demo"))
    url = page.as_uri()

    shot = tmp_path / "shot.png"
    result = run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1000,700", url)
    assert shot.exists(), f"no screenshot: {result.stderr[-2000:]}"
    width, channels, rows = png_pixels(shot.read_bytes())
    background = rows[2][:channels]
    pixels = [row[x:x + channels] for row in rows[::4] for x in range(0, len(row), channels * 4)]
    colors = set(pixels)
    differing = sum(1 for p in pixels if p != background)
    assert len(colors) > 20, "the screenshot is (nearly) one colour"
    assert differing / len(pixels) > 0.2, "the screenshot is mostly background"

    dom = run_chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('class="band layer"') == 3
    assert dom.stdout.count('class="band container-layer"') == 1
    assert "RUN rm /etc/motd" in dom.stdout


def test_hostile_names_stay_valid_xml_and_terminal_safe(tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    from lamina.inspector.render import printable

    layer1, layer2 = tmp_path / "l1", tmp_path / "l2"
    for name in (b"bad\xff", b"new\nline", b"ctl\x01", b"esc\x1b[2J"):
        (layer1 / "d").mkdir(parents=True, exist_ok=True)
        with open(os.path.join(os.fsencode(layer1 / "d"), name), "wb") as f:
            f.write(b"x")
        (layer2 / "d").mkdir(parents=True, exist_ok=True)
        fd = os.open(layer2 / "d", os.O_RDONLY | os.O_DIRECTORY)
        try:
            ondisk.make_whiteout(fd, os.fsdecode(name))
        finally:
            os.close(fd)
    analysis = analyze([LayerInput(layer1, "sha256:" + "1" * 64, "RUN printf 'a\\nb'\n&& echo \x1b[31m"),
                        LayerInput(layer2, "sha256:" + "2" * 64, "RUN rm -rf /d/*")])
    assert sorted(analysis.layers[1].whiteouts) == sorted(
        "/d/" + os.fsdecode(n) for n in (b"bad\xff", b"new\nline", b"ctl\x01", b"esc\x1b[2J"))
    svg = render_svg(analysis, "hostile")
    ET.fromstring(svg)                                   # parses: no raw control characters
    assert "\x1b" not in svg and "\x01" not in svg and "/d/bad\\xff" in svg
    html = render_html(analysis, "hostile")
    html.encode("utf-8")                                 # no lone surrogates left
    assert printable("a\nb\x1b[0m\udcff") == "a\\x0ab\\x1b[0m\\xff"
    assert printable("ok – ünïcode") == "ok – ünïcode"
