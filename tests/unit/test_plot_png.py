"""bench.plot_png: a PNG line chart that a small stdlib decoder reads back, byte-identical when
drawn twice, and clear errors for bad input."""

from __future__ import annotations

import math
import struct
import zlib

import pytest

from bench.plot_png import PALETTE, line_chart

SERIES = [
    ("measured", [(1, 10.0), (2, 14.0), (4, None), (8, 30.0), (16, 41.0)], "solid"),
    ("ideal", [(1, 10.0), (2, 20.0), (4, 40.0), (8, 80.0), (16, 160.0)], "dashed"),
]


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit RGB, non-interlaced, filter-0 PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + body), f"bad CRC on {tag!r}"
        chunks.append((tag, body))
        pos += 12 + length
    assert [tag for tag, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color, interlace) == (8, 2, 0)  # 8-bit RGB, not interlaced
    raw = zlib.decompress(b"".join(body for tag, body in chunks if tag == b"IDAT"))
    stride = 1 + width * 3
    assert len(raw) == height * stride
    rows = [raw[y * stride:(y + 1) * stride] for y in range(height)]
    assert all(row[0] == 0 for row in rows)  # filter type 0: the bytes are the pixels
    return width, height, [row[1:] for row in rows]


def pixel(rows: list[bytes], x: int, y: int) -> tuple[int, int, int]:
    return tuple(rows[y][3 * x:3 * x + 3])


def count_color(rows: list[bytes], color: tuple[int, int, int], x0: int, y0: int, x1: int, y1: int) -> int:
    """Pixels of `color` in [x0, x1) x [y0, y1)."""
    return sum(pixel(rows, x, y) == color for y in range(y0, y1) for x in range(x0, x1))


def render(path, series, **kwargs) -> list[bytes]:
    line_chart(path, series, title="Throughput (tokens/s)", x_label="workers", y_label="tokens/s",
               log_x=True, width=640, height=400, **kwargs)
    return decode_png(path.read_bytes())[2]


def test_the_chart_decodes_and_shows_each_series(tmp_path):
    path = tmp_path / "chart.png"
    rows = render(path, SERIES)
    width, height, _ = decode_png(path.read_bytes())
    assert (width, height) == (640, 400)
    assert pixel(rows, 0, 0) == pixel(rows, width - 1, height - 1) == (255, 255, 255)
    for color in PALETTE[:2]:  # more than the legend's swatch (under 60 px) alone would give
        assert count_color(rows, color, 60, 70, width - 20, height - 60) > 150


def test_a_none_y_breaks_the_line(tmp_path):
    joined = [("measured", [(x, 20.0 if y is None else y) for x, y in SERIES[0][1]], "solid")]
    with_gap = count_color(render(tmp_path / "gap.png", SERIES[:1]), PALETTE[0], 0, 0, 640, 400)
    without = count_color(render(tmp_path / "joined.png", joined), PALETTE[0], 0, 0, 640, 400)
    assert 0 < with_gap < without - 50


def test_the_same_input_gives_the_same_bytes(tmp_path):
    kwargs = dict(title="t", x_label="x", y_label="y", y_range=(0.0, 200.0))
    line_chart(tmp_path / "a.png", SERIES, **kwargs)
    line_chart(tmp_path / "b.png", SERIES, **kwargs)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_text_outside_the_font_is_drawn_anyway(tmp_path):
    line_chart(tmp_path / "c.png", SERIES, title="≥ 2× faster — µs ☃", x_label="x", y_label="y")
    assert decode_png((tmp_path / "c.png").read_bytes())[:2] == (800, 500)


@pytest.mark.parametrize("series, kwargs, named", [
    ([], {}, "series=[]"),
    ([("bad", [(1, math.nan)], "solid")], {}, "nan"),
    ([("bad", [(math.inf, 1.0)], "solid")], {}, "inf"),
    ([("bad", [(1, 1.0), (0, 2.0)], "solid")], {"log_x": True}, "x=0"),
    ([("bad", [(-3.5, 2.0)], "solid")], {"log_x": True}, "x=-3.5"),
    ([("bad", [(1, 1.0)], "dotted")], {}, "'dotted'"),
    ([("bad", [(1, 1.0)], "solid")], {"y_range": (5.0, 1.0)}, "(5.0, 1.0)"),
])
def test_bad_input_is_named(tmp_path, series, kwargs, named):
    with pytest.raises(ValueError) as raised:
        line_chart(tmp_path / "bad.png", series, title="t", x_label="x", y_label="y", **kwargs)
    assert named in str(raised.value)
    assert not (tmp_path / "bad.png").exists()
