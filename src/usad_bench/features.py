"""Frozen image features for manifest samples, through the on-disk cache.

``FeatureExtractor.iter_batches`` streams (samples, features) batch by batch so a large test set
never has to fit in memory; ``extract`` gathers a small set (a support set) into one
:class:`FeatureTable`. Cache misses are computed in batches on the backbone's device; image files
are decoded by a small thread pool (PIL releases the GIL while decoding), which keeps a GPU fed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from usad_bench.backbone import Backbone, ImageFeatures
from usad_bench.cache import FeatureCache, feature_key, file_digest
from usad_bench.data.images import require_image
from usad_bench.data.manifest import Sample
from usad_bench.data.preprocess import Preprocess, check_variant
from usad_bench.feature_kinds import RAW, FeatureRequest

PATCH_DTYPE = torch.float16  # patch tokens are the bulk of the cache; half precision halves it


@dataclass
class FeatureTable:
    """Features of an ordered list of samples, held in memory."""

    ids: list[str]
    cls: torch.Tensor  # (N, D) float32
    patches: torch.Tensor | None  # (N, L, P, W) float16, or None when no layers were requested
    layers: tuple[int, ...]
    kind: str = "raw"  # feature kind (usad_bench.feature_kinds)
    windows: dict[int, torch.Tensor] = field(default_factory=dict)  # windows kind: side -> (N, n_windows, D) fp16

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: torch.Tensor | slice) -> ImageFeatures:
        patches = self.patches[index].float() if self.patches is not None else None
        windows = {side: w[index].float() for side, w in self.windows.items()}
        return ImageFeatures(cls=self.cls[index], patches=patches, layers=self.layers, kind=self.kind, windows=windows)


class FeatureExtractor:
    """Compute-or-load frozen features for samples: raw tokens of chosen layers, or an encoder variant.

    ``layers`` is a :class:`FeatureRequest` (``Method.feature_request()``) or, as before, a tuple of
    1-indexed layers for raw tokens. A request this backbone cannot serve fails here, before any image.
    Raw tokens share one cache entry per image for all blocks (``usad_bench.cache``): a miss encodes
    the union of the blocks asked of this backbone so far, in one pass.
    """

    def __init__(
        self,
        backbone: Backbone,
        cache: FeatureCache,
        layers: FeatureRequest | tuple[int, ...] = (),
        batch_size: int = 32,
        workers: int = 4,
    ):
        self.request = layers if isinstance(layers, FeatureRequest) else FeatureRequest(layers=tuple(layers))
        backbone.check_request(self.request)
        self.backbone = backbone
        self.cache = cache
        self.batch_size = batch_size
        self.workers = workers
        mean, std = backbone.mean_std
        if self.request.unnormalised:  # MVFA feeds [0, 1] pixels (its loaders only Resize + ToTensor)
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        self.preprocess = Preprocess(backbone.image_size, mean, std)
        self._description = backbone.describe()
        self._merged = self.request.kind == RAW  # raw: one entry per image holds every block encoded so far
        if self._merged:
            self.cache.add_to_layer_plan(self._plan_key, self.layers)

    @property
    def layers(self) -> tuple[int, ...]:
        return self.request.layers

    def key(self, variant: str) -> str:
        layers = () if self._merged else self.layers  # raw entries hold blocks as separate tensors
        return feature_key(self._description, layers, variant, self.request.key_fields())

    @property
    def _plan_key(self) -> str:
        return feature_key(self._description, (), "any", {"layer_plan": True, **self.request.key_fields()})

    def _wanted(self) -> set[str] | None:
        """The tensors a raw request reads from an entry; None (all) for the other kinds."""
        return {"cls", *(f"layer_{i}" for i in self.layers)} if self._merged else None

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
        batches = [feats for _, feats in self.iter_batches(samples, variant)]
        patches = [f.patches.to(PATCH_DTYPE) for f in batches if f.patches is not None]
        sides = batches[0].windows if batches else {}
        return FeatureTable(
            ids=[s.id for s in samples],
            cls=torch.cat([f.cls for f in batches]).float(),
            patches=torch.cat(patches) if patches else None,
            layers=batches[0].layers if batches else self.layers,
            kind=self.request.kind,
            windows={side: torch.cat([f.windows[side].to(PATCH_DTYPE) for f in batches]) for side in sides},
        )

    def _chunk_features(self, chunk: list[Sample], key: str, variant: str, pool) -> ImageFeatures:
        shas = list(pool.map(lambda s: file_digest(require_image(s.image)), chunk))
        entries = [self.cache.load(key, sha, self._wanted()) for sha in shas]
        missing = [i for i, entry in enumerate(entries) if entry is None]
        if missing:
            images = list(pool.map(lambda i: self.preprocess.load(chunk[i], variant), missing))
            request = self._request_to_compute(key, [shas[i] for i in missing])
            computed = self.backbone.encode_features(torch.stack(images), request)
            for row, i in enumerate(missing):
                entry = self._entry(computed, row)
                self.cache.store(key, shas[i], entry)
                entries[i] = entry
        return self._stack(entries)

    def _request_to_compute(self, key: str, shas: list[str]) -> FeatureRequest:
        """Raw: every block planned for this backbone or already stored for these images, so the
        rewritten entries lose nothing and later requests hit; other kinds: the request itself."""
        if not self._merged:
            return self.request
        layers = set(self.layers) | self.cache.layer_plan(self._plan_key)
        for sha in shas:
            names = self.cache.stored_names(key, sha)
            layers |= {int(n.removeprefix("layer_")) for n in names if n.startswith("layer_")}
        return FeatureRequest(layers=tuple(sorted(layers)))

    def _entry(self, computed: ImageFeatures, row: int) -> dict[str, torch.Tensor]:
        """One image's cache entry: raw blocks as ``layer_<i>`` tensors, other kinds' patches whole."""
        entry = {"cls": computed.cls[row].float().cpu()}
        if computed.patches is not None and self._merged:
            for index, layer in enumerate(computed.layers):
                entry[f"layer_{layer}"] = computed.patches[row, index].to(PATCH_DTYPE).cpu()
        elif computed.patches is not None:
            entry["patches"] = computed.patches[row].to(PATCH_DTYPE).cpu()
        for side, windows in computed.windows.items():
            entry[f"windows_{side}"] = windows[row].to(PATCH_DTYPE).cpu()
        return entry

    def _stack(self, entries: list[dict[str, torch.Tensor]]) -> ImageFeatures:
        """One batch of ImageFeatures from cache entries (the same whether computed now or loaded)."""
        cls = torch.stack([e["cls"] for e in entries])
        if self._merged:  # the requested blocks, in the request's order: (B, L, N, W)
            per_image = [torch.stack([e[f"layer_{i}"] for i in self.layers]) for e in entries] if self.layers else None
            patches = torch.stack(per_image).float() if per_image else None
        else:
            patches = torch.stack([e["patches"] for e in entries]).float() if "patches" in entries[0] else None
        windows = {
            int(name.removeprefix("windows_")): torch.stack([e[name] for e in entries]).float()
            for name in sorted(entries[0])
            if name.startswith("windows_")
        }
        layers = (self.backbone.num_layers,) if windows else self.layers  # windows: the final block's tokens
        return ImageFeatures(cls=cls, patches=patches, layers=layers, kind=self.request.kind, windows=windows)
