"""Segmentation losses shared by the anomaly-map methods.

Focal and Dice follow APRIL-GAN's formulation, which AnomalyCLIP, MVFA and UltraAD reuse: the
focal loss is computed on a two-channel (normal, abnormal) probability map, the Dice loss on the
abnormal channel against the mask (and, in APRIL-GAN, on the normal channel against its inverse).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Mean focal loss, as APRIL-GAN's ``FocalLoss`` (alpha = 1, label smoothing ``smooth``).

    The one-hot target is smoothed by clamping into [smooth / (K - 1), 1 - smooth] and p_t is the
    smoothed target's dot product with the probabilities plus ``smooth``: -(1 - p_t)^gamma log p_t.
    Unlike clamping p_t itself, this keeps a gradient at every pixel, however wrong it is.

    Args:
        probs: (B, K, H, W) class probabilities, K = 2 for (normal, abnormal); they sum to one over dim 1.
        target: (B, H, W) mask of class indices in {0, .., K-1} (a float {0, 1} mask is truncated, as there).
    """
    n_classes = probs.shape[1]
    one_hot = F.one_hot(target.long(), n_classes).movedim(-1, 1).to(probs.dtype)  # (B, K, H, W)
    one_hot = one_hot.clamp(smooth / (n_classes - 1), 1.0 - smooth)
    p_true = (one_hot * probs).sum(1) + smooth  # (B, H, W)
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
