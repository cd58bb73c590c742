"""Reading images and masks, with errors that say which file is wrong and what to do.

Conventions (documented in the README):

* Images are read as RGB; grayscale ultrasound is replicated to three channels, which is what
  CLIP's image encoder expects.
* A mask pixel is lesion when its largest channel is > 127 (> 0 for masks stored as 0/1). This
  reads BUSI's 0/255 masks, BUS-BRA's, and BUS-UCLM's colour-coded RGB masks (green = benign,
  red = malignant, black = background) alike.
* Several mask files for one image are united (BUSI stores one file per lesion).
* A mask whose size differs from its image is an error here; converters resolve the known cases
  of a release explicitly (see ``converters.bus_uclm``) so nothing is silently stretched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from usad_bench.errors import UsadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def require_image(path: Path) -> Path:
    """``path`` as a Path, or a UsadError saying what to do when the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise UsadError(f"image not found: {path}; fix the path in the manifest or re-run `usad-bench data prepare`")
    return path


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image file, raising UsadError when it is missing or corrupt."""
    path = require_image(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here and not deep inside a DataLoader
            return im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UsadError(
            f"cannot read image {path} ({exc}); replace the file, or remove it (and its manifest row, if any)"
        ) from exc


def load_rgb(path: Path) -> Image.Image:
    return open_image(path).convert("RGB")


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) without decoding the pixels."""
    try:
        with Image.open(require_image(path)) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise UsadError(f"cannot read image {path} ({exc}); replace the file or remove its row") from exc


def binarise_mask(mask: Image.Image) -> np.ndarray:
    """Boolean lesion mask (H, W) from any mask image mode."""
    arr = np.asarray(mask.convert("RGB") if mask.mode not in ("L", "1", "RGB") else mask)
    if arr.dtype == bool:
        return arr.copy()
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    threshold = 0 if arr.max(initial=0) <= 1 else 127
    return arr > threshold


def load_mask(mask_paths: Sequence[Path], size: tuple[int, int], image_path: Path | None = None) -> np.ndarray:
    """Union of the mask files as a boolean (H, W) array; all-False when there are none.

    Args:
        mask_paths: the sample's mask files.
        size: the image's (width, height); every mask must have it.
        image_path: named in the error message when sizes differ.
    """
    width, height = size
    union = np.zeros((height, width), dtype=bool)
    for path in mask_paths:
        mask = open_image(path)
        if mask.size != (width, height):
            raise UsadError(
                f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image {image_path or ''} is {width}x{height}; "
                "resize the mask to the image (nearest neighbour) or re-run `usad-bench data prepare`"
            )
        union |= binarise_mask(mask)
    return union


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
