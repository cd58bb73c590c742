"""APRIL-GAN's per-layer linear patch heads and text maps, shared by ``april_gan``, ``linear_adapter``
and VCP-CLIP's raw branch (which reuses the same ``LinearLayer`` in its ``train.py``).

One ``nn.Linear(W -> D)`` per chosen encoder block maps that block's raw patch tokens (residual stream,
before ``ln_post`` / ``proj``, CLS dropped) into the joint space; the tokens are L2-normalised,
compared with the (normal, abnormal) text embeddings at a logit scale, upsampled bilinearly with
``align_corners=True`` *before* the softmax, and soft-maxed over the two states
(ByChelsea/VAND-APRIL-GAN ``model.py:5-20``, ``train.py:114-126``, ``test.py:171-183``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from usad_bench.backbone import default_layers
from usad_bench.methods.common import patch_logits_to_probs, upsample_map
from usad_bench.methods.losses import segmentation_loss

# APRIL-GAN's defaults: features_list 3 6 9 for its 12-block ViT-B-16 (train.py:189, test.py default),
# 6 12 18 24 for ViT-L-14-336 (train.sh, test_few_shot.sh).
APRIL_GAN_LAYERS = {12: (3, 6, 9), 24: (6, 12, 18, 24)}


def april_gan_layers(num_layers: int) -> tuple[int, ...]:
    """The authors' blocks for a 12- or 24-block ViT; four evenly spaced blocks for any other depth."""
    return APRIL_GAN_LAYERS.get(num_layers, default_layers(num_layers))


class LinearPatchHeads(nn.Module):
    """One linear map per block: raw tokens (B, L, N, W) -> unit tokens (B, L, N, D) in the joint space."""

    def __init__(self, n_layers: int, vision_width: int, embed_dim: int):
        super().__init__()
        # nn.Linear's default init, as APRIL-GAN's and VCP-CLIP's LinearLayer
        self.adapters = nn.ModuleList(nn.Linear(vision_width, embed_dim) for _ in range(n_layers))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return torch.stack([F.normalize(head(patches[:, i]), dim=-1) for i, head in enumerate(self.adapters)], 1)


def text_layer_probs(
    tokens: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float, grid: tuple[int, int], size: int
) -> list[torch.Tensor]:
    """Per block, (B, 2, S, S) probabilities of (normal, abnormal).

    Args:
        tokens: (B, L, N, D) unit patch tokens.
        text: (2, D) unit text embeddings shared by the batch, or (B, 2, D) per image (VCP-CLIP).
        scale: logit scale (APRIL-GAN's fixed 100, VCP-CLIP's learned exp(tau)).
    """
    per_image = text if text.dim() == 3 else text.expand(tokens.shape[0], -1, -1)  # (B, 2, D)
    probs = []
    for i in range(tokens.shape[1]):
        logits = scale * tokens[:, i] @ per_image.transpose(1, 2)  # (B, N, 2)
        probs.append(patch_logits_to_probs(logits, grid, size))
    return probs


def layers_segmentation_loss(probs: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Sum over blocks of focal + Dice on the abnormal channel (APRIL-GAN train.py:132-137)."""
    return sum(segmentation_loss(p, mask) for p in probs)


def memory_distance_map(
    patches: torch.Tensor, memory: torch.Tensor, grid: tuple[int, int], size: int, chunk: int = 4096
) -> torch.Tensor:
    """APRIL-GAN's few-shot map: per block min over the memory of (1 - cos), upsampled, summed over blocks.

    Args:
        patches: (B, L, N, W) raw tokens of the test images.
        memory: (L, M, W) raw tokens of the normal support images (unit-normalised or not).
    Returns:
        (B, S, S); the original computes the same with sklearn's cosine_similarity (test.py:185-201).
    """
    keys = F.normalize(memory.float(), dim=-1)
    total = 0.0
    for i in range(patches.shape[1]):
        query = F.normalize(patches[:, i].float(), dim=-1)  # (B, N, W)
        # chunked over the memory: (B, N, M) would be large for ViT-L at 518 px
        best = torch.full(query.shape[:2], -2.0, device=query.device)
        for part in keys[i].split(chunk):
            best = torch.maximum(best, (query @ part.T).amax(-1))
        total = total + upsample_map(1.0 - best, grid, size)
    return total
