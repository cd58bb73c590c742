"""Tip-Adapter-F: Tip-Adapter with learnable cache keys (gaopengcuhk/Tip-Adapter ``run_tip_adapter_F``).

The keys start as Tip-Adapter's cache and are fine-tuned with cross-entropy on the support set
(AdamW lr 1e-3, eps 1e-4, cosine decay per iteration, batch 256, 100 epochs as in the EuroSAT
config whose alpha/beta grid Tip-Adapter uses here) while alpha and beta stay at their initial
values; alpha and beta are then searched on the original's grid. The keys are not renormalised
while they learn, as in the original (its keys are the weight of a bias-free linear layer).

The original searches on a validation split after fine-tuning. Here the search uses the support
set only, and keeps a held-out image out of the keys it is scored against *and* out of their
fine-tuning: for each fold the keys of the other images are fine-tuned with the same recipe
(in ``setup_support``, plain PyTorch), then the held-out images are classified for every grid
point. The final keys are fine-tuned on the whole support set by the runner's training loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler

from usad_bench.methods.base import SupportEpochSampler, SupportSet
from usad_bench.methods.registry import register
from usad_bench.methods.tip_adapter import TipAdapter, TipAdapterConfig


@dataclass
class TipAdapterFConfig(TipAdapterConfig):
    epochs: int = 100  # train_epoch of the EuroSAT config (20 elsewhere); see baselines/tip_adapter_f.md
    batch_size: int = 256  # Tip-Adapter-F's batch size (the whole support set here)
    lr: float = 1e-3  # AdamW learning rate
    adam_eps: float = 1e-4  # AdamW epsilon (the original's, for its fp16 training)


def tip_f_optimizer(params, cfg: TipAdapterFConfig, total_steps: int):
    """AdamW with a cosine decay over every iteration of the run, as Tip-Adapter-F."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.adam_eps)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, total_steps))


@register("tip_adapter_f")
class TipAdapterF(TipAdapter):
    config_class = TipAdapterFConfig
    trainable = True

    def _init_keys(self, n: int, d: int) -> None:
        self.cache_keys = nn.Parameter(torch.zeros(n, d))  # (N, D) learnable keys, set in setup_support

    def setup_support(self, support: SupportSet) -> None:
        with torch.no_grad():
            super().setup_support(support)

    def training_logits(self, image: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Logits with the initial alpha and beta, which Tip-Adapter-F trains with."""
        affinity = image @ keys.T  # (B, K); keys are not renormalised while they learn, as in the original
        cache = torch.exp(-self.cfg.init_beta * (1.0 - affinity)) @ values
        return self.zero_shot_logits(image) + self.cfg.init_alpha * cache

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        image = F.normalize(batch["cls"].float(), dim=-1)
        loss = F.cross_entropy(self.training_logits(image, self.cache_keys, self.cache_values), batch["label"])
        return self.log_losses({"ce": loss}, batch_size=len(batch["label"]))

    def configure_optimizers(self):
        optimizer, scheduler = tip_f_optimizer(
            self.trainable_parameters(), self.cfg, self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _search(self, support: SupportSet, labels: torch.Tensor) -> None:
        queries = F.normalize(support.features["orig"].cls.float().to(labels.device), dim=-1)
        views = torch.stack([F.normalize(support.features[v].cls.float(), dim=-1) for v in self.train_variants()])
        views = views.to(labels.device)  # (V, N, D): the training items of every support image
        keys, values = self.cache_keys.detach(), self.cache_values

        def fold_cache(train: torch.Tensor, held: torch.Tensor):
            tuned = self.fine_tune_keys(keys[train], values[train], views[:, train], labels[train])
            return queries[held] @ tuned.T, values[train]

        alpha, beta, accuracy = self.run_search(support, labels, queries, fold_cache)
        self.alpha.fill_(alpha)
        self.beta.fill_(beta)
        self.search_accuracy.fill_(accuracy)

    def fine_tune_keys(
        self, keys: torch.Tensor, values: torch.Tensor, views: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The training recipe on a subset: (K, D) keys tuned on its (V, K, D) views; returns new keys.

        Epochs as the runner's loader (``SupportSet.training_loader``): each of the K images once per
        epoch, in one random view, the last partial batch kept.
        """
        cfg = self.cfg
        images = views.flatten(0, 1)  # (V*K, D): item view * K + image, the runner's indexing
        targets = labels.repeat(views.shape[0])
        batches = BatchSampler(SupportEpochSampler(views.shape[1], views.shape[0], seed=0), cfg.batch_size, False)
        tuned = nn.Parameter(keys.clone())
        optimizer, scheduler = tip_f_optimizer([tuned], cfg, cfg.epochs * len(batches))
        with torch.enable_grad():
            for _ in range(cfg.epochs):
                for batch in batches:
                    batch = torch.as_tensor(batch, device=images.device)
                    loss = F.cross_entropy(self.training_logits(images[batch], tuned, values), targets[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
        return tuned.detach()
