"""UltraAD's building blocks, each a plain ``nn.Module`` (the method itself is in ``ultraad.py``).

* :class:`ImageAwarePrompts`: normal / abnormal prompts whose class word is a global learnable
  token followed by an instance-specific token, encoded by the frozen CLIP text tower.
* :class:`ClassMemory`: the memory-boosted few-shot classifier (text memory P_t frozen, image
  memory F_t learnable, one-hot labels L_t).
* :class:`PatchTextFusion`: PIF, an M-head cross-attention from prompt embeddings (queries) to
  patch tokens (keys / values) that yields image-language fused text embeddings.
* :func:`state_prototypes`: the normal and abnormal text prototypes from the prompt vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from usad_bench.backbone import Backbone
from usad_bench.data.manifest import NORMAL
from usad_bench.errors import UsadError
from usad_bench.methods.common import cache_affinity_logits, causal_text_length
from usad_bench.prompts import PromptSet, ensemble_embedding

PLACEHOLDER = "X"  # one CLIP token ("x</w>"); its input embeddings are replaced by learned tokens


class ImageAwarePrompts(nn.Module):
    """``template.format("[G] [I]")`` for the normal and the abnormal template, [G] global, [I] per image.

    The two templates differ only in their state word; the two learned tokens stand where the class
    word would be ("a photo of a normal [CLS]."), so one pair of tokens serves both prompts.
    """

    def __init__(self, backbone: Backbone, templates: tuple[str, str], init_words: str):
        super().__init__()
        for t in templates:
            if t.count("{}") != 1:
                raise UsadError(f"UltraAD prompt template {t!r} needs exactly one '{{}}' for the learned tokens")
        tokens = backbone.tokenize([t.format(f"{PLACEHOLDER} {PLACEHOLDER}") for t in templates])  # (2, T)
        placeholder_id = int(backbone.tokenize([PLACEHOLDER])[0, 1])
        self.positions = [_placeholder_position(backbone, t) for t in templates]
        for row, p in zip(tokens, self.positions, strict=True):
            if not (row[p : p + 2] == placeholder_id).all():
                raise UsadError(f"could not locate the learned-token slot in the prompt templates {templates}")
        with torch.no_grad():
            embedding = backbone.token_embedding(tokens)  # (2, T, Wt)
            init_ids = backbone.tokenize([init_words])
            n_words = int(init_ids[0].argmax()) - 1  # tokens between start and end of text
            init = backbone.token_embedding(init_ids)[0, 1 : 1 + n_words].float().mean(0, keepdim=True)  # (1, Wt)
        self.tower_dtype = embedding.dtype  # fp16 towers need fp16 inputs
        self.width = embedding.shape[-1]
        self.global_token = nn.Parameter(init.clone())  # (1, Wt), starts as the object word ("breast")
        length = causal_text_length(backbone, embedding, tokens)
        self.register_buffer("tokens", tokens[:, :length])
        self.register_buffer("embedding", embedding[:, :length].float())
        # The words before the learned tokens are the same for every image: the causal tower's states
        # there are computed once (not saved: they follow from the backbone and the templates).
        prefix = backbone.text_prefix(embedding[:, : min(self.positions)])
        self.register_buffer("prefix", prefix, persistent=False)  # (L, 2, p, Wt) or None
        self.use_prefix = prefix is not None and self._prefix_is_exact(backbone)

    def forward(self, backbone: Backbone, instance: torch.Tensor, use_prefix: bool | None = None) -> torch.Tensor:
        """Instance tokens (B, Wt) -> unit prompt embeddings (B, 2, D) of (normal, abnormal).

        ``use_prefix=False`` runs the whole prompts through the tower (the reference path; same result).
        """
        b = instance.shape[0]
        prompts = self.prompt_embeddings(instance)  # (B*2, T, Wt), row = image * 2 + state
        tokens = self.tokens.repeat(b, 1)
        if self.use_prefix if use_prefix is None else use_prefix:
            p = self.prefix.shape[2]
            prefix = self.prefix.repeat(1, b, 1, 1)  # (L, B*2, p, Wt), rows in the prompts' order
            encoded = backbone.encode_text_after_prefix(prefix, prompts[:, p:], tokens)
        else:
            encoded = backbone.encode_text_embeddings(prompts, tokens)  # (B*2, D)
        return F.normalize(encoded.view(b, 2, -1), dim=-1)

    def prompt_embeddings(self, instance: torch.Tensor) -> torch.Tensor:
        """(B, Wt) instance tokens -> (B*2, T, Wt) input embeddings of both prompts of every image."""
        b = instance.shape[0]
        learned = torch.stack([self.global_token.expand(b, -1), instance], dim=1)  # (B, 2, Wt)
        prompts = []
        for state, p in enumerate(self.positions):
            base = self.embedding[state].expand(b, -1, -1)  # (B, T, Wt)
            prompts.append(torch.cat([base[:, :p], learned, base[:, p + 2 :]], dim=1))
        return torch.stack(prompts, dim=1).flatten(0, 1).to(self.tower_dtype)

    @torch.no_grad()
    def _prefix_is_exact(self, backbone: Backbone) -> bool:
        """Checked once, as the causal length is: the cached-prefix path must equal the whole-prompt one."""
        instance = torch.randn(2, self.width, generator=torch.Generator().manual_seed(0)).to(self.embedding)
        fast, full = self(backbone, instance, use_prefix=True), self(backbone, instance, use_prefix=False)
        return torch.allclose(fast, full, atol=1e-4, rtol=1e-3)


def _placeholder_position(backbone: Backbone, template: str) -> int:
    """Index of the first learned token: after the start token and the template's words before '{}'."""
    prefix = template.split("{}")[0].strip()
    if not prefix:
        return 1
    return int(backbone.tokenize([prefix])[0].argmax())  # end-of-text index = 1 + number of prefix tokens


class ClassMemory(nn.Module):
    """Memory-boosted classification over K support images and C classes.

    logits = scale * cos(z, P_t) averaged per class + alpha * exp(-beta * (1 - cos(q, F_t))) @ L_t,
    with z the MiniNet-projected query embedding (the paper's f'), q the image-memory query (CLIP's
    own embedding f by default, UltraAD's ``cache_query``), P_t the support images' lesion-aware
    description embeddings (frozen buffer), F_t their CLIP image embeddings (a parameter refined in
    training) and L_t their one-hot labels (buffer).
    """

    def __init__(self, n_support: int, n_classes: int, dim: int, alpha: float, beta: float, scale: float):
        super().__init__()
        self.alpha, self.beta, self.scale = alpha, beta, scale
        self.image_memory = nn.Parameter(torch.zeros(n_support, dim))  # F_t, filled by `fill`
        self.register_buffer("text_memory", torch.zeros(n_support, dim))  # P_t, frozen
        self.register_buffer("label_memory", torch.zeros(n_support, n_classes))  # L_t, one-hot

    @torch.no_grad()
    def fill(self, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> None:
        """Store unit image embeddings (K, D), unit description embeddings (K, D) and labels (K,)."""
        if image.shape != self.image_memory.shape:
            raise UsadError(
                f"UltraAD was built for {self.image_memory.shape[0]} support images but got {image.shape[0]}; "
                "every class needs exactly `shots` images"
            )
        self.image_memory.copy_(image)
        self.text_memory.copy_(text)
        self.label_memory.copy_(F.one_hot(labels, self.label_memory.shape[1]).float())

    def forward(self, z: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """Unit projected embeddings z (B, D) and unit image-memory queries (B, D; default z) -> (B, C) logits.

        The text term always reads z (the paper's "projected image class token"); the image-memory
        term reads ``query``: the raw CLIP embedding f in the paper's reading (``cache_query: clip``).
        """
        query = z if query is None else query
        per_class = self.label_memory / self.label_memory.sum(0).clamp_min(1.0)  # (K, C), columns average
        text_logits = self.scale * (z @ self.text_memory.T) @ per_class  # (B, C)
        keys = F.normalize(self.image_memory, dim=-1)  # (K, D) refined in training, compared by cosine
        return text_logits + self.alpha * cache_affinity_logits(query, keys, self.label_memory, self.beta)


class PatchTextFusion(nn.Module):
    """PIF: M-head cross-attention, queries = text embeddings, keys / values = patch tokens.

    The attended patch content is added to the text embedding (residual), so the fused embedding
    stays close to the prompt it came from and only moves toward what this image shows. W_k has no
    bias: it could never change the output (nor receive a gradient).
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise UsadError(f"PIF heads ({heads}) must divide the embedding width ({dim}); set pif_heads accordingly")
        self.heads = heads
        self.w_q = nn.Linear(dim, dim)
        self.w_k = nn.Linear(dim, dim, bias=False)  # a key bias adds one constant to a query's scores: no effect
        self.w_v = nn.Linear(dim, dim)
        self.w_o = nn.Linear(dim, dim)

    def forward(self, text: torch.Tensor, patches: torch.Tensor, folded: bool = True) -> torch.Tensor:
        """Text (B, T, D) and patch tokens (B, N, D) -> unit fused text embeddings (B, T, D).

        ``folded=False`` projects every patch token with W_k and W_v (the textbook form, the reference);
        the default folds both projections onto the T queries instead, with the same result:
        q·(W_k p) = (W_kᵀ q)·p, and the attention-weighted mean of W_v p + b_v is
        W_v (weighted mean of p) + b_v. That
        costs T·M vectors of width D per image instead of 2·N projected tokens (T = 2, N = 196..576).
        """
        b, t, d = text.shape
        head = d // self.heads
        q = self.w_q(text).view(b, t, self.heads, head).transpose(1, 2)  # (B, M, T, d)
        if not folded:
            k = self.w_k(patches).view(b, -1, self.heads, head).transpose(1, 2)  # (B, M, N, d)
            v = self.w_v(patches).view(b, -1, self.heads, head).transpose(1, 2)  # (B, M, N, d)
            attn = (q @ k.transpose(-1, -2) / math.sqrt(head)).softmax(dim=-1)  # (B, M, T, N)
            fused = attn @ v  # (B, M, T, d)
        else:
            w_k = self.w_k.weight.view(self.heads, head, d)  # (M, d, D): each head's rows of W_k
            w_v = self.w_v.weight.view(self.heads, head, d)
            keys = torch.einsum("bmtk,mkD->bmtD", q, w_k).flatten(1, 2)  # (B, M*T, D): W_kᵀ q per head
            attn = (keys @ patches.transpose(1, 2) / math.sqrt(head)).softmax(dim=-1)  # (B, M*T, N)
            pooled = (attn @ patches).view(b, self.heads, t, d)  # (B, M, T, D): attention-weighted mean patch
            fused = torch.einsum("bmtD,mkD->bmtk", pooled, w_v) + self.w_v.bias.view(self.heads, 1, head)
        fused = fused.transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        return F.normalize(text + self.w_o(fused), dim=-1)


def class_texts(prompts: PromptSet, label: str, dataset: str) -> list[str]:
    """A class's prompt sentences: its class templates plus its lesion-aware descriptions."""
    return prompts.class_prompts(label) + prompts.describe(label, dataset)


def state_prototypes(backbone: Backbone, prompts: PromptSet, classes: list[str], dataset: str) -> torch.Tensor:
    """(2, D) unit normal and abnormal prototypes.

    Normal = the ensemble of the normal class's prompts; abnormal = the mean of the abnormal
    classes' ensembles. A task without a normal (or without an abnormal) class falls back to the
    vocabulary's normal (abnormal) state prompts for that side.
    """

    def ensemble(texts: list[str]) -> torch.Tensor:
        return ensemble_embedding(backbone.encode_text(texts))

    if NORMAL in classes:
        normal = ensemble(class_texts(prompts, NORMAL, dataset))
    else:
        normal = ensemble(prompts.state_prompts("normal"))
    abnormal_classes = [c for c in classes if c != NORMAL]
    if abnormal_classes:
        abnormal = F.normalize(
            torch.stack([ensemble(class_texts(prompts, c, dataset)) for c in abnormal_classes]).mean(0), dim=-1
        )
    else:
        abnormal = ensemble(prompts.state_prompts("abnormal"))
    return torch.stack([normal, abnormal])


def description_embeddings(backbone: Backbone, prompts: PromptSet, classes: list[str], dataset: str) -> torch.Tensor:
    """(C, D) unit embeddings of each class's lesion-aware descriptions ("This is a [type] ultrasound image ...")."""
    return torch.stack([ensemble_embedding(backbone.encode_text(prompts.describe(c, dataset))) for c in classes])
