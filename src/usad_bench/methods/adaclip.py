"""AdaCLIP (Cao et al., ECCV 2024; caoyunkang/AdaCLIP @ e27ee32): hybrid static + dynamic prompts in both
towers of a frozen CLIP, per-layer patch heads and hybrid semantic fusion (HSF) for the image score.

Follows ``method/adaclip.py`` and ``method/trainer.py`` (see baselines/adaclip.md):

* Prompts (length 5, depth 4): entering image block 1 five tokens ``static[0] + dynamic`` are appended
  after CLS + patches; entering blocks 2..4 the last five tokens are replaced by ``static[i] + dynamic``;
  later blocks carry them as ordinary tokens (``adaclip.py:98-137``). Text: entering text blocks 2..4,
  positions 1..5 of every sentence become ``static[i] + dynamic`` (``:63-96``); nothing at block 1.
  ``dynamic`` = five ``Linear(D -> width)`` heads of the frozen, unprompted model's CLS (``:405-414``).
* Patch tokens: the raw stream leaving blocks L/4, L/2, 3L/4, L with the prompt tokens and the CLS
  dropped, one ``Linear(W -> D)`` each, normalised; CLS: ``ln_post`` + ``proj`` of the prompted stream,
  then ``Linear(D -> D)``, normalised (``:375-385,464-488``).
* Text: APRIL-GAN's 7 normal / 5 abnormal states x the first 4 templates, each ensemble normalised,
  averaged, normalised; recomputed for every image (its prompts depend on the image). Exact shortcut: an
  image's start token and prompts are the same in all its sentences of the causal tower, so they run once
  per image (``stream.run_text_shared_prompts``; ``shared_text_prefix = False`` runs every sentence).
* Maps: ``100 cos(patch_l, t)`` per layer, upsampled bilinearly (``align_corners``); training: softmax per
  layer; test: mean of the layer logits, softmax, ``(p_a + 1 - p_n) / 2``, Gaussian sigma 4.
* Image score: HSF = k-means (k = 20, **seeded** here) over the 100 most anomalous patches' 4-layer
  tokens, mean of the cluster means; ``f = normalize(0.2 HSF + 0.8 CLS')``, ``softmax(100 <f, t>)[a]``.
* Loss: focal on the image probabilities + per layer focal + Dice(p_a, gt) + Dice(p_n, 1 - gt); AdamW
  lr 0.01, betas (0.5, 0.999), default weight decay; 5 epochs, batch 1, the last epoch kept.
* Cached once per image (feature kind ``stream`` at block 0): the ``ln_pre`` output (B, 1 + N, W) and the
  frozen CLS that makes the dynamic prompts. Every step and prediction reruns all image blocks and the
  text tower (``usad_bench.stream``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn

from usad_bench.backbone import ImageFeatures, default_layers
from usad_bench.errors import UsadError
from usad_bench.feature_kinds import STREAM, FeatureRequest
from usad_bench.methods.anomalyclip import smooth
from usad_bench.methods.base import Method, MethodConfig, Prediction, batch_features
from usad_bench.methods.common import causal_text_length
from usad_bench.methods.losses import dice_loss, focal_loss
from usad_bench.methods.patch_heads import LinearPatchHeads
from usad_bench.methods.registry import register
from usad_bench.prompts import STATES, PromptSet, load_prompts
from usad_bench.stream import (
    StreamEdit,
    finish_visual,
    run_text_blocks,
    run_text_shared_prompts,
    run_visual_blocks,
    text_first_block,
)

DICE_MODES = ("as_original", "per_image")


@dataclass
class AdaCLIPConfig(MethodConfig):
    epochs: int = 5  # train.py --epoch default
    batch_size: int = 1  # train.py:177-179 (the original's text prompting needs it); larger batches are exact here
    lr: float = 0.01  # AdamW, betas (0.5, 0.999), weight decay 0.01 (torch's default, trainer.py:87)
    weight_decay: float = 0.01
    prompts: str = "april_gan"  # the same 7 + 5 state phrases as AdaCLIP's TextEmbebddingLayer
    n_templates: int = 4  # AdaCLIP keeps the first 4 of the 35 templates (adaclip.py:156-160)
    layers: list[int] | None = None  # 1-indexed blocks; None = L/4, L/2, 3L/4, L (train.py:46-49)
    prompt_length: int = 5  # train.py --prompting_length
    prompt_depth: int = 4  # train.py --prompting_depth
    hsf: bool = True  # hybrid semantic fusion in the image score
    k_clusters: int = 20  # train.py --k_clusters; 5 k most anomalous patches are clustered
    hsf_alpha: float = 0.2  # adaclip.py:517
    kmeans_seed: int = 0  # the original's KMeans is unseeded
    logit_scale: float = 100.0
    sigma: float = 4.0  # Gaussian smoothing of the test map (trainer.py:194); 0 = none
    flip_augment: bool = False  # the original's only augmentation is MVTec's 2x2 mosaic
    dice: str = "as_original"  # as_original: per mask row for a batch of 1 (see dice_terms), per image otherwise


def adaclip_layers(num_layers: int) -> tuple[int, ...]:
    """``n // 4 * (1..4)`` (train.py:46-49): 6/12/18/24 of 24, 3/6/9/12 of 12; evenly spaced below 4 blocks."""
    step = num_layers // 4
    return tuple(step * i for i in range(1, 5)) if step else default_layers(num_layers)


class HybridPrompts(nn.Module):
    """One tower's prompts: ``static[i]`` (length, width) per prompted depth + the shared dynamic tokens."""

    def __init__(self, depth: int, length: int, width: int, embed_dim: int):
        super().__init__()
        self.static = nn.ParameterList(nn.Parameter(torch.randn(length, width) * 0.02) for _ in range(depth))
        self.generator = nn.ModuleList(nn.Linear(embed_dim, width) for _ in range(length))  # adaclip.py:387-397

    def forward(self, frozen_cls: torch.Tensor) -> list[torch.Tensor]:
        """(B, D) frozen CLS -> per depth (B, length, width) tokens ``static + dynamic``."""
        dynamic = torch.stack([head(frozen_cls) for head in self.generator], dim=1)  # (B, length, width)
        return [dynamic + static for static in self.static]


class HybridSemanticFusion:
    """AdaCLIP's HSF (adaclip.py:234-286), with a seeded k-means: a (B, D) unit embedding of the most
    anomalous patches. Gradients flow through the gathered tokens; the cluster labels are constants."""

    def __init__(self, k_clusters: int, seed: int):
        self.k_clusters, self.seed = k_clusters, seed

    def __call__(self, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, N, D) unit patch tokens, logits (B, L, N, 2) -> (B, D)."""
        abnormal = logits.mean(1).softmax(-1)[..., 1]  # (B, N)
        top = abnormal.topk(min(abnormal.shape[1], 5 * self.k_clusters), dim=1).indices  # (B, k)
        picked = tokens.gather(2, top[:, None, :, None].expand(-1, tokens.shape[1], -1, tokens.shape[-1]))
        return F.normalize(torch.stack([self.fuse(p) for p in picked]), dim=-1)  # picked: (B, L, k, D)

    def fuse(self, picked: torch.Tensor) -> torch.Tensor:
        """(L, k, D) tokens of one image -> (D,) mean over clusters of each cluster's mean over its tokens."""
        stacked = picked.permute(1, 0, 2).flatten(1)  # (k, L*D): the layers side by side, as the original
        labels = self.cluster(stacked.detach().float().cpu().numpy())
        labels = torch.as_tensor(labels, device=picked.device)
        per_patch = picked.mean(0)  # (k, D): every cluster member contributes its L tokens equally
        centres = [per_patch[labels == c].mean(0) for c in labels.unique()]  # empty clusters cannot occur
        return torch.stack(centres).mean(0)

    def cluster(self, points: np.ndarray) -> np.ndarray:
        k = min(self.k_clusters, len(points))
        return KMeans(n_clusters=k, n_init="auto", random_state=self.seed).fit_predict(points)


def prompt_stream_edit(prompts: list[torch.Tensor], layers: tuple[int, ...], kept: dict) -> StreamEdit:
    """The image-stream edit: append prompts entering block 1, replace them entering blocks 2..depth, and
    keep the patch tokens (prompts and CLS dropped) leaving each of ``layers`` into ``kept``."""
    length = prompts[0].shape[1]

    def edit(index: int, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, W) leaving block ``index``
        if index in layers:
            kept[index] = x[:, 1:-length]  # recorded before this index's replacement, as adaclip.py:130-135
        if index >= len(prompts):
            return x
        prompt = prompts[index].to(x.dtype)
        return torch.cat([x if index == 0 else x[:, :-length], prompt], dim=1)

    return edit


def text_prompt_edit(prompts: list[torch.Tensor]) -> StreamEdit:
    """The text-stream edit: entering text block i + 1 (i >= 1), positions 1..n become ``prompts[i - 1]``
    (one (T, n, Wt) row per sentence, so each image of a batch has its own prompts)."""

    def edit(index: int, x: torch.Tensor) -> torch.Tensor:
        if not 0 < index <= len(prompts):
            return x
        prompt = prompts[index - 1].to(x.dtype)
        return torch.cat([x[:, :1], prompt, x[:, 1 + prompt.shape[1] :]], dim=1)

    return edit


class StateSentences(nn.Module):
    """The fixed sentences of both state ensembles: token ids and input embeddings, shortened to the
    longest end-of-text position (exact for CLIP's causal tower)."""

    def __init__(self, backbone, prompts: PromptSet, min_length: int):
        super().__init__()
        sentences = [prompts.state_prompts(state) for state in STATES]
        self.counts = [len(s) for s in sentences]
        tokens = backbone.tokenize(sentences[0] + sentences[1])  # (T, C)
        with torch.no_grad():
            embedding = backbone.token_embedding(tokens).float()  # (T, C, Wt)
        length = max(causal_text_length(backbone, embedding, tokens), min_length)
        self.register_buffer("tokens", tokens[:, :length], persistent=False)
        self.register_buffer("embedding", embedding[:, :length], persistent=False)
        # the stream leaving text block 1, where no prompt has entered yet (run_text_shared_prompts)
        first = text_first_block(backbone, self.embedding) if backbone.text_resumable else None
        self.register_buffer("first_block", first, persistent=False)


def dice_terms(probs: torch.Tensor, gt: torch.Tensor, per_row: bool) -> torch.Tensor:
    """Dice(p_a, gt) + Dice(p_n, 1 - gt) of (B, 2, S, S) probabilities and (B, S, S) masks.

    ``per_row``: the original squeezes its batch-1 mask to (S, S) (trainer.py:115), so ``BinaryDiceLoss``
    (loss.py:92-107) takes the S rows for S images: a smoothed Dice per mask row, averaged over the rows.
    """
    if per_row:
        probs, gt = probs.transpose(0, 1).flatten(1, 2), gt.flatten(0, 1)  # (2, B*S, S), (B*S, S): rows as images
        return dice_loss(probs[1], gt) + dice_loss(probs[0], 1.0 - gt)
    return dice_loss(probs[:, 1], gt) + dice_loss(probs[:, 0], 1.0 - gt)


@register("adaclip")
class AdaCLIP(Method):
    """See the module docstring."""

    config_class = AdaCLIPConfig
    trainable = True
    outputs = ("score", "map")
    # AdaCLIP rebuilds the OpenAI model from a JSON config without quick_gelu (custom_clip.py:636,652)
    activation = "gelu"

    def __init__(self, cfg: AdaCLIPConfig, backbone, task):
        super().__init__(cfg, backbone, task)
        if cfg.dice not in DICE_MODES:
            raise UsadError(f"adaclip: dice={cfg.dice!r} is not one of {', '.join(DICE_MODES)}")
        if cfg.prompt_length < 1 or cfg.prompt_depth < 1:
            raise UsadError("adaclip needs prompt_length >= 1 and prompt_depth >= 1")
        if backbone.text_num_layers == 0:
            raise UsadError(
                "adaclip prompts the text transformer, which needs an open_clip text tower; this backbone's is a "
                "Hugging Face model (e.g. BiomedCLIP). Use an OpenAI/OpenCLIP ViT backbone for it."
            )
        self.layers = tuple(cfg.layers or adaclip_layers(backbone.num_layers))
        width, dim = backbone.vision_width, backbone.embed_dim
        text_width = backbone.token_embedding(backbone.tokenize(["x"])).shape[-1]
        visual_depth = min(cfg.prompt_depth, backbone.num_layers)  # entering blocks 1..depth
        # the original also makes a text static[0] that it never uses; text prompts enter blocks 2..depth
        text_depth = min(cfg.prompt_depth - 1, max(backbone.text_num_layers - 1, 0))
        self.visual_prompts = HybridPrompts(visual_depth, cfg.prompt_length, width, dim)
        self.text_prompts = HybridPrompts(text_depth, cfg.prompt_length, text_width, dim)
        self.patch_heads = LinearPatchHeads(len(self.layers), width, dim)
        self.cls_head = nn.Linear(dim, dim)
        prompts = load_prompts(cfg.prompts)
        prompts = dataclasses.replace(prompts, templates=prompts.templates[: cfg.n_templates])
        self.sentences = StateSentences(backbone, prompts, min_length=cfg.prompt_length + 2)
        self.hsf = HybridSemanticFusion(cfg.k_clusters, cfg.kmeans_seed) if cfg.hsf else None
        self.shared_text_prefix = True  # exact speed-up (run_text_shared_prompts); False runs text_reference

    def feature_request(self) -> FeatureRequest:
        return FeatureRequest(kind=STREAM, layers=(0,))  # the ln_pre output + the frozen model's CLS

    # ------------------------------------------------------------------------------------------ forward
    def encode(self, feats: ImageFeatures) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cached stream -> unit CLS' (B, D), unit patch tokens (B, L, N, D), unit text (B, 2, D)."""
        frozen_cls = feats.cls.float()
        kept: dict[int, torch.Tensor] = {}
        edit = prompt_stream_edit(self.visual_prompts(frozen_cls), self.layers, kept)
        visual = self.backbone.visual
        stream = run_visual_blocks(visual, feats.patches[:, 0].to(frozen_cls.device), 0, edit)  # (B, T + n, W)
        cls = F.normalize(self.cls_head(finish_visual(visual, stream).float()), dim=-1)
        patches = self.patch_heads(torch.stack([kept[i].float() for i in self.layers], 1))  # (B, L, N, D)
        return cls, patches, self.text_features(frozen_cls)

    def text_features(self, frozen_cls: torch.Tensor) -> torch.Tensor:
        """(B, D) frozen CLS -> (B, 2, D) unit (normal, abnormal) ensembles under that image's prompts."""
        s, prompts = self.sentences, self.text_prompts(frozen_cls)  # per depth (B, n, Wt)
        if self.shared_text_prefix and s.first_block is not None and prompts:
            text = run_text_shared_prompts(self.backbone, s.first_block, s.tokens, prompts)  # (B, T, D)
        else:
            text = self.text_reference(prompts, len(frozen_cls))
        text = F.normalize(text, dim=-1)
        states = [F.normalize(part.mean(1), dim=-1) for part in text.split(s.counts, dim=1)]
        return torch.stack(states, 1)  # (B, 2, D)

    def text_reference(self, prompts: list[torch.Tensor], b: int) -> torch.Tensor:
        """Every sentence of every image through the whole tower (the original's computation): (B, T, D)."""
        s = self.sentences
        n_sentences = s.tokens.shape[0]
        prompts = [p.repeat_interleave(n_sentences, 0) for p in prompts]  # (B*T, n, Wt)
        embedding = s.embedding.repeat(b, 1, 1)  # (B*T, C, Wt); every image's sentences in one pass
        text = run_text_blocks(self.backbone, embedding, s.tokens.repeat(b, 1), text_prompt_edit(prompts))
        return text.unflatten(0, (b, n_sentences))

    def similarities(self, cls, patches, text) -> tuple[torch.Tensor, torch.Tensor]:
        """Image probabilities (B, 2) and per-layer patch logits (B, L, N, 2)."""
        scale = self.cfg.logit_scale
        logits = scale * patches @ text[:, None].transpose(-1, -2)  # (B, L, N, 2)
        if self.hsf is not None:
            alpha = self.cfg.hsf_alpha
            cls = F.normalize(alpha * self.hsf(patches, logits) + (1 - alpha) * cls, dim=-1)
        image = (scale * (cls[:, None] @ text.transpose(1, 2))[:, 0]).softmax(-1)  # (B, 2)
        return image, logits

    def upsample(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, N, 2) patch logits -> (B, 2, S, S), bilinear with align_corners (adaclip.py:530-534)."""
        grid = logits.transpose(1, 2).unflatten(-1, self.backbone.grid)
        size = (self.task.image_size, self.task.image_size)
        return F.interpolate(grid, size=size, mode="bilinear", align_corners=True)

    # ----------------------------------------------------------------------------------------- training
    def losses(self, feats: ImageFeatures, mask, is_anomaly, pixel_truth) -> dict[str, torch.Tensor]:
        """trainer.py:125-135: image focal + per layer focal + Dice(p_a, gt) + Dice(p_n, 1 - gt)."""
        image, logits = self.similarities(*self.encode(feats))
        target = (is_anomaly > 0.5).float()
        losses = {"image": focal_loss(image[:, :, None, None], target[:, None, None])}
        if pixel_truth.any():  # an image without a ground-truth mask teaches nothing about pixels
            gt = (mask[pixel_truth] > 0.5).float()
            probs = [self.upsample(logits[pixel_truth, i]).softmax(1) for i in range(logits.shape[1])]
            per_row = self.cfg.dice == "as_original" and len(gt) == 1
            losses["pixel"] = sum(focal_loss(p, gt) + dice_terms(p, gt, per_row) for p in probs)
        return losses

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        feats = batch_features(batch, (0,))
        losses = self.losses(feats, batch["mask"], batch["is_anomaly"], batch["pixel_truth"].bool())
        return self.log_losses(losses, batch_size=len(batch["cls"]))

    def configure_optimizers(self):
        params = self.trainable_parameters()
        return torch.optim.AdamW(params, lr=self.cfg.lr, betas=(0.5, 0.999), weight_decay=self.cfg.weight_decay)

    # --------------------------------------------------------------------------------------- prediction
    @torch.no_grad()
    def predict_features(self, feats: ImageFeatures) -> Prediction:
        image, logits = self.similarities(*self.encode(feats))
        probs = self.upsample(logits.mean(1)).softmax(1)  # mean of the layer logits (upsampling is linear)
        anomaly_map = (probs[:, 1] + 1 - probs[:, 0]) / 2  # (B, S, S)
        return Prediction(score=image[:, 1], anomaly_map=smooth(anomaly_map, self.cfg.sigma))
