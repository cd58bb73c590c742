"""Reading images and masks, with errors that say which file is wrong and what to do.

This module is the one place where image files are decoded (prepare, fit, eval and predict all
come through it). Conventions (documented in docs/data.md, "Bring your own data"):

* **Images** become 8-bit RGB in [0, 255] whatever their mode: 8-bit grayscale is replicated to
  three channels (what CLIP's image encoder expects); 1-bit becomes 0 / 255; palette images take
  their palette's colours; an alpha channel is composited over black (the ultrasound background).
  16-bit (and 32-bit integer / float) grayscale is scaled by its bit depth: the smallest of 8, 10,
  12, 14 or 16 bits that holds the image's maximum, so 12-bit scanner data stored in 16 bits is
  not left nearly black, an 8-bit picture saved as 16 bits decodes to the same pixels, and images
  of one acquisition keep their brightness relative to each other (a per-image min-max stretch
  would not).
* **Masks**: a pixel is lesion when it differs from the background (default 0 / black), so 0/255,
  0/1, label-index ({0, 1, 2, ...}) and colour-coded masks with low codes all read correctly.
  A :class:`MaskRule` can name another background value or colour, or keep only some codes.
  JPEG masks are lossy: there a pixel must differ from the background by more than
  ``JPEG_MASK_TOLERANCE`` (compression ringing around edges is not lesion).
* Several mask files for one image are united (BUSI stores one file per lesion).
* A mask whose size differs from its image is an error here; converters resolve the known cases
  of a release explicitly (see ``converters.bus_uclm``) so nothing is silently stretched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from usad_bench.errors import UsadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LOSSY_SUFFIXES = (".jpg", ".jpeg")
# JPEG ringing around a 0/255 edge stays well below this; the lowest colour codes seen in releases are 64.
JPEG_MASK_TOLERANCE = 32
# Bit depths tried, smallest first, when scaling high-bit-depth grayscale to 8 bits.
BIT_DEPTHS = (8, 10, 12, 14, 16)
# File-name endings that mark a mask of the image "<stem>" ("<stem>_mask.png", "<stem>_mask_1.png",
# "<stem>_tumor.png"...), matched case-insensitively. LESION_MASK_SUFFIXES are united into the lesion
# ground truth by default; AUXILIARY_SUFFIXES are other annotations of an image (e.g. "_other":
# structures that are not the lesion), never images and never lesion unless asked for.
LESION_MASK_SUFFIXES = ("_mask", "_masks", "_seg", "_segmentation", "_tumor", "_tumour", "_lesion", "_gt", "_label")
AUXILIARY_SUFFIXES = ("_other", "_annotation", "_roi", "_contour")
# Folder names (any case) that hold masks in a tree parallel to the images, never images.
MASK_FOLDERS = ("masks", "mask", "gt", "ground_truth", "groundtruth", "annotations", "segmentations")


def require_image(path: Path) -> Path:
    """``path`` as a Path, or a UsadError saying what to do when the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise UsadError(f"image not found: {path}; fix the path in the manifest or re-run `usad-bench data prepare`")
    return path


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image file (any mode, as stored), raising UsadError when missing or corrupt."""
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
    """The image as 8-bit RGB in [0, 255] (see the module docstring for each mode)."""
    return to_rgb8(open_image(path))


def to_rgb8(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: high bit depths scaled by their bit depth, alpha over black."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(scale_to_uint8(np.asarray(im))).convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        rgb = rgba[..., :3] * (rgba[..., 3:] / 255.0)  # composite over black, the ultrasound background
        return Image.fromarray(np.rint(rgb).astype(np.uint8), mode="RGB")
    return im.convert("RGB")  # L, 1 (-> 0 / 255), RGB, CMYK, YCbCr ...


def scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """(H, W) integer or float grayscale -> uint8, divided by the smallest bit depth that holds its maximum."""
    is_float = np.asarray(values).dtype.kind == "f"
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0).clip(min=0)
    top = float(values.max(initial=0))
    if is_float and top <= 1.0:
        full = 1.0  # float images in [0, 1]
    else:
        depth = next((b for b in BIT_DEPTHS if top <= 2**b - 1), None)
        full = float(2**depth - 1) if depth is not None else top  # beyond 16 bits: the image's own maximum
    return np.rint(values * (255.0 / max(full, 1e-12))).clip(0, 255).astype(np.uint8)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) without decoding the pixels."""
    try:
        with Image.open(require_image(path)) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise UsadError(f"cannot read image {path} ({exc}); replace the file or remove its row") from exc


# ----------------------------------------------------------------------------- masks
Code = tuple[int, ...]  # a gray value / label index (1 element) or an RGB colour (3 elements)


@dataclass(frozen=True)
class MaskRule:
    """Which mask pixels are lesion: those unlike ``background``, or only those equal to one of ``keep``."""

    background: Code = (0,)
    keep: tuple[Code, ...] = ()

    @property
    def is_default(self) -> bool:
        return self == MaskRule()

    @classmethod
    def parse(cls, background: str | None = None, keep: str | None = None) -> MaskRule:
        """From command-line text: ``"0"``, ``"255"``, ``"0:0:0"`` and ``"1,2"`` or ``"255:0:0,0:255:0"``."""
        bg = parse_code(background) if background else (0,)
        codes = tuple(parse_code(c) for c in keep.split(",") if c.strip()) if keep else ()
        return cls(bg, codes)


def parse_code(text: str) -> Code:
    """``"64"`` -> (64,), ``"64:0:0"`` -> (64, 0, 0)."""
    try:
        code = tuple(int(v) for v in text.strip().split(":"))
    except ValueError:
        code = ()
    if len(code) not in (1, 3) or min(code) < 0:
        raise UsadError(f"bad mask code {text!r}: give a value (e.g. 0, 255, 2) or a colour R:G:B (e.g. 64:0:0)")
    return code


def binarise_mask(mask: Image.Image, rule: MaskRule | None = None, lossy: bool = False) -> np.ndarray:
    """Boolean lesion mask (H, W) from any mask mode; ``lossy`` for JPEG files (see module docstring)."""
    rule = rule or MaskRule()
    tolerance = JPEG_MASK_TOLERANCE if lossy else 0
    if mask.mode in ("P", "PA"):
        mask = mask.convert("RGBA")  # users see (and name) the palette's colours, not its indices
    transparent = None
    if mask.mode in ("RGBA", "LA", "La", "RGBa"):
        transparent = np.asarray(mask.getchannel("A")) == 0
        mask = mask.convert("RGB" if mask.mode.startswith("RGB") else "L")
    arr = np.asarray(mask.convert("L") if mask.mode == "1" else mask).astype(np.int64)
    if mask.mode == "1":
        arr = (arr > 0).astype(np.int64)
    arr = arr[..., None] if arr.ndim == 2 else arr  # (H, W, C), C = 1 or 3
    if rule.keep:
        lesion = np.zeros(arr.shape[:2], dtype=bool)
        for code in rule.keep:
            lesion |= _matches(arr, code, tolerance)
    else:
        lesion = ~_matches(arr, rule.background, tolerance)
    if transparent is not None:
        lesion &= ~transparent
    return lesion


def _matches(arr: np.ndarray, code: Code, tolerance: int) -> np.ndarray:
    """(H, W) pixels of ``arr`` (H, W, C) equal to ``code`` within ``tolerance``; gray vs colour compare as R=G=B."""
    channels = arr.shape[2]
    if len(code) != channels:
        if channels == 1:  # a colour code against a grayscale mask: only a gray colour can match
            arr = np.repeat(arr, 3, axis=2)
        else:
            code = code * 3
    return (np.abs(arr - np.asarray(code, dtype=np.int64)) <= tolerance).all(axis=2)


def read_mask(path: Path, rule: MaskRule | None = None) -> np.ndarray:
    """One mask file as a boolean (H, W) lesion array."""
    return binarise_mask(open_image(path), rule, lossy=Path(path).suffix.lower() in LOSSY_SUFFIXES)


def load_mask(mask_paths: Sequence[Path], size: tuple[int, int], image_path: Path | None = None) -> np.ndarray:
    """Union of the mask files as a boolean (H, W) array; all-False when there are none.

    Args:
        mask_paths: the sample's mask files (read with the default rule: converters write binary
            masks whenever the user chose another one).
        size: the image's (width, height); every mask must have it.
        image_path: named in the error message when sizes differ.
    """
    width, height = size
    union = np.zeros((height, width), dtype=bool)
    for path in mask_paths:
        mask = read_mask(path)
        if mask.shape != (height, width):
            raise UsadError(
                f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path or ''} is "
                f"{width}x{height}; resize the mask to the image (nearest neighbour) or re-run `data prepare`"
            )
        union |= mask
    return union


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (suffixes in any case), sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def mask_owner(stem: str, suffixes: Iterable[str]) -> str | None:
    """The image stem a mask file's stem names (``"a_mask_1"`` -> ``"a"``), or None when it is no mask name."""
    alternatives = "|".join(re.escape(s) for s in sorted(suffixes, key=len, reverse=True))
    if not alternatives:
        return None
    match = re.match(rf"^(?P<stem>.+?)(?:{alternatives})(?:[_ -]?\d+)?$", stem, flags=re.IGNORECASE)
    return match["stem"] if match else None


def masks_among(paths: Sequence[Path], root: Path) -> list[Path]:
    """The files of ``paths`` that are another listed image's mask (never to be scored as images).

    A file is a mask when its name is ``<stem><mask suffix>[_i]`` and ``<stem>`` is an image in the
    same folder, or when it lies under a mask folder (``masks/``, ``gt/`` ...) below ``root`` and an
    image outside such folders has its stem.
    """
    suffixes = (*LESION_MASK_SUFFIXES, *AUXILIARY_SUFFIXES)
    in_mask_tree = {p for p in paths if any(part.lower() in MASK_FOLDERS for part in _parts(p, root))}
    images = [p for p in paths if p not in in_mask_tree and mask_owner(p.stem, suffixes) is None]
    beside = {(p.parent, p.stem) for p in images}
    stems = {p.stem for p in images}
    masks = []
    for p in paths:
        owner = mask_owner(p.stem, suffixes)
        if (owner is not None and (p.parent, owner) in beside) or (p in in_mask_tree and (owner or p.stem) in stems):
            masks.append(p)
    return masks


def _parts(path: Path, root: Path) -> tuple[str, ...]:
    """Folder names between ``root`` and the file."""
    try:
        return Path(path).parent.relative_to(root).parts
    except ValueError:
        return ()
