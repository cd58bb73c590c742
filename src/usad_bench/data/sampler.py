"""Few-shot support sets: ``k`` images per class, seeded, never sharing a patient with the test set.

How a support set is drawn, for each class independently:

1. the class's rows are sorted by id (so reordering the manifest CSV does not change the draw) and
   grouped by patient (``group``);
2. patients are shuffled, and so are the images within each patient;
3. images are taken round-robin: one image from each patient in turn, then a second image from
   each, and so on, until ``k`` are taken. A support set thus spans as many patients as possible,
   and only a class with fewer than ``k`` patients contributes two images of one patient.

Randomness: one :class:`random.Random` per class, seeded with the string ``"<seed>:<class>"``.
String seeds are hashed with SHA-512 by Python, so the draw is the same on every platform,
Python version and ``PYTHONHASHSEED``, and a class's support does not depend on which other
classes were requested.

The held-out (in-domain test) set is every manifest row whose patient has no image in the
support set, of every class, in manifest order. The split also records the sha256 of each support
image's file, so evaluation can drop test rows that are the same image under another name or id.
"""

from __future__ import annotations

import hashlib
import numbers
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from usad_bench.data.manifest import Manifest, Sample, order_classes
from usad_bench.errors import UsadError
from usad_bench.io import read_json, write_json

SPLIT_FIELDS = ("shots", "seed", "classes", "support_ids", "support_groups", "heldout_ids")


@dataclass
class Split:
    """A support set and the held-out rows that share no patient with it."""

    shots: int
    seed: int
    classes: list[str]  # in canonical order (order_classes)
    support_ids: list[str]  # grouped by class in `classes` order, each class in draw order
    support_groups: list[str]  # sorted distinct groups used by the support set
    heldout_ids: list[str]  # manifest rows whose group is NOT in support_groups (in-domain test set)
    support_sha256: dict[str, str] = field(default_factory=dict)  # support id -> image file sha256 (optional)

    def to_json(self) -> dict:
        return {**{name: getattr(self, name) for name in SPLIT_FIELDS}, "support_sha256": self.support_sha256}

    @classmethod
    def from_json(cls, d: dict) -> Split:
        if not isinstance(d, dict):
            raise UsadError(
                f"a split must be a JSON object with keys {', '.join(SPLIT_FIELDS)}, got {type(d).__name__}"
            )
        missing = [name for name in SPLIT_FIELDS if name not in d]
        if missing:
            raise UsadError(f"split is missing {', '.join(missing)}; re-create it with the current usad_bench")
        return cls(
            shots=int(d["shots"]),
            seed=int(d["seed"]),
            classes=[str(c) for c in d["classes"]],
            support_ids=[str(i) for i in d["support_ids"]],
            support_groups=[str(g) for g in d["support_groups"]],
            heldout_ids=[str(i) for i in d["heldout_ids"]],
            support_sha256={str(k): str(v) for k, v in (d.get("support_sha256") or {}).items()},  # may be absent
        )


def sample_support(manifest: Manifest, shots: int, seed: int, classes: Sequence[str] | None = None) -> Split:
    """Draw ``shots`` images per class (see the module docstring for how) and the held-out rest.

    Args:
        manifest: the pool to draw from (one domain, usually).
        shots: images per class, k >= 1.
        seed: any integer; the same (manifest rows, shots, seed, classes) always give the same split.
        classes: the classes to draw; None = every class in the manifest.

    Raises:
        UsadError: k < 1, a class not in the manifest, or a class with fewer than k images.
    """
    if isinstance(shots, bool) or not isinstance(shots, numbers.Integral) or shots < 1:
        raise UsadError(f"shots (k) must be an integer >= 1, got {shots!r}")
    shots = int(shots)
    if isinstance(classes, str):  # a single class name, not its characters
        classes = [classes]
    available = manifest.classes
    wanted = order_classes(available if classes is None else classes)
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise UsadError(
            f"class(es) {', '.join(map(repr, unknown))} not in manifest {manifest.path or ''}; "
            f"available: {', '.join(available)}"
        )
    by_class = {c: sorted((s for s in manifest if s.label == c), key=lambda s: s.id) for c in wanted}
    _check_enough(by_class, shots, manifest)
    support_ids = [s.id for c in wanted for s in _draw_class(by_class[c], shots, random.Random(f"{seed}:{c}"))]
    index = manifest.by_id()
    groups = sorted({index[i].group for i in support_ids})
    used = set(groups)
    heldout = [s.id for s in manifest if s.group not in used]
    digests = {i: image_sha256(index[i].image) for i in support_ids if Path(index[i].image).is_file()}
    return Split(shots, seed, wanted, support_ids, groups, heldout, digests)


def image_sha256(path: Path) -> str:
    """sha256 of an image file's bytes (the feature cache's image key, so the two always agree)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _check_enough(by_class: dict[str, list[Sample]], shots: int, manifest: Manifest) -> None:
    max_shots = min(len(rows) for rows in by_class.values())  # the smallest class bounds k
    for label, rows in by_class.items():
        if len(rows) < shots:
            raise UsadError(
                f"class {label!r} has only {len(rows)} images in manifest {manifest.path or ''}, fewer than "
                f"k={shots}; the largest k possible for classes {', '.join(by_class)} is {max_shots}"
            )


def _draw_class(rows: list[Sample], shots: int, rng: random.Random) -> list[Sample]:
    """Round-robin over shuffled patients, one image per patient per round."""
    patients: dict[str, list[Sample]] = {}
    for s in rows:  # rows are sorted by id, so each patient's list is too, before shuffling
        patients.setdefault(s.group, []).append(s)
    order = sorted(patients)
    rng.shuffle(order)
    for group in order:
        rng.shuffle(patients[group])
    drawn: list[Sample] = []
    depth = 0
    while len(drawn) < shots:
        drawn += [patients[g][depth] for g in order if depth < len(patients[g])]
        depth += 1
    return drawn[:shots]


def exclude_groups(manifest: Manifest, groups: Iterable[str]) -> Manifest:
    """The manifest without any row of these patients (e.g. a support set's)."""
    drop = {groups} if isinstance(groups, str) else set(groups)
    return manifest.where(lambda s: s.group not in drop)


def write_split(split: Split, path: Path) -> None:
    """Write ``split.json`` atomically."""
    write_json(path, split.to_json())


def read_split(path: Path) -> Split:
    path = Path(path)
    if not path.is_file():
        raise UsadError(f"split file not found: {path}; create it by sampling a support set first")
    try:
        data = read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsadError(f"split file {path} is not valid JSON ({exc}); delete it and sample again") from exc
    try:
        return Split.from_json(data)
    except UsadError as exc:
        raise UsadError(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise UsadError(f"split file {path} has a malformed field ({exc}); delete it and sample again") from exc
