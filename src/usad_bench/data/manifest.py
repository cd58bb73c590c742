"""The manifest: one CSV row per image, the common currency of every command.

Columns (see README, "Manifest format"):

=============  ==========================================================================
``id``         unique within the manifest, ``<dataset>/<image stem>`` by convention
``image``      image path, relative to the manifest's folder (absolute paths also work)
``masks``      ``;``-separated mask paths (their union is the lesion mask); empty = no mask
``class``      class label, e.g. ``normal`` / ``benign`` / ``malignant``
``is_anomaly`` ``1`` for abnormal images, ``0`` for normal ones
``group``      patient id (namespaced by dataset); the image id when patients are unknown
``domain``     acquisition domain: the dataset, or the scanner where a release names it
``dataset``    which release or folder the row came from
=============  ==========================================================================

Few-shot support and test sets are split by ``group`` so no patient is in both.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from usad_bench.errors import UsadError
from usad_bench.io import write_text

COLUMNS = ("id", "image", "masks", "class", "is_anomaly", "group", "domain", "dataset")
NORMAL = "normal"
# Canonical order so class indices mean the same thing in every run: normal is class 0.
CLASS_ORDER = (NORMAL, "benign", "malignant")


@dataclass(frozen=True)
class Sample:
    """One manifest row with its paths resolved to absolute paths."""

    id: str
    image: Path
    masks: tuple[Path, ...]
    label: str
    is_anomaly: bool
    group: str
    domain: str
    dataset: str

    @property
    def has_mask(self) -> bool:
        return len(self.masks) > 0


def order_classes(labels: Iterable[str]) -> list[str]:
    """Distinct labels in canonical order: normal, benign, malignant, then the rest sorted."""
    distinct = set(labels)
    known = [c for c in CLASS_ORDER if c in distinct]
    return known + sorted(distinct - set(CLASS_ORDER))


@dataclass
class Manifest:
    """An ordered list of samples plus the file they came from (if any)."""

    samples: list[Sample]
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)

    @property
    def classes(self) -> list[str]:
        return order_classes(s.label for s in self.samples)

    def by_id(self) -> dict[str, Sample]:
        return {s.id: s for s in self.samples}

    def subset(self, ids: Iterable[str]) -> Manifest:
        """Samples with these ids, in the order given."""
        index = self.by_id()
        missing = [i for i in ids if i not in index]
        if missing:
            raise UsadError(f"ids not in manifest {self.path}: {missing[:5]}; was the manifest regenerated?")
        return Manifest([index[i] for i in ids], self.path)

    def where(self, keep) -> Manifest:
        return Manifest([s for s in self.samples if keep(s)], self.path)


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read a manifest CSV; paths are resolved relative to the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise UsadError(f"manifest not found: {path}; create one with `usad-bench data prepare` or `data synth`")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UsadError(f"{path} is not a usad_bench manifest: missing columns {missing}")
        rows = list(reader)
    root = path.parent.resolve()
    samples = [_row_to_sample(row, root, path, n + 2) for n, row in enumerate(rows)]
    _check_unique_ids(samples, path)
    if not samples:
        raise UsadError(f"manifest {path} has no rows; check the data folder it was prepared from")
    return Manifest(samples, path)


def write_manifest(samples: Sequence[Sample], path: str | os.PathLike) -> Path:
    """Write samples to ``path`` atomically, storing paths relative to its folder."""
    path = Path(path)
    root = path.parent.resolve()
    _check_unique_ids(samples, path)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for s in samples:
        writer.writerow(
            {
                "id": s.id,
                "image": _relative(s.image, root),
                "masks": ";".join(_relative(m, root) for m in s.masks),
                "class": s.label,
                "is_anomaly": int(s.is_anomaly),
                "group": s.group,
                "domain": s.domain,
                "dataset": s.dataset,
            }
        )
    write_text(path, buf.getvalue())
    return path


def with_domain(manifest: Manifest, domain: str) -> Manifest:
    """A copy whose samples all carry ``domain`` (e.g. to merge scanners into one test set)."""
    return Manifest([replace(s, domain=domain) for s in manifest.samples], manifest.path)


def _row_to_sample(row: dict[str, str], root: Path, path: Path, line: int) -> Sample:
    try:
        is_anomaly = {"0": False, "1": True, "false": False, "true": True}[row["is_anomaly"].strip().lower()]
    except KeyError:
        raise UsadError(f"{path}:{line}: is_anomaly must be 0 or 1, got {row['is_anomaly']!r}") from None
    image = row["image"].strip()
    if not image or not row["id"].strip() or not row["class"].strip():
        raise UsadError(f"{path}:{line}: id, image and class must not be empty")
    masks = tuple(root / m.strip() for m in (row["masks"] or "").split(";") if m.strip())
    return Sample(
        id=row["id"].strip(),
        image=root / image,
        masks=masks,
        label=row["class"].strip(),
        is_anomaly=is_anomaly,
        group=row["group"].strip() or row["id"].strip(),
        domain=row["domain"].strip() or row["dataset"].strip(),
        dataset=row["dataset"].strip(),
    )


def _relative(p: Path, root: Path) -> str:
    p = Path(p).resolve()
    try:
        return os.path.relpath(p, root)
    except ValueError:  # another drive on Windows
        return str(p)


def _check_unique_ids(samples: Sequence[Sample], path: Path) -> None:
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise UsadError(f"duplicate id {s.id!r} in manifest {path}; ids must be unique")
        seen.add(s.id)
