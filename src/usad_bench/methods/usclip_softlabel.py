"""Ultrasound-CLIP few-shot adaptation with semantic soft labels (US-365K, CVPR 2026).

Ultrasound-CLIP pretrains CLIP with image-text targets taken from the similarity of diagnostic
attributes instead of one-hot pairs. Here the same objective adapts a frozen backbone to a few-shot
support set:

* Pairs: each support image with the attribute-structured description of its class (the prompt
  file's ``attributes``; default ``breast_ultrasound_attributes``), so a batch is B image-text pairs.
* Targets: the (B, B) attribute similarity of the pairs' classes (share of the nine attributes two
  classes agree on, ``captions.attribute_similarity_matrix``): images of one class share their
  target mass, and benign and malignant (which agree on body system, organ, echogenicity) are
  closer than either is to normal.
* Loss: ``pretrain.objective.semantic_aware_loss`` -- the pretraining command's soft-label
  contrastive loss plus the semantic matching loss, imported, not rewritten.
* Trainable: the backbone stays frozen (the suite caches its features), so what adapts is a residual
  linear map on the image embedding (zero-initialised: training starts at zero-shot) and the class
  text embeddings (initialised at the description ensembles), with CLIP's logit scale fixed.
* Prediction: class logits ``logit_scale * cos(image, class text)``, image score ``1 - p(normal)``.

A user holding the released Ultrasound-CLIP weights passes them as the backbone (see
baselines/usclip_softlabel.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from usad_bench.backbone import ImageFeatures
from usad_bench.captions import attribute_similarity_matrix
from usad_bench.errors import UsadError
from usad_bench.methods.base import Method, MethodConfig, Prediction
from usad_bench.methods.common import class_anomaly_score
from usad_bench.methods.registry import register
from usad_bench.pretrain.objective import SEMANTIC_TEMPERATURE, semantic_aware_loss
from usad_bench.prompts import PROMPT_HELP, PromptSet, ensemble_embedding


@dataclass
class USCLIPSoftLabelConfig(MethodConfig):
    epochs: int = 50  # few-shot schedule (the paper fine-tunes, but reports no few-shot recipe)
    batch_size: int = 16
    lr: float = 1e-3  # Adam
    prompts: str = "breast_ultrasound_attributes"  # needs a vocabulary with per-class `attributes`
    logit_scale: float = 100.0  # CLIP's learned scale, fixed
    semantic_weight: float = 1.0  # weight of the semantic matching loss (the release's default)
    semantic_temperature: float = SEMANTIC_TEMPERATURE  # temperature of the soft targets (the release's 0.07)
    train_text: bool = True  # also adapt the class text embeddings (false: image side only)


def class_attribute_similarity(prompts: PromptSet, classes: list[str], dataset: str) -> torch.Tensor:
    """(C, C) share of diagnostic attributes two classes agree on, unit diagonal."""
    rows = [prompts.class_attributes(c, dataset) for c in classes]
    missing = [c for c, row in zip(classes, rows, strict=True) if not row]
    if missing:
        raise UsadError(
            f"usclip_softlabel: prompt file {prompts.name!r} gives no diagnostic attributes for {missing}; pass "
            f"--set prompts=breast_ultrasound_attributes or a copy of it with those classes ({PROMPT_HELP})"
        )
    return torch.from_numpy(attribute_similarity_matrix(rows))


def pair_similarity(class_similarity: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, B) target similarity of a batch of image-description pairs from their (B,) class labels."""
    return class_similarity[labels][:, labels]


@register("usclip_softlabel")
class USCLIPSoftLabel(Method):
    config_class = USCLIPSoftLabelConfig
    trainable = True
    outputs = ("score", "logits")

    def __init__(self, cfg: USCLIPSoftLabelConfig, backbone, task):
        super().__init__(cfg, backbone, task)
        self.register_buffer("class_similarity", class_attribute_similarity(task.prompts, task.classes, task.dataset))
        texts = [task.prompts.describe(c, task.dataset) for c in task.classes]
        class_text = torch.stack([ensemble_embedding(backbone.encode_text(t)) for t in texts])  # (C, D)
        self.class_text = nn.Parameter(class_text, requires_grad=cfg.train_text)
        self.image_map = nn.Linear(backbone.embed_dim, backbone.embed_dim)
        nn.init.zeros_(self.image_map.weight)  # residual map starts at 0: the first prediction is zero-shot's
        nn.init.zeros_(self.image_map.bias)

    def image_embedding(self, cls: torch.Tensor) -> torch.Tensor:
        cls = cls.float()
        return F.normalize(cls + self.image_map(cls), dim=-1)  # (B, D)

    def class_logits(self, cls: torch.Tensor) -> torch.Tensor:
        return self.cfg.logit_scale * self.image_embedding(cls) @ F.normalize(self.class_text, dim=-1).T

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        labels = batch["label"]
        image = self.image_embedding(batch["cls"])  # (B, D)
        text = F.normalize(self.class_text, dim=-1)[labels]  # (B, D): each image's class description
        losses = semantic_aware_loss(
            image,
            text,
            self.cfg.logit_scale,
            pair_similarity(self.class_similarity, labels),
            semantic_weight=self.cfg.semantic_weight,
            temperature=self.cfg.semantic_temperature,
        )
        parts = {"contrastive": losses["contrastive"], "semantic": self.cfg.semantic_weight * losses["semantic"]}
        return self.log_losses(parts, batch_size=len(labels))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.image_map.weight, self.image_map.bias, self.class_text) if p.requires_grad]

    @torch.no_grad()
    def predict_features(self, feats: ImageFeatures) -> Prediction:
        logits = self.class_logits(feats.cls)
        return Prediction(score=class_anomaly_score(logits, self.task.normal_index), class_logits=logits)
