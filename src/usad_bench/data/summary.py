"""A few human-readable lines describing a manifest (``usad-bench data summary``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from usad_bench.data.manifest import CLASS_ORDER, Manifest, Sample, order_classes


def summarise(manifest: Manifest) -> str:
    """Counts per class, masks, patients (distinct groups) and class counts per domain.

    The canonical classes are always listed, zeros included, so a missing class (BUS-BRA has no
    normal images) is visible at a glance.
    """
    samples = list(manifest)
    classes = order_classes([*CLASS_ORDER, *(s.label for s in samples)])
    abnormal = [s for s in samples if s.is_anomaly]
    datasets = sorted({s.dataset for s in samples})
    groups = len({s.group for s in samples})
    if groups == len(samples):
        patients = f"patients: {groups} groups (one per image: no patient ids)"
    else:
        patients = f"patients: {groups} ({len(samples) / groups:.1f} images each on average)"
    lines = [
        f"{len(samples)} images ({', '.join(datasets)}): {_class_counts(samples, classes)}",
        f"masks: {sum(s.has_mask for s in samples)} images "
        f"({sum(s.has_mask for s in abnormal)} of {len(abnormal)} abnormal)",
        patients,
        "domains:",
    ]
    by_domain: dict[str, list[Sample]] = {}
    for s in samples:
        by_domain.setdefault(s.domain, []).append(s)
    width = max(len(d) for d in by_domain) if by_domain else 0
    for domain in sorted(by_domain):
        rows = by_domain[domain]
        lines.append(f"  {domain:<{width}}  {len(rows):5d} images: {_class_counts(rows, classes)}")
    return "\n".join(lines)


def _class_counts(samples: Iterable[Sample], classes: list[str]) -> str:
    counts = Counter(s.label for s in samples)
    return ", ".join(f"{c} {counts[c]}" for c in classes)
