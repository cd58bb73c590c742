"""Converters from public breast-ultrasound releases (and plain class folders) to a manifest.

``prepare(kind, src, out)`` reads a release in its own layout and writes ``out/manifest.csv``. The
manifest points into the release; only BUS-UCLM's colour-coded masks are re-written (as binary PNGs
under ``out/masks/``), because the loaders read binary masks at the image's size. How each release
is read, and why, is in ``docs/data.md``.

Every image is decoded once here, so a corrupt file is reported now, with its path, and not hours
later inside a training loop. Anything the release itself gets inconsistent (a mask colour that
disagrees with the label, an abnormal image without a mask) is counted and logged as a warning.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from usad_bench.data.images import IMAGE_SUFFIXES, binarise_mask, list_images, open_image
from usad_bench.data.manifest import CLASS_ORDER, NORMAL, Sample, write_manifest
from usad_bench.errors import UsadError
from usad_bench.io import atomic_path

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
# "<stem>_mask.png", "<stem>_mask_1.png", ...: BUSI's convention, also accepted in the folder layout.
_MASK_NAME = re.compile(r"^(?P<stem>.+)_mask(?:_\d+)?$")
# BUS-UCLM images whose masks were saved at another size (the release's own quirk, see docs/data.md).
UCLM_RESIZED_PREFIXES = ("HESN_",)
# The HESN masks' aspect ratio differs from their images' by up to ~20%; beyond 30% the mask is
# more likely another image's than a rescaled one, so it is an error rather than a resize.
UCLM_ASPECT_TOLERANCE = 0.30

Issues = dict[str, list[str]]


def prepare(kind: str, src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert the release (or class-folder tree) at ``src`` and write ``out/manifest.csv``.

    Args:
        kind: one of ``busi``, ``bus_uclm``, ``bus_bra``, ``folder``.
        src: the release's own folder or the folder containing it.
        out: output folder; created if needed.

    Returns:
        The manifest's path.
    """
    if kind not in CONVERTERS:
        raise UsadError(f"unknown data kind {kind!r}; known: {', '.join(CONVERTERS)}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise UsadError(f"source folder not found: {src}; pass the folder the {kind} data was unpacked into")
    samples = CONVERTERS[kind](src, out)
    if not samples:
        raise UsadError(f"no images found under {src}; check that it holds the {kind} data")
    return write_manifest(samples, out / MANIFEST_NAME)


# ----------------------------------------------------------------------------- BUSI
def busi(src: Path, out: Path) -> list[Sample]:
    """BUSI: ``Dataset_BUSI_with_GT/<class>/<class> (i).png`` with one mask file per lesion."""
    root = _find_root(src, "Dataset_BUSI_with_GT", CLASS_ORDER, "BUSI")
    issues: Issues = {}
    samples: list[Sample] = []
    for label in CLASS_ORDER:
        samples += _busi_class(root / label, label, issues)
    _report("busi", issues)
    return samples


def _busi_class(folder: Path, label: str, issues: Issues) -> list[Sample]:
    images, masks = _split_masks(list_images(folder))
    for stem in sorted(set(masks) - {p.stem for p in images}):
        issues.setdefault("mask files without an image (ignored)", []).append(f"{folder.name}/{stem}")
    samples = []
    for path in images:
        size = open_image(path).size
        mask_paths = masks.get(path.stem, [])
        lit = [bool(_read_mask(m, size, path).any()) for m in mask_paths]
        if label == NORMAL:
            # Normal images are pixel ground truth (all background) without a file; their release
            # masks are only checked to be empty (see preprocess.has_pixel_truth).
            if any(lit):
                issues.setdefault("normal images whose mask is not empty (mask ignored)", []).append(path.stem)
            mask_paths = []
        elif not any(lit):
            issues.setdefault("abnormal images without a lesion mask", []).append(path.stem)
            mask_paths = []
        sid = f"busi/{path.stem}"
        samples.append(Sample(sid, path, tuple(mask_paths), label, label != NORMAL, sid, "busi", "busi"))
    return samples


def _split_masks(files: Sequence[Path]) -> tuple[list[Path], dict[str, list[Path]]]:
    """Images (naturally sorted) and their ``<stem>_mask*.png`` files, keyed by the image stem."""
    images, masks = [], {}
    for path in files:
        match = _MASK_NAME.match(path.stem)
        if match:
            masks.setdefault(match["stem"], []).append(path)
        else:
            images.append(path)
    for paths in masks.values():
        paths.sort(key=lambda p: _natural_key(p.name))
    return sorted(images, key=lambda p: _natural_key(p.name)), masks


# ----------------------------------------------------------------------------- BUS-UCLM
def bus_uclm(src: Path, out: Path) -> list[Sample]:
    """BUS-UCLM: ``INFO.csv`` labels, patients from file-name prefixes, RGB masks made binary."""
    root = _find_root(src, "BUS-UCLM", ("INFO.csv", "images", "masks"), "BUS-UCLM")
    rows = _read_csv(root / "INFO.csv", ("Image", "Label"))
    issues: Issues = {}
    samples = []
    for line, row in enumerate(rows, start=2):
        name = row["Image"].strip()
        label = _class_label(row["Label"], root / "INFO.csv", line)
        image = root / "images" / name
        mask = _uclm_mask(root, name, label, _listed_image_size(image, root / "INFO.csv"), out, issues)
        stem = Path(name).stem
        sid = f"bus_uclm/{stem}"
        group = f"bus_uclm:{stem.split('_')[0]}"
        samples.append(Sample(sid, image, mask, label, label != NORMAL, group, "bus_uclm", "bus_uclm"))
    listed = {row["Image"].strip() for row in rows}
    unlisted = [p.name for p in list_images(root / "images") if p.name not in listed]
    if unlisted:
        issues["images not listed in INFO.csv (ignored)"] = unlisted
    _report("bus_uclm", issues)
    return samples


def _uclm_mask(root: Path, name: str, label: str, size: tuple[int, int], out: Path, issues: Issues) -> tuple[Path, ...]:
    """Check one colour-coded mask against the label; write its binary version for abnormal images."""
    path = root / "masks" / name
    if not path.is_file():
        if label != NORMAL:
            issues.setdefault("abnormal images without a mask", []).append(name)
        return ()
    rgb = np.asarray(open_image(path).convert("RGB"))
    red, green = (rgb[..., 0] > 127), (rgb[..., 1] > 127)
    # green = benign lesion, red = malignant, black = none.
    expected = {NORMAL: (False, False), "benign": (False, True), "malignant": (True, False)}[label]
    if (bool(red.any()), bool(green.any())) != expected:
        issues.setdefault("masks whose colour disagrees with the INFO.csv label", []).append(name)
    lesion = _fit_uclm_mask(red | green, path, size)
    if label == NORMAL:
        return ()  # all background by definition, like every normal image (see busi)
    if not lesion.any():
        issues.setdefault("abnormal images with an empty mask", []).append(name)
        return ()
    target = out / "masks" / f"{Path(name).stem}.png"
    with atomic_path(target) as tmp:
        Image.fromarray(lesion.astype(np.uint8) * 255, mode="L").save(tmp, format="PNG")
    return (target,)


def _fit_uclm_mask(lesion: np.ndarray, path: Path, size: tuple[int, int]) -> np.ndarray:
    """The mask at the image's size: the HESN_* masks cover the same field of view at another scale."""
    width, height = size
    mask_h, mask_w = lesion.shape
    if (mask_w, mask_h) == (width, height):
        return lesion
    aspect_gap = abs(math.log((width / height) / (mask_w / mask_h)))
    if not path.stem.startswith(UCLM_RESIZED_PREFIXES) or aspect_gap > math.log1p(UCLM_ASPECT_TOLERANCE):
        raise UsadError(
            f"mask {path} is {mask_w}x{mask_h} but its image is {width}x{height}; only the HESN_* masks are "
            "known to differ (same field of view at another scale): replace this mask with one of the image's size"
        )
    resized = Image.fromarray(lesion.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
    log.info("resized mask %s from %dx%d to its image's %dx%d", path.name, mask_w, mask_h, width, height)
    return np.asarray(resized) > 127


# ----------------------------------------------------------------------------- BUS-BRA
def bus_bra(src: Path, out: Path) -> list[Sample]:
    """BUS-BRA: ``bus_data.csv`` gives case (patient), device (domain) and pathology per image."""
    root = _find_root(src, "BUSBRA", ("bus_data.csv", "Images"), "BUS-BRA")
    csv_path = root / "bus_data.csv"
    rows = _read_csv(csv_path, ("ID", "Case", "Pathology", "Device"))
    issues: Issues = {}
    samples = []
    for line, row in enumerate(rows, start=2):
        name = row["ID"].strip()
        label = _class_label(row["Pathology"], csv_path, line)
        image = root / "Images" / f"{name}.png"
        size = _listed_image_size(image, csv_path)
        mask = root / "Masks" / f"mask_{name.removeprefix('bus_')}.png"
        masks: tuple[Path, ...] = ()
        if mask.is_file() and _read_mask(mask, size, image).any():
            masks = (mask,)
        elif label != NORMAL:
            issues.setdefault("abnormal images without a lesion mask", []).append(name)
        sid = f"bus_bra/{name}"
        group, domain = f"bus_bra:{row['Case'].strip()}", f"bus_bra:{row['Device'].strip()}"
        samples.append(Sample(sid, image, masks, label, label != NORMAL, group, domain, "bus_bra"))
    _report("bus_bra", issues)
    return samples


# ----------------------------------------------------------------------------- class folders
def folder(src: Path, out: Path) -> list[Sample]:
    """``<root>/<class>/<image>`` with optional ``<root>/masks/<class>/<stem>.png`` or ``<stem>_mask.png``."""
    class_dirs = sorted(d for d in src.iterdir() if d.is_dir() and d.name != "masks" and not d.name.startswith("."))
    if not class_dirs:
        raise UsadError(
            f"no class folders in {src}; expected {src}/<class>/<images>, e.g. normal/, benign/, malignant/"
        )
    dataset = src.resolve().name
    samples: list[Sample] = []
    seen: dict[str, Path] = {}
    for class_dir in class_dirs:
        images, beside = _split_masks(list_images(class_dir))
        if not images:
            raise UsadError(
                f"class folder {class_dir} has no images ({', '.join(IMAGE_SUFFIXES)}); add images or remove it"
            )
        label = class_dir.name.strip().lower()
        for path in images:
            if path.stem in seen:
                raise UsadError(
                    f"{path} and {seen[path.stem]} have the same stem; ids are <dataset>/<stem>: rename one of them"
                )
            seen[path.stem] = path
            size = open_image(path).size
            masks = beside.get(path.stem, []) + _masks_in_tree(src / "masks" / class_dir.name, path.stem)
            for mask in masks:
                _read_mask(mask, size, path)
            sid = f"{dataset}/{path.stem}"
            samples.append(Sample(sid, path, tuple(masks), label, label != NORMAL, sid, dataset, dataset))
    return samples


def _masks_in_tree(mask_dir: Path, stem: str) -> list[Path]:
    """``masks/<class>/<stem>.<ext>`` when present (any image suffix, .png first)."""
    for suffix in IMAGE_SUFFIXES:
        path = mask_dir / f"{stem}{suffix}"
        if path.is_file():
            return [path]
    return []


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


def _read_mask(path: Path, size: tuple[int, int], image: Path) -> np.ndarray:
    """A binary mask that must have its image's size."""
    mask = open_image(path)
    if mask.size != size:
        raise UsadError(
            f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image {image} is {size[0]}x{size[1]}; "
            "resize the mask to the image (nearest neighbour) or fix the pairing"
        )
    return binarise_mask(mask)


def _natural_key(name: str) -> list:
    """Sort "x (2)" before "x (10)", as the releases number their files."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _report(dataset: str, issues: Issues) -> None:
    """One warning line per kind of inconsistency in the release: counted, not fatal."""
    for what, names in issues.items():
        examples = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        log.warning("%s: %d %s (%s)", dataset, len(names), what, examples)


CONVERTERS: dict[str, Callable[[Path, Path], list[Sample]]] = {
    "busi": busi,
    "bus_uclm": bus_uclm,
    "bus_bra": bus_bra,
    "folder": folder,
}
