"""Linear patch adapter: the trainable reference method.

APRIL-GAN's trained branch on its own (ByChelsea/VAND-APRIL-GAN, ``train.py``): one linear layer
per chosen encoder block maps that block's raw patch tokens into the joint space; each block's
tokens are compared with the normal / abnormal prompt ensembles (logit scale 100), the 2-channel
logits are upsampled bilinearly and soft-maxed, and every block's map is trained with
focal + Dice against the lesion mask (Adam, lr 1e-3, betas 0.5 / 0.999, batch 8).

Differences from APRIL-GAN, on purpose: the maps of the blocks are averaged rather than summed
(same ranking, scores stay in [0, 1]); the image score is the map's maximum (APRIL-GAN's
zero-shot score uses the CLS-text similarity and its few-shot score adds a memory term, both left
to the full APRIL-GAN baseline); images without a mask contribute nothing to the pixel loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from usad_bench.backbone import ImageFeatures, default_layers
from usad_bench.methods.base import Method, MethodConfig, Prediction, batch_features
from usad_bench.methods.common import patch_logits_to_probs, state_text_features
from usad_bench.methods.losses import segmentation_loss
from usad_bench.methods.registry import register
from usad_bench.prompts import load_prompts


@dataclass
class LinearAdapterConfig(MethodConfig):
    epochs: int = 20  # passes over the (tiny) support set
    batch_size: int = 8  # APRIL-GAN's batch size
    lr: float = 1e-3  # Adam learning rate (APRIL-GAN)
    layers: list[int] | None = None  # 1-indexed blocks; None = four evenly spaced (6/12/18/24 of ViT-L/14)
    logit_scale: float = 100.0  # scale of patch-text cosine similarities before the softmax
    flip_augment: bool = True  # also train on mirrored support images


@register("linear_adapter")
class LinearAdapter(Method):
    config_class = LinearAdapterConfig
    trainable = True
    outputs = ("score", "map")

    def __init__(self, cfg: LinearAdapterConfig, backbone, task):
        super().__init__(cfg, backbone, task)
        self.layers = tuple(cfg.layers or default_layers(backbone.num_layers))
        self.register_buffer("state_text", state_text_features(backbone, load_prompts(cfg.prompts)))  # (2, D)
        self.adapters = nn.ModuleList(nn.Linear(backbone.vision_width, backbone.embed_dim) for _ in self.layers)

    def feature_layers(self) -> tuple[int, ...]:
        return self.layers

    def layer_probs(self, feats: ImageFeatures) -> list[torch.Tensor]:
        """Per block, (B, 2, S, S) probabilities of (normal, abnormal)."""
        probs = []
        for i, adapter in enumerate(self.adapters):
            tokens = F.normalize(adapter(feats.patches[:, i]), dim=-1)  # (B, N, D)
            logits = self.cfg.logit_scale * tokens @ self.state_text.T  # (B, N, 2)
            probs.append(patch_logits_to_probs(logits, self.backbone.grid, self.task.image_size))
        return probs

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        keep = batch["pixel_truth"]
        if not keep.any():
            return None  # no pixel ground truth in this batch: nothing to learn from
        feats = batch_features(batch, self.layers)
        feats.patches = feats.patches[keep]
        mask = batch["mask"][keep]
        loss = sum(segmentation_loss(p, mask) for p in self.layer_probs(feats))
        return self.log_losses({"seg": loss}, batch_size=int(keep.sum()))

    def configure_optimizers(self):
        return torch.optim.Adam(self.trainable_parameters(), lr=self.cfg.lr, betas=(0.5, 0.999))

    @torch.no_grad()
    def predict_features(self, feats: ImageFeatures) -> Prediction:
        anomaly_map = torch.stack([p[:, 1] for p in self.layer_probs(feats)]).mean(0)  # (B, S, S)
        return Prediction(score=anomaly_map.flatten(1).amax(1), anomaly_map=anomaly_map)
