"""UltraAD: few-shot ultrasound anomaly detection, localisation and classification (Zhou et al., MICCAI 2025).

No public code; built from the paper (arXiv 2506.19694) as summarised in docs/METHODS.md. For a
batch of frozen CLIP features:

1. **Shared projected embedding**: z = normalise(f + MiniNet(f)) from the unit CLS embedding f; it
   conditions the prompts and drives the classifier (the multitask link). The MiniNet's last layer
   starts at zero, so z starts exactly at f.
2. **Image-aware prompting**: "a photo of a normal [G][I]." / "a photo of an abnormal [G][I].",
   [G] a global learnable token, [I] = Linear(z), encoded by the frozen text tower.
3. **Image feature adapters**: one linear layer per chosen block maps its patch tokens into the
   joint space; map 1 compares them with the image-aware prompts. ``adapter: hybrid`` (an ablation, not
   the paper) puts Hybrid Tuning's adapter (hybrid_adapter.py) before each of these layers.
4. **PIF**: normal / abnormal prototypes (class prompts + lesion-aware descriptions), ensembled
   with the image-aware prompts, cross-attend to the adapted tokens; map 2 compares the tokens with
   the fused text. The final map (``final_map``) averages the blocks of map 2 by default.
5. **Memory-boosted classification**: logits = scale * cos(z, text memory) per class +
   alpha * exp(-beta * (1 - cos(f, image memory))) @ labels (see ``ClassMemory``; ``cache_query``).
6. **Score**: w * (1 - p(normal)) + (1 - w) * max(map).

Loss: cross-entropy on the classes plus focal + Dice (equal weights) on every map of every image
with pixel ground truth (lesion masks, and normal images as all background). A support set without
any lesion mask trains no map at all; its maps are then zero-shot CLIP maps (projected patch tokens
against the prototypes). Ablations are config switches: ``prompts: generic`` (US-unaware wording),
``classification: false``, ``pif: false``. See baselines/ultraad.md for every choice the paper
leaves open.

Three exact shortcuts (``SHORTCUTS``; the tests and benchmarks/bench_ultraad_step.py compare each with
the straightforward computation): the prompts' fixed words are run through the causal text tower
once (``text_prefix``), PIF folds its key/value projections onto its two queries (``pif_fold``), and
a map is one upsampled logit difference through a sigmoid instead of a two-channel softmax
(``logit_diff``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from usad_bench.backbone import ImageFeatures, default_layers
from usad_bench.methods.base import Method, MethodConfig, Prediction, SupportSet, batch_features
from usad_bench.methods.common import MetaNet, check_choice, class_anomaly_score, patch_logits_to_probs
from usad_bench.methods.hybrid_adapter import HybridPatchAdapter
from usad_bench.methods.losses import segmentation_loss
from usad_bench.methods.registry import register
from usad_bench.methods.ultraad_parts import (
    ClassMemory,
    ImageAwarePrompts,
    PatchTextFusion,
    description_embeddings,
    state_prototypes,
)

FINAL_MAPS = ("fused", "plain", "mean")
CACHE_QUERIES = ("clip", "projected")
ADAPTERS = ("linear", "hybrid")
SHORTCUTS = frozenset({"text_prefix", "pif_fold", "logit_diff"})


class BranchLogits(NamedTuple):
    """Patch logits per block for each branch: (B, N, 1) abnormal minus normal, or (B, N, 2) (normal,
    abnormal) on the reference path."""

    plain: list[torch.Tensor]  # map 1: adapted patch tokens vs the image-aware prompts (or zero-shot maps)
    fused: list[torch.Tensor]  # map 2: adapted patch tokens vs PIF's fused text (empty without PIF)


@dataclass
class UltraADConfig(MethodConfig):
    epochs: int = 50  # passes over the support images (one cached view each); the paper does not say
    batch_size: int = 8  # support images per step (APRIL-GAN's batch size)
    lr: float = 1e-3  # Adam learning rate for every learned part (APRIL-GAN, Tip-Adapter-F)
    prompts: str = "breast_ultrasound"  # vocabulary; "generic" is the US-unaware ablation
    layers: list[int] | None = None  # 1-indexed blocks; None = four evenly spaced (6/12/18/24 of ViT-L/14)
    normal_template: str = "a photo of a normal {}."  # "{}" takes the two learned tokens [G][I]
    abnormal_template: str = "a photo of an abnormal {}."  # same slot, other state word
    mini_reduction: int = 16  # MiniNet bottleneck: hidden width = embedding width // this (CoCoOp)
    classification: bool = True  # memory-boosted class branch and CE loss (False = ablation "no cls branch")
    pif: bool = True  # patch-wise image-language fusion and its map (False = ablation "no PIF")
    pif_heads: int = 8  # M, attention heads of PIF; must divide the embedding width
    alpha: float = 1.0  # weight of the image-memory (cache) term in the class logits (Tip-Adapter)
    beta: float = 5.5  # sharpness of the image-memory affinity exp(-beta * (1 - cos)) (Tip-Adapter)
    cache_query: str = "clip"  # image-memory query: "clip" = raw CLIP embedding f (paper, Tip-Adapter), "projected" = z
    final_map: str = "fused"  # map that localises: "fused" = PIF's map 2 (paper), "plain" = map 1, "mean" = both
    logit_scale: float = 100.0  # CLIP's scale for text similarities, in maps and class logits
    cls_weight: float = 1.0  # weight of the cross-entropy term beside the (unweighted) map losses
    score_weight: float = 0.5  # w in score = w * p(abnormal) + (1 - w) * max(map)
    flip_augment: bool = True  # also train on mirrored support images
    text_chunk: int = 16  # images per text-tower pass at prediction (each costs two prompts)
    adapter: str = "linear"  # per-block image adapter: linear (paper) or hybrid (Hybrid Tuning's adapter + linear)


@register("ultraad")
class UltraAD(Method):
    config_class = UltraADConfig
    trainable = True
    outputs = ("score", "map", "logits")

    def __init__(self, cfg: UltraADConfig, backbone, task):
        super().__init__(cfg, backbone, task)
        check_choice("final_map", cfg.final_map, FINAL_MAPS, "ultraad")
        check_choice("cache_query", cfg.cache_query, CACHE_QUERIES, "ultraad")
        check_choice("adapter", cfg.adapter, ADAPTERS, "ultraad")
        dim = backbone.embed_dim
        self.layers = tuple(cfg.layers or default_layers(backbone.num_layers))
        self.mini_net = MetaNet(dim, dim, reduction=cfg.mini_reduction, zero_init_output=True)  # z starts at f
        templates = (cfg.normal_template, cfg.abnormal_template)
        self.prompt_learner = ImageAwarePrompts(backbone, templates, init_words=task.prompts.object)
        self.token_head = nn.Linear(dim, self.prompt_learner.width)  # z -> instance token [I]
        self.adapters = nn.ModuleList(image_adapter(cfg.adapter, backbone, dim) for _ in self.layers)
        self.fusion = PatchTextFusion(dim, cfg.pif_heads) if cfg.pif else None
        # (2, D) normal, abnormal: PIF's queries, and the text of the zero-shot maps of a support set without masks
        self.register_buffer("prototypes", state_prototypes(backbone, task.prompts, task.classes, task.dataset))
        self.register_buffer("maps_learned", torch.tensor(True))  # False: the support set has no lesion mask
        self.memory = None
        if cfg.classification:
            descriptions = description_embeddings(backbone, task.prompts, task.classes, task.dataset)
            self.register_buffer("class_descriptions", descriptions)  # (C, D), frozen source of P_t
            n_classes = len(task.classes)
            self.memory = ClassMemory(task.n_support, n_classes, dim, cfg.alpha, cfg.beta, cfg.logit_scale)
        self.shortcuts = set(SHORTCUTS)  # exact speed-ups in use; remove one to run its reference path

    # -- what the runner asks
    def feature_layers(self) -> tuple[int, ...]:
        return self.layers

    def setup_support(self, support: SupportSet) -> None:
        """Note whether any lesion mask exists; fill the class memory (image memory = unit CLS embeddings
        averaged over views, Tip-Adapter)."""
        lesion_masks = support.pixel_truth & (support.is_anomaly > 0)
        self.maps_learned.fill_(bool(lesion_masks.any()))
        if self.memory is None:
            return
        device = self.memory.image_memory.device
        views = torch.stack([F.normalize(support.features[v].cls.float(), dim=-1) for v in support.variants])
        image = F.normalize(views.mean(0), dim=-1).to(device)  # (K, D)
        labels = support.labels.to(device)
        self.memory.fill(image, self.class_descriptions[labels], labels)

    # -- the model
    def forward_parts(
        self, feats: ImageFeatures, branches: tuple[str, ...] = ("plain", "fused")
    ) -> tuple[BranchLogits, torch.Tensor | None]:
        """Patch logits of the requested branches for every block, and (B, C) class logits (or None)."""
        image = F.normalize(feats.cls.float(), dim=-1)  # (B, D) f
        z = F.normalize(image + self.mini_net(image), dim=-1)  # (B, D); residual: starts at CLIP's embedding
        logits = None
        if self.memory is not None:
            logits = self.memory(z, image if self.cfg.cache_query == "clip" else z)
        if not branches:
            return BranchLogits([], []), logits
        if not self.maps_learned:
            return BranchLogits(self.zero_shot_logits(feats.patches), []), logits
        instance = self.token_head(z)  # (B, Wt)
        use_prefix = None if "text_prefix" in self.shortcuts else False  # None: wherever the tower allows it
        aware = self.prompt_learner(self.backbone, instance, use_prefix=use_prefix)  # (B, 2, D)
        return self.layer_logits(feats.patches, aware, branches), logits

    def layer_logits(self, patches: torch.Tensor, aware: torch.Tensor, branches: tuple[str, ...]) -> BranchLogits:
        """Map 1 (adapted tokens vs the image-aware prompts) and, with PIF, map 2 for every block.

        PIF's queries are the normal / abnormal prototypes ensembled with the image-aware prompts;
        cross-attending them to the block's adapted tokens gives the fused text of map 2.
        """
        parts = BranchLogits([], [])
        fuse = self.fusion is not None and "fused" in branches
        queries = F.normalize(self.prototypes + aware, dim=-1) if fuse else None  # (B, 2, D)
        for i, adapter in enumerate(self.adapters):
            tokens = F.normalize(adapter(patches[:, i]), dim=-1)  # (B, N, D)
            if "plain" in branches:
                parts.plain.append(self._patch_logits(tokens, aware))
            if fuse:
                fused = self.fusion(queries, tokens, folded="pif_fold" in self.shortcuts)
                parts.fused.append(self._patch_logits(tokens, fused))
        return parts

    def zero_shot_logits(self, patches: torch.Tensor) -> list[torch.Tensor]:
        """Per block, frozen CLIP's projected patch tokens against the normal / abnormal prototypes."""
        text = self.prototypes.expand(patches.shape[0], -1, -1)  # (B, 2, D)
        return [
            self._patch_logits(F.normalize(self.backbone.project_tokens(patches[:, i]), dim=-1), text)
            for i in range(patches.shape[1])
        ]

    def _patch_logits(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, N, D) unit tokens, (B, 2, D) unit text -> (B, N, 1) abnormal-minus-normal logits.

        The reference path (``logit_diff`` off) keeps both: (B, N, 2) (normal, abnormal).
        """
        if "logit_diff" in self.shortcuts:
            return self.cfg.logit_scale * tokens @ (text[:, 1] - text[:, 0]).unsqueeze(-1)
        return self.cfg.logit_scale * tokens @ text.transpose(1, 2)

    def abnormal_probs(self, patch_logits: list[torch.Tensor]) -> torch.Tensor:
        """Per-block patch logits -> (B, K, S, S) p(abnormal) at the input size, one channel per block.

        A two-way softmax is the sigmoid of the logit difference, and bilinear upsampling is linear,
        so one upsample of the K stacked differences gives what K two-channel upsamples + softmax give.
        """
        grid, size = self.backbone.grid, self.task.image_size
        if patch_logits[0].shape[-1] == 2:  # reference path: APRIL-GAN's upsample-then-softmax per block
            return torch.stack([patch_logits_to_probs(x, grid, size)[:, 1] for x in patch_logits], dim=1)
        diff = torch.cat(patch_logits, dim=-1).transpose(1, 2)  # (B, K, N)
        diff = diff.reshape(diff.shape[0], diff.shape[1], *grid)
        return F.interpolate(diff, size=(size, size), mode="bilinear", align_corners=True).sigmoid()

    # -- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        keep = self._map_truth(batch)
        if self.memory is None and not keep.any():
            return None  # segmentation-only model and no pixel ground truth here: nothing to learn
        branches = ("plain", "fused") if keep.any() else ()  # no map loss: the maps are not even computed
        parts, logits = self.forward_parts(batch_features(batch, self.layers), branches)
        return self.log_losses(self.losses(parts, logits, batch), batch_size=len(keep))

    def _map_truth(self, batch: dict) -> torch.Tensor:
        """(B,) which images train the maps: pixel ground truth, and only if the support set has lesion masks."""
        return batch["pixel_truth"] & self.maps_learned

    def losses(self, parts: BranchLogits, logits: torch.Tensor | None, batch: dict) -> dict[str, torch.Tensor]:
        """Named loss terms: ``ce`` (class branch), ``seg`` (map 1) and ``seg_pif`` (map 2), each when it applies."""
        out = {}
        if logits is not None:
            out["ce"] = self.cfg.cls_weight * F.cross_entropy(logits, batch["label"])
        keep = self._map_truth(batch)
        if keep.any():  # images without pixel ground truth get no map loss
            mask = batch["mask"][keep]
            for name, branch in (("seg", parts.plain), ("seg_pif", parts.fused)):
                if branch:  # mean over blocks: the loss scale does not depend on how many blocks are used
                    p = self.abnormal_probs([x[keep] for x in branch])  # (B', K, S, S)
                    per_block = [
                        segmentation_loss(torch.stack([1 - p[:, k], p[:, k]], 1), mask) for k in range(p.shape[1])
                    ]
                    out[name] = torch.stack(per_block).mean()
        return out

    def configure_optimizers(self):
        return torch.optim.Adam(self.trainable_parameters(), lr=self.cfg.lr, betas=(0.5, 0.999))

    # -- prediction
    @torch.no_grad()
    def predict_features(self, feats: ImageFeatures) -> Prediction:
        parts = [self._predict(chunk) for chunk in _chunks(feats, self.cfg.text_chunk)]
        logits = torch.cat([p.class_logits for p in parts]) if self.memory is not None else None
        return Prediction(
            score=torch.cat([p.score for p in parts]),
            anomaly_map=torch.cat([p.anomaly_map for p in parts]),
            class_logits=logits,
        )

    def final_branches(self) -> tuple[str, ...]:
        """The branches whose maps localise (``final_map``); without PIF only map 1 exists."""
        if self.fusion is None:
            return ("plain",)
        return {"fused": ("fused",), "plain": ("plain",), "mean": ("plain", "fused")}[self.cfg.final_map]

    def _predict(self, feats: ImageFeatures) -> Prediction:
        parts, logits = self.forward_parts(feats, self.final_branches())
        anomaly_map = self.abnormal_probs(parts.plain + parts.fused).mean(1)  # (B, S, S) mean over blocks
        peak = anomaly_map.flatten(1).amax(1)  # (B,)
        if logits is None:
            return Prediction(score=peak, anomaly_map=anomaly_map)
        # Without a normal class p(abnormal) is 1 for every image, so the ranking is max(map)'s.
        p_abnormal = class_anomaly_score(logits, self.task.normal_index)
        w = self.cfg.score_weight
        return Prediction(score=w * p_abnormal + (1 - w) * peak, anomaly_map=anomaly_map, class_logits=logits)


def image_adapter(kind: str, backbone, dim: int) -> nn.Module:
    """One block's image adapter, (B, N, W) -> (B, N, D): UltraAD's linear layer, or (``adapter: hybrid``)
    Hybrid Tuning's frequency-filter + noise-estimation adapter followed by that linear layer."""
    if kind == "hybrid":
        return HybridPatchAdapter(backbone.vision_width, dim, tuple(backbone.grid))
    return nn.Linear(backbone.vision_width, dim)


def _chunks(feats: ImageFeatures, size: int) -> list[ImageFeatures]:
    """Split a batch so the text tower (two prompts per image) sees at most ``size`` images at once."""
    n = feats.cls.shape[0]
    return [
        ImageFeatures(cls=feats.cls[i : i + size], patches=feats.patches[i : i + size], layers=feats.layers)
        for i in range(0, n, max(1, size))
    ]
