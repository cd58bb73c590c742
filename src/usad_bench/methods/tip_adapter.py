"""Tip-Adapter: a training-free cache of the support set (Zhang et al., ECCV 2022; gaopengcuhk/Tip-Adapter).

logits = 100 * f @ W_text^T + alpha * exp(-beta * (1 - f @ keys^T)) @ values, with f the unit image
embedding, keys the unit support embeddings (averaged over augmented views before normalising),
values their one-hot labels and W_text the class prompt ensembles.

alpha and beta are searched on the original's grid (``search_hp`` in ``utils.py``: beta in
0.1 + i * (beta_max - 0.1) / beta_steps, alpha likewise) by accuracy, keeping the first grid
point (beta outer, alpha inner) that reaches the best accuracy -- but on the support set
itself, never on test data: every support image is classified by a cache that holds no image of
its own patient (leave-one-patient-out by default, or patient-grouped k-fold). The original
searches on a separate validation split, which a few-shot benchmark does not have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from usad_bench.backbone import ImageFeatures
from usad_bench.methods.base import Method, MethodConfig, Prediction, SupportSet
from usad_bench.methods.common import (
    cache_affinity_logits,
    class_anomaly_score,
    class_text_features,
    support_folds,
)
from usad_bench.methods.registry import register

# For a fold's held-out images: (affinity to the fold's keys (h, K), the keys' one-hot values (K, C)).
FoldCache = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TipAdapterConfig(MethodConfig):
    logit_scale: float = 100.0  # scale of the zero-shot logits (CLIP's 100)
    init_beta: float = 1.0  # beta used when the search is off (Tip-Adapter's init_beta)
    init_alpha: float = 2.0  # alpha used when the search is off (EuroSAT config; see baselines/tip_adapter.md)
    search: bool = True  # search alpha and beta on the support set (Tip-Adapter's search_hp)
    beta_max: float = 12.0  # search_scale[0]: beta grid upper end (EuroSAT config)
    alpha_max: float = 10.0  # search_scale[1]: alpha grid upper end (EuroSAT config)
    beta_steps: int = 200  # search_step[0]
    alpha_steps: int = 20  # search_step[1]
    cv_folds: int = 0  # 0 = leave-one-patient-out; k = patient-grouped stratified k-fold
    flip_views: bool = True  # keys average the orig and mirrored views (Tip-Adapter averages 10 augmented views)


def tip_grid(upper: float, steps: int) -> torch.Tensor:
    """Tip-Adapter's search values: 0.1 + i * (upper - 0.1) / steps for i < steps (upper itself excluded)."""
    return 0.1 + torch.arange(steps, dtype=torch.float64) * (upper - 0.1) / steps


def search_alpha_beta(
    clip_logits: torch.Tensor,
    labels: torch.Tensor,
    folds: list,
    fold_cache: FoldCache,
    betas: torch.Tensor,
    alphas: torch.Tensor,
) -> tuple[float, float, float]:
    """Pick (alpha, beta) by held-out accuracy over the folds, keeping the first grid point that reaches the best.

    As the original's ``search_hp``: beta in the outer loop, alpha in the inner one, and a point replaces
    the current best only if its accuracy is strictly higher.

    Args:
        clip_logits: (N, C) zero-shot logits of the support images (the queries).
        labels: (N,) their classes.
        folds: (train, held-out) index pairs; a held-out image is never in its fold's cache.
        fold_cache: builds the cache of a fold's train images; see ``FoldCache``.
    Returns:
        alpha, beta, and the held-out accuracy they reach.
    """
    correct = torch.zeros(len(betas), len(alphas), dtype=torch.float64)
    for train, held in folds:
        train, held = torch.as_tensor(train), torch.as_tensor(held)
        affinity, values = fold_cache(train, held)  # (h, K), (K, C)
        cache = torch.exp(-betas[:, None, None] * (1.0 - affinity.double())) @ values.double()  # (nb, h, C)
        logits = clip_logits[held].double() + alphas[None, :, None, None] * cache[:, None]  # (nb, na, h, C)
        correct += (logits.argmax(-1) == labels[held]).sum(-1)
    i, j = (correct == correct.max()).nonzero()[0].tolist()  # row-major (beta, alpha): the original's loop order
    return float(alphas[j]), float(betas[i]), float(correct[i, j] / len(labels))


def cache_keys(support: SupportSet, flip_views: bool) -> torch.Tensor:
    """(N, D) unit keys: each support image's raw embedding averaged over its views, then normalised."""
    views = ["orig", "hflip"] if flip_views else ["orig"]
    return F.normalize(torch.stack([support.features[v].cls.float() for v in views]).mean(0), dim=-1)


@register("tip_adapter")
class TipAdapter(Method):
    config_class = TipAdapterConfig
    trainable = False
    outputs = ("score", "logits")

    def __init__(self, cfg: TipAdapterConfig, backbone, task):
        super().__init__(cfg, backbone, task)
        n, c, d = task.n_support, len(task.classes), backbone.embed_dim
        self.register_buffer("class_text", class_text_features(backbone, task.prompts, task.classes))  # (C, D)
        self.register_buffer("cache_values", torch.zeros(n, c))  # (N, C) one-hot labels of the keys
        self.register_buffer("alpha", torch.tensor(cfg.init_alpha))  # searched in setup_support
        self.register_buffer("beta", torch.tensor(cfg.init_beta))
        self.register_buffer("search_accuracy", torch.tensor(float("nan")))  # held-out support accuracy
        self._init_keys(n, d)

    def _init_keys(self, n: int, d: int) -> None:
        self.register_buffer("cache_keys", torch.zeros(n, d))  # (N, D) unit support embeddings

    def train_variants(self) -> tuple[str, ...]:
        return ("orig", "hflip") if self.cfg.flip_views else ("orig",)

    def zero_shot_logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.cfg.logit_scale * image @ self.class_text.T

    def setup_support(self, support: SupportSet) -> None:
        device = self.cache_values.device
        labels = support.labels.to(device)
        self.cache_values.copy_(F.one_hot(labels, len(self.task.classes)).float())
        self.cache_keys.copy_(cache_keys(support, self.cfg.flip_views).to(device))
        if self.cfg.search:
            self._search(support, labels)

    def _search(self, support: SupportSet, labels: torch.Tensor) -> None:
        queries = F.normalize(support.features["orig"].cls.float().to(labels.device), dim=-1)
        keys, values = self.cache_keys, self.cache_values

        def fold_cache(train: torch.Tensor, held: torch.Tensor):
            return queries[held] @ keys[train].T, values[train]

        alpha, beta, accuracy = self.run_search(support, labels, queries, fold_cache)
        self.alpha.fill_(alpha)
        self.beta.fill_(beta)
        self.search_accuracy.fill_(accuracy)

    def run_search(self, support: SupportSet, labels, queries, fold_cache: FoldCache) -> tuple[float, float, float]:
        folds = support_folds(labels.cpu().numpy(), [s.group for s in support.samples], self.cfg.cv_folds)
        cfg = self.cfg
        with torch.no_grad():
            return search_alpha_beta(
                self.zero_shot_logits(queries),
                labels,
                folds,
                fold_cache,
                tip_grid(cfg.beta_max, cfg.beta_steps).to(labels.device),
                tip_grid(cfg.alpha_max, cfg.alpha_steps).to(labels.device),
            )

    def cache_logits(self, image: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
        return cache_affinity_logits(image, self.cache_keys, self.cache_values, beta)

    @torch.no_grad()
    def predict_features(self, feats: ImageFeatures) -> Prediction:
        image = F.normalize(feats.cls.float(), dim=-1)  # (B, D)
        logits = self.zero_shot_logits(image) + self.alpha * self.cache_logits(image, self.beta)
        return Prediction(score=class_anomaly_score(logits, self.task.normal_index), class_logits=logits)
