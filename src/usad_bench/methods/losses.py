"""Segmentation losses shared by the anomaly-map methods.

Focal and Dice follow APRIL-GAN's formulation, which AnomalyCLIP, MVFA and UltraAD reuse: the
focal loss is computed on a two-channel (normal, abnormal) probability map, the Dice loss on the
abnormal channel against the mask (and, in APRIL-GAN, on the normal channel against its inverse).
"""

from __future__ import annotations

import torch


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-5) -> torch.Tensor:
    """Mean focal loss.

    Args:
        probs: (B, 2, H, W) probabilities of (normal, abnormal); they sum to one over dim 1.
        target: (B, H, W) float mask in {0, 1}.
    """
    target = target.long().unsqueeze(1)  # (B, 1, H, W)
    p_true = probs.gather(1, target).squeeze(1).clamp(eps, 1.0 - eps)  # probability of the true class
    return (-((1.0 - p_true) ** gamma) * p_true.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - Dice between (B, H, W) probabilities and masks, averaged over the images of the batch.

    Per-image averaging (APRIL-GAN's BinaryDiceLoss) keeps a small lesion from being drowned by a
    large one in the same batch; the smoothing term makes an empty mask with an empty prediction
    score a perfect 1.
    """
    prob, target = prob.flatten(1), target.flatten(1)
    dice = (2.0 * (prob * target).sum(1) + smooth) / (prob.sum(1) + target.sum(1) + smooth)
    return 1.0 - dice.mean()


def segmentation_loss(probs: torch.Tensor, target: torch.Tensor, symmetric_dice: bool = False) -> torch.Tensor:
    """Focal + Dice on a (B, 2, H, W) map, equal weights (APRIL-GAN); ``symmetric_dice`` adds the
    normal channel's Dice against the inverted mask (AnomalyCLIP)."""
    loss = focal_loss(probs, target) + dice_loss(probs[:, 1], target)
    if symmetric_dice:
        loss = loss + dice_loss(probs[:, 0], 1.0 - target)
    return loss
