"""MVFA (CVPR 2024, MediaBrain-SJTU/MVFA-AD @ a30bf7b): few-shot medical anomaly detection with
multi-level visual feature adapters re-injected into the image encoder's stream.

* After each of four blocks (6/12/18/24 of 24; ``default_layers`` at other depths) a seg and a det
  ``ClipAdapter`` (Linear W->D no bias + LeakyReLU = ``med``; Linear D->W no bias + LeakyReLU = ``out``)
  read the whole stream, CLS included, and the stream becomes ``0.8 x + 0.1 out_seg + 0.1 out_det``
  (``CLIP/adapter.py:14-29,67-74``); later blocks see the adapted stream. ``med`` tokens (CLS dropped)
  are the features: ``100 cos(med, t)`` with the two prompt ensembles, softmax, abnormal channel.
* The stream leaving the first adapted block is cached per image (feature kind ``stream``); each
  step and prediction reruns the adapters and the blocks after it (``usad_bench.stream``).
* Losses (``train_few.py:122-161``): det = sum over blocks of BCE-with-logits of the mean patch
  probability (the original feeds the *probability* as the logit; kept by default, ``det_bce``);
  seg = sum over blocks of focal + Dice on the upsampled maps, for images with pixel truth.
  Adam lr 1e-3, betas (0.5, 0.999), batch 1, 50 epochs, last epoch kept.
* Few-shot memory: the det/seg ``med`` tokens of the normal shots (all cached views; CLS included as
  the original does), rebuilt from the cached prefixes whenever the adapters changed.
  Map: zero-shot sum_l p_a (seg tokens) and few-shot sum_l min_m (1 - cos) (seg memory), fused 0.5/0.5;
  score: max of the fused map. The original min-maxes both maps over the whole test set first
  (``train_few.py:278-292``); here each image is scored on its own by default, and ``test_minmax: true``
  runs the original's recipe as the named transductive scoring ``TEST_MINMAX`` (see baselines/mvfa.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from usad_bench.backbone import ImageFeatures, default_layers
from usad_bench.errors import UsadError
from usad_bench.feature_kinds import STREAM, FeatureRequest
from usad_bench.methods.base import PER_IMAGE, Method, MethodConfig, Prediction, SupportSet
from usad_bench.methods.common import patch_logits_to_probs, state_text_features
from usad_bench.methods.losses import segmentation_loss
from usad_bench.methods.patch_heads import memory_distance_map
from usad_bench.methods.registry import register
from usad_bench.prompts import load_prompts
from usad_bench.stream import run_visual_blocks

DET_BCE = ("probability_as_logit", "probability")
RESIDUAL_KEEP, ADAPTER_SHARE = 0.8, 0.1  # adapter.py:71
TEST_MINMAX = "transductive: test-set min-max (MVFA)"  # the scoring name of test_minmax: true


@dataclass
class MvfaConfig(MethodConfig):
    epochs: int = 50  # train_few.py:47
    batch_size: int = 1  # train_few.py:45 (and its train_loader)
    lr: float = 1e-3  # train_few.py:48; Adam betas (0.5, 0.999)
    prompts: str = "april_gan"  # MVFA's ensemble (utils.py:9-29) is APRIL-GAN's: same states and templates
    layers: list[int] | None = None  # 1-indexed adapted blocks; None = 6/12/18/24 of 24, evenly spaced otherwise
    logit_scale: float = 100.0
    det_bce: str = "probability_as_logit"  # as the original; "probability" = BCE on the probability itself
    memory_cls: bool = True  # the original's memory includes the shots' CLS tokens (train_few.py:168-179)
    unnormalised: bool = True  # [0, 1] pixels without mean/std, as MVFA's loaders (medical_few.py:36-45)
    flip_augment: bool = True  # cached hflip views stand in for the original's x11 augmentation of the shots
    # the original's transductive fusion: min-max each branch map over the whole test set (train_few.py:278-292)
    test_minmax: bool = False


class ClipAdapter(nn.Module):
    """MVFA's residual adapter: (.., W) -> med (.., D), out (.., W); no biases, LeakyReLU after each."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.fc1 = nn.Sequential(nn.Linear(width, bottleneck, bias=False), nn.LeakyReLU())
        self.fc2 = nn.Sequential(nn.Linear(bottleneck, width, bias=False), nn.LeakyReLU())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        med = self.fc1(x)
        return med, self.fc2(med)


class AdaptedStream(nn.Module):
    """Seg and det adapters at ``layers``; runs the frozen blocks from the cached stream of ``layers[0]``."""

    def __init__(self, layers: tuple[int, ...], width: int, bottleneck: int):
        super().__init__()
        self.layers = layers
        self.seg_adapters = nn.ModuleList(ClipAdapter(width, bottleneck) for _ in layers)
        self.det_adapters = nn.ModuleList(ClipAdapter(width, bottleneck) for _ in layers)
        # The last adapters' `out` re-enters a stream nothing reads (the original only uses the med tokens), so
        # their fc2 never gets a gradient there either; kept (same state as the original), not trained.
        for adapter in (self.seg_adapters[-1], self.det_adapters[-1]):
            adapter.fc2.requires_grad_(False)

    def forward(self, visual: nn.Module, stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1 + N, W) tokens leaving block layers[0] -> seg, det ``med`` tokens, each (B, L, 1 + N, D)."""
        seg, det = [], []

        def adapt(index: int, x: torch.Tensor) -> torch.Tensor:
            if index not in self.layers:
                return x
            i = self.layers.index(index)
            seg_med, seg_out = self.seg_adapters[i](x)
            det_med, det_out = self.det_adapters[i](x)
            seg.append(seg_med)
            det.append(det_med)
            return RESIDUAL_KEEP * x + ADAPTER_SHARE * seg_out + ADAPTER_SHARE * det_out

        run_visual_blocks(visual, stream, self.layers[0], adapt, stop=self.layers[-1])  # nothing after is used
        return torch.stack(seg, 1), torch.stack(det, 1)


def mvfa_layers(num_layers: int) -> tuple[int, ...]:
    """6/12/18/24 for ViT-L's 24 blocks (train_few.py:50); the same fractions of the depth otherwise."""
    return default_layers(num_layers)


@register("mvfa")
class Mvfa(Method):
    config_class = MvfaConfig
    trainable = True
    outputs = ("score", "map")
    # MVFA rebuilds the OpenAI ViT-L from a JSON without quick_gelu, i.e. runs exact GELU (CLIP/clip.py:111-131)
    activation = "gelu"

    def __init__(self, cfg: MvfaConfig, backbone, task):
        super().__init__(cfg, backbone, task)
        if cfg.det_bce not in DET_BCE:
            raise UsadError(f"option det_bce={cfg.det_bce!r} is not one of {', '.join(DET_BCE)}")
        self.layers = tuple(sorted(cfg.layers or mvfa_layers(backbone.num_layers)))
        backbone.check_request(self.feature_request())
        self.register_buffer("state_text", state_text_features(backbone, load_prompts(cfg.prompts)))  # (2, D)
        # the bottleneck is compared with the text embeddings, so it is the joint width (768 for ViT-L-14)
        self.adapters = AdaptedStream(self.layers, backbone.vision_width, backbone.embed_dim)
        # (M, 1 + N, W) cached prefixes of the normal shots' views: the memory is rebuilt from them with the
        # current adapters (saved with the state, so a reloaded model rebuilds the same memory)
        self.register_buffer("support_stream", torch.zeros(0, 1 + _n_patches(backbone), backbone.vision_width))
        self._memory: tuple[torch.Tensor, torch.Tensor] | None = None  # (seg, det) each (L, M', D); a cache

    @property
    def scoring(self) -> str:  # an instance property: the option decides
        return TEST_MINMAX if self.cfg.test_minmax else PER_IMAGE

    def feature_request(self) -> FeatureRequest:
        return FeatureRequest(kind=STREAM, layers=(self.layers[0],), unnormalised=self.cfg.unnormalised)

    def feature_layers(self) -> tuple[int, ...]:
        return (self.layers[0],)

    # ------------------------------------------------------------------ support and training
    def setup_support(self, support: SupportSet) -> None:
        normal = self.task.normal_index
        keep = support.labels == normal if normal is not None else torch.zeros_like(support.labels, dtype=torch.bool)
        views = [support.features[v].patches[keep][:, 0].float() for v in support.variants]  # each (K, 1+N, W)
        self.support_stream = torch.cat(views).to(self.support_stream.device)
        self._memory = None

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        if "support_stream" in state:  # its size depends on the support set
            self.support_stream = torch.empty_like(state["support_stream"], device=self.support_stream.device)
        self._memory = None
        return super().load_state_dict(state, strict=strict, assign=assign)

    def adapted_tokens(self, stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1 + N, W) cached prefixes -> seg, det ``med`` tokens (B, L, 1 + N, D)."""
        return self.adapters(self.backbone.visual, stream.to(self.backbone.device))

    def layer_probs(self, med: torch.Tensor) -> torch.Tensor:
        """(B, L, 1 + N, D) med tokens -> (B, L, N, 2) patch probabilities of (normal, abnormal), CLS dropped."""
        tokens = F.normalize(med[:, :, 1:], dim=-1)
        return (self.cfg.logit_scale * tokens @ self.state_text.T).softmax(-1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        self._memory = None  # the adapters are about to change
        seg, det = self.adapted_tokens(batch["patches"][:, 0])
        losses, keep = {}, batch["pixel_truth"]
        if keep.any():  # seg first: the original's sum order (loss = seg_loss + det_loss)
            losses["seg"] = self.seg_loss(seg[keep], batch["mask"][keep])
        losses["det"] = self.det_loss(det, batch["is_anomaly"].float())
        return self.log_losses(losses, batch_size=int(batch["patches"].shape[0]))

    def det_loss(self, det: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Sum over blocks of BCE of the mean patch probability (train_few.py:122-130)."""
        score = self.layer_probs(det)[..., 1].mean(-1)  # (B, L)
        if self.cfg.det_bce == "probability_as_logit":  # the original's: sigmoid(p) in [0.5, 0.73]
            return sum(F.binary_cross_entropy_with_logits(score[:, i], target) for i in range(score.shape[1]))
        score = score.clamp(1e-6, 1 - 1e-6)
        return sum(F.binary_cross_entropy(score[:, i], target) for i in range(score.shape[1]))

    def seg_loss(self, seg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sum over blocks of focal + Dice on the upsampled (B, 2, S, S) maps (train_few.py:132-146)."""
        size = mask.shape[-1]
        return sum(segmentation_loss(self._seg_probs(seg[:, i], size), mask) for i in range(seg.shape[1]))

    def _seg_probs(self, med: torch.Tensor, size: int) -> torch.Tensor:
        """(B, 1 + N, D) med tokens of one block -> (B, 2, S, S): logits upsampled before the softmax."""
        logits = self.cfg.logit_scale * F.normalize(med[:, 1:], dim=-1) @ self.state_text.T  # (B, N, 2)
        return patch_logits_to_probs(logits, self.backbone.grid, size)

    def configure_optimizers(self):
        # two Adams over disjoint parameter sets (seg, det adapters) with equal settings = one Adam
        return torch.optim.Adam(self.trainable_parameters(), lr=self.cfg.lr, betas=(0.5, 0.999))

    # ------------------------------------------------------------------ memory and prediction
    @torch.no_grad()
    def memory(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(seg, det) memories, each (L, M * T, D): adapted med tokens of the normal shots' views."""
        if self.support_stream.shape[0] == 0:
            return None
        if self._memory is None:
            parts = [self.adapted_tokens(chunk) for chunk in self.support_stream.split(8)]
            first = 0 if self.cfg.memory_cls else 1
            self._memory = tuple(
                torch.cat([p[k][:, :, first:] for p in parts]).transpose(0, 1).flatten(1, 2) for k in range(2)
            )
        return self._memory

    @torch.no_grad()
    def predict_features(self, feats: ImageFeatures) -> Prediction:
        return fused_prediction(*self.branch_maps(feats))

    @torch.no_grad()
    def predict_parts(self, feats: ImageFeatures) -> dict[str, torch.Tensor]:
        """The raw branch maps of a batch, each (B, S, S), for ``finish_test_set`` (test_minmax: true)."""
        zero_map, few_map = self.branch_maps(feats)
        parts = {"zero_map": zero_map.float().cpu()}
        if few_map is not None:
            parts["few_map"] = few_map.float().cpu()
        return parts

    def finish_test_set(self, parts: dict[str, torch.Tensor]) -> Prediction:
        """The original's recipe: each branch map min-maxed over all (T, S, S) test maps, then fused."""
        few_map = parts.get("few_map")  # absent without normal shots
        zero_map = minmax_over_set(parts["zero_map"])
        return fused_prediction(zero_map, None if few_map is None else minmax_over_set(few_map))

    def branch_maps(self, feats: ImageFeatures) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Zero-shot map sum_l p_a (B, S, S) and few-shot map sum_l min(1 - cos) (B, S, S) or None."""
        size = self.task.image_size
        seg, _ = self.adapted_tokens(feats.patches[:, 0])  # (B, L, 1 + N, D)
        zero_map = sum(self._seg_probs(seg[:, i], size)[:, 1] for i in range(seg.shape[1]))
        memory = self.memory()
        if memory is None:
            return zero_map, None
        return zero_map, memory_distance_map(seg[:, :, 1:], memory[0], self.backbone.grid, size)


def fused_prediction(zero_map: torch.Tensor, few_map: torch.Tensor | None) -> Prediction:
    """0.5/0.5 fusion of the (B, S, S) branch maps (the zero-shot map alone without normal shots); score = max."""
    fused = zero_map if few_map is None else 0.5 * zero_map + 0.5 * few_map
    return Prediction(score=fused.flatten(1).amax(1), anomaly_map=fused)


def minmax_over_set(maps: torch.Tensor) -> torch.Tensor:
    """(T, S, S) maps -> (maps - min) / (max - min) with one min and max over the whole set (test_few.py).

    A constant set (max == min, where the original divides by zero) becomes all zeros.
    """
    low, span = maps.min(), maps.max() - maps.min()
    return (maps - low) / span if span > 0 else torch.zeros_like(maps)


def _n_patches(backbone) -> int:
    rows, cols = backbone.grid
    return rows * cols
