"""Checks that a plot the code wrote is a real picture with its curves in it (tests/ helpers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_plot(path: Path) -> np.ndarray:
    """The RGB pixels of a PNG the plotting code wrote, checked to be a real, non-blank picture."""
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= 480 and im.height >= 360, im.size  # a figure, not a thumbnail
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.std() > 10  # not one flat colour
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50  # axes, text, antialiased lines
    return rgb


def line_pixels(rgb: np.ndarray, min_pixels: int = 20) -> list[np.ndarray]:
    """The pixels of each distinct line colour in a plot, as (x, y) fractions of the image size
    (y downwards), largest first.

    Colours are told apart by hue: antialiasing blends a line with the white background, which
    lowers its saturation but keeps its hue; axes, grid and text are grey and have none.
    """
    rgb = rgb.astype(np.float64)
    height, width, _ = rgb.shape
    hi, lo = rgb.max(axis=2), rgb.min(axis=2)
    coloured = hi - lo > 60
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    span = np.where(hi > lo, hi - lo, 1.0)
    hue = 60.0 * np.select([hi == r, hi == g], [((g - b) / span) % 6, (b - r) / span + 2],
                           (r - g) / span + 4)
    ys, xs = np.nonzero(coloured)
    bins = (hue[coloured] // 10).astype(int) % 36  # 10-degree hue bins
    full = np.bincount(bins, minlength=36) >= min_pixels
    if not full.any():
        return []
    assert not full.all(), "every hue is present: not a line plot"
    # Runs of adjacent populated bins (wrapping at 360 degrees) are one colour each.
    groups: list[list[int]] = []
    start = int(np.argmin(full))  # an empty bin, so no run is split at the wrap
    for k in (i % 36 for i in range(start, start + 36)):
        if full[k]:
            if not groups or groups[-1][-1] != (k - 1) % 36:
                groups.append([])
            groups[-1].append(k)
    lines = [np.stack([xs[sel] / width, ys[sel] / height], axis=1)
             for sel in (np.isin(bins, grp) for grp in groups)]
    return sorted(lines, key=len, reverse=True)
