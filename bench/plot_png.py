"""Line charts as PNG files, in pure Python (stdlib only: zlib, struct, math).

No matplotlib or Pillow: the bench writes its figures with this. One call, `line_chart`, draws
series of (x, y) points as 2 px lines with square markers on a white canvas, with axes, numeric
tick labels, light grey grid lines, a title, axis labels and a legend, in a 5x7 bitmap font.
All sizes are in pixels; the output is an 8-bit RGB PNG, byte-identical for the same input.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

# The classic public-domain 5x7 LCD font, ASCII 32..126: 5 column bytes per glyph, bit 0 = top row.
_FONT_HEX = (
    "000000000000005f00000007000700147f147f14242a7f2a12231308646236495522500005030000001c224100"
    "0041221c0014083e081408083e080800503000000808080808006060000020100804023e5149453e00427f4000"
    "42615149462141454b311814127f1027454545393c4a49493001710905033649494936064949291e0036360000"
    "00563600000814224100141414141400412214080201510906324979413e7e1111117e7f494949363e41414122"
    "7f4141221c7f494949417f090909013e4149497a7f0808087f00417f41002040413f017f081422417f40404040"
    "7f020c027f7f0408107f3e4141413e7f090909063e4151215e7f09192946464949493101017f01013f4040403f"
    "1f2040201f3f4038403f631408146307087008076151494543007f41410002040810200041417f000402010204"
    "4040404040000102040020545454787f484444383844444420384444487f3854545418087e0901020c5252523e"
    "7f0804047800447d40002040443d007f1028440000417f40007c041804787c0804047838444444387c14141408"
    "081414187c7c080404084854545420043f4440203c4040207c1c2040201c3c4030403c44281028440c5050503c"
    "4464544c44000836410000007f000000413608001008081008"
)
_GLYPHS = {chr(32 + i): bytes.fromhex(_FONT_HEX[10 * i:10 * i + 10]) for i in range(95)}
# Descenders: g p q y redrawn in 8 rows (bit 7 used) and hung 1 row low, j 2 rows (a 9-row cell).
_GLYPHS.update(zip("gpqy", map(bytes.fromhex, ("0c9292927e", "fe1212120c", "0c121212fe", "0e9090907e"))))
_DROP = {"g": 1, "p": 1, "q": 1, "y": 1, "j": 2}  # rows below the others
_SUBSTITUTES = {"≥": ">=", "≤": "<=", "×": "x", "–": "-", "—": "-", "µ": "u", "±": "+-", "→": "->"}

# Well-separated series colors (RGB 0..255), in the order series are given; dashed series share it.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
           (148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207)]
_WHITE, _BLACK, _AXIS, _GRID, _FRAME = (255,) * 3, (0,) * 3, (60,) * 3, (225,) * 3, (150,) * 3
_DASH = (9, 6)  # dashed lines: on, off (px along the line's major axis)
_MARKER_MAX_POINTS = 60  # series with more points than this get markers only where isolated


class _Canvas:
    """An RGB raster (row-major, 3 bytes a pixel) plus an `ink` mask of where data was drawn."""

    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.px = bytearray(b"\xff" * (width * height * 3))
        self.ink = bytearray(width * height)  # 1 where a data series painted (legend placement)
        self.clip: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 (exclusive) for data

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        """Fill [x0, x1) x [y0, y1), clipped to the canvas (and to `clip` while it is set)."""
        cx0, cy0, cx1, cy1 = self.clip or (0, 0, self.w, self.h)
        x0, y0, x1, y1 = max(x0, cx0, 0), max(y0, cy0, 0), min(x1, cx1, self.w), min(y1, cy1, self.h)
        if x0 >= x1 or y0 >= y1:
            return
        run = bytes(color) * (x1 - x0)
        for y in range(y0, y1):
            i = y * self.w + x0
            self.px[3 * i:3 * (i + x1 - x0)] = run
            if self.clip is not None:
                self.ink[i:i + x1 - x0] = b"\x01" * (x1 - x0)

    def line(self, x0: int, y0: int, x1: int, y1: int, color, dash=None, phase: int = 0) -> int:
        """Bresenham line 2 px thick; `dash` = (on, off) px; returns the dash phase to carry on."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            if dash is None or phase % (dash[0] + dash[1]) < dash[0]:
                self.rect(x0, y0, x0 + 2, y0 + 2, color)
            phase += 1
            if x0 == x1 and y0 == y1:
                return phase
            e2 = 2 * err
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def text(self, x: int, y: int, s: str, color, scale: int = 1) -> None:
        """Draw `s` with its top-left corner at (x, y); each font pixel is scale x scale px
        (7 rows tall, 9 with descenders)."""
        for ch in s:
            drop = _DROP.get(ch, 0)
            for col, bits in enumerate(_GLYPHS.get(ch, _GLYPHS["?"])):
                for row in range(8):
                    if bits >> row & 1:
                        px, py = x + col * scale, y + (row + drop) * scale
                        self.rect(px, py, px + scale, py + scale, color)
            x += 6 * scale

    def png(self) -> bytes:
        """The canvas as an 8-bit RGB PNG (filter type 0 on every row)."""
        stride = self.w * 3
        raw = b"".join(b"\x00" + self.px[y * stride:(y + 1) * stride] for y in range(self.h))

        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)  # 8 bit, RGB, no interlace
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _ascii(s: str) -> str:
    """`s` in the font's character set: a few symbols spelled out, anything else as '?'."""
    s = "".join(_SUBSTITUTES.get(ch, ch) for ch in str(s))
    return "".join(ch if ch in _GLYPHS else "?" for ch in s)


def _fit(s: str, max_px: int, scale: int) -> str:
    """`s` cut (ending in '..') so it is at most `max_px` wide at `scale`."""
    room = max(1, (max_px + scale) // (6 * scale))
    return s if len(s) <= room else s[:max(0, room - 2)] + ".."


def _width(s: str, scale: int) -> int:
    """Width in px of `s` drawn at `scale`."""
    return max(0, len(s) * 6 * scale - scale)


def _nice_ticks(lo: float, hi: float, count: int = 6) -> tuple[list[float], float]:
    """About `count` round values (steps of 1, 2, 2.5 or 5 x 10^k) covering [lo, hi], and the step."""
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if raw <= m * mag * 1.000001)
    k, ticks = math.ceil(lo / step - 1e-9), []
    while k * step <= hi + step * 1e-9:
        ticks.append(k * step)
        k += 1
    return ticks, step


def _fmt(v: float, step: float | None = None) -> str:
    """A tick label: with `step`, as many decimals as the step needs; else a short general form."""
    if step is not None and 1e-4 <= step and abs(v) < 1e7:
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        decimals += round(step * 10 ** decimals, 6) % 1 != 0  # a step of 2.5 x 10^k
        return f"{v:.{decimals}f}" if v else "0"
    if v == int(v) and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.4g}"


def _validate(series, log_x: bool, y_range, width: int, height: int) -> None:
    """Raise ValueError naming the first bad value."""
    if not series:
        raise ValueError(f"series={series!r}: line_chart needs at least one series")
    if width < 200 or height < 150:
        raise ValueError(f"width={width}, height={height}: the chart needs at least 200 x 150 px")
    if y_range is not None and not (all(map(math.isfinite, y_range)) and y_range[0] < y_range[1]):
        raise ValueError(f"y_range={y_range!r}: needs finite (low, high) with low < high")
    for label, points, style in series:
        if style not in ("solid", "dashed"):
            raise ValueError(f"series {label!r}: style={style!r}, expected 'solid' or 'dashed'")
        for i, (x, y) in enumerate(points):
            if not math.isfinite(x) or (y is not None and not math.isfinite(y)):
                raise ValueError(f"series {label!r} point {i}: non-finite coordinate x={x!r}, y={y!r}")
            if log_x and x <= 0:
                raise ValueError(f"series {label!r} point {i}: x={x!r} is not positive, log_x needs x > 0")


def _axes(series, log_x: bool, y_range):
    """(x_lo, x_hi, x_ticks, y_lo, y_hi, y_ticks): axis ranges (x in log10 units with log_x)
    and ticks as (position, label) pairs."""
    xs = sorted({x for _, points, _ in series for x, _ in points})
    ys = [y for _, points, _ in series for _, y in points if y is not None]
    tx = [math.log10(x) for x in xs] if log_x else xs
    x_lo, x_hi = (tx[0], tx[-1]) if tx else (0.0, 1.0)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    pad = (x_hi - x_lo) * 0.04  # keep end points and their labels off the frame
    x_lo, x_hi = x_lo - pad, x_hi + pad
    if 0 < len(xs) <= 10:
        x_ticks = [(t, _fmt(x)) for t, x in zip(tx, xs)]
    elif log_x:
        decades = range(math.floor(x_lo), math.ceil(x_hi) + 1)
        mults = (1,) if len(decades) > 3 else (1, 2, 5)
        x_ticks = [(math.log10(m * 10.0 ** d), _fmt(m * 10.0 ** d)) for d in decades for m in mults
                   if x_lo <= math.log10(m * 10.0 ** d) <= x_hi]
    else:
        ticks, step = _nice_ticks(x_lo, x_hi)
        x_ticks = [(t, _fmt(t, step)) for t in ticks]
    if y_range is not None:
        y_lo, y_hi = float(y_range[0]), float(y_range[1])
    else:
        y_lo, y_hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
        if y_hi == y_lo:  # one value: a band of +-10 % (or +-1) around it
            y_lo, y_hi = y_lo - (abs(y_lo) * 0.1 or 1), y_hi + (abs(y_hi) * 0.1 or 1)
        _, step = _nice_ticks(y_lo, y_hi)
        y_lo, y_hi = math.floor(y_lo / step + 1e-9) * step, math.ceil(y_hi / step - 1e-9) * step
    ticks, step = _nice_ticks(y_lo, y_hi)
    return x_lo, x_hi, x_ticks, y_lo, y_hi, [(t, _fmt(t, step)) for t in ticks]


def _draw_frame(cv: _Canvas, box, axes, labels, scale: int) -> None:
    """Grid, axes, ticks, tick labels, title and axis labels around the plot box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    x_lo, x_hi, x_ticks, y_lo, y_hi, y_ticks = axes
    title, x_label, y_label = labels
    for t, text in y_ticks:
        y = round(y1 - (t - y_lo) / (y_hi - y_lo) * (y1 - y0))
        if t != y_lo:
            cv.rect(x0 + 1, y, x1, y + 1, _GRID)
        cv.rect(x0 - 6, y, x0, y + 1, _AXIS)
        cv.text(x0 - 10 - _width(text, scale), y - 7 * scale // 2, text, _BLACK, scale)
    last_right = -1  # right edge of the last x tick label drawn: skip one that would overlap it
    for t, text in x_ticks:
        x = round(x0 + (t - x_lo) / (x_hi - x_lo) * (x1 - x0))
        cv.rect(x, y1, x + 1, y1 + 6, _AXIS)
        left = min(max(x - _width(text, scale) // 2, 0), cv.w - _width(text, scale))
        if left > last_right + 2 * scale:
            cv.text(left, y1 + 10, text, _BLACK, scale)
            last_right = left + _width(text, scale)
    cv.rect(x0, y0, x0 + 1, y1 + 1, _AXIS)
    cv.rect(x0, y1, x1, y1 + 1, _AXIS)
    for text, s, x, y in ((title, scale + 1, None, 10), (x_label, scale, None, y1 + 22 + 7 * scale),
                          (y_label, scale, 8, y0 - 16 - 7 * scale)):
        text = _fit(text, cv.w - 16, s)
        left = (x0 + x1 - _width(text, s)) // 2 if x is None else x
        cv.text(max(8, min(left, cv.w - 8 - _width(text, s))), y, text, _BLACK, s)


def _draw_series(cv: _Canvas, box, axes, series, log_x: bool) -> None:
    """Each series' lines (broken at None y) and markers, clipped to the plot box."""
    x0, y0, x1, y1 = box
    x_lo, x_hi, _, y_lo, y_hi, _ = axes
    cv.clip = (x0 + 1, y0, x1, y1)
    for n, (_, points, style) in enumerate(series):
        color, dash = PALETTE[n % len(PALETTE)], (_DASH if style == "dashed" else None)
        runs, run = [], []  # runs of consecutive points with a y, in pixels
        for x, y in points:
            if y is None:
                if run:
                    runs.append(run)
                run = []
                continue
            t = math.log10(x) if log_x else x
            run.append((round(x0 + (t - x_lo) / (x_hi - x_lo) * (x1 - x0)),
                        round(y1 - (y - y_lo) / (y_hi - y_lo) * (y1 - y0))))
        if run:
            runs.append(run)
        for run in runs:
            phase = 0
            for (ax, ay), (bx, by) in zip(run, run[1:]):
                phase = cv.line(ax, ay, bx, by, color, dash, phase)
            if len(points) <= _MARKER_MAX_POINTS or len(run) == 1:
                for px, py in run:
                    cv.rect(px - 3, py - 3, px + 5, py + 5, color)
    cv.clip = None


def _draw_legend(cv: _Canvas, box, series, scale: int) -> None:
    """A legend box (swatch + label a row) in the corner of the plot box with the least data."""
    x0, y0, x1, y1 = box
    labels = [_fit(_ascii(label), x1 - x0 - 70, scale) for label, _, _ in series]
    row_h, swatch = 7 * scale + 8, 28  # px
    w, h = 36 + swatch + max(_width(s, scale) for s in labels), len(labels) * row_h + 10
    spots = [(x1 - w - 8, y0 + 8), (x0 + 10, y0 + 8), (x1 - w - 8, y1 - h - 8), (x0 + 10, y1 - h - 8)]

    def covered(spot):
        lx, ly = spot
        return sum(cv.ink[y * cv.w + max(lx, 0):y * cv.w + max(lx + w, 0)].count(1)
                   for y in range(max(ly, 0), min(ly + h, cv.h)))

    lx, ly = min(spots, key=covered)  # ties keep the first: top-right
    cv.rect(lx, ly, lx + w, ly + h, _FRAME)
    cv.rect(lx + 1, ly + 1, lx + w - 1, ly + h - 1, _WHITE)
    for n, (text, (_, _, style)) in enumerate(zip(labels, series)):
        color, cy = PALETTE[n % len(PALETTE)], ly + 5 + n * row_h + row_h // 2
        cv.line(lx + 10, cy - 1, lx + 10 + swatch, cy - 1, color, _DASH if style == "dashed" else None)
        cv.text(lx + 20 + swatch, cy - 7 * scale // 2, text, _BLACK, scale)


def line_chart(path, series, *, title: str, x_label: str, y_label: str, log_x: bool = False,
               y_range: tuple[float, float] | None = None, width: int = 800, height: int = 500) -> None:
    """Write a line chart PNG of `width` x `height` px to `path`.

    `series`: a list of (label, points, style): points are (x, y) pairs drawn in order, a y of None
    is a gap (the line breaks there); style is "solid" or "dashed". Colors follow PALETTE in
    series order. `log_x` puts x on a log10 scale (every x must be > 0); `y_range` fixes the y
    axis to (low, high) instead of a rounded data range, clipping points outside it. Raises
    ValueError, naming the value, for no series, a non-finite coordinate, x <= 0 with log_x, a
    bad style or y_range, or a canvas under 200 x 150 px.
    """
    _validate(series, log_x, y_range, width, height)
    scale = 2 if min(width, height) >= 400 else 1  # font px per glyph px; the title gets one more
    axes = _axes(series, log_x, y_range)
    y_tick_w = max(_width(text, scale) for _, text in axes[5])
    box = (16 + y_tick_w + 10, 36 + 7 * (2 * scale + 1),  # plot area x0, y0, x1, y1 in px
           width - 24, height - 34 - 14 * scale)
    cv = _Canvas(width, height)
    labels = (_ascii(title), _ascii(x_label), _ascii(y_label))
    _draw_frame(cv, box, axes, labels, scale)
    _draw_series(cv, box, axes, series, log_x)
    _draw_legend(cv, box, series, scale)
    Path(path).write_bytes(cv.png())
