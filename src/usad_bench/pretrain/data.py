"""Image-text pairs for pretraining, read from a manifest with ``caption`` and/or ``attributes`` columns.

* ``caption``: one report sentence per image, used as is.
* ``attributes``: ``key=value;...`` diagnostic descriptors (see :mod:`usad_bench.captions`). They
  give the soft-label targets; without a caption column a new caption is built from them every
  epoch (a different wording each time, deterministic for a seed).

Images are decoded once and kept as uint8 at the model's input size (resized without cropping,
exactly as :class:`usad_bench.data.preprocess.Preprocess` does at inference).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from usad_bench.captions import attribute_similarity_matrix, build_caption, parse_attributes
from usad_bench.data.manifest import Sample, read_manifest
from usad_bench.data.preprocess import Preprocess
from usad_bench.errors import UsadError

log = logging.getLogger(__name__)

CAPTION_COLUMN = "caption"
ATTRIBUTES_COLUMN = "attributes"


@dataclass
class PairRecord:
    sample: Sample
    caption: str | None  # the manifest's caption; None = build one from the attributes
    attributes: dict[str, str]


def read_pairs(manifest: Path) -> list[PairRecord]:
    """Rows usable for pretraining; a manifest without either column is a one-line error."""
    samples = read_manifest(manifest).samples
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or [])
        rows = list(reader)
    if not columns & {CAPTION_COLUMN, ATTRIBUTES_COLUMN}:
        raise UsadError(
            f"{manifest} has no '{CAPTION_COLUMN}' or '{ATTRIBUTES_COLUMN}' column; add '{CAPTION_COLUMN}' (a report "
            f"sentence per image) and/or '{ATTRIBUTES_COLUMN}' (e.g. shape=oval;margin=spiculated), or synthesise "
            "a captioned corpus with `usad-bench data synth OUT --pretraining`"
        )
    records = []
    for line, (sample, row) in enumerate(zip(samples, rows, strict=True), start=2):
        caption = (row.get(CAPTION_COLUMN) or "").strip() or None
        attributes = parse_attributes(row.get(ATTRIBUTES_COLUMN) or "", where=f"{manifest}:{line}")
        if caption or attributes:
            records.append(PairRecord(sample, caption, attributes))
    if not records:
        raise UsadError(f"{manifest}: every '{CAPTION_COLUMN}' / '{ATTRIBUTES_COLUMN}' cell is empty; fill them in")
    if len(records) < len(samples):
        log.warning("%s: %d of %d rows have neither caption nor attributes and are skipped", manifest,
                    len(samples) - len(records), len(samples))  # fmt: skip
    return records


class PairDataset(torch.utils.data.Dataset):
    """Index -> (uint8 image (3, S, S), caption, attributes); captions vary with :attr:`epoch`."""

    def __init__(self, records: list[PairRecord], image_size: int, seed: int = 0):
        self.records = records
        self.seed = seed
        self.epoch = 0  # set by the training loop so built captions change between epochs
        to_unit = Preprocess(image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # [0, 1], no normalisation
        self.images = torch.stack([(to_unit.load(r.sample) * 255).round().to(torch.uint8) for r in records])

    def __len__(self) -> int:
        return len(self.records)

    def caption(self, index: int) -> str:
        record = self.records[index]
        if record.caption:
            return record.caption
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return build_caption(record.attributes, record.sample.label, rng)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        return self.images[index], self.caption(index), index

    def similarity(self, indices: list[int]) -> torch.Tensor:
        """(B, B) target similarity of a batch: attribute overlap, or identical captions without attributes."""
        rows = [self.records[i].attributes for i in indices]
        if all(rows):
            return torch.from_numpy(attribute_similarity_matrix(rows))
        from usad_bench.pretrain.objective import caption_similarity

        return caption_similarity([self.caption(i) for i in indices])


def collate(batch: list[tuple[torch.Tensor, str, int]]) -> dict:
    images, captions, indices = zip(*batch, strict=True)
    return {"images": torch.stack(images), "captions": list(captions), "indices": list(indices)}
