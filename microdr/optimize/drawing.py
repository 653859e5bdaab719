"""Text and line charts drawn with Pillow, for the pictures of a run (``loss.png``, the sheets,
the progress animation).

Pictures are numpy ``(H, W, 3)`` uint8 RGB, row 0 at the top, as in :mod:`microdr.io.images`. Text
uses Pillow's built-in font (no file is read, nothing is downloaded): a small vector font where
Pillow has FreeType, else its bitmap font.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: Height of the text, in pixels (the bitmap font, without FreeType, has its own: about 11).
TEXT_SIZE = 13
#: Colors of the series of a chart, in order (those of matplotlib's and Vega's "category10").
SERIES_COLORS = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip
TEXT_COLOR = (0, 0, 0)
GRID_COLOR = (225, 225, 225)
#: The size of the plot area of one chart panel, in pixels.
PLOT_SIZE = (360, 240)
#: Margins of a panel around its plot area: left (tick labels), top (title), right, bottom
#: (tick labels and the x-axis label).
MARGINS = (70, 26, 16, 44)
#: A log scale is used when the positive values span more than this ratio (a decade).
LOG_SPAN = 10.0


@functools.cache
def font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font, :data:`TEXT_SIZE` pixels high where FreeType is available."""
    return ImageFont.load_default(size=TEXT_SIZE)


@functools.cache
def text_size(text: str) -> tuple[int, int]:
    """Width and height in pixels of one line of ``text``, as :func:`draw_text` draws it: the
    height is the font's (top of the line to the lowest descender), whatever the letters."""
    return font().getbbox(text)[2], font().getbbox("Ag")[3]


def draw_text(
    image: Image.Image, xy: tuple[float, float], text: str, fill=TEXT_COLOR, anchor="la"
) -> None:
    """One line of ``text`` on ``image`` at ``xy``; ``anchor`` as Pillow's, of ``l``/``m``/``r``
    (left, middle, right) and ``a``/``m`` (top, middle): ``"la"`` has ``xy`` at the top left."""
    mask = _rendered(text)
    width, height = mask.size
    x = xy[0] - {"l": 0, "m": width / 2, "r": width}[anchor[0]]
    y = xy[1] - {"a": 0, "m": height / 2}[anchor[1]]
    image.paste(fill, (round(x), round(y)), mask)


@functools.cache
def _rendered(text: str) -> Image.Image:
    """``text`` as a mask (mode ``"L"``, 255 on the glyphs), from the top left of its line:
    kept, as a run's pictures repeat their labels many times (drawing text is slow)."""
    mask = Image.new("L", text_size(text), 0)
    ImageDraw.Draw(mask).text((0, 0), text, fill=255, font=font())
    return mask


@dataclass(frozen=True)
class Series:
    """One curve: ``y[i]`` at ``x[i]``; ``None`` and non-finite values (and non-positive ones on
    a log scale) leave a gap."""

    label: str
    x: Sequence[float]
    y: Sequence[float | None]


@dataclass(frozen=True)
class Panel:
    """One chart: its title, the x-axis label, and its curves (colored by their index in
    :data:`SERIES_COLORS`); a legend is drawn when there is more than one curve. The y scale is
    logarithmic when the positive values span more than :data:`LOG_SPAN`."""

    title: str
    xlabel: str
    series: Sequence[Series]


def line_charts(panels: Sequence[Panel]) -> np.ndarray:
    """The panels side by side on white, ``(H, W, 3)`` uint8."""
    legend_rows = max((_legend_rows(panel) for panel in panels), default=0)
    line = text_size("")[1] + 6
    width = MARGINS[0] + PLOT_SIZE[0] + MARGINS[2]
    height = MARGINS[1] + PLOT_SIZE[1] + MARGINS[3] + legend_rows * line
    image = Image.new("RGB", (width * max(len(panels), 1), height), "white")
    draw = ImageDraw.Draw(image)
    for index, panel in enumerate(panels):
        _draw_panel(image, draw, panel, index * width)
    return np.asarray(image)


def nice_ticks(low: float, high: float, log: bool) -> list[float]:
    """Tick values that cover ``[low, high]`` (the first at or below ``low``, the last at or above
    ``high``): on a log scale the powers of ten (with 2 and 5 times them when the values span
    less than two decades), else multiples of 1, 2 or 5 times a power of ten, 4 to 10 of them."""
    if log:
        first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
        decades = [10.0**k for k in range(first, max(last, first + 1) + 1)]
        if math.log10(high / low) >= 2:
            return decades
        # Rounded so that 2 * 0.01 is shown as 0.02.
        ticks = [float(f"{d * m:.12g}") for d in decades[:-1] for m in (1, 2, 5)] + decades[-1:]
        start = max(i for i, t in enumerate(ticks) if t <= low)
        stop = min(i for i, t in enumerate(ticks) if t >= high)
        return ticks[start : stop + 1]
    if high <= low:  # one value: a range around it
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / 5
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start, stop = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    # Rounded so that 0.1 * 3 is shown as 0.3.
    return [round(k * step, 12) for k in range(start, stop + 1)]


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _legend_rows(panel: Panel) -> int:
    return len(panel.series) if len(panel.series) > 1 else 0


def _draw_panel(image: Image.Image, draw: ImageDraw.ImageDraw, panel: Panel, left: int) -> None:
    x0, y0 = left + MARGINS[0], MARGINS[1]
    x1, y1 = x0 + PLOT_SIZE[0], y0 + PLOT_SIZE[1]
    xs = _finite([x for series in panel.series for x in series.x])
    ys = _finite([y for series in panel.series for y in series.y])
    positive = [y for y in ys if y > 0]
    log = bool(positive) and max(positive) / min(positive) > LOG_SPAN
    if log:
        ys = positive
    scale_title = f"{panel.title} (log scale)" if log else panel.title
    draw_text(image, ((x0 + x1) / 2, 6), scale_title, anchor="ma")
    draw_text(image, ((x0 + x1) / 2, y1 + 24), panel.xlabel, anchor="ma")
    if not ys:
        draw.rectangle((x0, y0, x1, y1), outline=TEXT_COLOR)
        draw_text(image, ((x0 + x1) / 2, (y0 + y1) / 2), "no values", anchor="mm")
        return
    # One iteration spans [i, i + 1], not a range around it that would show negative ones.
    x_ticks = nice_ticks(min(xs), max(max(xs), min(xs) + 1), log=False)
    x_ticks = [t for t in x_ticks if t == int(t)] or x_ticks  # iterations are integers
    y_ticks = nice_ticks(min(ys), max(ys), log)

    def to_y(value: float) -> float:
        low, high = y_ticks[0], y_ticks[-1]
        if log:
            value, low, high = math.log10(value), math.log10(low), math.log10(high)
        return y1 - (value - low) / (high - low) * (y1 - y0)

    def to_x(value: float) -> float:
        low, high = x_ticks[0], x_ticks[-1]
        return x0 + (value - low) / ((high - low) or 1) * (x1 - x0)

    for tick in y_ticks:
        y = to_y(tick)
        draw.line((x0, y, x1, y), fill=GRID_COLOR)
        draw.line((x0 - 4, y, x0, y), fill=TEXT_COLOR)
        draw_text(image, (x0 - 6, y), f"{tick:g}", anchor="rm")
    for tick in x_ticks:
        x = to_x(tick)
        draw.line((x, y0, x, y1), fill=GRID_COLOR)
        draw.line((x, y1, x, y1 + 4), fill=TEXT_COLOR)
        draw_text(image, (x, y1 + 6), f"{tick:g}", anchor="ma")
    draw.rectangle((x0, y0, x1, y1), outline=TEXT_COLOR)
    for index, series in enumerate(panel.series):
        color = SERIES_COLORS[index % len(SERIES_COLORS)]
        for run in _runs(series, log):
            points = [(to_x(x), to_y(y)) for x, y in run]
            if len(points) == 1:
                (x, y), = points
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
            else:
                draw.line(points, fill=color, width=2)
    if _legend_rows(panel):
        line = text_size("")[1] + 6
        for index, series in enumerate(panel.series):
            y = y1 + MARGINS[3] + index * line + line / 2
            color = SERIES_COLORS[index % len(SERIES_COLORS)]
            draw.line((x0, y, x0 + 24, y), fill=color, width=3)
            draw_text(image, (x0 + 30, y), series.label, anchor="lm")


def _runs(series: Series, log: bool) -> list[list[tuple[float, float]]]:
    """The unbroken stretches of a curve's drawable points."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in zip(series.x, series.y):
        if y is None or not math.isfinite(y) or (log and y <= 0):
            runs.append([])
        else:
            runs[-1].append((x, y))
    return [run for run in runs if run]


#: The frame around and between the panels of a sheet: mid gray, seen against black and white.
FRAME_COLOR = (150, 150, 150)
#: Pixels of frame around and between panels.
FRAME = 4
#: Small images are enlarged (nearest neighbour, an integer factor) to at least this many pixels
#: on their longer side, so that single pixels can be seen.
PANEL_SIDE = 256


def labeled_grid(
    images: np.ndarray,
    labels: Sequence[str],
    columns: int,
    title: str | None = None,
    side: int = PANEL_SIDE,
) -> np.ndarray:
    """Images ``(N, H, W, 3)`` uint8 in a grid ``columns`` wide, each enlarged by the integer
    factor that makes its longer side at least ``side`` pixels (nearest neighbour: each pixel a
    square), under its label, with a :data:`FRAME_COLOR` frame; ``title`` on a line above.
    Returns ``(H', W', 3)`` uint8."""
    count, height, width, _ = images.shape
    factor = max(1, math.ceil(side / max(height, width)))
    panels = images.repeat(factor, axis=1).repeat(factor, axis=2)
    line = text_size("")[1] + 2 * FRAME
    cell_width = max(width * factor, *(text_size(label)[0] + 2 * FRAME for label in labels))
    cell_height = line + height * factor
    rows = math.ceil(count / columns)
    top = line if title else 0
    canvas = Image.new(
        "RGB",
        (columns * (cell_width + FRAME) + FRAME, top + rows * (cell_height + FRAME) + FRAME),
        FRAME_COLOR,
    )
    if title:
        draw_text(canvas, (FRAME, FRAME + line / 2), title, anchor="lm")
    for index, (panel, label) in enumerate(zip(panels, labels)):
        row, column = divmod(index, columns)
        left = FRAME + column * (cell_width + FRAME)
        upper = top + FRAME + row * (cell_height + FRAME)
        draw_text(canvas, (left + cell_width / 2, upper + line / 2), label, anchor="mm")
        offset = (cell_width - width * factor) // 2
        canvas.paste(Image.fromarray(panel), (left + offset, upper + line))
    return np.asarray(canvas)
