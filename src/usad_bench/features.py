"""Frozen image features for manifest samples, through the on-disk cache.

``FeatureExtractor.iter_batches`` streams (samples, features) batch by batch so a large test set
never has to fit in memory; ``extract`` gathers a small set (a support set) into one
:class:`FeatureTable`. Cache misses are computed in batches on the backbone's device; image files
are decoded by a small thread pool (PIL releases the GIL while decoding), which keeps a GPU fed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from usad_bench.backbone import Backbone, ImageFeatures
from usad_bench.cache import FeatureCache, feature_key, file_digest
from usad_bench.data.images import require_image
from usad_bench.data.manifest import Sample
from usad_bench.data.preprocess import Preprocess, check_variant

PATCH_DTYPE = torch.float16  # patch tokens are the bulk of the cache; half precision halves it


@dataclass
class FeatureTable:
    """Features of an ordered list of samples, held in memory."""

    ids: list[str]
    cls: torch.Tensor  # (N, D) float32
    patches: torch.Tensor | None  # (N, L, P, W) float16, or None when no layers were requested
    layers: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: torch.Tensor | slice) -> ImageFeatures:
        patches = self.patches[index].float() if self.patches is not None else None
        return ImageFeatures(cls=self.cls[index], patches=patches, layers=self.layers)


class FeatureExtractor:
    """Compute-or-load frozen features of chosen layers for samples."""

    def __init__(
        self,
        backbone: Backbone,
        cache: FeatureCache,
        layers: tuple[int, ...] = (),
        batch_size: int = 32,
        workers: int = 4,
    ):
        self.backbone = backbone
        self.cache = cache
        self.layers = tuple(layers)
        self.batch_size = batch_size
        self.workers = workers
        mean, std = backbone.mean_std
        self.preprocess = Preprocess(backbone.image_size, mean, std)
        self._description = backbone.describe()

    def key(self, variant: str) -> str:
        return feature_key(self._description, self.layers, variant)

    def iter_batches(
        self, samples: Sequence[Sample], variant: str = "orig"
    ) -> Iterator[tuple[list[Sample], ImageFeatures]]:
        check_variant(variant)
        key = self.key(variant)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for start in range(0, len(samples), self.batch_size):
                chunk = list(samples[start : start + self.batch_size])
                yield chunk, self._chunk_features(chunk, key, variant, pool)

    def extract(self, samples: Sequence[Sample], variant: str = "orig") -> FeatureTable:
        cls, patches = [], []
        for _, feats in self.iter_batches(samples, variant):
            cls.append(feats.cls)
            if feats.patches is not None:
                patches.append(feats.patches.to(PATCH_DTYPE))
        return FeatureTable(
            ids=[s.id for s in samples],
            cls=torch.cat(cls).float(),
            patches=torch.cat(patches) if patches else None,
            layers=self.layers,
        )

    def _chunk_features(self, chunk: list[Sample], key: str, variant: str, pool) -> ImageFeatures:
        shas = list(pool.map(lambda s: file_digest(require_image(s.image)), chunk))
        entries = [self.cache.load(key, sha) for sha in shas]
        missing = [i for i, entry in enumerate(entries) if entry is None]
        if missing:
            images = list(pool.map(lambda i: self.preprocess.load(chunk[i], variant), missing))
            computed = self.backbone.encode_images(torch.stack(images), self.layers)
            for row, i in enumerate(missing):
                entry = {"cls": computed.cls[row].float().cpu()}
                if computed.patches is not None:
                    entry["patches"] = computed.patches[row].to(PATCH_DTYPE).cpu()
                self.cache.store(key, shas[i], entry)
                entries[i] = entry
        cls = torch.stack([e["cls"] for e in entries])
        patches = torch.stack([e["patches"] for e in entries]).float() if self.layers else None
        return ImageFeatures(cls=cls, patches=patches, layers=self.layers)
