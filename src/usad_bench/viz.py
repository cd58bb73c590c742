"""Heat-map overlays: the anomaly map in colour over the grayscale ultrasound image.

Colours are fixed by a value range fitted on the support set (``support.json: map_range``), not
per image: a per-image min-max stretch would paint every normal image as if it held a lesion.
"""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Anchor colours of a perceptually ordered map (dark blue -> cyan -> yellow -> red).
_ANCHORS = np.array(
    [[0.0, 0.0, 0.3], [0.0, 0.3, 1.0], [0.0, 0.9, 0.9], [1.0, 1.0, 0.0], [1.0, 0.5, 0.0], [0.8, 0.0, 0.0]]
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (H, W) -> RGB uint8 (H, W, 3)."""
    v = np.clip(values, 0.0, 1.0) * (len(_ANCHORS) - 1)
    low = np.floor(v).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (v - low)[..., None]
    rgb = _ANCHORS[low] * (1.0 - frac) + _ANCHORS[low + 1] * frac
    return (rgb * 255).astype(np.uint8)


def overlay(
    image: Image.Image,
    anomaly_map: np.ndarray,
    value_range: tuple[float, float] | None = None,
    alpha: float = 0.45,
    mask: np.ndarray | None = None,
) -> Image.Image:
    """Blend the map (resized to the image) over the image; draw the mask outline in white if given."""
    lo, hi = value_range or (float(anomaly_map.min()), float(anomaly_map.max()))
    scaled = (anomaly_map - lo) / max(hi - lo, 1e-8)
    base = image.convert("RGB")
    heat = Image.fromarray(colormap(scaled)).resize(base.size, Image.BILINEAR)
    # Stronger colour where the map is high, so normal tissue stays readable.
    weight = Image.fromarray((np.clip(scaled, 0, 1) * 255 * alpha).astype(np.uint8)).resize(base.size, Image.BILINEAR)
    blended = Image.composite(heat, base, weight)
    if mask is not None:
        edge = _outline(np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(base.size, Image.NEAREST)) > 0)
        arr = np.asarray(blended).copy()
        arr[edge] = 255
        blended = Image.fromarray(arr)
    return blended


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def side_by_side(panels: list[Image.Image], height: int = 256, caption: str | None = None) -> Image.Image:
    """Panels scaled to one height and placed left to right (qualitative figures); ``caption`` burnt in below."""
    scaled = [p.resize((max(1, round(p.width * height / p.height)), height)) for p in panels]
    canvas = Image.new("RGB", (sum(p.width for p in scaled) + 4 * (len(scaled) - 1), height), "black")
    x = 0
    for p in scaled:
        canvas.paste(p, (x, 0))
        x += p.width + 4
    return label_image(canvas, caption)


def label_image(image: Image.Image, text: str | None) -> Image.Image:
    """``image`` with ``text`` burnt into a black band below it (kept when the PNG is copied anywhere).

    Used for the random/synthetic-weights warning: the band is added, not painted over the scan,
    so no pixel of the overlay is hidden. ``text=None`` returns the image unchanged.
    """
    if not text:
        return image
    base = image.convert("RGB")
    size = max(10, min(16, base.width // 16))  # readable on a 128 px thumbnail and on a 1000 px scan
    font = ImageFont.load_default(size=size)
    chars_per_line = max(8, int(base.width / (0.6 * size)))
    lines = textwrap.wrap(text, width=chars_per_line)
    band = (len(lines) * (size + 3)) + 6
    canvas = Image.new("RGB", (base.width, base.height + band), "black")
    canvas.paste(base, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((3, base.height + 3 + i * (size + 3)), line, fill=(255, 220, 0), font=font)
    return canvas
