"""Encoder variants: what a method asks the frozen image encoder to produce.

A :class:`FeatureRequest` names a *kind* of features and its parameters; it enters the feature-cache
key, so every variant is computed once per image and cached like the plain features.

* ``raw``: the CLS in the joint space and raw block tokens (before the final norm and projection)
  of the chosen blocks -- what APRIL-GAN, VCP-CLIP, UltraAD and the adapters use (the default).
* ``dpam``: AnomalyCLIP's diagonally prominent attention map. From block ``dpam_start`` on, a
  second, parameter-free V-V attention path runs beside the unchanged CLIP path: its attention
  input is the *original* path's state (``ln_1`` of it), q and k are replaced by v, the output goes
  through the block's own ``out_proj``, and its residuals accumulate with no FFN. Block tokens come
  from the V-V path after the final norm and projection; the CLS is the original path's, projected
  without the final norm (as AnomalyCLIP's ``VisionTransformer.forward`` returns it).
* ``windows``: WinCLIP's window embeddings. The embedded sequence (patch embedding + CLS + position
  embedding), computed once per image, is cut into CLS + the s x s tokens of every window (stride one
  patch) -- never by cropping the image, so each token keeps its absolute position -- and each scale's
  windows are pushed through the transformer as one batch (as anomalib does). Outputs: the image CLS,
  each window's CLS (final norm + projection), and the final patch tokens after the final norm, not
  projected (anomalib's ``patch_embeddings``).
* ``stream``: the whole token sequence (CLS first) leaving one block, ``layers=(j,)``, from which
  ``usad_bench.stream`` resumes blocks j+1..L with a method's edits (MVFA), plus the frozen CLS.

``unnormalised=True`` (any kind) feeds the encoder [0, 1] pixels without the mean/std normalisation,
as MVFA's data loaders do; it enters the cache key.

Only open_clip ``VisionTransformer`` towers expose the modules these variants need (``conv1``,
``ln_pre``, ``transformer.resblocks`` of ``ResidualAttentionBlock``, ``ln_post``, ``proj``); timm
towers (e.g. BiomedCLIP) support ``raw`` only. The blocks are called through their public
submodules; nothing is patched or hooked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from usad_bench.errors import UsadError

RAW, DPAM, WINDOWS, STREAM = "raw", "dpam", "windows", "stream"
KINDS = (RAW, DPAM, WINDOWS, STREAM)
# Window sequences per transformer call: bounds memory (32 images of ViT-L-14-336 make ~17k windows per
# scale); every sequence is independent, so the split changes no number.
WINDOW_CHUNK = 4096


@dataclass(frozen=True)
class FeatureRequest:
    """One kind of frozen image features and its parameters (hashable; part of the cache key)."""

    kind: str = RAW
    layers: tuple[int, ...] = ()  # 1-indexed blocks whose tokens are kept (raw, dpam)
    dpam_start: int = 0  # dpam: first 1-indexed block with the V-V path
    scales: tuple[int, ...] = ()  # windows: window sides in patches, e.g. (2, 3)
    unnormalised: bool = False  # [0, 1] pixels, no mean/std (MVFA's loaders); enters the cache key

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsadError(f"unknown feature kind {self.kind!r}; known: {', '.join(KINDS)}")
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        object.__setattr__(self, "scales", tuple(int(s) for s in self.scales))

    def key_fields(self) -> dict:
        """What the cache key adds for this kind; empty for ``raw``, so plain features keep their old keys."""
        fields = self._kind_key_fields()
        return {**fields, "unnormalised": True} if self.unnormalised else fields

    def _kind_key_fields(self) -> dict:
        if self.kind == STREAM:
            return {"kind": STREAM, "with_cls": True}
        if self.kind == RAW:
            return {}
        if self.kind == DPAM:
            return {"kind": DPAM, "dpam_start": self.dpam_start, "vv_ffn": False, "cls_ln_post": False}
        return {"kind": WINDOWS, "scales": list(self.scales), "stride": 1}


def dpam_first_block(num_layers: int) -> int:
    """AnomalyCLIP's first V-V block, scaled to the depth: 6 of 24 (``DPAM_layer=20``), 3 of 12, 1 of 4."""
    return max(1, round(num_layers / 4))


def require_vit(visual: nn.Module, kind: str) -> None:
    """Fail clearly when the tower lacks the open_clip modules ``kind`` needs."""
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj")
    missing = [name for name in needed if not hasattr(visual, name)]
    if not missing:
        block = visual.transformer.resblocks[0]
        if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention) or not block.attn.batch_first:
            missing = ["transformer.resblocks[*].attn (batch-first nn.MultiheadAttention)"]
        elif getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            missing = ["CLS-token pooling"]
    if missing:
        raise UsadError(
            f"feature kind {kind!r} needs an open_clip VisionTransformer image tower (missing: {', '.join(missing)}); "
            "this backbone only gives raw block tokens. Use an OpenAI/OpenCLIP ViT backbone for this method."
        )


def embed_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 1 + N, W): patch embedding, CLS and absolute position embedding, before ``ln_pre``."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)  # (B, N, W)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    return torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)


def attend_and_mlp(
    block: nn.Module, x: torch.Tensor, normed: torch.Tensor, keys: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """One open_clip ``ResidualAttentionBlock`` for the positions ``x`` (B, m, W) only, given their ``ln_1``
    output ``normed`` and the layer-normed keys (= values) they attend to (B, k, W).

    ``block.forward`` cannot take other keys (it normalises them only with a cross-attention ``ln_1_kv``);
    this is its arithmetic with the keys chosen by the caller (a cached prefix, or a whole window).
    """
    x = x + block.ls_1(block.attention(normed, keys, keys, attn_mask=attn_mask))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def vv_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """V-V self-attention of (B, N, W) inputs with ``attn``'s own weights: softmax(v v^T / sqrt(d)) v, out_proj."""
    width = x.shape[-1]
    bias = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
    v = F.linear(x, attn.in_proj_weight[2 * width :], bias)  # (B, N, W), the value projection
    v = v.unflatten(-1, (attn.num_heads, width // attn.num_heads)).transpose(1, 2)  # (B, H, N, W/H)
    out = F.scaled_dot_product_attention(v, v, v)  # scale 1/sqrt(W/H), as AnomalyCLIP's Attention
    return attn.out_proj(out.transpose(1, 2).flatten(2))  # (B, N, W)


def encode_dpam(visual: nn.Module, images: torch.Tensor, layers: tuple[int, ...], start: int):
    """AnomalyCLIP's encoder: original-path CLS (B, D) and V-V tokens (B, L, N, D) of ``layers``."""
    require_vit(visual, DPAM)
    x = visual.ln_pre(visual.patch_dropout(embed_tokens(visual, images)))  # (B, 1+N, W)
    vv, kept = None, {}
    for index, block in enumerate(visual.transformer.resblocks, start=1):
        if index >= start:  # the V-V path starts from the original state and reads it at every block
            vv = (x if vv is None else vv) + block.ls_1(vv_attention(block.attn, block.ln_1(x)))
        x = block(x)  # the unchanged CLIP path
        if index in layers:
            kept[index] = vv if vv is not None else x
    tokens = torch.stack([kept[i] for i in layers], dim=1)[:, :, 1:]  # (B, L, N, W), CLS dropped
    tokens = visual.ln_post(tokens) @ visual.proj  # (B, L, N, D)
    cls = x[:, 0] @ visual.proj  # original path, no ln_post (AnomalyCLIP.py:387)
    return cls, tokens


def window_indices(grid: tuple[int, int], side: int) -> torch.Tensor:
    """(n_windows, side*side) patch indices (row-major) of every side x side window, stride one patch."""
    rows, cols = grid
    if side > min(rows, cols):
        raise UsadError(f"window side {side} is larger than the {rows}x{cols} patch grid; use smaller scales")
    board = torch.arange(rows * cols).reshape(rows, cols)
    return board.unfold(0, side, 1).unfold(1, side, 1).reshape(-1, side * side)


def encode_windows(visual: nn.Module, images: torch.Tensor, grid: tuple[int, int], scales: tuple[int, ...]):
    """WinCLIP's encoder: image CLS (B, D), final patch tokens (B, N, W) after ln_post, windows {s: (B, n_s, D)}."""
    require_vit(visual, WINDOWS)
    embedded = visual.patch_dropout(embed_tokens(visual, images))  # (B, 1+N, W)
    full = visual.ln_post(_run_blocks(visual, visual.ln_pre(embedded)))
    windows = {}
    for side in scales:
        index = window_indices(grid, side).to(images.device) + 1  # +1: token 0 is the CLS
        index = torch.cat([torch.zeros_like(index[:, :1]), index], dim=1)  # (n, 1 + s*s)
        batch = embedded[:, index].flatten(0, 1)  # (B*n, 1 + s*s, W), one batch per scale
        pooled = torch.cat([_window_cls(visual, part) for part in batch.split(WINDOW_CHUNK)])  # (B*n, D)
        windows[side] = pooled.unflatten(0, (images.shape[0], index.shape[0]))
    return full[:, 0] @ visual.proj, full[:, 1:], windows


def _window_cls(visual: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """(n, 1 + s*s, W) window sequences -> (n, D): ln_pre, the blocks, ln_post on the CLS, proj.

    Only the CLS leaves the last block, so that block runs its query, attention output and MLP for the CLS
    alone (its keys and values still cover the whole window): the same numbers, ~6 % less work per window.
    """
    *blocks, last = visual.transformer.resblocks
    x = visual.ln_pre(windows)
    for block in blocks:
        x = block(x)
    normed = last.ln_1(x)  # (n, 1 + s*s, W)
    cls = attend_and_mlp(last, x[:, :1], normed[:, :1], normed)  # (n, 1, W)
    return visual.ln_post(cls[:, 0]) @ visual.proj


def _run_blocks(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for block in visual.transformer.resblocks:
        x = block(x)
    return x
