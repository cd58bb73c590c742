"""CLIP-Adapter: a residual bottleneck MLP on the image embedding (Gao et al., IJCV 2024).

Forward pass from the authors' ``clip_adapter.py`` (gaopengcuhk/CLIP-Adapter): Linear(D, D/4, no
bias) -> ReLU -> Linear(D/4, D, no bias) -> ReLU on the *raw* CLIP image embedding, blended as
0.2 * adapter + 0.8 * original, then normalised; logits = 100 * cos(image, class text), the text
being frozen hand-crafted prompts (here the prompt file's class-template ensemble; ``prompts:
generic`` gives a single "a photo of a {}."). Loss: cross-entropy.

The authors' repository released no training config (it runs inside CoOp's Dassl trainer), so the
optimiser follows the harness that runs CLIP-Adapter beside LP++ (FereshteShakeri/FewShot-CLIP-
Strong-Baseline, ``methods/clip_adapter.py``): plain SGD lr 0.01, batch 32, 200 epochs, one
warm-up epoch at 1e-5, then cosine decay. That harness steps its epoch-length cosine once per
*iteration* (so the rate falls to zero and rises again once a run has more iterations than epochs) and feeds the
adapter normalised embeddings with ratio 0.5; here the cosine is stepped per epoch, as Dassl does,
and the forward pass is the authors'. See baselines/clip_adapter.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from usad_bench.backbone import ImageFeatures
from usad_bench.methods.base import Method, MethodConfig, Prediction
from usad_bench.methods.common import class_anomaly_score, class_text_features
from usad_bench.methods.coop import warmup_cosine
from usad_bench.methods.registry import register


@dataclass
class CLIPAdapterConfig(MethodConfig):
    epochs: int = 200  # CoOp's few-shot schedule for 8/16 shots, which the LP++ harness keeps for CLIP-Adapter
    batch_size: int = 32  # the harness's batch size for CLIP-Adapter
    lr: float = 0.01  # plain SGD learning rate (the harness's value for CLIP-Adapter)
    reduction: int = 4  # bottleneck: hidden width = embedding width // this
    ratio: float = 0.2  # residual ratio: weight of the adapted feature in the blend
    warmup_epochs: int = 1  # epochs at the constant warm-up learning rate
    warmup_lr: float = 1e-5  # the constant warm-up learning rate
    logit_scale: float = 100.0  # CLIP's learned logit scale, fixed
    flip_augment: bool = True  # also train on mirrored support images (the harness trains with random flips)


class Adapter(nn.Module):
    """CLIP-Adapter's bottleneck: two bias-free linear layers, each followed by ReLU."""

    def __init__(self, dim: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.fc = nn.Sequential(
            nn.Linear(dim, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim, bias=False),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@register("clip_adapter")
class CLIPAdapter(Method):
    config_class = CLIPAdapterConfig
    trainable = True
    outputs = ("score", "logits")

    def __init__(self, cfg: CLIPAdapterConfig, backbone, task):
        super().__init__(cfg, backbone, task)
        self.register_buffer("class_text", class_text_features(backbone, task.prompts, task.classes))  # (C, D)
        self.adapter = Adapter(backbone.embed_dim, cfg.reduction)

    def class_logits(self, cls: torch.Tensor) -> torch.Tensor:
        ratio = self.cfg.ratio
        image = ratio * self.adapter(cls) + (1.0 - ratio) * cls  # (B, D), blended before normalising
        return self.cfg.logit_scale * F.normalize(image, dim=-1) @ self.class_text.T

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        loss = F.cross_entropy(self.class_logits(batch["cls"]), batch["label"])
        return self.log_losses({"ce": loss}, batch_size=len(batch["label"]))

    def configure_optimizers(self):
        cfg = self.cfg
        optimizer = torch.optim.SGD(self.trainable_parameters(), lr=cfg.lr)
        scheduler = warmup_cosine(optimizer, cfg.epochs, cfg.warmup_epochs, cfg.warmup_lr, cfg.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    @torch.no_grad()
    def predict_features(self, feats: ImageFeatures) -> Prediction:
        logits = self.class_logits(feats.cls)
        return Prediction(score=class_anomaly_score(logits, self.task.normal_index), class_logits=logits)
