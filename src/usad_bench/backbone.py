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

import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from usad_bench.errors import UsadError

log = logging.getLogger(__name__)

TINY_MODEL = "usad-tiny"  # registered below: 64 px, 4 layers, random weights only; for tests and CI
RANDOM_WEIGHTS = ("", "none", "random")
LOCAL_DIR = "local-dir:"  # open_clip's prefix for a downloaded hub folder (open_clip_config.json + weights)
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that identifies a backbone; saved in every run's config."""

    name: str = "ViT-L-14-336"  # open_clip model name, or "hf-hub:<org>/<repo>"
    pretrained: str | None = "openai"  # open_clip tag, local checkpoint path, or None for random weights
    image_size: int | None = None  # input size override (positional embeddings are interpolated); None = model's
    precision: str = "fp32"  # fp32, fp16 or bf16 for the frozen towers
    seed: int = 0  # initialises random weights (only used when pretrained is None)

    @property
    def is_random(self) -> bool:
        # hf-hub: and local-dir: models always load their repo's weights (open_clip ignores `pretrained`).
        if self.name.startswith(("hf-hub:", LOCAL_DIR)):
            return False
        return self.pretrained is None or str(self.pretrained).lower() in RANDOM_WEIGHTS

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ImageFeatures:
    """Frozen image-encoder outputs for a batch of images."""

    cls: torch.Tensor  # (B, D) CLS embedding in the joint space, not normalised
    patches: torch.Tensor | None  # (B, L, N, W) tokens of the chosen blocks, before final norm/projection
    layers: tuple[int, ...] = field(default=())  # 1-indexed blocks, in the order of dim 1 of `patches`


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

    # ---------------------------------------------------------------- construction
    @classmethod
    def load(cls, spec: BackboneSpec, device: str | torch.device = "cpu") -> Backbone:
        register_tiny_model()
        kwargs = {"precision": spec.precision, "device": resolve_device(device)}
        if spec.image_size:
            kwargs["force_image_size"] = spec.image_size
        if spec.is_random:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.seed)
                model = _create(spec, pretrained=None, **kwargs)
            return cls(model, spec, weights_id=f"random:{spec.name}:seed{spec.seed}")
        pretrained, weights_id = _resolve_weights(spec)
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
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.device)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Embeddings (T, D) of fixed prompts, not normalised."""
        with torch.no_grad():
            return self.model.encode_text(self.tokenize(texts)).float()

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Input embeddings (T, C, Wt) of token ids (T, C); edit them, then call ``encode_text_embeddings``."""
        return self._text.tower.token_embedding(tokens)

    def encode_text_embeddings(
        self, embeddings: torch.Tensor, tokens: torch.Tensor, deep_prompts: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Encode edited input embeddings (T, C, Wt); gradients flow to them, not to the frozen weights.

        Args:
            embeddings: token embeddings, some positions replaced by learnable vectors.
            tokens: the token ids they came from; used to find each prompt's end-of-text position.
            deep_prompts: optional list of (n, Wt) tensors; before block j+1 the n positions after the
                start token are replaced by ``deep_prompts[j]`` (compound / deep prompt tuning).
        """
        return self._text.encode(embeddings, tokens.to(self.device), deep_prompts)


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

    def encode(self, x: torch.Tensor, tokens: torch.Tensor, deep_prompts: list[torch.Tensor] | None) -> torch.Tensor:
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
        x = t.ln_final(x)
        pooled = _pool_text(x, tokens, getattr(t, "text_pool_type", getattr(t, "pool_type", "argmax")))
        proj = t.text_projection
        if proj is None:
            return pooled.float()
        return (proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj).float()


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


def _create(spec: BackboneSpec, pretrained: str | None, **kwargs) -> nn.Module:
    try:
        return open_clip.create_model(spec.name, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        if "not found in built-ins" in str(exc):
            raise UsadError(f"unknown open_clip model {spec.name!r}; see `open_clip.list_models()`") from None
        raise UsadError(_weights_help(spec, exc)) from exc
    except (OSError, ValueError) as exc:
        raise UsadError(_weights_help(spec, exc)) from exc


def _resolve_weights(spec: BackboneSpec) -> tuple[str | None, str]:
    """The ``pretrained`` argument for open_clip and a stable identity of the weights."""
    if spec.name.startswith("hf-hub:"):
        return None, spec.name
    if spec.name.startswith(LOCAL_DIR):
        return None, _local_dir_weights_id(Path(spec.name.removeprefix(LOCAL_DIR)).expanduser())
    pretrained = str(spec.pretrained)
    if os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise UsadError(f"checkpoint file not found: {path}; pass an existing file to --pretrained")
        return str(path), f"file:{file_sha256(path)}"
    tags = open_clip.list_pretrained_tags_by_model(spec.name)
    if pretrained not in tags:
        raise UsadError(f"{spec.name} has no pretrained tag {pretrained!r}; known tags: {tags or 'none'}")
    return pretrained, f"tag:{spec.name}:{pretrained}"


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
    reason = str(exc).splitlines()[0]
    reason = reason if len(reason) <= 160 else reason[:160] + "…"
    if spec.name.startswith("hf-hub:"):
        return (
            f"could not load {spec.name} ({reason}). Offline? Download that Hugging Face repo (open_clip_config.json "
            "and the weights) on a connected machine and pass --backbone local-dir:/path/to/that/folder."
        )
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
