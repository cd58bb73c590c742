"""Ultrasound-CLIP's semantic-aware objective, as reusable functions.

Ultrasound-CLIP (US-365K, CVPR 2026; github.com/ZJUDataIntelligence/Ultrasound-CLIP) trains CLIP
on image-report pairs whose diagnostic attributes are known. Two terms:

* **Soft-label contrastive loss.** Plain CLIP treats every other pair in a batch as a negative;
  with attribute-tagged data many of them describe the same findings. The targets of both
  cross-entropies are instead the row-softmax of the attribute-similarity matrix ``S`` at the
  semantic temperature (the same target distribution as the released ``SemanticLoss``'s KL term),
  so pairs with identical attributes share the probability mass and partly matching ones get some.
* **Semantic matching loss** (``L_SM``, released ``semantic_loss.py``): the cosine similarities of
  image and text embeddings are pulled towards ``S``: ``0.6 * MSE + 0.4 * KL(softmax(S/T) ||
  softmax(cos/T))`` with ``T = 0.07``, batch-mean KL over rows.

The total is ``L_contrastive + semantic_weight * L_SM`` (released default weight 1.0). Everything
takes embeddings and a similarity matrix, so the same loss fine-tunes any model (few-shot too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SEMANTIC_TEMPERATURE = 0.07  # released SemanticLoss default
MSE_WEIGHT, KL_WEIGHT = 0.6, 0.4  # released semantic_matching_loss weights


def soft_targets(similarity: torch.Tensor, temperature: float = SEMANTIC_TEMPERATURE) -> torch.Tensor:
    """(B, B) row-stochastic targets from an attribute similarity in [0, 1] with a unit diagonal."""
    return (similarity.float() / max(temperature, 1e-6)).softmax(dim=1)


def soft_contrastive_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    similarity: torch.Tensor | None = None,
    temperature: float = SEMANTIC_TEMPERATURE,
) -> torch.Tensor:
    """Symmetric CLIP cross-entropy against soft labels; ``similarity=None`` is plain CLIP (one-hot).

    Args:
        image_emb, text_emb: (B, D) L2-normalised embeddings of matching pairs.
        logit_scale: the model's (already exponentiated) inverse temperature.
        similarity: (B, B) symmetric attribute similarity of the pairs.
    """
    logits = logit_scale * image_emb @ text_emb.T  # (B, B) image -> text
    if similarity is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    targets = soft_targets(similarity.to(logits.device), temperature)
    image_to_text = -(targets * logits.log_softmax(dim=1)).sum(1).mean()
    text_to_image = -(targets.T * logits.T.log_softmax(dim=1)).sum(1).mean()
    return 0.5 * (image_to_text + text_to_image)


def semantic_matching_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    similarity: torch.Tensor,
    temperature: float = SEMANTIC_TEMPERATURE,
    mse_weight: float = MSE_WEIGHT,
    kl_weight: float = KL_WEIGHT,
) -> torch.Tensor:
    """Ultrasound-CLIP's ``L_SM`` between predicted cosine similarities and the target matrix."""
    predicted = F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T  # (B, B)
    target = similarity.float().to(predicted.device)
    mse = F.mse_loss(predicted, target)
    predicted_logits = (predicted / temperature).clamp(-50.0, 50.0)  # the release clamps too (fp16 safety)
    target_logits = (target / temperature).clamp(-50.0, 50.0)
    kl = F.kl_div(predicted_logits.log_softmax(dim=1), target_logits.softmax(dim=1), reduction="batchmean")
    return mse_weight * mse + kl_weight * kl


def semantic_aware_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
    similarity: torch.Tensor,
    semantic_weight: float = 1.0,
    temperature: float = SEMANTIC_TEMPERATURE,
) -> dict[str, torch.Tensor]:
    """The full objective; returns ``loss`` and its two parts (for logging)."""
    contrastive = soft_contrastive_loss(image_emb, text_emb, logit_scale, similarity, temperature)
    semantic = semantic_matching_loss(image_emb, text_emb, similarity, temperature)
    return {"loss": contrastive + semantic_weight * semantic, "contrastive": contrastive, "semantic": semantic}


def caption_similarity(captions: list[str]) -> torch.Tensor:
    """Fallback target when a manifest has captions but no attributes: identical captions match."""
    index = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    codes = torch.tensor([index[c] for c in captions])
    return (codes[:, None] == codes[None, :]).float()
