"""AnomalyCLIP (Zhou et al., ICLR 2024): object-agnostic learnable prompts on a DPAM-refined frozen CLIP.

Follows zqhang/AnomalyCLIP (see baselines/anomalyclip.md):

* Image side: the frozen encoder with DPAM (encoder variant ``dpam``): V-V attention from block 6 of
  24 on (3 of 12), tokens of the chosen blocks (default: the last, as ``train.sh``) after the final
  norm and projection; the image embedding is the original path's CLS, projected without the final
  norm. Everything is cached once per image.
* Text side: two object-agnostic prompts, ``[X]*12 object.`` and ``[X]*12 damaged object.``, whose
  12 context vectors are learned separately for normal and abnormal (N(0, 0.02)), plus deep text
  prompts: 4 learned tokens replace positions 1..4 at text blocks 1..8 (``depth`` 9).
* Losses: CE on cos(CLS, t) / 0.07 against the image label, plus, per block, focal + Dice(abnormal,
  mask) + Dice(normal, 1 - mask) on softmax(cos(token, t) / 0.07) upsampled bilinearly to the input
  size; the pixel loss is weighted 4 (``lam``). Adam, lr 1e-3, betas (0.5, 0.999), batch 8,
  15 epochs, the last epoch kept.
* Prediction: score = softmax(cos(CLS, t) / 0.07)[abnormal]; map = sum over blocks of
  (p_abnormal + 1 - p_normal) / 2, Gaussian-smoothed with sigma 4 (pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn

from usad_bench.backbone import ImageFeatures
from usad_bench.feature_kinds import DPAM, FeatureRequest, dpam_first_block
from usad_bench.methods.base import Method, MethodConfig, Prediction, batch_features
from usad_bench.methods.common import causal_text_length
from usad_bench.methods.losses import segmentation_loss
from usad_bench.methods.registry import register


@dataclass
class AnomalyCLIPConfig(MethodConfig):
    epochs: int = 15  # train.sh
    batch_size: int = 8
    lr: float = 1e-3
    layers: list[int] | None = None  # blocks whose V-V tokens make maps; None = the last block (train.sh)
    dpam_start: int | None = None  # first V-V block; None = 6 of 24 (DPAM_layer=20), scaled to the depth
    n_ctx: int = 12  # learnable context tokens per prompt
    depth: int = 9  # deep text prompts at text blocks 1 .. depth-1
    t_n_ctx: int = 4  # tokens per deep text prompt
    temperature: float = 0.07
    pixel_weight: float = 4.0  # lam: weight of the pixel losses against the image CE
    sigma: float = 4.0  # Gaussian smoothing of the test map (pixels); 0 = none
    object_word: str = "object"  # object-agnostic: the same word for every class


class ObjectAgnosticPrompts(nn.Module):
    """Learned normal / abnormal context vectors and deep text prompts around fixed prompt tokens."""

    def __init__(self, backbone, cfg: AnomalyCLIPConfig):
        super().__init__()
        prefix = " ".join(["X"] * cfg.n_ctx)
        texts = [f"{prefix} {cfg.object_word}.", f"{prefix} damaged {cfg.object_word}."]  # normal, abnormal
        tokens = backbone.tokenize(texts)  # (2, C)
        with torch.no_grad():
            embedding = backbone.token_embedding(tokens).float()  # (2, C, Wt)
        length = causal_text_length(backbone, embedding, tokens)  # the padding after end-of-text changes nothing
        tokens, embedding = tokens[:, :length], embedding[:, :length]
        width = embedding.shape[-1]
        self.n_ctx = cfg.n_ctx
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("embedding", embedding, persistent=False)
        self.ctx = nn.Parameter(torch.randn(2, cfg.n_ctx, width) * 0.02)  # [normal, abnormal] contexts
        # Deep prompts enter text blocks 1 .. depth-1; a shallower tower (tests' tiny one) takes only those it has.
        n_deep = min(cfg.depth - 1, max(backbone.text_num_layers - 1, 0))
        self.deep = nn.ParameterList(nn.Parameter(torch.randn(cfg.t_n_ctx, width) * 0.02) for _ in range(n_deep))

    def forward(self, backbone) -> torch.Tensor:
        """(2, D) unit text embeddings of (normal, abnormal)."""
        e = self.embedding
        prompts = torch.cat([e[:, :1], self.ctx.to(e.dtype), e[:, 1 + self.n_ctx :]], dim=1)  # (2, C, Wt)
        text = backbone.encode_text_embeddings(prompts, self.tokens, deep_prompts=list(self.deep))
        return F.normalize(text, dim=-1)


@register("anomalyclip")
class AnomalyCLIP(Method):
    """See the module docstring."""

    config_class = AnomalyCLIPConfig
    trainable = True
    outputs = ("score", "map")
    activation = "quick_gelu"  # AnomalyCLIP_lib builds the OpenAI model with QuickGELU (AnomalyCLIP.py:107-120)

    def __init__(self, cfg: AnomalyCLIPConfig, backbone, task):
        super().__init__(cfg, backbone, task)
        self.layers = tuple(cfg.layers or (backbone.num_layers,))
        self.dpam_start = cfg.dpam_start or dpam_first_block(backbone.num_layers)
        self.prompts = ObjectAgnosticPrompts(backbone, cfg)

    def feature_request(self) -> FeatureRequest:
        return FeatureRequest(kind=DPAM, layers=self.layers, dpam_start=self.dpam_start)

    def text_features(self) -> torch.Tensor:
        return self.prompts(self.backbone)

    def layer_probs(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, L, N, D) DPAM tokens, (2, D) text -> (B, L, 2, S, S) softmax(cos / T), upsampled after the softmax."""
        probs = (F.normalize(tokens, dim=-1) @ text.T / self.cfg.temperature).softmax(-1)  # (B, L, N, 2)
        b, n_layers = probs.shape[:2]
        grid = probs.permute(0, 1, 3, 2).reshape(b * n_layers, 2, *self.backbone.grid)
        size = (self.task.image_size, self.task.image_size)
        return F.interpolate(grid, size=size, mode="bilinear", align_corners=False).unflatten(0, (b, n_layers))

    def losses(self, feats: ImageFeatures, mask: torch.Tensor, label: torch.Tensor, pixel_truth: torch.Tensor):
        """AnomalyCLIP's image CE and its lam-weighted per-block focal + two-sided Dice (train.py:82-104)."""
        text = self.text_features()  # (2, D)
        logits = F.normalize(feats.cls, dim=-1) @ text.T / self.cfg.temperature  # (B, 2)
        losses = {"image": F.cross_entropy(logits, label.long())}
        if pixel_truth.any():  # images without a ground-truth mask teach nothing about pixels
            probs = self.layer_probs(feats.patches[pixel_truth], text)  # (B', L, 2, S, S)
            gt = (mask[pixel_truth] > 0.5).float()
            pixel = sum(segmentation_loss(probs[:, i], gt, symmetric_dice=True) for i in range(probs.shape[1]))
            losses["pixel"] = self.cfg.pixel_weight * pixel
        return losses

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        feats = batch_features(batch, self.layers)
        losses = self.losses(feats, batch["mask"], batch["is_anomaly"], batch["pixel_truth"].bool())
        return self.log_losses(losses, batch_size=len(batch["cls"]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.trainable_parameters(), lr=self.cfg.lr, betas=(0.5, 0.999))

    @torch.no_grad()
    def predict_features(self, feats: ImageFeatures) -> Prediction:
        text = self.text_features()
        cls = F.normalize(feats.cls.float(), dim=-1)
        score = (cls @ text.T / self.cfg.temperature).softmax(-1)[:, 1]
        probs = self.layer_probs(feats.patches.float(), text)  # (B, L, 2, S, S)
        anomaly_map = ((probs[:, :, 1] + 1 - probs[:, :, 0]) / 2).sum(1)  # (B, S, S)
        return Prediction(score=score, anomaly_map=smooth(anomaly_map, self.cfg.sigma))


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of (B, S, S) maps per image, as AnomalyCLIP's test.py (scipy, reflect borders)."""
    if sigma <= 0:
        return maps
    smoothed = [gaussian_filter(m, sigma=sigma) for m in maps.cpu().numpy()]
    return torch.from_numpy(np.stack(smoothed)).to(maps)
