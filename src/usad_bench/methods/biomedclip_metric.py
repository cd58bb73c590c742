"""BiomedCLIP prototype metric learning (Lee, Lee, Kim, J. KICS 50(10), 2025; no public code).

Our reading of the paper (every vague part is written down in baselines/biomedclip_metric.md):

* Embeddings: the frozen backbone's image embedding (CLS, joint space) and the embeddings of each
  class's clinical descriptions (the prompt file's lesion-aware descriptions, ensembled per class).
  The default backbone is BiomedCLIP (``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``).
* Projection network: Linear(D, H) -> ReLU -> Linear(H, P), output L2-normalised: the compact space.
  Image and text share it (both live in CLIP's joint space), so text can place the prototypes.
* Prototypes: one learnable vector per class in the compact space, initialised at the projected text
  embedding of its class ("text initialises the prototypes") and pulled back towards it during
  training by ``text_weight * mean(1 - cos(prototype, projected text))`` ("text regularises").
* Metric loss: prototypical cross-entropy on ``-||z - p_c||^2 / temperature`` over every class, which
  pulls each image to its own prototype and away from the others: normal vs abnormal, and benign vs
  malignant when both are classes.
* Score: the same distances; class logits ``-d^2 / T`` and image score ``1 - p(normal)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from usad_bench.backbone import ImageFeatures
from usad_bench.methods.base import Method, MethodConfig, Prediction
from usad_bench.methods.common import class_anomaly_score
from usad_bench.methods.registry import register
from usad_bench.prompts import ensemble_embedding


@dataclass
class BiomedCLIPMetricConfig(MethodConfig):
    epochs: int = 50  # passes over the support set (the paper gives no schedule; see baselines/biomedclip_metric.md)
    batch_size: int = 16
    lr: float = 1e-3  # Adam
    hidden_dim: int = 256  # projection network's hidden width
    proj_dim: int = 128  # the compact embedding's width
    temperature: float = 0.1  # softmax temperature on squared distances of unit vectors (range [0, 4])
    text_weight: float = 0.1  # weight of the prototype-to-text regulariser (0 = text only initialises)
    text_init: bool = True  # initialise prototypes at the projected class-description embeddings


class ProjectionNetwork(nn.Module):
    """Two-layer MLP from the joint space (D) to the compact space (P), unit-normalised output."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x.float()), dim=-1)


def squared_distances(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(B, P) embeddings, (C, P) prototypes -> (B, C) squared Euclidean distances."""
    return torch.cdist(z, prototypes).pow(2)


@register("biomedclip_metric")
class BiomedCLIPMetric(Method):
    config_class = BiomedCLIPMetricConfig
    trainable = True
    outputs = ("score", "logits")

    def __init__(self, cfg: BiomedCLIPMetricConfig, backbone, task):
        super().__init__(cfg, backbone, task)
        texts = [task.prompts.describe(c, task.dataset) for c in task.classes]
        class_text = torch.stack([ensemble_embedding(backbone.encode_text(t)) for t in texts])  # (C, D)
        self.register_buffer("class_text", class_text)
        self.projection = ProjectionNetwork(backbone.embed_dim, cfg.hidden_dim, cfg.proj_dim)
        with torch.no_grad():
            start = self.projection(class_text) if cfg.text_init else F.normalize(torch.randn(len(texts), cfg.proj_dim))
        self.prototypes = nn.Parameter(start.clone())  # (C, P)

    def class_logits(self, cls: torch.Tensor) -> torch.Tensor:
        return -squared_distances(self.projection(cls), self.prototypes) / self.cfg.temperature  # (B, C)

    def text_regulariser(self) -> torch.Tensor:
        anchors = self.projection(self.class_text)  # (C, P)
        return (1.0 - F.cosine_similarity(self.prototypes, anchors, dim=-1)).mean()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        losses = {"proto": F.cross_entropy(self.class_logits(batch["cls"]), batch["label"])}
        if self.cfg.text_weight > 0:
            losses["text"] = self.cfg.text_weight * self.text_regulariser()
        return self.log_losses(losses, batch_size=len(batch["label"]))

    @torch.no_grad()
    def predict_features(self, feats: ImageFeatures) -> Prediction:
        logits = self.class_logits(feats.cls)
        return Prediction(score=class_anomaly_score(logits, self.task.normal_index), class_logits=logits)
