"""Resume the frozen towers mid-stream, with explicit points where a method edits the token stream.

Methods such as MVFA (residual adapters re-injected after blocks 6/12/18/24) and AdaCLIP (prompt tokens
inserted into the image stream from block 1, deep prompts in the text tower) cannot be trained on
cached final features: every step reruns the blocks after the first edit. What comes *before* the
first edit is the same for every step, so it is computed once per image and cached (feature kind
``stream``: the whole token sequence, CLS included, leaving block j).

Image tower (open_clip ``VisionTransformer`` only; ``feature_kinds.require_vit`` checks it):

* ``embed_stream(visual, images)``: the stream *leaving block 0*, i.e. entering block 1
  (patch embedding + CLS + position embedding + ``ln_pre``), (B, 1 + N, W).
* ``run_visual_blocks(visual, tokens, start, edit)``: tokens leaving block ``start`` (0 = embedded
  stream) through blocks start+1..L. ``edit(i, x) -> x`` is called with the stream leaving block i for
  every i in start..L (so first on the resumed tokens themselves): it may transform the stream (MVFA),
  insert or replace tokens (AdaCLIP; the sequence length may change) and record what it needs.
* ``finish_visual(visual, tokens)``: ``ln_post`` + CLS pooling + ``proj`` -> (B, D) joint-space CLS,
  exactly as open_clip's ``forward`` for CLS pooling.

Text tower: ``run_text_blocks`` is ``Backbone.encode_text_embeddings`` with the same ``edit`` protocol
(called with the stream leaving text block i, i = 0 being the embedded prompts); deep prompt replacement
is one such edit (``deep_prompt_edit``). ``run_text_shared_prompts`` gives the same result for per-image deep
prompts shared by many sentences (AdaCLIP), running the positions all sentences of an image share once.

The blocks are called through their public modules; nothing is patched or hooked, and the frozen
weights take no gradient (the backbone's parameters have ``requires_grad=False``), while gradients flow
*through* them to whatever the edits add.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from usad_bench.backbone import project_text
from usad_bench.feature_kinds import STREAM, attend_and_mlp, embed_tokens, require_vit

# (i, tokens leaving block i) -> tokens entering block i + 1; i is 1-indexed, 0 = before the first block
StreamEdit = Callable[[int, torch.Tensor], torch.Tensor]


def _no_edit(_: int, x: torch.Tensor) -> torch.Tensor:
    return x


def embed_stream(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) images -> (B, 1 + N, W) tokens entering block 1 (what open_clip's ``_embeds`` gives)."""
    return visual.ln_pre(visual.patch_dropout(embed_tokens(visual, images)))


def run_visual_blocks(
    visual: nn.Module, tokens: torch.Tensor, start: int = 0, edit: StreamEdit | None = None, stop: int | None = None
) -> torch.Tensor:
    """Tokens leaving block ``start`` (B, T, W) -> tokens leaving block ``stop`` (default: the last)."""
    blocks = visual.transformer.resblocks
    stop = len(blocks) if stop is None else stop
    edit = edit or _no_edit
    batch_first = getattr(visual.transformer, "batch_first", True)
    dtype = next(visual.parameters()).dtype
    x = edit(start, tokens)
    for index in range(start + 1, stop + 1):
        x = x.to(dtype)
        block = blocks[index - 1]
        x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        x = edit(index, x)
    return x


def finish_visual(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, W) tokens leaving the last block -> (B, D) CLS embedding in the joint space."""
    if getattr(visual, "final_ln_after_pool", False):
        pooled = visual.ln_post(tokens[:, 0])
    else:
        pooled = visual.ln_post(tokens)[:, 0]
    return pooled @ visual.proj if visual.proj is not None else pooled


def encode_stream(visual: nn.Module, images: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature kind ``stream``: the frozen CLS (B, D) and the whole sequence leaving ``block`` (B, 1, 1 + N, W)."""
    require_vit(visual, STREAM)
    prefix = run_visual_blocks(visual, embed_stream(visual, images), 0, stop=block)
    cls = finish_visual(visual, run_visual_blocks(visual, prefix, block))
    return cls, prefix.unsqueeze(1)


# ---------------------------------------------------------------------------------------------- text tower
def run_text_blocks(backbone, embeddings: torch.Tensor, tokens: torch.Tensor, edit: StreamEdit | None = None):
    """Prompts' input embeddings (T, C, Wt) through the text tower with ``edit`` -> (T, D), not normalised.

    Without an edit this is ``Backbone.encode_text_embeddings`` (the tests check it); the causal mask
    follows the sequence length, so an edit may insert tokens (the end-of-text position is then found
    after the insertion: ``tokens`` must describe the edited sequence's original ids, shifted by callers
    that insert before it).
    """
    tower = backbone._text.tower
    edit = edit or _no_edit
    x = embeddings + tower.positional_embedding[: embeddings.shape[1]].to(embeddings.dtype)
    batch_first = getattr(tower.transformer, "batch_first", True)
    x = edit(0, x)
    for index, block in enumerate(tower.transformer.resblocks, start=1):
        n = x.shape[1]
        mask = tower.attn_mask[:n, :n] if tower.attn_mask is not None else None
        x = block(x, attn_mask=mask) if batch_first else block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        x = edit(index, x)
    x = tower.ln_final(x)
    return project_text(tower, x[torch.arange(x.shape[0], device=x.device), tokens.to(x.device).argmax(dim=-1)])


def deep_prompt_edit(prompts: list[torch.Tensor]) -> StreamEdit:
    """Deep prompt replacement as an edit: entering text block i + 1 (i >= 1), positions 1..n become prompts[i-1]."""

    def edit(index: int, x: torch.Tensor) -> torch.Tensor:
        if not 0 < index <= len(prompts):
            return x
        prompt = prompts[index - 1].to(x.dtype)  # (n, Wt)
        n = prompt.shape[0]
        return torch.cat([x[:, :1], prompt.expand(x.shape[0], -1, -1), x[:, 1 + n :]], dim=1)

    return edit


# ------------------------------------------------------------------------- text prompts shared by sentences
def text_first_block(backbone, embeddings: torch.Tensor) -> torch.Tensor:
    """Fixed prompts' input embeddings (T, C, Wt) -> their stream leaving text block 1 (T, C, Wt), no grad.

    For ``run_text_shared_prompts``: when prompts first enter at block 2, block 1 sees only fixed words.
    """
    tower = backbone._text.tower
    x = embeddings + tower.positional_embedding[: embeddings.shape[1]].to(embeddings.dtype)
    x = x.to(tower.positional_embedding.dtype)  # the tower's precision
    with torch.no_grad():
        return tower.transformer.resblocks[0](x, attn_mask=tower.attn_mask[: x.shape[1], : x.shape[1]])


def run_text_shared_prompts(
    backbone, first_block: torch.Tensor, tokens: torch.Tensor, prompts: list[torch.Tensor]
) -> torch.Tensor:
    """``run_text_blocks`` with ``deep_prompt_edit``-style per-image prompts, computing each image's shared
    positions once instead of once per sentence.

    Entering text blocks 2..len(prompts) + 1, positions 1..n of every sentence of image b become
    ``prompts[i][b]``; after that they are carried as ordinary tokens. In a causal tower positions 0..n then
    see only the start token (the same in every sentence) and the prompts, so from block 2 on they are the
    same in all T sentences of an image: they run once per image, and the sentences' later positions attend
    to them (their keys are that shared prefix followed by their own positions). Running the sentences in
    groups of equal length (nothing after an end-of-text token is needed) was measured slower on CPU: the
    small matrix products cost more than the skipped positions.

    Args:
        first_block: (T, C, Wt) from ``text_first_block``; tokens: (T, C) ids; prompts: per depth (B, n, Wt).
    Returns:
        (B, T, D) text embeddings, not normalised (AdaCLIP's tests compare them with ``run_text_blocks``).
    """
    tower = backbone._text.tower
    (t, c, width), (b, n) = first_block.shape, prompts[0].shape[:2]
    p = 1 + n  # shared positions: the start token and the prompts
    prefix = first_block[:1, :1].expand(b, 1, width)  # (B, 1, Wt): the start token leaving block 1
    suffix = first_block[None, :, p:].expand(b, -1, -1, -1).flatten(0, 1)  # (B*T, C - p, Wt)
    prefix_mask, suffix_mask = tower.attn_mask[:p, :p], tower.attn_mask[p:c, :c]  # causal rows
    for index, block in enumerate(tower.transformer.resblocks[1:], start=1):  # leaving block ``index``
        if index <= len(prompts):
            prefix = torch.cat([prefix[:, :1], prompts[index - 1].to(prefix.dtype)], dim=1)  # (B, p, Wt)
        shared, normed = block.ln_1(prefix), block.ln_1(suffix)
        keys = torch.cat([shared.repeat_interleave(t, 0), normed], dim=1)  # (B*T, C, Wt)
        suffix = attend_and_mlp(block, suffix, normed, keys, suffix_mask)
        prefix = attend_and_mlp(block, prefix, shared, shared, prefix_mask)
    x = torch.cat([prefix.repeat_interleave(t, 0), suffix], dim=1)  # (B*T, C, Wt)
    ends = tokens.to(x.device).argmax(dim=-1).repeat(b)  # end-of-text positions (may fall among the prompts)
    pooled = tower.ln_final(x[torch.arange(x.shape[0], device=x.device), ends])
    return project_text(tower, pooled).unflatten(0, (b, t))
