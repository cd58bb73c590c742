"""Zero-shot CLIP: the training-free reference every adapted method should beat.

* Class logits: cos(CLS, class prompt ensembles) / T, i.e. zero-shot CLIP classification
  (CoOp's ``ZeroshotCLIP``, with the prompt file's class-template ensemble as Tip-Adapter and
  CoOp's ``ZeroshotCLIP2`` use; ``--set prompts=generic`` gives the originals' "a photo of a {}.").
* Image score, ``image_score: states`` (default): softmax over (normal, abnormal) of
  cos(CLS, state prompt ensembles) / T, abnormal entry -- the "CLIP for AD" recipe UltraAD's paper
  starts from (WinCLIP's zero-shot score). ``image_score: classes``: 1 - p(normal) from the class
  logits, the score every few-shot classifier here gives (used by the classification table).
* Anomaly map (``maps: true``): the state softmax per patch token, after the final norm and
  projection into the joint space, averaged over the chosen layers and upsampled to the input size.
  ``maps: false`` asks for no patch tokens at all (CLS-only, like the other classifiers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from usad_bench.backbone import ImageFeatures
from usad_bench.errors import UsadError
from usad_bench.methods.base import Method, MethodConfig, Prediction
from usad_bench.methods.common import class_anomaly_score, class_text_features, state_text_features, upsample_map
from usad_bench.methods.registry import register

IMAGE_SCORES = ("states", "classes")


@dataclass
class ZeroShotCLIPConfig(MethodConfig):
    layers: list[int] | None = None  # blocks whose projected patch tokens make the map; None = last block
    temperature: float = 0.01  # softmax temperature; CLIP's logit scale of 100
    image_score: str = "states"  # "states": normal/abnormal prompts; "classes": 1 - p(normal) of the class logits
    maps: bool = True  # predict anomaly maps (needs patch tokens); false = CLS features only


@register("zero_shot_clip")
class ZeroShotCLIP(Method):
    config_class = ZeroShotCLIPConfig
    trainable = False
    outputs = ("score", "map", "logits")

    def __init__(self, cfg: ZeroShotCLIPConfig, backbone, task):
        super().__init__(cfg, backbone, task)
        if cfg.image_score not in IMAGE_SCORES:
            raise UsadError(f"zero_shot_clip: image_score must be one of {IMAGE_SCORES}, got {cfg.image_score!r}")
        if not cfg.maps:
            self.outputs = ("score", "logits")  # this instance predicts no map
        if cfg.maps or cfg.image_score == "states":  # the state ensembles cost ~200 text-tower passes
            self.register_buffer("state_text", state_text_features(backbone, task.prompts))  # (2, D)
        self.register_buffer("class_text", class_text_features(backbone, task.prompts, task.classes))  # (C, D)

    def feature_layers(self) -> tuple[int, ...]:
        if not self.cfg.maps:
            return ()
        return tuple(self.cfg.layers or (self.backbone.num_layers,))

    @torch.no_grad()
    def predict_features(self, feats: ImageFeatures) -> Prediction:
        cls = F.normalize(feats.cls.float(), dim=-1)  # (B, D)
        logits = cls @ self.class_text.T / self.cfg.temperature  # (B, C)
        if self.cfg.image_score == "classes":
            score = class_anomaly_score(logits, self.task.normal_index)
        else:
            score = (cls @ self.state_text.T / self.cfg.temperature).softmax(-1)[:, 1]
        anomaly_map = None
        if self.cfg.maps:
            tokens = F.normalize(self.backbone.project_tokens(feats.patches), dim=-1)  # (B, L, N, D)
            patch_abnormal = (tokens @ self.state_text.T / self.cfg.temperature).softmax(-1)[..., 1]  # (B, L, N)
            anomaly_map = upsample_map(patch_abnormal.mean(1), self.backbone.grid, self.task.image_size)
        return Prediction(score=score, anomaly_map=anomaly_map, class_logits=logits)
