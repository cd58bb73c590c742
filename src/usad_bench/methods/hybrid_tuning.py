"""Hybrid Tuning (Qu et al., "Adapting Vision-Language Foundation Model for Next Generation Medical
Ultrasound Image Analysis"; jinggqu/NextGen-UIA @ 69dd54f): a frozen encoder, the hybrid adapter
(Frequency Filtering + Noise Estimation, ``hybrid_adapter.py``) and ``TimmCLIPAdapter``'s heads
(``src/third_party/timm/clip_adapter.py``), trained on the support set.

Per chosen block (the original's ``extract_layers=[3, 6, 9]``, 0-indexed, i.e. blocks 4/7/10 of 12):
the block's patch tokens -> hybrid adapter -> ``reduce`` Linear(W, 512) -> block
(LayerNorm, Linear, GELU, Linear); the blocks' outputs are summed into a (B, 512, H, W) grid, which
feeds the segmentation head (bilinear upsample + 1x1 conv to 2 channels; applied here as conv then
upsample, the same numbers since both are linear and the bilinear weights sum to 1) and the
classification head (average pool, dropout 0.5, Linear to the task's classes).

Training follows ``fewshot_{classification,segmentation}.py``: AdamW lr 1e-4, betas (0.9, 0.95),
weight decay 0.01, cosine annealing per step to 1e-8, 200 epochs, batch 32; sigmoid focal loss
(MONAI ``FocalLoss(to_onehot_y=True)``) on the class logits, Dice + CE (MONAI ``DiceCELoss``,
squared denominators, softmax) on the 2-channel mask logits. The original trains one model per
task; here both heads share the adapters and train jointly (``task`` option selects one).
Deviations are listed in baselines/hybrid_tuning.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from usad_bench.backbone import ImageFeatures
from usad_bench.methods.base import Method, MethodConfig, Prediction, SupportSet, batch_features, steps_per_epoch
from usad_bench.methods.common import check_choice
from usad_bench.methods.hybrid_adapter import FILTER_MODES, HybridAdapter
from usad_bench.methods.registry import register

TASKS = ("both", "cls", "seg")
IMAGE_SCORES = ("cls", "map_max")


def hybrid_tuning_layers(num_layers: int) -> tuple[int, ...]:
    """1-indexed blocks matching the original's 0-indexed [3, 6, 9] of a 12-block ViT, scaled to depth."""
    return tuple(num_layers * k // 12 + 1 for k in (3, 6, 9))


@dataclass
class HybridTuningConfig(MethodConfig):
    epochs: int = 200  # fewshot_*.py --epochs
    batch_size: int = 32  # fewshot_*.py --batch_size
    lr: float = 1e-4  # AdamW
    lr_min: float = 1e-8  # cosine annealing floor (per step)
    weight_decay: float = 0.01
    layers: list[int] | None = None  # 1-indexed blocks; None = 4/7/10 of 12 (the original's [3, 6, 9])
    adapter: bool = True  # the hybrid adapter on each chosen block (False = heads only, the original's "none")
    bottleneck: int = 64  # --mona_bottleneck
    filter_mode: str = "channel"  # channel = the code's per-channel filter; spectral = per frequency (the paper)
    reduce_dim: int = 512  # --reduce_dim
    task: str = "both"  # which heads train: both, cls (classification only), seg (segmentation only)
    image_score: str = "cls"  # cls = 1 - p(normal) from the class head; map_max = max of the lesion map
    flip_augment: bool = True  # the original's weak augmentations include flips


class HybridHeads(nn.Module):
    """``TimmCLIPAdapter``'s reduce + block pyramid and its two heads, on (B, L, N, W) tokens."""

    def __init__(self, n_layers: int, width: int, reduce_dim: int, n_classes: int):
        super().__init__()
        self.reduces = nn.ModuleList(nn.Linear(width, reduce_dim) for _ in range(n_layers))
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(reduce_dim),
                nn.Linear(reduce_dim, reduce_dim),
                nn.GELU(),
                nn.Linear(reduce_dim, reduce_dim),
            )
            for _ in range(n_layers)
        )
        self.seg_conv = nn.Conv2d(reduce_dim, 2, kernel_size=1)  # seg_head's conv (upsampling done after)
        self.cls_head = nn.Sequential(nn.Dropout(0.5), nn.Linear(reduce_dim, n_classes))  # after the pool

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, N, W) -> (B, 2, H, W) mask logits on the token grid, (B, C) class logits."""
        pairs = enumerate(zip(self.reduces, self.blocks, strict=True))
        fused = sum(block(reduce(tokens[:, i])) for i, (reduce, block) in pairs)  # (B, N, D)
        b, _, d = fused.shape
        fmap = fused.transpose(1, 2).reshape(b, d, *grid)  # (B, D, H, W)
        return self.seg_conv(fmap), self.cls_head(fmap.mean((2, 3)))


@register("hybrid_tuning")
class HybridTuning(Method):
    config_class = HybridTuningConfig
    trainable = True
    outputs = ("score", "map", "logits")

    def __init__(self, cfg: HybridTuningConfig, backbone, task):
        super().__init__(cfg, backbone, task)
        check_choice("filter_mode", cfg.filter_mode, FILTER_MODES)
        check_choice("task", cfg.task, TASKS)
        check_choice("image_score", cfg.image_score, IMAGE_SCORES)
        self.layers = tuple(cfg.layers or hybrid_tuning_layers(backbone.num_layers))
        width, grid = backbone.vision_width, tuple(backbone.grid)
        self.adapters = nn.ModuleList(
            HybridAdapter(width, grid, cfg.bottleneck, cfg.filter_mode) if cfg.adapter else nn.Identity()
            for _ in self.layers
        )
        self.heads = HybridHeads(len(self.layers), width, cfg.reduce_dim, len(task.classes))
        self.n_support = task.n_support

    def feature_layers(self) -> tuple[int, ...]:
        return self.layers

    def setup_support(self, support: SupportSet) -> None:
        self.n_support = len(support)  # the cosine schedule spans every optimiser step

    def forward_heads(self, feats: ImageFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2, S, S) mask logits at the input size and (B, C) class logits."""
        index = [feats.layers.index(layer) for layer in self.layers]
        patches = feats.patches[:, index].float()  # (B, L, N, W)
        tokens = torch.stack([adapter(patches[:, i]) for i, adapter in enumerate(self.adapters)], 1)
        mask_logits, class_logits = self.heads(tokens, tuple(self.backbone.grid))
        size = self.task.image_size
        return F.interpolate(mask_logits, size=(size, size), mode="bilinear", align_corners=False), class_logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        mask_logits, class_logits = self.forward_heads(batch_features(batch, self.layers))
        losses = {}
        if self.cfg.task in ("both", "cls"):
            target = F.one_hot(batch["label"], class_logits.shape[1]).float()
            losses["focal"] = sigmoid_focal_loss(class_logits, target, alpha=-1, gamma=2.0, reduction="mean")
        keep = batch["pixel_truth"]
        if self.cfg.task in ("both", "seg") and keep.any():
            losses["dice_ce"] = dice_ce_loss(mask_logits[keep], batch["mask"][keep])
        if not losses:
            return None  # segmentation only and no mask in this batch: nothing to learn from
        return self.log_losses(losses, batch_size=batch["label"].shape[0])

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.trainable_parameters(), lr=self.cfg.lr, betas=(0.9, 0.95), weight_decay=self.cfg.weight_decay
        )
        steps = max(self.cfg.epochs * steps_per_epoch(self.n_support, self.cfg.batch_size, self.drop_last), 1)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=self.cfg.lr_min)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @torch.no_grad()
    def predict_features(self, feats: ImageFeatures) -> Prediction:
        mask_logits, class_logits = self.forward_heads(feats)
        anomaly_map = mask_logits.softmax(1)[:, 1]  # (B, S, S) p(lesion)
        normal = self.task.normal_index
        if self.cfg.image_score == "cls" and normal is not None:
            score = 1.0 - class_logits.softmax(-1)[:, normal]
        else:
            score = anomaly_map.flatten(1).amax(1)
        return Prediction(score=score, anomaly_map=anomaly_map, class_logits=class_logits)


def dice_ce_loss(logits: torch.Tensor, mask: torch.Tensor, smooth: float = 1e-8) -> torch.Tensor:
    """MONAI ``DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=smooth_dr=1e-8)``.

    (B, 2, S, S) logits, (B, S, S) {0, 1} mask. Dice per image and channel (background included),
    1 - (2 sum(p g) + s) / (sum(p^2) + sum(g^2) + s), averaged; plus mean cross-entropy.
    """
    target = mask.round().long()
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()  # (B, 2, S, S)
    probs = logits.softmax(1)
    inter = (probs * onehot).sum((2, 3))
    denom = (probs**2).sum((2, 3)) + (onehot**2).sum((2, 3))
    dice = 1.0 - (2.0 * inter + smooth) / (denom + smooth)
    return dice.mean() + F.cross_entropy(logits, target)
