"""APRIL-GAN (VAND 2023 challenge, ByChelsea/VAND-APRIL-GAN @ f13b8a6): zero-shot text branch with
trained per-layer linear heads, plus the few-shot memory branch.

* Text branch: APRIL-GAN's prompt ensemble (7 normal / 5 abnormal state phrases x 35 templates,
  ``prompt_ensemble.py``), state words mapped to ultrasound in the built-in vocabulary ``april_gan``
  (see that YAML file for the word-by-word mapping). Per chosen block, a linear head maps the raw
  patch tokens into the joint space; ``100 * cos`` with the two ensembles, bilinear upsampling
  (``align_corners=True``), softmax, abnormal channel, **summed** over blocks (``test.py:171-183``).
  The heads are trained with focal + Dice per block (``train.py:132-137``; Adam lr 1e-3, betas 0.5 /
  0.999, batch 8).
* Memory branch: the raw tokens of the normal support images (no head); per block
  ``min(1 - cos)`` to the memory, upsampled and summed, **added** to the map (``test.py:185-201``).
* Image score: zero-shot ``softmax(100 * cos(CLS, t))[abnormal]`` (``test.py:159-169``); with the
  memory the original averages it with the test-set min-max of the map maximum (``test.py:235-249``),
  a transductive step. Here the map maximum is divided by the number of blocks instead (per image; the
  map is a sum of one probability and one memory distance per block), see baselines/april_gan.md.

``linear_adapter`` is this class with the memory and the CLS score switched off (head-only
configuration); see ``linear_adapter.py``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from usad_bench.backbone import ImageFeatures
from usad_bench.methods.base import Method, MethodConfig, Prediction, SupportSet, batch_features
from usad_bench.methods.common import check_choice, state_text_features
from usad_bench.methods.patch_heads import (
    LinearPatchHeads,
    april_gan_layers,
    layers_segmentation_loss,
    memory_distance_map,
    text_layer_probs,
)
from usad_bench.methods.registry import register
from usad_bench.prompts import load_prompts

IMAGE_SCORES = ("fused", "text", "map_max")
LAYER_REDUCTIONS = ("sum", "mean")


@dataclass
class AprilGanConfig(MethodConfig):
    epochs: int = 15  # train.sh: 15 epochs when trained without the mosaic (VisA recipe); 3 with it (MVTec)
    batch_size: int = 8  # train.sh
    lr: float = 1e-3  # Adam, betas (0.5, 0.999)
    prompts: str = "april_gan"  # APRIL-GAN's ensemble, state words mapped to ultrasound
    layers: list[int] | None = None  # 1-indexed blocks; None = 3/6/9 (12 blocks), 6/12/18/24 (24 blocks)
    logit_scale: float = 100.0  # fixed scale of patch-text and CLS-text cosines
    memory: bool = True  # few-shot memory branch (raw tokens of the normal support images)
    memory_layers: list[int] | None = None  # blocks of the memory; None = same as `layers` (test_few_shot.sh)
    image_score: str = "fused"  # fused = 0.5 * (CLS prob + max(map) / n_blocks); text = CLS prob; map_max
    layer_reduce: str = "sum"  # how block maps are combined: sum (APRIL-GAN) or mean
    flip_augment: bool = False  # APRIL-GAN does not flip (its only augmentation is a 2x2 mosaic)


@register("april_gan")
class AprilGan(Method):
    config_class = AprilGanConfig
    trainable = True
    outputs = ("score", "map")
    # APRIL-GAN rebuilds the OpenAI ViT-L from a JSON without quick_gelu at 518 px, i.e. runs exact GELU
    # (open_clip/factory.py:147-164, model.py:87 of its fork)
    activation = "gelu"

    def __init__(self, cfg: AprilGanConfig, backbone, task):
        super().__init__(cfg, backbone, task)
        check_choice("image_score", cfg.image_score, IMAGE_SCORES)
        check_choice("layer_reduce", cfg.layer_reduce, LAYER_REDUCTIONS)
        self.layers = tuple(cfg.layers or april_gan_layers(backbone.num_layers))
        self.memory_layers = tuple(cfg.memory_layers or self.layers) if cfg.memory else ()
        self.register_buffer("state_text", state_text_features(backbone, load_prompts(cfg.prompts)))  # (2, D)
        self.heads = LinearPatchHeads(len(self.layers), backbone.vision_width, backbone.embed_dim)
        # (Lm, M, W) raw tokens of the normal support images; filled by setup_support, saved with the state
        self.register_buffer("memory_bank", torch.zeros(len(self.memory_layers), 0, backbone.vision_width))

    def feature_layers(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.layers) | set(self.memory_layers)))

    # ------------------------------------------------------------------ support and training
    def setup_support(self, support: SupportSet) -> None:
        if not self.memory_layers:
            return
        normal = self.task.normal_index
        keep = support.labels == normal if normal is not None else torch.zeros_like(support.labels, dtype=torch.bool)
        if not keep.any():
            warnings.warn(
                "april_gan: the support set has no normal image; the memory branch adds nothing", stacklevel=2
            )
            return
        table = support.features["orig"]  # the original's memory holds the k shots, un-augmented
        index = [table.layers.index(layer) for layer in self.memory_layers]
        tokens = table.patches[keep][:, index].float()  # (K, Lm, N, W)
        self.memory_bank = tokens.transpose(0, 1).flatten(1, 2).to(self.memory_bank.device)  # (Lm, K*N, W)

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        if "memory_bank" in state:  # the memory's size depends on the support set
            self.memory_bank = torch.empty_like(state["memory_bank"], device=self.memory_bank.device)
        return super().load_state_dict(state, strict=strict, assign=assign)

    def layer_probs(self, feats: ImageFeatures) -> list[torch.Tensor]:
        """Per head block, (B, 2, S, S) probabilities of (normal, abnormal)."""
        index = [feats.layers.index(layer) for layer in self.layers]
        tokens = self.heads(feats.patches[:, index])  # (B, L, N, D)
        return text_layer_probs(tokens, self.state_text, self.cfg.logit_scale, self.backbone.grid, self.task.image_size)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        keep = batch["pixel_truth"]
        if not keep.any():
            return None  # no pixel ground truth in this batch: nothing to learn from
        feats = batch_features(batch, self.feature_layers())
        feats.patches = feats.patches[keep]
        loss = layers_segmentation_loss(self.layer_probs(feats), batch["mask"][keep])
        return self.log_losses({"seg": loss}, batch_size=int(keep.sum()))

    def configure_optimizers(self):
        return torch.optim.Adam(self.trainable_parameters(), lr=self.cfg.lr, betas=(0.5, 0.999))

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict_features(self, feats: ImageFeatures) -> Prediction:
        text_maps = torch.stack([p[:, 1] for p in self.layer_probs(feats)])  # (L, B, S, S)
        anomaly_map = text_maps.sum(0) if self.cfg.layer_reduce == "sum" else text_maps.mean(0)
        if self.memory_layers and self.memory_bank.shape[1] > 0:
            index = [feats.layers.index(layer) for layer in self.memory_layers]
            memory_map = memory_distance_map(
                feats.patches[:, index], self.memory_bank, self.backbone.grid, anomaly_map.shape[-1]
            )
            anomaly_map = anomaly_map + (memory_map if self.cfg.layer_reduce == "sum" else memory_map / len(index))
        return Prediction(score=self.image_score(feats.cls, anomaly_map), anomaly_map=anomaly_map)

    def image_score(self, cls: torch.Tensor, anomaly_map: torch.Tensor) -> torch.Tensor:
        """(B,) image scores from the CLS embeddings (B, D) and the final maps (B, S, S)."""
        map_max = anomaly_map.flatten(1).amax(1)
        if self.cfg.image_score == "map_max":
            return map_max
        text_prob = (self.cfg.logit_scale * F.normalize(cls.float(), dim=-1) @ self.state_text.T).softmax(-1)[:, 1]
        if self.cfg.image_score == "text" or not self.memory_layers:
            return text_prob  # APRIL-GAN's zero-shot score (test.py:159-169)
        blocks = len(self.layers) if self.cfg.layer_reduce == "sum" else 1
        return 0.5 * (text_prob + map_max / blocks)
