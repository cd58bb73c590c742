"""Small pieces several methods share: text ensembles, patch-to-pixel maps, scoring."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from usad_bench.backbone import Backbone, end_of_text_length
from usad_bench.errors import UsadError
from usad_bench.prompts import STATES, PromptSet, ensemble_embedding


def state_text_features(backbone: Backbone, prompts: PromptSet) -> torch.Tensor:
    """(2, D) unit embeddings of the normal and abnormal prompt ensembles."""
    return torch.stack([ensemble_embedding(backbone.encode_text(prompts.state_prompts(s))) for s in STATES])


def class_text_features(backbone: Backbone, prompts: PromptSet, classes: list[str]) -> torch.Tensor:
    """(C, D) unit embeddings of each class's prompt ensemble."""
    return torch.stack([ensemble_embedding(backbone.encode_text(prompts.class_prompts(c))) for c in classes])


@torch.no_grad()
def causal_text_length(backbone: Backbone, embedding: torch.Tensor, tokens: torch.Tensor) -> int:
    """How many token positions prompts (T, L, Wt) need: up to their last end-of-text token, when that is exact.

    CLIP's text tower is causal and reads its output at the end-of-text token, so the padding after
    it changes nothing; dropping it makes every text pass several times cheaper (CoOp's 77 positions
    hold ~10 real tokens). Checked once on the prompts themselves: a tower that is not causal keeps
    the full length.
    """
    length = end_of_text_length(tokens)
    full = backbone.encode_text_embeddings(embedding, tokens)
    short = backbone.encode_text_embeddings(embedding[:, :length], tokens[:, :length])
    return length if torch.allclose(full, short, atol=1e-4, rtol=1e-3) else tokens.shape[1]


def patch_logits_to_probs(logits: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """(B, N, 2) patch logits -> (B, 2, S, S) probabilities.

    The logits are upsampled bilinearly *before* the softmax, as APRIL-GAN does, so the map is
    smooth at the input resolution.
    """
    b, _, k = logits.shape
    h, w = grid
    grid_logits = logits.transpose(1, 2).reshape(b, k, h, w)
    upsampled = F.interpolate(grid_logits, size=(size, size), mode="bilinear", align_corners=True)
    return upsampled.softmax(dim=1)


def upsample_map(patch_map: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """(B, N) patch scores -> (B, S, S) by bilinear interpolation."""
    b = patch_map.shape[0]
    grid_map = patch_map.reshape(b, 1, *grid)
    return F.interpolate(grid_map, size=(size, size), mode="bilinear", align_corners=True)[:, 0]


def cache_affinity_logits(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """Tip-Adapter's cache term: exp(-beta * (1 - cos(query, key))) weighted by the keys' one-hot labels.

    Args:
        query: (B, D) unit image embeddings.
        keys: (K, D) unit embeddings of the support images (the cache / image memory).
        values: (K, C) one-hot labels of the keys.
        beta: sharpness; larger keeps only the nearest keys.
    Returns:
        (B, C) logits (multiply by Tip-Adapter's alpha before adding them to zero-shot logits).
    """
    affinity = query @ keys.T  # (B, K) cosine similarities
    return torch.exp(-beta * (1.0 - affinity)) @ values


class MetaNet(torch.nn.Module):
    """CoCoOp's meta-net: Linear -> ReLU -> Linear, a bottleneck from an image embedding to a token.

    UltraAD's MiniNet follows the same idea (the paper cites CoCoOp for it).
    """

    def __init__(self, in_dim: int, out_dim: int, reduction: int = 16, zero_init_output: bool = False):
        super().__init__()
        hidden = max(1, in_dim // reduction)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(in_dim, hidden), torch.nn.ReLU(inplace=True), torch.nn.Linear(hidden, out_dim)
        )
        if zero_init_output:  # output 0 at start: a residual x + MetaNet(x) then starts exactly at x
            torch.nn.init.zeros_(self.net[-1].weight)
            torch.nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def class_anomaly_score(logits: torch.Tensor, normal_index: int | None) -> torch.Tensor:
    """Binary anomaly score of a classifier: 1 - p(normal) from (B, C) class logits.

    Without a normal class every class of the task is abnormal, so every image is: the score is
    then 1 for all images (image-level detection is undefined for such a task, not guessed).
    """
    if normal_index is None:
        return torch.ones(logits.shape[0], device=logits.device)
    return 1.0 - logits.softmax(dim=-1)[:, normal_index]


def support_folds(labels, groups, n_folds: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, held-out) index pairs over a support set, for choosing hyper-parameters on it alone.

    A patient's images are never split between the two sides (two views of one lesion would make
    held-out accuracy optimistic). Leave-one-patient-out when ``n_folds <= 0`` or when the
    smallest class has no more images than ``n_folds`` (few shots); otherwise stratified group
    k-fold with a fixed shuffle seed. Either way the folds are a deterministic function of the
    labels and groups.
    """
    from sklearn.model_selection import LeaveOneGroupOut, StratifiedGroupKFold

    labels = np.asarray(labels)
    _, group_ids = np.unique(np.asarray(groups), return_inverse=True)
    dummy = np.zeros((len(labels), 1))
    if n_folds <= 0 or np.unique(labels, return_counts=True)[1].min() <= n_folds:
        splitter = LeaveOneGroupOut()
    else:
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has fewer members than n_splits"
        return [(train, held) for train, held in splitter.split(dummy, labels, group_ids)]


def check_choice(name: str, value: str, choices: tuple[str, ...], method: str = "") -> None:
    """A one-line error for a string option outside its documented choices."""
    if value not in choices:
        owner = f"{method} option" if method else "option"
        raise UsadError(f"{owner} {name}={value!r} is not one of {', '.join(choices)}")
