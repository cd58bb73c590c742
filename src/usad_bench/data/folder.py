"""Users' own data: ``<root>/<class>/<image>`` folders, with masks beside the images or in a parallel tree.

``folder(src, out, options)`` reads the layout described in docs/data.md ("Bring your own data")
and runs every check promised there. Each decision the converter has to guess (which folder is
normal, which file is a mask, whether frames share a video) is logged, and each problem is counted
in one warning line per kind with the first few files; nothing is dropped without a word. Masks of
the wrong size and duplicate image names are collected and reported in one error.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from usad_bench.data.converters import Checks, _read_csv, _read_mask, split_masks
from usad_bench.data.images import (
    AUXILIARY_SUFFIXES,
    IMAGE_SUFFIXES,
    LESION_MASK_SUFFIXES,
    MASK_FOLDERS,
    MaskRule,
    list_images,
    mask_owner,
    open_image,
)
from usad_bench.data.manifest import NORMAL, Sample
from usad_bench.errors import UsadError
from usad_bench.io import atomic_path

log = logging.getLogger(__name__)

DEFAULT_RULE = MaskRule()  # any pixel unlike black / 0 is lesion
EMPTY_MASKS = "abnormal images whose mask is empty (mask dropped: no pixel ground truth)"

# Words that make a class folder normal ("Ovary_Normal", "healthy", "benign_normal"), and phrases
# that do once the name's separators are removed ("no_tumor" -> "notumor").
NORMAL_WORDS = ("normal", "normals", "healthy", "regular", "negative", "control", "controls")
NORMAL_PHRASES = ("notumor", "notumour", "nolesion", "nofinding", "nomass")
NEGATIONS = ("non", "not", "un", "ab")
# Trailing frame numbers: "p01_frame_0003", "video2-17", "case 4 (12)".
_FRAME_TAIL = re.compile(r"[\s_\-.]*(?:frame|frm|slice|f)?[\s_\-.]*\(?\d+\)?$", re.IGNORECASE)
GROUP_COLUMNS = ("group", "patient", "patient_id", "case", "video", "subject", "sequence")
IMAGE_COLUMNS = ("image", "file", "filename", "file_name", "name", "path", "id")


@dataclass(frozen=True)
class FolderOptions:
    """How to read a class-folder tree (the ``data prepare folder`` options)."""

    normal: tuple[str, ...] = ()  # class folders that are normal; () = recognise common spellings
    mask_suffixes: tuple[str, ...] = LESION_MASK_SUFFIXES  # "<stem><suffix>[_i]" files are lesion masks
    mask_rule: MaskRule = DEFAULT_RULE  # which mask pixels are lesion (background value / kept codes)
    groups: Path | None = None  # CSV image -> patient/video; None = SRC/groups.csv when present
    group_pattern: str | None = None  # regex on the image stem: its first group (or match) is the patient


def folder(src: Path, out: Path, opts: FolderOptions) -> list[Sample]:
    """Read ``src/<class>/<images>`` (see the module docstring); returns the manifest rows."""
    dataset = src.resolve().name
    class_dirs = _class_dirs(src)
    labels = class_labels(class_dirs, opts.normal, dataset)
    checks = Checks(dataset)
    tree = _mask_tree(src)
    samples: list[Sample] = []
    for class_dir in class_dirs:
        samples += _class_samples(class_dir, labels[class_dir], dataset, out, opts, tree, checks)
    for path in tree.unclaimed():
        checks.warn("mask files in the mask tree that match no image (ignored)", path.name)
    _check_unique_ids(samples)
    _warn_missing_masks(samples, checks)
    samples = assign_groups(samples, src, opts, checks)
    samples = _group_duplicates(samples, checks)
    checks.finish()
    return samples


def _class_dirs(src: Path) -> list[Path]:
    dirs = sorted(
        d for d in src.iterdir() if d.is_dir() and d.name.lower() not in MASK_FOLDERS and not d.name.startswith(".")
    )
    if not dirs:
        raise UsadError(
            f"no class folders in {src}; expected {src}/<class>/<images>, e.g. normal/, benign/, malignant/"
        )
    return dirs


# ----------------------------------------------------------------------------- classes
def looks_normal(name: str) -> bool:
    """Whether a folder name spells "normal": ``Ovary_Normal``, ``healthy``, ``no_tumor`` (not ``abnormal``)."""
    tokens = [t for t in re.split(r"[^a-z0-9]+", name.lower()) if t]
    if any(t in NEGATIONS for t in tokens):
        return False
    return any(t in NORMAL_WORDS for t in tokens) or any(p in "".join(tokens) for p in NORMAL_PHRASES)


def class_labels(class_dirs: list[Path], normal: tuple[str, ...], dataset: str) -> dict[Path, str]:
    """Folder -> class label: ``normal`` for normal folders (chosen or recognised), else the name in lower case."""
    if normal:
        wanted = {n.strip().lower() for n in normal if n.strip()}
        unknown = sorted(wanted - {d.name.lower() for d in class_dirs})
        if unknown:
            raise UsadError(
                f"--normal names {', '.join(unknown)}, not a class folder here; the folders are "
                f"{', '.join(d.name for d in class_dirs)}"
            )
        is_normal = {d: d.name.lower() in wanted for d in class_dirs}
    else:
        is_normal = {d: looks_normal(d.name) for d in class_dirs}
    labels = {d: NORMAL if is_normal[d] else d.name.strip().lower() for d in class_dirs}
    renamed = [d.name for d in class_dirs if is_normal[d] and d.name != NORMAL]
    if renamed:
        how = "as asked (--normal)" if normal else "a recognised spelling; pass --normal NAME[,NAME] to choose"
        log.warning("%s: class folder(s) %s read as class normal (%s)", dataset, ", ".join(renamed), how)
    if NORMAL not in labels.values():
        log.warning(
            "%s: no normal class among the folders %s: every image is abnormal, so normal-vs-abnormal metrics will be "
            "null; pass --normal NAME if one of them holds normal images",
            dataset,
            ", ".join(d.name for d in class_dirs),
        )
    return labels


# ----------------------------------------------------------------------------- images and masks
@dataclass
class _MaskTree:
    """Mask files under ``<src>/masks/`` (any of MASK_FOLDERS): per class sub-folder, or flat."""

    by_class: dict[str, list[Path]]  # lower-case class folder name -> files; "" = directly in masks/
    claimed: set[Path]

    def files(self, class_name: str) -> list[Path]:
        return self.by_class.get(class_name.lower(), []) + self.by_class.get("", [])

    def unclaimed(self) -> list[Path]:
        return sorted(p for files in self.by_class.values() for p in files if p not in self.claimed)


def _mask_tree(src: Path) -> _MaskTree:
    by_class: dict[str, list[Path]] = {}
    for root in (d for d in src.iterdir() if d.is_dir() and d.name.lower() in MASK_FOLDERS):
        by_class.setdefault("", []).extend(list_images(root))
        for sub in (d for d in root.iterdir() if d.is_dir()):
            by_class.setdefault(sub.name.lower(), []).extend(list_images(sub))
    return _MaskTree(by_class, set())


def _class_samples(
    class_dir: Path, label: str, dataset: str, out: Path, opts: FolderOptions, tree: _MaskTree, checks: Checks
) -> list[Sample]:
    """One class folder: its images, their masks (beside them and in the tree), the checks on each."""
    files = list_images(class_dir)
    _warn_nested(class_dir, checks)
    known = tuple(dict.fromkeys((*opts.mask_suffixes, *LESION_MASK_SUFFIXES, *AUXILIARY_SUFFIXES)))
    images, _, orphans = split_masks(files, known)  # no mask-like file is ever an image
    stems = {p.stem for p in images}
    masks = _lesion_masks(files, stems, opts.mask_suffixes, checks)
    for path in orphans:
        checks.warn("mask files that match no image (ignored, not read as images)", f"{class_dir.name}/{path.name}")
    for path in tree.files(class_dir.name):
        owner = path.stem if path.stem in stems else mask_owner(path.stem, opts.mask_suffixes)
        if owner in stems:
            masks.setdefault(owner, []).append(path)
            tree.claimed.add(path)
    if not images:
        raise UsadError(
            f"class folder {class_dir} has no images ({', '.join(IMAGE_SUFFIXES)}); add images or remove it"
        )
    return [_sample(path, masks.get(path.stem, []), label, dataset, out, opts.mask_rule, checks) for path in images]


def _lesion_masks(files: list[Path], stems: set[str], suffixes: tuple[str, ...], checks: Checks) -> dict:
    """``<stem><suffix>`` files of an image in ``stems``; other annotations beside an image are reported."""
    masks: dict[str, list[Path]] = {}
    for path in files:
        owner = mask_owner(path.stem, suffixes)
        if owner in stems:
            masks.setdefault(owner, []).append(path)
        elif mask_owner(path.stem, (*LESION_MASK_SUFFIXES, *AUXILIARY_SUFFIXES)) in stems:
            checks.warn(
                f"annotation files that are not lesion masks (ignored; lesion masks end in {', '.join(suffixes)}: "
                "choose with --mask-suffix)",
                path.name,
            )
    return masks


def _warn_nested(class_dir: Path, checks: Checks) -> None:
    for path in sorted(class_dir.rglob("*")):
        if path.is_file() and path.parent != class_dir and path.suffix.lower() in IMAGE_SUFFIXES:
            checks.warn(
                "images in sub-folders of a class folder (not read: move them up; give patients with --groups)",
                path.relative_to(class_dir.parent).as_posix(),
            )


def _sample(
    path: Path, mask_files: list[Path], label: str, dataset: str, out: Path, rule: MaskRule, checks: Checks
) -> Sample:
    """One manifest row; its masks checked (size, empty, on a normal image), made binary under a non-default rule."""
    size = open_image(path).size
    lesion = np.zeros((size[1], size[0]), dtype=bool)
    mismatches = len(checks.mismatches)
    for mask in mask_files:
        lesion |= _read_mask(mask, size, path, checks, rule)
    masks: tuple[Path, ...] = tuple(mask_files)
    if len(checks.mismatches) > mismatches:
        pass  # a mask of the wrong size: reported in the final error, not as an empty mask too
    elif masks and label == NORMAL:
        if lesion.any():
            checks.warn(
                "normal images with a lesion mask (mask ignored: a normal image's ground truth is all background; "
                "move the image to its lesion's class if the mask is right)",
                path.name,
            )
        masks = ()
    elif masks and not lesion.any():
        checks.warn(EMPTY_MASKS, path.name)
        masks = ()
    elif masks and not rule.is_default:
        masks = (_write_binary(out / "masks" / path.parent.name / f"{path.stem}.png", lesion),)
    sid = f"{dataset}/{path.stem}"
    return Sample(sid, path, masks, label, label != NORMAL, sid, dataset, dataset)


def _write_binary(target: Path, lesion: np.ndarray) -> Path:
    """A 0/255 PNG that every later step reads with the default rule."""
    with atomic_path(target) as tmp:
        Image.fromarray(lesion.astype(np.uint8) * 255, mode="L").save(tmp, format="PNG")
    return target


def _check_unique_ids(samples: list[Sample]) -> None:
    first: dict[str, Path] = {}
    clashes = []
    for s in samples:
        if s.id in first:
            clashes.append(f"{s.image} and {first[s.id]}")
        first.setdefault(s.id, s.image)
    if clashes:
        raise UsadError(
            f"{len(clashes)} image(s) share a stem with another ({'; '.join(clashes[:3])}"
            f"{'; ...' if len(clashes) > 3 else ''}); ids are <dataset>/<stem>: rename them"
        )


def _warn_missing_masks(samples: list[Sample], checks: Checks) -> None:
    """Abnormal images without a mask matter only when others have one (image-level-only data is fine)."""
    abnormal = [s for s in samples if s.is_anomaly]
    reported = set(checks.issues.get(EMPTY_MASKS, []))  # their (empty) mask is already counted
    if any(s.has_mask for s in abnormal):
        for s in abnormal:
            if not s.has_mask and s.image.name not in reported:
                checks.warn(
                    "abnormal images without a mask (no pixel ground truth: left out of pixel metrics)", s.image.name
                )


# ----------------------------------------------------------------------------- patients / videos
def assign_groups(samples: list[Sample], src: Path, opts: FolderOptions, checks: Checks) -> list[Sample]:
    """Patient (or video) of each image from a groups CSV or a file-name pattern; a warning when frames look grouped."""
    if opts.groups is not None and opts.group_pattern:
        raise UsadError("give either --groups CSV or --group-pattern REGEX, not both")
    table = opts.groups or (src / "groups.csv" if (src / "groups.csv").is_file() and not opts.group_pattern else None)
    if table is not None:
        log.info("groups from %s", table)
        lookup = read_groups(Path(table))
        found = {s.id: lookup.get(s.image.name) or lookup.get(s.image.stem) for s in samples}
        where = f"not listed in {Path(table).name}"
    elif opts.group_pattern:
        found = {s.id: _pattern_group(opts.group_pattern, s.image.stem) for s in samples}
        where = f"not matched by --group-pattern {opts.group_pattern!r}"
    else:
        _warn_frame_sequences(samples, checks)
        return samples
    dataset = samples[0].dataset
    for s in samples:
        if not found[s.id]:
            checks.warn(f"images {where} (each is its own group)", s.image.name)
    return [replace(s, group=f"{dataset}:{found[s.id]}") if found[s.id] else s for s in samples]


def read_groups(path: Path) -> dict[str, str]:
    """``image -> group`` from a CSV with an image column (file name or stem) and a patient/video column."""
    rows = _read_csv(path, ())
    columns = {c.lower(): c for c in (rows[0] if rows else {})}
    image_col = next((columns[c] for c in IMAGE_COLUMNS if c in columns), None)
    group_col = next((columns[c] for c in GROUP_COLUMNS if c in columns), None)
    if not rows or image_col is None or group_col is None:
        raise UsadError(
            f"{path} needs a header with an image column ({'/'.join(IMAGE_COLUMNS)}) and a group column "
            f"({'/'.join(GROUP_COLUMNS)}), and one row per image, e.g. 'image,patient' / 'scan_001.png,P07'"
        )
    lookup = {}
    for row in rows:
        name, group = Path(row[image_col].strip()).name, row[group_col].strip()
        if name and group:
            lookup[name] = lookup[Path(name).stem] = group
    return lookup


def _pattern_group(pattern: str, stem: str) -> str | None:
    try:
        match = re.search(pattern, stem)
    except re.error as exc:
        raise UsadError(f"--group-pattern {pattern!r} is not a valid regular expression ({exc})") from None
    if match is None:
        return None
    return match.groupdict().get("group") or (match.group(1) if match.re.groups else match.group(0))


def sequence_base(stem: str) -> str | None:
    """The name before a trailing frame number (``"p01_frame_0003"`` -> ``"p01"``), or None without one."""
    base = _FRAME_TAIL.sub("", stem)
    return base if base and base != stem else None


def _warn_frame_sequences(samples: list[Sample], checks: Checks) -> None:
    """Several numbered series in one class (p01_1, p01_2, p02_1 ...) look like videos or patients.

    One series per class is just numbering (BUSI's "benign (1)", "benign (2)"), so it is not flagged.
    """
    by_class: dict[str, Counter] = {}
    for s in samples:
        base = sequence_base(s.image.stem)
        if base is not None:
            by_class.setdefault(s.label, Counter())[base] += 1
    for s in samples:
        bases = by_class.get(s.label, Counter())
        base = sequence_base(s.image.stem)
        if len(bases) >= 2 and base is not None and bases[base] >= 2:
            checks.warn(
                "images that look like frames of one video or patient (a shared name before a frame number) while "
                "no groups were given: support and test may share a sequence; pass --groups CSV or --group-pattern",
                s.image.name,
            )


def _group_duplicates(samples: list[Sample], checks: Checks) -> list[Sample]:
    """Byte-identical images under two names: reported, and put in one group so they never straddle a split."""
    first: dict[str, Sample] = {}
    result = []
    for s in samples:
        digest = hashlib.sha256(s.image.read_bytes()).hexdigest()
        if digest in first:
            checks.warn(
                "images identical to another image (put in its group)", f"{s.image.name} = {first[digest].image.name}"
            )
            s = replace(s, group=first[digest].group)
        first.setdefault(digest, s)
        result.append(s)
    return result
