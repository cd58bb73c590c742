"""A few human-readable lines describing a manifest (``usad-bench data summary``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from usad_bench.data.images import image_size as image_size_of
from usad_bench.data.images import load_mask
from usad_bench.data.manifest import CLASS_ORDER, Manifest, Sample, order_classes


def summarise(manifest: Manifest, check_masks: bool = True) -> str:
    """Counts per class, masks, patients (distinct groups) and class counts per domain.

    The canonical classes are always listed, zeros included, so a missing class (BUS-BRA has no
    normal images) is visible at a glance. ``check_masks`` decodes every mask and counts, per
    dataset, those without a lesion pixel (``data prepare`` drops them itself, with a warning).
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
        *(empty_mask_lines(samples) if check_masks else []),
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


def empty_mask_lines(samples: list[Sample]) -> list[str]:
    """Per dataset with masks: how many have no lesion pixel (they would score as all-background ground truth)."""
    lines = []
    for dataset in sorted({s.dataset for s in samples if s.has_mask}):
        masked = [s for s in samples if s.dataset == dataset and s.has_mask]
        empty = [s.id for s in masked if not load_mask(s.masks, image_size_of(s.image), s.image).any()]
        line = f"empty masks ({dataset}): {len(empty)} of {len(masked)}"
        if empty:
            line += f" ({', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''}; left out of pixel metrics by eval)"
        lines.append(line)
    return lines


def prompt_coverage(manifest: Manifest, prompts: str = "breast_ultrasound") -> str:
    """One line: which of the manifest's classes the prompt vocabulary cannot describe (UltraAD needs all)."""
    from usad_bench.prompts import PROMPT_HELP, load_prompts

    vocabulary = load_prompts(prompts)
    classes = manifest.classes
    missing = sorted({c for d in {s.dataset for s in manifest} for c in vocabulary.missing_descriptions(classes, d)})
    unnamed = [c for c in classes if c not in vocabulary.class_names]
    if not missing and not unnamed:
        return f"prompts: {prompts} describes every class ({', '.join(classes)})"
    parts = []
    if missing:
        parts.append(f"no description for class(es) {', '.join(missing)} (UltraAD needs one): {PROMPT_HELP}")
    if unnamed:
        parts.append(f"no class words for {', '.join(unnamed)} (classifiers use the label itself)")
    return f"prompts: {prompts} has " + "; ".join(parts)
