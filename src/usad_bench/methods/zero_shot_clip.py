"""Zero-shot CLIP: the training-free reference every adapted method should beat.

* Image score: softmax over (normal, abnormal) of cos(CLS, prompt ensembles) / T, abnormal entry
  (the "CLIP for AD" recipe UltraAD's paper starts from, WinCLIP's zero-shot score).
* Anomaly map: the same softmax per patch token, after the final norm and projection into the
  joint space, averaged over the chosen layers and upsampled to the input size.
* Class logits: cos(CLS, class prompt ensembles) / T, i.e. zero-shot CLIP classification
  (CoOp's ``ZeroshotCLIP`` with a template ensemble as Tip-Adapter uses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from usad_bench.backbone import ImageFeatures
from usad_bench.methods.base import Method, MethodConfig, Prediction
from usad_bench.methods.common import class_text_features, state_text_features, upsample_map
from usad_bench.methods.registry import register
from usad_bench.prompts import load_prompts


@dataclass
class ZeroShotCLIPConfig(MethodConfig):
    layers: list[int] | None = None  # blocks whose projected patch tokens make the map; None = last block
    temperature: float = 0.01  # softmax temperature; CLIP's logit scale of 100


@register("zero_shot_clip")
class ZeroShotCLIP(Method):
    config_class = ZeroShotCLIPConfig
    trainable = False
    outputs = ("score", "map", "logits")

    def __init__(self, cfg: ZeroShotCLIPConfig, backbone, task):
        super().__init__(cfg, backbone, task)
        prompts = load_prompts(cfg.prompts)
        self.register_buffer("state_text", state_text_features(backbone, prompts))  # (2, D)
        self.register_buffer("class_text", class_text_features(backbone, prompts, task.classes))  # (C, D)

    def feature_layers(self) -> tuple[int, ...]:
        return tuple(self.cfg.layers or (self.backbone.num_layers,))

    @torch.no_grad()
    def predict_features(self, feats: ImageFeatures) -> Prediction:
        cls = F.normalize(feats.cls, dim=-1)  # (B, D)
        score = (cls @ self.state_text.T / self.cfg.temperature).softmax(-1)[:, 1]
        tokens = F.normalize(self.backbone.project_tokens(feats.patches), dim=-1)  # (B, L, N, D)
        patch_abnormal = (tokens @ self.state_text.T / self.cfg.temperature).softmax(-1)[..., 1]  # (B, L, N)
        anomaly_map = upsample_map(patch_abnormal.mean(1), self.backbone.grid, self.task.image_size)
        logits = cls @ self.class_text.T / self.cfg.temperature
        return Prediction(score=score, anomaly_map=anomaly_map, class_logits=logits)
