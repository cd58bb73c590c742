"""Converters from public breast-ultrasound releases (and plain class folders) to a manifest.

``prepare(kind, src, out)`` reads a release in its own layout and writes ``out/manifest.csv``. The
manifest points into the release; only BUS-UCLM's colour-coded masks are re-written (as binary PNGs
under ``out/masks/``), because the loaders read binary masks at the image's size. How each release
is read, and why, is in ``docs/data.md``.

Every image is decoded once here, so a corrupt file is reported now, with its path, and not hours
later inside a training loop. Anything the release itself gets inconsistent (a mask colour that
disagrees with the label, an abnormal image without a mask) is counted and logged as one warning
line per kind (:class:`Checks`); masks of the wrong size are all collected into one error.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from usad_bench.data.images import MaskRule, list_images, mask_owner, open_image, read_mask
from usad_bench.data.manifest import CLASS_ORDER, NORMAL, Sample, write_manifest
from usad_bench.errors import UsadError
from usad_bench.io import atomic_path

if TYPE_CHECKING:  # folder.py imports this module's helpers
    from usad_bench.data.folder import FolderOptions

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
# "<stem>_mask.png", "<stem>_mask_1.png", ...: BUSI's convention.
BUSI_MASK_SUFFIXES = ("_mask",)
# BUS-UCLM images whose masks were saved at another size (the release's own quirk, see docs/data.md).
UCLM_RESIZED_PREFIXES = ("HESN_",)
# The HESN masks' aspect ratio differs from their images' by up to ~20%; beyond 30% the mask is
# more likely another image's than a rescaled one, so it is an error rather than a resize.
UCLM_ASPECT_TOLERANCE = 0.30
UCLM_SIZE_FIX = (
    "only the HESN_* masks are known to differ (same field of view at another scale): "
    "replace these masks with ones of their images' size"
)


@dataclass
class Checks:
    """What a conversion found wrong: warnings (counted, not fatal) and size mismatches (one error at the end)."""

    dataset: str
    issues: dict[str, list[str]] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    fix: str = "resize each mask to its image (nearest neighbour) or fix the pairing"

    def warn(self, what: str, name: str) -> None:
        self.issues.setdefault(what, []).append(name)

    def mismatch(self, mask: Path, mask_size: tuple[int, int], image: Path, size: tuple[int, int]) -> None:
        self.mismatches.append(
            f"{mask} is {mask_size[0]}x{mask_size[1]} but its image {image.name} is {size[0]}x{size[1]}"
        )

    def finish(self) -> None:
        """Log one warning line per kind; raise one error naming every mask of the wrong size."""
        for what, names in self.issues.items():
            log.warning("%s: %d %s (%s)", self.dataset, len(names), what, _examples(names))
        if self.mismatches:
            raise UsadError(
                f"{self.dataset}: {len(self.mismatches)} mask(s) differ in size from their images "
                f"({_examples(self.mismatches)}); {self.fix}"
            )


def prepare(kind: str, src: str | os.PathLike, out: str | os.PathLike, options: FolderOptions | None = None) -> Path:
    """Convert the release (or class-folder tree) at ``src`` and write ``out/manifest.csv``.

    Args:
        kind: one of ``busi``, ``bus_uclm``, ``bus_bra``, ``folder``.
        src: the release's own folder or the folder containing it.
        out: output folder; created if needed.
        options: ``folder.FolderOptions`` for the ``folder`` kind (None = defaults); the releases take none.

    Returns:
        The manifest's path.
    """
    if kind not in CONVERTERS:
        raise UsadError(f"unknown data kind {kind!r}; known: {', '.join(CONVERTERS)}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise UsadError(f"source folder not found: {src}; pass the folder the {kind} data was unpacked into")
    if options is not None and kind != "folder":
        raise UsadError(
            f"the folder options (--normal, --mask-suffix, --groups ...) apply to `folder` only, not {kind}"
        )
    if kind == "folder":
        from usad_bench.data.folder import FolderOptions, folder

        samples = folder(src, out, options or FolderOptions())
    else:
        samples = CONVERTERS[kind](src, out)
    if not samples:
        raise UsadError(f"no images found under {src}; check that it holds the {kind} data")
    return write_manifest(samples, out / MANIFEST_NAME)


# ----------------------------------------------------------------------------- BUSI
def busi(src: Path, out: Path) -> list[Sample]:
    """BUSI: ``Dataset_BUSI_with_GT/<class>/<class> (i).png`` with one mask file per lesion."""
    root = _find_root(src, "Dataset_BUSI_with_GT", CLASS_ORDER, "BUSI")
    checks = Checks("busi")
    samples: list[Sample] = []
    for label in CLASS_ORDER:
        samples += _busi_class(root / label, label, checks)
    checks.finish()
    return samples


def _busi_class(folder: Path, label: str, checks: Checks) -> list[Sample]:
    images, masks, orphans = split_masks(list_images(folder), BUSI_MASK_SUFFIXES)
    for path in orphans:
        checks.warn("mask files without an image (ignored)", f"{folder.name}/{path.name}")
    samples = []
    for path in images:
        size = open_image(path).size
        mask_paths = masks.get(path.stem, [])
        lit = [bool(_read_mask(m, size, path, checks).any()) for m in mask_paths]
        if label == NORMAL:
            # Normal images are pixel ground truth (all background) without a file; their release
            # masks are only checked to be empty (see preprocess.has_pixel_truth).
            if any(lit):
                checks.warn("normal images whose mask is not empty (mask ignored)", path.stem)
            mask_paths = []
        elif not any(lit):
            checks.warn("abnormal images without a lesion mask", path.stem)
            mask_paths = []
        sid = f"busi/{path.stem}"
        samples.append(Sample(sid, path, tuple(mask_paths), label, label != NORMAL, sid, "busi", "busi"))
    return samples


def split_masks(files: Sequence[Path], suffixes: Sequence[str]) -> tuple[list[Path], dict[str, list[Path]], list[Path]]:
    """Images (naturally sorted), their ``<stem><suffix>[_<i>]`` mask files keyed by image stem, and orphans.

    A file whose name ends in a mask suffix is never an image: when no image of that stem is
    beside it, it is an orphan (reported by the caller), not a new image.
    """
    owners = {path: mask_owner(path.stem, suffixes) for path in files}
    images = [p for p, owner in owners.items() if owner is None]
    stems = {p.stem for p in images}
    masks: dict[str, list[Path]] = {}
    orphans = []
    for path, owner in owners.items():
        if owner is not None and owner in stems:
            masks.setdefault(owner, []).append(path)
        elif owner is not None:
            orphans.append(path)
    for paths in masks.values():
        paths.sort(key=lambda p: _natural_key(p.name))
    return sorted(images, key=lambda p: _natural_key(p.name)), masks, orphans


# ----------------------------------------------------------------------------- BUS-UCLM
def bus_uclm(src: Path, out: Path) -> list[Sample]:
    """BUS-UCLM: ``INFO.csv`` labels, patients from file-name prefixes, RGB masks made binary."""
    root = _find_root(src, "BUS-UCLM", ("INFO.csv", "images", "masks"), "BUS-UCLM")
    rows = _read_csv(root / "INFO.csv", ("Image", "Label"))
    checks = Checks("bus_uclm", fix=UCLM_SIZE_FIX)
    samples = []
    for line, row in enumerate(rows, start=2):
        name = row["Image"].strip()
        label = _class_label(row["Label"], root / "INFO.csv", line)
        image = root / "images" / name
        mask = _uclm_mask(root, name, label, _listed_image_size(image, root / "INFO.csv"), out, checks)
        stem = Path(name).stem
        sid = f"bus_uclm/{stem}"
        group = f"bus_uclm:{stem.split('_')[0]}"
        samples.append(Sample(sid, image, mask, label, label != NORMAL, group, "bus_uclm", "bus_uclm"))
    listed = {row["Image"].strip() for row in rows}
    unlisted = [p.name for p in list_images(root / "images") if p.name not in listed]
    for name in unlisted:
        checks.warn("images not listed in INFO.csv (ignored)", name)
    checks.finish()
    return samples


def _uclm_mask(root: Path, name: str, label: str, size: tuple[int, int], out: Path, checks: Checks) -> tuple[Path, ...]:
    """Check one colour-coded mask against the label; write its binary version for abnormal images."""
    path = root / "masks" / name
    if not path.is_file():
        if label != NORMAL:
            checks.warn("abnormal images without a mask", name)
        return ()
    rgb = np.asarray(open_image(path).convert("RGB"))
    red, green = (rgb[..., 0] > 127), (rgb[..., 1] > 127)
    # green = benign lesion, red = malignant, black = none.
    expected = {NORMAL: (False, False), "benign": (False, True), "malignant": (True, False)}[label]
    if (bool(red.any()), bool(green.any())) != expected:
        checks.warn("masks whose colour disagrees with the INFO.csv label", name)
    lesion = _fit_uclm_mask(red | green, path, size, checks)
    if label == NORMAL or lesion is None:
        return ()  # normal: all background by definition, like every normal image (see busi)
    if not lesion.any():
        checks.warn("abnormal images with an empty mask", name)
        return ()
    target = out / "masks" / f"{Path(name).stem}.png"
    with atomic_path(target) as tmp:
        Image.fromarray(lesion.astype(np.uint8) * 255, mode="L").save(tmp, format="PNG")
    return (target,)


def _fit_uclm_mask(lesion: np.ndarray, path: Path, size: tuple[int, int], checks: Checks) -> np.ndarray | None:
    """The mask at the image's size: the HESN_* masks cover the same field of view at another scale.

    Any other size mismatch is collected in ``checks`` (None returned): only the HESN_* masks are
    known to differ, so replacing the mask with one of the image's size is the fix.
    """
    width, height = size
    mask_h, mask_w = lesion.shape
    if (mask_w, mask_h) == (width, height):
        return lesion
    aspect_gap = abs(math.log((width / height) / (mask_w / mask_h)))
    if not path.stem.startswith(UCLM_RESIZED_PREFIXES) or aspect_gap > math.log1p(UCLM_ASPECT_TOLERANCE):
        checks.mismatch(path, (mask_w, mask_h), path.parent.parent / "images" / path.name, (width, height))
        return None
    resized = Image.fromarray(lesion.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
    log.info("resized mask %s from %dx%d to its image's %dx%d", path.name, mask_w, mask_h, width, height)
    return np.asarray(resized) > 127


# ----------------------------------------------------------------------------- BUS-BRA
def bus_bra(src: Path, out: Path) -> list[Sample]:
    """BUS-BRA: ``bus_data.csv`` gives case (patient), device (domain) and pathology per image."""
    root = _find_root(src, "BUSBRA", ("bus_data.csv", "Images"), "BUS-BRA")
    csv_path = root / "bus_data.csv"
    rows = _read_csv(csv_path, ("ID", "Case", "Pathology", "Device"))
    checks = Checks("bus_bra")
    samples = []
    for line, row in enumerate(rows, start=2):
        name = row["ID"].strip()
        label = _class_label(row["Pathology"], csv_path, line)
        image = root / "Images" / f"{name}.png"
        size = _listed_image_size(image, csv_path)
        mask = root / "Masks" / f"mask_{name.removeprefix('bus_')}.png"
        masks: tuple[Path, ...] = ()
        if mask.is_file() and _read_mask(mask, size, image, checks).any():
            masks = (mask,)
        elif label != NORMAL:
            checks.warn("abnormal images without a lesion mask", name)
        sid = f"bus_bra/{name}"
        group, domain = f"bus_bra:{row['Case'].strip()}", f"bus_bra:{row['Device'].strip()}"
        samples.append(Sample(sid, image, masks, label, label != NORMAL, group, domain, "bus_bra"))
    checks.finish()
    return samples


# ----------------------------------------------------------------------------- shared helpers
def _find_root(src: Path, name: str, markers: Sequence[str], release: str) -> Path:
    """The release folder: ``src`` itself or ``src/<name>``, whichever holds all ``markers``."""
    for candidate in (src / name, src):
        if all((candidate / m).exists() for m in markers):
            return candidate
    # Name what is missing in the folder that looks most like the release, so the fix is obvious.
    folder = src / name if (src / name).is_dir() else src
    missing = ", ".join(m for m in markers if not (folder / m).exists())
    raise UsadError(
        f"no {release} release in {src}: {folder} lacks {missing}; point SRC at the unpacked {release} "
        f"release ({name}/ or the folder holding it)"
    )


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a ``,`` or ``;`` separated CSV (UTF-8, BOM or not) that must have ``required`` columns."""
    if not path.is_file():
        raise UsadError(f"{path} not found; the release is incomplete: unpack it again")
    try:
        text = path.read_text(encoding="utf-8-sig")
        header = text.split("\n", 1)[0]
        delimiter = ";" if header.count(";") > header.count(",") else ","
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = [{(k or "").strip(): (v or "") for k, v in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UsadError(f"cannot read {path} ({exc}); it should be a UTF-8 CSV: unpack the release again") from exc
    missing = [c for c in required if c not in columns]
    if missing:
        raise UsadError(f"{path} lacks columns {missing} (has {columns}); is it the release's original file?")
    return rows


def _class_label(value: str | None, path: Path, line: int) -> str:
    label = (value or "").strip().lower()
    if label not in CLASS_ORDER:
        raise UsadError(f"{path}:{line}: unknown class {value!r}; expected one of {', '.join(CLASS_ORDER)}")
    return label


def _listed_image_size(path: Path, table: Path) -> tuple[int, int]:
    """Decode an image a release table lists (a missing file means an incomplete download)."""
    if not path.is_file():
        raise UsadError(f"image {path} listed in {table} is missing; the release is incomplete: unpack it again")
    return open_image(path).size


def _read_mask(
    path: Path, size: tuple[int, int], image: Path, checks: Checks, rule: MaskRule | None = None
) -> np.ndarray:
    """A boolean lesion mask at its image's size; a mask of another size is noted in ``checks`` (empty returned)."""
    mask = read_mask(path, rule)
    if mask.shape != (size[1], size[0]):
        checks.mismatch(path, (mask.shape[1], mask.shape[0]), image, size)
        return np.zeros((size[1], size[0]), dtype=bool)
    return mask


def _natural_key(name: str) -> list:
    """Sort "x (2)" before "x (10)", as the releases number their files."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _examples(names: Sequence[str], n: int = 3) -> str:
    return ", ".join(str(x) for x in names[:n]) + (", ..." if len(names) > n else "")


CONVERTERS: dict[str, Callable[[Path, Path], list[Sample]] | None] = {
    "busi": busi,
    "bus_uclm": bus_uclm,
    "bus_bra": bus_bra,
    "folder": None,  # takes options: data/folder.py
}
