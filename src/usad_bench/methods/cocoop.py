"""CoCoOp: CoOp with image-conditioned context (Zhou et al., CVPR 2022; KaiyangZhou/CoOp ``trainers/cocoop.py``).

A meta-net (Linear -> ReLU -> Linear, bottleneck 1/16) maps each image's unit CLIP embedding to
one token-sized bias that is added to every context vector, so each image gets its own prompts
for all classes. Recipe (``vit_b16_c4_ep10_batch1_ctxv1``): 4 context vectors initialised from
the words "a photo of a", 10 epochs, batch 1, SGD lr 0.002 with CoOp's warm-up and cosine
schedule, logit scale 100.

Cost: the text tower runs once per (image, class) pair, in training and at prediction, which is
why CoCoOp is the slowest baseline here; see baselines/cocoop.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from usad_bench.backbone import ImageFeatures
from usad_bench.methods.base import Prediction
from usad_bench.methods.common import MetaNet, class_anomaly_score
from usad_bench.methods.coop import CoOp, CoOpConfig
from usad_bench.methods.registry import register


@dataclass
class CoCoOpConfig(CoOpConfig):
    epochs: int = 10  # CoCoOp's schedule
    batch_size: int = 1  # CoCoOp's batch size (prompts differ per image; batch 1 is the original's choice)
    n_ctx: int = 4  # context vectors (ignored when ctx_init is set: its word count is used, as CoCoOp)
    ctx_init: str = "a photo of a"  # CoCoOp's initial context words
    meta_reduction: int = 16  # meta-net bottleneck: hidden width = embedding width // this


@register("cocoop")
class CoCoOp(CoOp):
    config_class = CoCoOpConfig

    def __init__(self, cfg: CoCoOpConfig, backbone, task):
        super().__init__(cfg, backbone, task)
        width = self.prompt_learner.ctx.shape[-1]
        self.meta_net = MetaNet(backbone.embed_dim, width, reduction=cfg.meta_reduction)

    def class_logits(self, cls: torch.Tensor) -> torch.Tensor:
        image = F.normalize(cls, dim=-1)  # (B, D); the meta-net sees the unit embedding, as in CoCoOp
        ctx = self.prompt_learner.ctx[None] + self.meta_net(image)[:, None]  # (B, n_ctx, W)
        text = self.prompt_learner.text_features(self.backbone, ctx)  # (B, C, D)
        return self.cfg.logit_scale * torch.einsum("bd,bcd->bc", image, text)

    @torch.no_grad()
    def predict_features(self, feats: ImageFeatures) -> Prediction:
        # Chunked: every image costs C text-tower passes, so a whole test batch at once can be large.
        logits = torch.cat([self.class_logits(part) for part in feats.cls.split(8)])
        return Prediction(score=class_anomaly_score(logits, self.task.normal_index), class_logits=logits)
