"""The frozen CLIP backbone every method shares.

One class, :class:`Backbone`, wraps any open_clip model and exposes the few things methods need:

* ``encode_images``: the CLS embedding in the joint space and the patch tokens of chosen
  encoder blocks (before the final norm and projection, as APRIL-GAN and UltraAD adapt them);
* ``project_tokens``: the same tokens mapped into the joint space (final norm + projection),
  the "after projection" view zero-shot patch maps use;
* ``encode_text`` for fixed prompts, and ``encode_text_embeddings`` for prompts whose token
  embeddings were edited (CoOp-style learnable context, image-conditioned tokens) with optional
  deep prompt tokens replaced at every layer (AnomalyCLIP-style).

Weights come from an open_clip tag (``--pretrained openai``), an ``hf-hub:`` model id, or a local
checkpoint file; ``pretrained=None`` builds random weights (tests, speed benchmarks). Layer
numbers are 1-indexed block outputs, as papers write them (L6/12/18/24 of ViT-L/14).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from usad_bench.errors import UsadError
from usad_bench.feature_kinds import (
    DPAM,
    RAW,
    WINDOWS,
    FeatureRequest,
    attend_and_mlp,
    encode_dpam,
    encode_windows,
    require_vit,
)

log = logging.getLogger(__name__)

TINY_MODEL = "usad-tiny"  # registered below: 64 px, 4 layers, random weights only; for tests and CI
RANDOM_WEIGHTS = ("", "none", "random")
LOCAL_DIR = "local-dir:"  # open_clip's prefix for a downloaded hub folder (open_clip_config.json + weights)
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def end_of_text_length(tokens: torch.Tensor) -> int:
    """Positions (T, C) token ids need up to their last end-of-text token (CLIP's has the largest id)."""
    return int(tokens.argmax(dim=-1).max()) + 1


# Fixed-prompt embeddings kept by this process (Backbone.encode_text): (tower identity, prompts) -> (T, D) on CPU.
_TEXT_MEMO: OrderedDict[tuple[str, tuple[str, ...]], torch.Tensor] = OrderedDict()
TEXT_MEMO_SIZE = 256  # prompt sets; each is a few hundred KB at most


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that identifies a backbone; saved in every run's config."""

    name: str = "ViT-L-14-336"  # open_clip model name, or "hf-hub:<org>/<repo>"
    pretrained: str | None = "openai"  # open_clip tag, local checkpoint path, or None for random weights
    image_size: int | None = None  # input size override (positional embeddings are interpolated); None = model's
    precision: str = "fp32"  # fp32, fp16 or bf16 for the frozen towers
    seed: int = 0  # initialises random weights (only used when pretrained is None)
    # MLP activation of both towers: None = the method's default (see Method.activation), else as open_clip
    # builds the model name; "gelu" (exact), "quick_gelu", or "native" (what the weights were trained with).
    activation: str | None = None

    @property
    def is_random(self) -> bool:
        # hf-hub: and local-dir: models always load their repo's weights (open_clip ignores `pretrained`).
        if self.name.startswith(("hf-hub:", LOCAL_DIR)):
            return False
        return self.pretrained is None or str(self.pretrained).lower() in RANDOM_WEIGHTS

    def to_dict(self) -> dict:
        return asdict(self)

    def with_default_activation(self, activation: str | None) -> BackboneSpec:
        """This spec with ``activation`` filled in when the user left it unset (a method's authors' choice).

        The authors chose for OpenAI's weights; the built-in synthetic weights were trained with open_clip's own
        build of ``usad-tiny`` (exact GELU), so they keep it whatever the method's authors ran.
        """
        if self.activation is not None or activation is None or self.pretrained == SYNTH_WEIGHTS:
            return self
        return replace(self, activation=activation)


@dataclass
class ImageFeatures:
    """Frozen image-encoder outputs for a batch of images."""

    cls: torch.Tensor  # (B, D) CLS embedding in the joint space, not normalised
    patches: torch.Tensor | None  # (B, L, N, W) tokens of the chosen blocks, before final norm/projection
    layers: tuple[int, ...] = field(default=())  # 1-indexed blocks, in the order of dim 1 of `patches`
    kind: str = RAW  # feature kind (usad_bench.feature_kinds): what `cls` and `patches` hold
    windows: dict[int, torch.Tensor] = field(default_factory=dict)  # windows kind: side -> (B, n_windows, D)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks the GPU when there is one."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def register_tiny_model() -> None:
    """Make ``usad-tiny`` known to open_clip (idempotent)."""
    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(resources.files("usad_bench") / "resources" / "model_configs")


def default_layers(num_layers: int, count: int = 4) -> tuple[int, ...]:
    """``count`` evenly spaced 1-indexed blocks ending at the last one: 24 -> (6, 12, 18, 24)."""
    count = min(count, num_layers)
    return tuple(round(num_layers * (i + 1) / count) for i in range(count))


class Backbone(nn.Module):
    """A frozen open_clip model in eval mode; see the module docstring."""

    def __init__(self, model: nn.Module, spec: BackboneSpec, weights_id: str):
        super().__init__()
        self.model = model
        self.spec = spec
        self.weights_id = weights_id  # what the weights are; part of the feature-cache key
        self.model.requires_grad_(False)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(spec.name)
        self._text = _TextTower(model)
        self._text_key: str | None = None  # _text_identity(), computed on first use

    # ---------------------------------------------------------------- construction
    @classmethod
    def load(cls, spec: BackboneSpec, device: str | torch.device = "cpu") -> Backbone:
        register_tiny_model()
        kwargs = {"precision": spec.precision, "device": resolve_device(device), **_activation_kwargs(spec)}
        if spec.image_size:
            kwargs["force_image_size"] = spec.image_size
        if spec.is_random:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.seed)
                model = _create(spec, pretrained=None, **kwargs)
            return cls(model, spec, weights_id=f"random:{spec.name}:seed{spec.seed}")
        pretrained, weights_id = check_weights(spec)
        return cls(_create(spec, pretrained=pretrained, **kwargs), spec, weights_id)

    def train(self, mode: bool = True) -> Backbone:
        # Frozen means frozen: a Lightning `model.train()` must not switch dropout or norms on.
        return super().train(False)

    # ---------------------------------------------------------------- geometry
    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def embed_dim(self) -> int:
        return int(self._text.output_dim(self.model))

    @property
    def image_size(self) -> int:
        size = self.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def num_layers(self) -> int:
        return len(_vision_blocks(self.visual))

    @property
    def vision_width(self) -> int:
        return int(_vision_blocks(self.visual)[0].ln_1.normalized_shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        patch = (
            self.visual.patch_size if hasattr(self.visual, "patch_size") else self.visual.trunk.patch_embed.patch_size
        )
        patch = patch if isinstance(patch, (tuple, list)) else (patch, patch)
        return self.image_size // patch[0], self.image_size // patch[1]

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        return tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)), tuple(
            cfg.get("std", open_clip.OPENAI_DATASET_STD)
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict:
        """What the feature cache keys on, beside image content and layers."""
        mean, std = self.mean_std
        return {
            "spec": self.spec.to_dict(),
            "weights": self.weights_id,
            "image_size": self.image_size,
            "mean": list(mean),
            "std": list(std),
            "activation": self.activation,
            "open_clip": open_clip.__version__,
            "torch": torch.__version__.split("+")[0],
        }

    # ---------------------------------------------------------------- image side
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, layers: tuple[int, ...] = ()) -> ImageFeatures:
        """CLS embeddings (B, D) and raw patch tokens (B, L, N, W) of 1-indexed ``layers``."""
        self._check_layers(layers)
        images = images.to(self.device, self._dtype)
        out = self.visual.forward_intermediates(
            images, indices=[i - 1 for i in layers] or [self.num_layers - 1], output_fmt="NLC"
        )
        cls = out["image_features"].float()
        patches = torch.stack(out["image_intermediates"], dim=1) if layers else None  # (B, L, N, W)
        return ImageFeatures(cls=cls, patches=patches, layers=tuple(layers))

    @property
    def activation(self) -> str:
        """The MLP activation the image tower runs: "gelu", "quick_gelu" or another module's name."""
        blocks = _vision_blocks(self.visual)
        mlp = getattr(blocks[0], "mlp", None)
        act = getattr(mlp, "gelu", None) or getattr(mlp, "act", None)  # open_clip block / timm Mlp
        return {"GELU": "gelu", "QuickGELU": "quick_gelu"}.get(type(act).__name__, type(act).__name__)

    def check_request(self, request: FeatureRequest) -> None:
        """Fail clearly, before any image is read, when this backbone cannot produce ``request``."""
        # a stream may start at block 0 = the embedded tokens entering block 1 (AdaCLIP's prompts enter there)
        self._check_layers(tuple(i for i in request.layers if not (request.kind == "stream" and i == 0)))
        if request.kind != RAW:
            require_vit(self.visual, request.kind)
        if request.kind == DPAM and not 1 <= request.dpam_start <= self.num_layers:
            raise UsadError(f"dpam_start={request.dpam_start} out of range 1..{self.num_layers} for {self.spec.name}")

    @torch.no_grad()
    def encode_features(self, images: torch.Tensor, request: FeatureRequest) -> ImageFeatures:
        """The features ``request`` names (see usad_bench.feature_kinds); ``raw`` is ``encode_images``."""
        self.check_request(request)
        if request.kind == RAW:
            return self.encode_images(images, request.layers)
        images = images.to(self.device, self._dtype)
        if request.kind == DPAM:
            cls, tokens = encode_dpam(self.visual, images, request.layers, request.dpam_start)
            return ImageFeatures(cls=cls.float(), patches=tokens.float(), layers=request.layers, kind=DPAM)
        if request.kind == "stream":  # MVFA's cached prefix: (B, 1, 1 + N, W), CLS included (usad_bench.stream)
            from usad_bench.stream import encode_stream

            cls, tokens = encode_stream(self.visual, images, request.layers[0])
            return ImageFeatures(cls=cls.float(), patches=tokens.float(), layers=request.layers, kind="stream")
        cls, tokens, windows = encode_windows(self.visual, images, self.grid, request.scales)
        return ImageFeatures(
            cls=cls.float(),
            patches=tokens.unsqueeze(1).float(),  # (B, 1, N, W): final block, after ln_post, not projected
            layers=(self.num_layers,),
            kind=WINDOWS,
            windows={side: w.float() for side, w in windows.items()},
        )

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map raw block tokens (..., W) into the joint space (..., D) with the final norm and projection."""
        visual = self.visual
        tokens = tokens.to(self._dtype)
        if hasattr(visual, "ln_post"):  # open_clip VisionTransformer
            projected = visual.ln_post(tokens)
            return (projected @ visual.proj if visual.proj is not None else projected).float()
        trunk_norm = getattr(visual.trunk, "norm", nn.Identity())  # timm towers (e.g. BiomedCLIP)
        return visual.head(trunk_norm(tokens)).float()

    def _check_layers(self, layers: tuple[int, ...]) -> None:
        bad = [i for i in layers if not 1 <= i <= self.num_layers]
        if bad:
            raise UsadError(f"layers {bad} out of range for {self.spec.name}, which has blocks 1..{self.num_layers}")

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.visual.parameters()).dtype

    # ---------------------------------------------------------------- text side
    @property
    def text_num_layers(self) -> int:
        """Blocks of the text transformer (0 for a Hugging Face text tower), e.g. to size deep prompts."""
        return len(self._text.tower.transformer.resblocks) if self._text.native else 0

    @property
    def text_resumable(self) -> bool:
        """Plain causal open_clip text blocks, so a method may run some positions apart (``text_prefix``)."""
        return self._text.native and _prefix_ready(self._text.tower)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.device)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Embeddings (T, D) of fixed prompts, not normalised.

        Fixed prompts through the frozen tower give the same embeddings in every run, so the process
        keeps them (a sweep builds each method for its fit and again for its evaluation; on a CPU
        that was ~11 s per build at ViT-B-16), and a causal CLIP tower stops at the last end-of-text
        token instead of running all 77 positions (exact: no position attends to the padding after it).
        """
        key = (self._text_identity(), tuple(texts))
        if key not in _TEXT_MEMO:
            with torch.no_grad():
                embeddings = self._encode_fixed_text(texts).float()
            if any(p.requires_grad for p in self.model.parameters()):  # a tower being tuned: never memoise
                return embeddings
            _TEXT_MEMO[key] = embeddings.cpu()
            while len(_TEXT_MEMO) > TEXT_MEMO_SIZE:
                _TEXT_MEMO.popitem(last=False)
        _TEXT_MEMO.move_to_end(key)
        return _TEXT_MEMO[key].clone().to(self.device)

    def _encode_fixed_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenize(texts)
        tower = self._text.tower
        causal = self._text.native and getattr(tower, "attn_mask", None) is not None
        if not causal or getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax")) != "argmax":
            return self.model.encode_text(tokens)
        tokens = tokens[:, : end_of_text_length(tokens)]
        return self._text.encode(tower.token_embedding(tokens), tokens, None)

    def _text_identity(self) -> str:
        """What fixes this tower's output for given prompts: weights, architecture, device type, dtype."""
        if self._text_key is None:
            described = {**self.describe(), "device": torch.device(self.device).type, "dtype": str(self._dtype)}
            self._text_key = json.dumps(described, sort_keys=True)
        return self._text_key

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Input embeddings (T, C, Wt) of token ids (T, C); edit them, then call ``encode_text_embeddings``."""
        return self._text.tower.token_embedding(tokens)

    def text_positional_embedding(self) -> torch.Tensor:
        """(C, Wt) positional embeddings of the text tower (added inside ``encode_text_embeddings``)."""
        return self._text.tower.positional_embedding

    def encode_text_embeddings(
        self,
        embeddings: torch.Tensor,
        tokens: torch.Tensor,
        deep_prompts: list[torch.Tensor] | None = None,
        pre_final_norm: nn.Module | None = None,
    ) -> torch.Tensor:
        """Encode edited input embeddings (T, C, Wt); gradients flow to them, not to the frozen weights.

        Args:
            embeddings: token embeddings, some positions replaced by learnable vectors.
            tokens: the token ids they came from; used to find each prompt's end-of-text position.
            deep_prompts: optional list of (n, Wt) tensors; before block j+1 the n positions after the
                start token are replaced by ``deep_prompts[j]`` (compound / deep prompt tuning).
            pre_final_norm: optional learned module applied to every token before the final layer norm
                (VCP-CLIP's ``prompt_norm``).
        """
        return self._text.encode(embeddings, tokens.to(self.device), deep_prompts, pre_final_norm)

    def text_prefix(self, embeddings: torch.Tensor) -> torch.Tensor | None:
        """Run the text tower once over positions that many prompts share, for ``encode_text_after_prefix``.

        Args:
            embeddings: (T, p, Wt) input embeddings of the first p positions of T prompts.
        Returns:
            (L, T, p, Wt): per block, its layer-normed input at those positions (what later positions
            attend to); None when the tower is not a plain causal open_clip text transformer. A causal
            position never sees the ones after it, so this is the same whatever follows the prefix.
        """
        return _text_prefix(self._text.tower, embeddings.to(self.device)) if self._text.native else None

    def encode_text_after_prefix(self, prefix: torch.Tensor, embeddings: torch.Tensor, tokens: torch.Tensor):
        """``encode_text_embeddings`` of whole prompts, computing only the positions after a cached prefix.

        Args:
            prefix: (L, T, p, Wt) from ``text_prefix``, one row per prompt of this call.
            embeddings: (T, C - p, Wt) input embeddings of positions p..C-1 (gradients flow to them).
            tokens: (T, C) token ids of the whole prompts; their end-of-text position must be >= p.
        Returns:
            (T, D) text embeddings, not normalised. Callers check once that this equals
            ``encode_text_embeddings`` on their prompts (it does for CLIP's causal tower).
        """
        return _text_after_prefix(self._text.tower, prefix, embeddings, tokens.to(self.device))


class _TextTower:
    """Reads the text transformer of CLIP and CustomTextCLIP models through their public modules."""

    def __init__(self, model: nn.Module):
        self.tower = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
        self.native = self.tower is not None and hasattr(self.tower, "token_embedding")

    def output_dim(self, model: nn.Module) -> int:
        if hasattr(model, "text_projection") and model.text_projection is not None:
            proj = model.text_projection
            return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]
        return int(model.encode_text(torch.zeros(1, 77, dtype=torch.long)).shape[-1])

    def encode(
        self,
        x: torch.Tensor,
        tokens: torch.Tensor,
        deep_prompts: list[torch.Tensor] | None,
        pre_final_norm: nn.Module | None = None,
    ) -> torch.Tensor:
        if not self.native:
            raise UsadError(
                "this method edits prompt embeddings, which needs an open_clip text transformer; the model's "
                "text tower is a Hugging Face model (e.g. BiomedCLIP). Use an OpenAI/OpenCLIP backbone for it."
            )
        t = self.tower
        blocks = t.transformer.resblocks
        x = x + t.positional_embedding[: x.shape[1]].to(x.dtype)
        mask = t.attn_mask[: x.shape[1], : x.shape[1]] if t.attn_mask is not None else None
        batch_first = getattr(t.transformer, "batch_first", True)
        for j, block in enumerate(blocks):
            if deep_prompts is not None and 0 < j <= len(deep_prompts):
                prompt = deep_prompts[j - 1].to(x.dtype)  # (n, Wt)
                n = prompt.shape[0]
                x = torch.cat([x[:, :1], prompt.expand(x.shape[0], -1, -1), x[:, 1 + n :]], dim=1)
            x = block(x, attn_mask=mask) if batch_first else block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        if pre_final_norm is not None:
            x = pre_final_norm(x)
        x = t.ln_final(x)
        return project_text(t, _pool_text(x, tokens, getattr(t, "text_pool_type", getattr(t, "pool_type", "argmax"))))


def _prefix_ready(tower: nn.Module) -> bool:
    """A text tower ``text_prefix`` can resume: causal mask, batch-first plain blocks, end-of-text pooling."""
    plain = all(
        isinstance(b, open_clip.transformer.ResidualAttentionBlock)
        and isinstance(b.attn, nn.MultiheadAttention)
        and not hasattr(b, "ln_1_kv")
        for b in tower.transformer.resblocks
    )
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
    causal = getattr(tower, "attn_mask", None) is not None
    return plain and causal and pool == "argmax" and getattr(tower.transformer, "batch_first", True)


@torch.no_grad()
def _text_prefix(tower: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """(T, p, Wt) prefix embeddings -> (L, T, p, Wt) layer-normed block inputs (``Backbone.text_prefix``)."""
    if not _prefix_ready(tower):
        return None
    p = x.shape[1]
    x = x + tower.positional_embedding[:p].to(x.dtype)
    mask = tower.attn_mask[:p, :p]
    states = []
    for block in tower.transformer.resblocks:
        states.append(block.ln_1(x))
        x = block(x, attn_mask=mask)
    return torch.stack(states)


def _text_after_prefix(tower: nn.Module, prefix: torch.Tensor, x: torch.Tensor, tokens: torch.Tensor):
    """Positions p.. of prompts through every block, attending to the cached prefix (``Backbone``'s doc)."""
    p, n = prefix.shape[2], x.shape[1]
    x = x + tower.positional_embedding[p : p + n].to(x.dtype)
    mask = tower.attn_mask[p : p + n, : p + n].to(x.dtype)  # causal rows of these positions, all keys
    for block, cached in zip(tower.transformer.resblocks, prefix, strict=True):
        normed = block.ln_1(x)  # (T, n, Wt)
        x = attend_and_mlp(block, x, normed, torch.cat([cached.to(x.dtype), normed], dim=1), mask)  # keys (T, p + n)
    x = tower.ln_final(x)
    return project_text(tower, x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1) - p])


def project_text(tower: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """(T, Wt) pooled end-of-text tokens of an open_clip text tower -> (T, D) float32 in the joint space."""
    proj = tower.text_projection
    if proj is not None:
        pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
    return pooled.float()


def _pool_text(x: torch.Tensor, tokens: torch.Tensor, pool_type: str) -> torch.Tensor:
    rows = torch.arange(x.shape[0], device=x.device)
    if pool_type == "argmax":  # CLIP's end-of-text token has the largest id
        return x[rows, tokens.argmax(dim=-1)]
    if pool_type == "first":
        return x[:, 0]
    if pool_type == "last":
        return x[:, -1]
    raise UsadError(f"text pooling {pool_type!r} is not supported for edited prompts")


def _vision_blocks(visual: nn.Module) -> nn.ModuleList:
    if hasattr(visual, "transformer"):
        return visual.transformer.resblocks
    return visual.trunk.blocks  # timm ViT


ACTIVATIONS = ("gelu", "quick_gelu", "native")


def _activation_kwargs(spec: BackboneSpec) -> dict:
    """open_clip arguments for the requested MLP activation (None: as open_clip builds the model name)."""
    if spec.activation is None:
        return {}
    if spec.activation not in ACTIVATIONS:
        raise UsadError(f"activation {spec.activation!r} is not one of {', '.join(ACTIVATIONS)}")
    quick = spec.activation == "quick_gelu"
    if spec.activation == "native":  # what the weights were trained with, per open_clip's pretrained table
        if spec.is_random or spec.name.startswith(("hf-hub:", LOCAL_DIR)):
            return {}
        quick = bool((open_clip.get_pretrained_cfg(spec.name, str(spec.pretrained)) or {}).get("quick_gelu"))
    return {"force_quick_gelu": True} if quick else {"quick_gelu": False}


def _create(spec: BackboneSpec, pretrained: str | None, **kwargs) -> nn.Module:
    try:
        return open_clip.create_model(spec.name, pretrained=pretrained, **kwargs)
    except Exception as exc:  # torch/safetensors raise many types for a bad file; each becomes one line
        if isinstance(exc, RuntimeError) and "not found in built-ins" in str(exc):
            raise UsadError(f"unknown open_clip model {spec.name!r}; see `open_clip.list_models()`") from None
        if _needs_transformers(exc):  # a Hugging Face text tower (BiomedCLIP), not the weights, is the cause
            raise UsadError(
                f"{spec.name} has a Hugging Face text tower, which needs the transformers package: "
                'pip install "usad_bench[biomedclip]" (or pip install transformers)'
            ) from None
        if pretrained is not None and Path(pretrained).is_file():
            raise UsadError(_checkpoint_help(spec, Path(pretrained), exc)) from exc
        if isinstance(exc, (RuntimeError, OSError, ValueError)):
            raise UsadError(_weights_help(spec, exc)) from exc
        raise


def _needs_transformers(exc: Exception) -> bool:
    """open_clip's own error for an HF text tower without transformers, or a failed import of it."""
    if isinstance(exc, ImportError):
        return (exc.name or "").split(".")[0] == "transformers"
    return isinstance(exc, RuntimeError) and "pip install transformers" in str(exc)


def check_weights(spec: BackboneSpec) -> tuple[str | None, str]:
    """Fail now, with the one-line error ``Backbone.load`` would give, when the weights of pretrained ``spec``
    cannot be had (unknown tag, missing file, offline and not cached); else open_clip's ``pretrained`` argument
    and the weights' identity. Callers that write files before loading (the demo) call it first."""
    register_tiny_model()
    pretrained, weights_id = _resolve_weights(spec)
    require_downloadable(spec, pretrained)  # offline and not cached: fail in seconds, before building the model
    return pretrained, weights_id


def _resolve_weights(spec: BackboneSpec) -> tuple[str | None, str]:
    """The ``pretrained`` argument for open_clip and a stable identity of the weights."""
    if spec.name.startswith("hf-hub:"):
        return None, spec.name
    if spec.name.startswith(LOCAL_DIR):
        return None, _local_dir_weights_id(Path(spec.name.removeprefix(LOCAL_DIR)).expanduser())
    pretrained = str(spec.pretrained)
    if pretrained == SYNTH_WEIGHTS:
        return _synth_weights(spec)
    if os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise UsadError(f"checkpoint file not found: {path}; pass an existing file to --pretrained")
        return str(path), f"file:{file_sha256(path)}"
    tags = open_clip.list_pretrained_tags_by_model(spec.name)
    if pretrained not in tags:
        raise UsadError(f"{spec.name} has no pretrained tag {pretrained!r}; known tags: {tags or 'none'}")
    return pretrained, f"tag:{spec.name}:{pretrained}"


SYNTH_WEIGHTS = "synth"  # --pretrained synth: the package's usad-tiny weights, pretrained on synthetic images only


def synth_weights_path(name: str = TINY_MODEL) -> Path:
    """Where the built-in synthetic-pretrained weights of ``name`` live (written by `make pretrain-tiny`)."""
    return Path(str(resources.files("usad_bench") / "resources" / "weights" / f"{name}-synth.safetensors"))


def _synth_weights(spec: BackboneSpec) -> tuple[str, str]:
    """``--pretrained synth``: the file and an identity that names it synthetic and hashes its content."""
    path = synth_weights_path(spec.name)
    if spec.name != TINY_MODEL:
        raise UsadError(f"--pretrained synth exists for --backbone {TINY_MODEL} only, not {spec.name}")
    if not path.is_file():
        raise UsadError(f"the built-in synthetic weights are missing ({path}); run `make pretrain-tiny` to create them")
    return str(path), f"synth:{spec.name}:{file_sha256(path)}"


def _local_dir_weights_id(folder: Path) -> str:
    """Identity of a downloaded hub folder: the content hash of every checkpoint file in it."""
    if not (folder / "open_clip_config.json").is_file():
        raise UsadError(
            f"{folder} is not a downloaded open_clip model folder (no open_clip_config.json); download the whole "
            "Hugging Face repo, or pass a model name with --pretrained /path/to/checkpoint"
        )
    checkpoints = sorted(p for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
    if not checkpoints:
        raise UsadError(f"{folder} has open_clip_config.json but no weights file ({', '.join(CHECKPOINT_SUFFIXES)})")
    digest = hashlib.sha256("".join(f"{p.name}:{file_sha256(p)}" for p in checkpoints).encode()).hexdigest()
    return f"local-dir:{digest}"


def _weights_help(spec: BackboneSpec, exc: Exception) -> str:
    reason = _one_line(exc)  # the whole cause, on one line
    if spec.name.startswith("hf-hub:"):
        return (
            f"could not load {spec.name} ({reason}). Offline? Download that Hugging Face repo (open_clip_config.json "
            "and the weights) on a connected machine and pass --backbone local-dir:/path/to/that/folder."
        )
    if spec.name.startswith(LOCAL_DIR):
        return _local_dir_help(spec, reason)
    cfg = open_clip.get_pretrained_cfg(spec.name, str(spec.pretrained)) or {}
    sources = []
    if cfg.get("hf_hub"):
        sources.append(f"Hugging Face repo {cfg['hf_hub'].rstrip('/')}")
    if cfg.get("url"):
        sources.append(cfg["url"])
    where = f" (from {' or '.join(sources)})" if sources else ""
    return (
        f"could not load weights for {spec.name} / {spec.pretrained}{where}: {reason}. Offline? Download the "
        "checkpoint on a connected machine and pass its path with --pretrained /path/to/file (or copy a filled "
        "~/.cache/huggingface/hub here); --pretrained none gives random weights."
    )


def _local_dir_help(spec: BackboneSpec, reason: str) -> str:
    """A downloaded hub folder open_clip could not build; its config may name another Hugging Face repo."""
    folder = Path(spec.name.removeprefix(LOCAL_DIR)).expanduser()
    try:  # BiomedCLIP's text tower reads the config.json of the PubMedBERT repo its config names
        config = json.loads((folder / "open_clip_config.json").read_text())
        text_model = str(config.get("model_cfg", {}).get("text_cfg", {}).get("hf_model_name", ""))
    except (OSError, ValueError, AttributeError):
        text_model = ""
    if text_model and not Path(text_model).expanduser().is_dir():
        return (
            f"could not build {spec.name} ({reason}). Its text tower also loads the Hugging Face repo {text_model} "
            "(hf_model_name in open_clip_config.json). Offline? Download that repo's config.json to a folder and set "
            "hf_model_name to that folder, or copy a filled ~/.cache/huggingface/hub here."
        )
    return (
        f"could not build {spec.name} ({reason}); the folder needs open_clip_config.json, the weights and tokenizer "
        "files of one Hugging Face repo: download that repo again."
    )


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _checkpoint_help(spec: BackboneSpec, path: Path, exc: Exception) -> str:
    """A local --pretrained file that open_clip could not load: another model's weights, or a damaged file."""
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("state_dict" in text or "size mismatch" in text or "Missing key" in text):
        return (
            f"checkpoint {path} does not fit --backbone {spec.name}: it holds the weights of another architecture "
            f"({_one_line(exc)}). Pass the --backbone the checkpoint was trained as, or a checkpoint of {spec.name}."
        )
    return (
        f"checkpoint {path} cannot be read ({_one_line(exc)}): the file is damaged or not a PyTorch/safetensors "
        "checkpoint; download or copy it again (compare its size or sha256 with the source)."
    )


# ----------------------------------------------------------------------------- offline: fail fast
NETWORK_TIMEOUT_S = 3.0  # one HEAD request; a connected machine answers well within it


def require_downloadable(spec: BackboneSpec, pretrained: str | None) -> None:
    """Weights that open_clip would download: check the network once; offline, use the cache or fail now.

    Without this, huggingface_hub retries for tens of seconds before an unhelpful error. Offline with
    the weights cached, huggingface_hub is switched to its offline mode, so it reads the cache without
    trying the network again.
    """
    source = _download_source(spec, pretrained)
    if source is None:
        return
    url, cached = source
    origin = "{0.scheme}://{0.netloc}/".format(urllib.parse.urlsplit(url))  # one check per server and process
    reason = "HF_HUB_OFFLINE is set" if _hf_offline() else _network_error(origin)
    if reason is None:
        return
    if cached:
        _set_hf_offline()
        return
    raise UsadError(_offline_help(spec, reason))


def _download_source(spec: BackboneSpec, pretrained: str | None) -> tuple[str, bool] | None:
    """(URL to check, already in the local cache?) for weights fetched from the network; None for local ones."""
    if spec.name.startswith("hf-hub:"):
        return _hf_source(spec.name.removeprefix("hf-hub:"), "open_clip_config.json")
    if pretrained is None or Path(pretrained).is_file():
        return None
    cfg = open_clip.get_pretrained_cfg(spec.name, str(pretrained)) or {}
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # as open_clip splits it: "org/model/" has the default file
        return _hf_source(repo, filename or "open_clip_pytorch_model.bin")
    if cfg.get("url"):
        cached = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])  # open_clip's URL cache
        return cfg["url"], cached.is_file()
    return None


def _hf_source(repo: str, filename: str) -> tuple[str, bool]:
    from huggingface_hub import constants, try_to_load_from_cache

    names = (filename, "open_clip_model.safetensors") if filename.endswith(".bin") else (filename,)
    cached = any(isinstance(try_to_load_from_cache(repo, name), str) for name in names)
    return f"{constants.ENDPOINT}/{repo}", cached


def _hf_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _set_hf_offline() -> None:
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # the switch huggingface_hub reads (also set by the HF_HUB_OFFLINE variable)


@functools.cache
def _network_error(url: str) -> str | None:
    """None when ``url``'s server answers one HEAD request (through the environment's proxies), else why not."""
    try:
        opener = urllib.request.build_opener()  # reads the proxy variables now (urlopen keeps its first opener's)
        opener.open(urllib.request.Request(url, method="HEAD"), timeout=NETWORK_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None  # the server answered (e.g. 401 for a gated repo): the network is there
    except (OSError, ValueError) as exc:
        return _one_line(exc)
    return None


def _offline_help(spec: BackboneSpec, reason: str) -> str:
    what = spec.name if spec.name.startswith("hf-hub:") else f"{spec.name} / {spec.pretrained}"
    if spec.name.startswith("hf-hub:"):
        fix = (
            "download that Hugging Face repo (open_clip_config.json and the weights) on a connected machine and pass "
            "--backbone local-dir:/path/to/that/folder"
        )
    else:
        cfg = open_clip.get_pretrained_cfg(spec.name, str(spec.pretrained)) or {}
        hub = cfg.get("hf_hub", "").rstrip("/")
        where = f"Hugging Face repo {hub}" if hub else cfg.get("url", "from its source")
        fix = (
            f"download the checkpoint ({where}) on a connected machine and pass --pretrained /path/to/file, or copy "
            "a filled ~/.cache/huggingface/hub here; --pretrained none gives random weights"
        )
    return f"the weights of {what} are not cached and the network is unreachable ({reason}); {fix}"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Content hash of a file; memoised by (path, size, mtime) because checkpoints are large."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
        _SHA_MEMO[key] = digest.hexdigest()
    return _SHA_MEMO[key]


_SHA_MEMO: dict[tuple, str] = {}


def normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
