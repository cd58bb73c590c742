"""UltraAD: few-shot ultrasound anomaly detection, localisation and classification (Zhou et al., MICCAI 2025).

No public code; built from the paper (arXiv 2506.19694) as summarised in docs/METHODS.md. For a
batch of frozen CLIP features:

1. **Shared projected embedding**: z = normalise(f + MiniNet(f)) from the unit CLS embedding f; it
   conditions the prompts and drives the classifier (the multitask link).
2. **Image-aware prompting**: "a photo of a normal [G][I]." / "a photo of an abnormal [G][I].",
   [G] a global learnable token, [I] = Linear(z), encoded by the frozen text tower.
3. **Image feature adapters**: one linear layer per chosen block maps its patch tokens into the
   joint space; map 1 compares them with the image-aware prompts.
4. **PIF**: normal / abnormal prototypes (class prompts + lesion-aware descriptions), ensembled
   with the image-aware prompts, cross-attend to the adapted tokens; map 2 compares the tokens with
   the fused text. The final map averages every block of both branches.
5. **Memory-boosted classification**: logits = scale * cos(z, text memory) per class +
   alpha * exp(-beta * (1 - cos(z, image memory))) @ labels (see ``ClassMemory``).
6. **Score**: w * (1 - p(normal)) + (1 - w) * max(map).

Loss: cross-entropy on the classes plus focal + Dice (equal weights) on every map of every image
with pixel ground truth (lesion masks, and normal images as all background). Ablations are config
switches: ``prompts: generic`` (US-unaware wording), ``classification: false``, ``pif: false``.
See baselines/ultraad.md for every choice the paper leaves open.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from usad_bench.backbone import ImageFeatures, default_layers
from usad_bench.methods.base import Method, MethodConfig, Prediction, SupportSet, batch_features
from usad_bench.methods.common import MetaNet, class_anomaly_score, patch_logits_to_probs
from usad_bench.methods.losses import segmentation_loss
from usad_bench.methods.registry import register
from usad_bench.methods.ultraad_parts import (
    ClassMemory,
    ImageAwarePrompts,
    PatchTextFusion,
    description_embeddings,
    state_prototypes,
)


class BranchMaps(NamedTuple):
    """(B, 2, S, S) probabilities of (normal, abnormal), one per block, for each branch."""

    plain: list[torch.Tensor]  # map 1: adapted patch tokens vs the image-aware prompts
    fused: list[torch.Tensor]  # map 2: adapted patch tokens vs PIF's fused text (empty without PIF)

    def all(self) -> list[torch.Tensor]:
        return self.plain + self.fused


@dataclass
class UltraADConfig(MethodConfig):
    epochs: int = 50  # passes over the support set (x2 with flips); the paper does not say, see baselines/ultraad.md
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
    logit_scale: float = 100.0  # CLIP's scale for text similarities, in maps and class logits
    cls_weight: float = 1.0  # weight of the cross-entropy term beside the (unweighted) map losses
    score_weight: float = 0.5  # w in score = w * p(abnormal) + (1 - w) * max(map)
    flip_augment: bool = True  # also train on mirrored support images
    text_chunk: int = 16  # images per text-tower pass at prediction (each costs two prompts)


@register("ultraad")
class UltraAD(Method):
    config_class = UltraADConfig
    trainable = True
    outputs = ("score", "map", "logits")

    def __init__(self, cfg: UltraADConfig, backbone, task):
        super().__init__(cfg, backbone, task)
        dim = backbone.embed_dim
        self.layers = tuple(cfg.layers or default_layers(backbone.num_layers))
        self.mini_net = MetaNet(dim, dim, reduction=cfg.mini_reduction)
        templates = (cfg.normal_template, cfg.abnormal_template)
        self.prompt_learner = ImageAwarePrompts(backbone, templates, init_words=task.prompts.object)
        self.token_head = nn.Linear(dim, self.prompt_learner.width)  # z -> instance token [I]
        self.adapters = nn.ModuleList(nn.Linear(backbone.vision_width, dim) for _ in self.layers)
        self.fusion = PatchTextFusion(dim, cfg.pif_heads) if cfg.pif else None
        prototypes = state_prototypes(backbone, task.prompts, task.classes, task.dataset) if cfg.pif else None
        self.register_buffer("prototypes", prototypes)  # (2, D) normal, abnormal: PIF's queries (None without PIF)
        self.memory = None
        if cfg.classification:
            descriptions = description_embeddings(backbone, task.prompts, task.classes, task.dataset)
            self.register_buffer("class_descriptions", descriptions)  # (C, D), frozen source of P_t
            n_classes = len(task.classes)
            self.memory = ClassMemory(task.n_support, n_classes, dim, cfg.alpha, cfg.beta, cfg.logit_scale)

    # -- what the runner asks
    def feature_layers(self) -> tuple[int, ...]:
        return self.layers

    def setup_support(self, support: SupportSet) -> None:
        """Fill the class memory: image memory = unit CLS embeddings averaged over views (Tip-Adapter)."""
        if self.memory is None:
            return
        device = self.memory.image_memory.device
        views = torch.stack([F.normalize(support.features[v].cls.float(), dim=-1) for v in support.variants])
        image = F.normalize(views.mean(0), dim=-1).to(device)  # (K, D)
        labels = support.labels.to(device)
        self.memory.fill(image, self.class_descriptions[labels], labels)

    # -- the model
    def forward_parts(self, feats: ImageFeatures) -> tuple[BranchMaps, torch.Tensor | None]:
        """Per block (B, 2, S, S) map probabilities of both branches, and (B, C) class logits (or None)."""
        image = F.normalize(feats.cls.float(), dim=-1)  # (B, D)
        z = F.normalize(image + self.mini_net(image), dim=-1)  # (B, D); residual: starts at CLIP's embedding
        aware = self.prompt_learner(self.backbone, self.token_head(z))  # (B, 2, D) unit image-aware prompts
        maps = self.layer_maps(feats.patches, aware)
        logits = self.memory(z) if self.memory is not None else None
        return maps, logits

    def layer_maps(self, patches: torch.Tensor, aware: torch.Tensor) -> BranchMaps:
        """Map 1 (adapted tokens vs the image-aware prompts) and, with PIF, map 2 for every block.

        PIF's queries are the normal / abnormal prototypes ensembled with the image-aware prompts;
        cross-attending them to the block's adapted tokens gives the fused text of map 2.
        """
        maps = BranchMaps([], [])
        queries = F.normalize(self.prototypes + aware, dim=-1) if self.fusion is not None else None  # (B, 2, D)
        for i, adapter in enumerate(self.adapters):
            tokens = F.normalize(adapter(patches[:, i]), dim=-1)  # (B, N, D)
            maps.plain.append(self._probs(tokens, aware))
            if self.fusion is not None:
                maps.fused.append(self._probs(tokens, self.fusion(queries, tokens)))
        return maps

    def _probs(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        logits = self.cfg.logit_scale * tokens @ text.transpose(1, 2)  # (B, N, 2)
        return patch_logits_to_probs(logits, self.backbone.grid, self.task.image_size)

    # -- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        keep = batch["pixel_truth"]
        if self.memory is None and not keep.any():
            return None  # segmentation-only model and no pixel ground truth here: nothing to learn
        maps, logits = self.forward_parts(batch_features(batch, self.layers))
        return self.log_losses(self.losses(maps, logits, batch), batch_size=len(keep))

    def losses(self, maps: BranchMaps, logits: torch.Tensor | None, batch: dict) -> dict[str, torch.Tensor]:
        """Named loss terms: ``ce`` (class branch), ``seg`` (map 1) and ``seg_pif`` (map 2), each when it applies."""
        out = {}
        if logits is not None:
            out["ce"] = self.cfg.cls_weight * F.cross_entropy(logits, batch["label"])
        keep = batch["pixel_truth"]
        if keep.any():  # images without pixel ground truth get no map loss
            mask = batch["mask"][keep]
            for name, branch in (("seg", maps.plain), ("seg_pif", maps.fused)):
                if branch:  # mean over blocks: the loss scale does not depend on how many blocks are used
                    out[name] = torch.stack([segmentation_loss(p[keep], mask) for p in branch]).mean()
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

    def _predict(self, feats: ImageFeatures) -> Prediction:
        maps, logits = self.forward_parts(feats)
        anomaly_map = torch.stack([p[:, 1] for p in maps.all()]).mean(0)  # (B, S, S) every block, both branches
        peak = anomaly_map.flatten(1).amax(1)  # (B,)
        if logits is None:
            return Prediction(score=peak, anomaly_map=anomaly_map)
        # Without a normal class p(abnormal) is 1 for every image, so the ranking is max(map)'s.
        p_abnormal = class_anomaly_score(logits, self.task.normal_index)
        w = self.cfg.score_weight
        return Prediction(score=w * p_abnormal + (1 - w) * peak, anomaly_map=anomaly_map, class_logits=logits)


def _chunks(feats: ImageFeatures, size: int) -> list[ImageFeatures]:
    """Split a batch so the text tower (two prompts per image) sees at most ``size`` images at once."""
    n = feats.cls.shape[0]
    return [
        ImageFeatures(cls=feats.cls[i : i + size], patches=feats.patches[i : i + size], layers=feats.layers)
        for i in range(0, n, max(1, size))
    ]
