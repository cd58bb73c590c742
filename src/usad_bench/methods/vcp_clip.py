"""VCP-CLIP (ECCV 2024; xiaozhen228/VCP-CLIP @ 4dd96ec): visual context prompting.

* Pre-VCP (``models/pre_vcp.py``): the object word of ``"a photo of a good / damaged <|class|>"``
  is replaced by r = 2 image-conditioned tokens ``prompt_query + Conv1d(1 -> r, k=3)(CLS)``.
* Deep text prompts (``models/model_CLIP.py:75-98,151-223``): one learned token after the start
  token, inserted after the positional embedding and replaced before every later text block by
  ``Dropout(0.1)(prompt_proj(deep_prompt[i]))``; a learned ``prompt_norm`` LayerNorm before
  ``ln_final``. The frozen text tower runs per image, because the prompt depends on the image.
* Raw branch: APRIL-GAN's linear heads on the raw block tokens, ``exp(tau1) * cos`` with the text.
* Post-VCP (``models/post_vcp.py``): the two text embeddings attend over the unit raw patch tokens
  (8 heads, **no 1/sqrt(d) scaling**, softmax over patches), output projection, L2; map
  ``exp(tau2) * cos(tokens, text')``. One module serves every block.
* Maps (``test.py:163-191,236``): per branch, per block: bilinear (``align_corners=True``),
  softmax, abnormal channel; mean over blocks. Pixel map ``gauss_sigma=8(0.2 raw + 0.8 post)``.
  Image score ``mean(top-k raw) + mean(top-k post)`` on the unsmoothed maps, k = 2000 at 518 px.
  The original min-max-normalises both over the per-class test set; that is monotone for the
  rankings of one test set, so it is simply left out (per image).
* Loss: sum over branches and blocks of focal + Dice (``train.py:241-253``). Adam betas (0.5, 0.999),
  lr 4e-5 (2e-5 when the authors train on MVTec), temperatures lr 0.01, 10 epochs, batch 32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from usad_bench.backbone import Backbone, ImageFeatures, default_layers
from usad_bench.errors import UsadError
from usad_bench.methods.base import Method, MethodConfig, Prediction, batch_features
from usad_bench.methods.common import patch_logits_to_probs
from usad_bench.methods.patch_heads import LinearPatchHeads, layers_segmentation_loss, text_layer_probs
from usad_bench.methods.registry import register

PLACEHOLDER = "X"  # one-token stand-in for VCP-CLIP's <|class|> vocabulary entry; its embedding is never used


@dataclass
class VcpClipConfig(MethodConfig):
    epochs: int = 10  # train.sh
    batch_size: int = 32  # train.sh
    lr: float = 4e-5  # heads, Pre-VCP, Post-VCP and text prompts (train.sh, VisA-trained run)
    temperature_lr: float = 0.01  # tau1 and tau2 (train.py:160)
    layers: list[int] | None = None  # 1-indexed; None = 6/12/18/24 of a 24-block ViT (four evenly spaced)
    prompt_len: int = 2  # r, image-conditioned tokens replacing <|class|>
    deep_prompt_len: int = 1  # n, learned text tokens after the start token
    normal_template: str = "a photo of a good {}"  # models/prompt_ensemble.py:32-33, "{}" = <|class|>
    abnormal_template: str = "a photo of a damaged {}"
    use_global: bool = True  # condition the class tokens on the CLS embedding (Pre-VCP)
    attention_heads: int = 8  # Post-VCP
    raw_weight: float = 0.2  # pixel map = raw_weight * raw + (1 - raw_weight) * post (test.py alpha)
    smooth_sigma: float = 8.0  # Gaussian sigma in pixels of the map (0 = none)
    top_k: int = 2000  # pixels averaged for the image score at top_k_reference_size
    top_k_reference_size: int = 518  # k scales with the map's area: k = top_k * (S / 518)^2


class PreVcp(nn.Module):
    """Image-conditioned class tokens: (B, D) CLS -> (B, r, Wt)."""

    def __init__(self, embed_dim: int, text_width: int, r: int):
        super().__init__()
        self.prompt_query = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, r, text_width)))
        self.prompt_linear = nn.Conv1d(1, r, kernel_size=3, stride=1, padding="same")
        # The original asserts embed_dim == text width (true for CLIP ViT-B / L); a map only where they differ.
        self.width_map = nn.Identity() if embed_dim == text_width else nn.Linear(embed_dim, text_width)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # tau1, raw branch

    def forward(self, cls: torch.Tensor, use_global: bool = True) -> torch.Tensor:
        query = self.prompt_query.expand(cls.shape[0], -1, -1)
        if not use_global:
            return query
        return query + self.prompt_linear(self.width_map(cls)[:, None])  # (B, r, Wt)


class PostVcp(nn.Module):
    """Text embeddings (B, T, Dt) attend over unit patch tokens (B, N, W) -> unit (B, T, W)."""

    def __init__(self, text_dim: int, vision_width: int, heads: int = 8):
        super().__init__()
        if vision_width % heads:
            raise UsadError(f"Post-VCP: vision width {vision_width} is not divisible by {heads} heads")
        self.heads = heads
        # kernel-1 Conv1d in the original = Linear
        self.q_proj = nn.Linear(text_dim, vision_width)
        self.k_proj = nn.Linear(vision_width, vision_width)
        self.v_proj = nn.Linear(vision_width, vision_width)
        self.out_proj = nn.Linear(vision_width, vision_width)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # tau2, post branch

    def forward(self, text: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, t, _ = text.shape
        n = tokens.shape[1]
        q = self.q_proj(text).reshape(b, t, self.heads, -1)  # (B, T, h, c)
        k = self.k_proj(tokens).reshape(b, n, self.heads, -1)  # (B, N, h, c)
        v = self.v_proj(tokens).reshape(b, n, self.heads, -1)
        attn = torch.einsum("bthc,bnhc->bhtn", q, k).softmax(dim=-1)  # as written: no 1/sqrt(c) scaling
        out = torch.einsum("bhtn,bnhc->bthc", attn, v).reshape(b, t, -1)
        return F.normalize(self.out_proj(out), dim=-1)


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the tower's precision (as CLIP's own LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class DeepTextPrompts(nn.Module):
    """VCP-CLIP's learned text tokens: a shallow one, one per later block, shared projection and norm."""

    def __init__(self, width: int, n_tokens: int, depth: int):
        super().__init__()
        self.prompt_embeddings = nn.Parameter(nn.init.uniform_(torch.empty(n_tokens, width), -1.0, 1.0))
        self.deep_prompt_embeddings = nn.Parameter(nn.init.uniform_(torch.empty(depth, n_tokens, width), -1.0, 1.0))
        self.prompt_proj = nn.Linear(width, width)
        nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")
        self.prompt_norm = Fp32LayerNorm(width, eps=1e-6)
        self.prompt_dropout = nn.Dropout(0.1)

    def shallow(self, count: int) -> torch.Tensor:
        """(count, n, W): dropout draws a mask per sequence, as the original's expand-then-dropout."""
        return self.prompt_dropout(self.prompt_proj(self.prompt_embeddings).expand(count, -1, -1))

    def deep(self) -> list[torch.Tensor]:
        return [self.prompt_dropout(self.prompt_proj(p)) for p in self.deep_prompt_embeddings]


class VcpText(nn.Module):
    """Builds VCP-CLIP's per-image prompts and encodes them with the frozen text tower."""

    def __init__(self, backbone: Backbone, templates: list[str], r: int, n_tokens: int):
        super().__init__()
        tokens = backbone.tokenize([t.format(PLACEHOLDER) for t in templates]).cpu()  # (S, C)
        placeholder_id = int(backbone.tokenize([PLACEHOLDER])[0, 1])
        slots = [(row == placeholder_id).nonzero().flatten() for row in tokens]
        if any(len(s) != 1 for s in slots):
            raise UsadError(f"each VCP-CLIP template needs exactly one '{{}}' and no word {PLACEHOLDER!r}: {templates}")
        self.slots = [int(s[0]) for s in slots]
        width = backbone.token_embedding(tokens[:1].to(backbone.device)).shape[-1]
        self.r, self.n_tokens = r, n_tokens
        with torch.no_grad():
            embedding = backbone.token_embedding(tokens.to(backbone.device)).float()  # (S, C, Wt)
        self.register_buffer("word_embedding", embedding, persistent=False)
        # end of text after the r class tokens (+ r - 1) and the shallow prompt (+ n), model_CLIP.py:173
        eot = tokens.argmax(-1) + r - 1 + n_tokens
        self.register_buffer("eot_onehot", F.one_hot(eot, tokens.shape[1]).float(), persistent=False)
        self.width = width

    def sequences(self, class_tokens: torch.Tensor, pos: torch.Tensor, shallow: torch.Tensor) -> torch.Tensor:
        """(B*S, C, Wt) inputs of the text blocks, positional embeddings included, as VCP builds them.

        class_tokens: (B, r, Wt); pos: (C, Wt); shallow: (B*S, n, Wt).
        """
        rows = []
        c = self.word_embedding.shape[1]
        for b in range(class_tokens.shape[0]):
            for s, slot in enumerate(self.slots):
                words = self.word_embedding[s]
                rows.append(torch.cat([words[:slot], class_tokens[b], words[slot + 1 : c - self.r + 1]]))
        x = torch.stack(rows) + pos  # positions added before the prompt goes in (model_CLIP.py:150)
        return torch.cat([x[:, :1], shallow, x[:, 1 : c - self.n_tokens]], dim=1)  # prompt after start token


@register("vcp_clip")
class VcpClip(Method):
    config_class = VcpClipConfig
    trainable = True
    outputs = ("score", "map")
    activation = "gelu"  # VCP-CLIP hard-codes nn.GELU in its CLIP blocks (models/transformer.py:499)

    def __init__(self, cfg: VcpClipConfig, backbone: Backbone, task):
        super().__init__(cfg, backbone, task)
        self.layers = tuple(cfg.layers or default_layers(backbone.num_layers))
        self.text = VcpText(backbone, [cfg.normal_template, cfg.abnormal_template], cfg.prompt_len, cfg.deep_prompt_len)
        self.prompts = DeepTextPrompts(self.text.width, cfg.deep_prompt_len, text_depth(backbone) - 1)  # 11 of 12
        self.pre_vcp = PreVcp(backbone.embed_dim, self.text.width, cfg.prompt_len)
        self.post_vcp = PostVcp(backbone.embed_dim, backbone.vision_width, cfg.attention_heads)
        self.heads = LinearPatchHeads(len(self.layers), backbone.vision_width, backbone.embed_dim)

    def feature_layers(self) -> tuple[int, ...]:
        return self.layers

    def state_text(self, cls: torch.Tensor) -> torch.Tensor:
        """(B, 2, D) unit (normal, abnormal) text embeddings conditioned on each image's CLS (B, D)."""
        b = cls.shape[0]
        n_states = len(self.text.slots)
        class_tokens = self.pre_vcp(cls.float(), self.cfg.use_global)  # (B, r, Wt)
        pos = self.backbone.text_positional_embedding().float()
        x = self.text.sequences(class_tokens, pos, self.prompts.shallow(b * n_states))
        dtype = self.backbone.text_positional_embedding().dtype
        # encode_text_embeddings adds the positional embedding itself; VCP added it before the prompt went in
        inputs = (x - pos[: x.shape[1]]).to(dtype)
        eot = self.text.eot_onehot.repeat(b, 1)  # the tower pools at the argmax of "token ids"
        text = self.backbone.encode_text_embeddings(inputs, eot, self.prompts.deep(), self.prompts.prompt_norm)
        return F.normalize(text, dim=-1).reshape(b, n_states, -1)

    def branch_probs(self, feats: ImageFeatures) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per block (B, 2, S, S) probabilities of the raw and the Post-VCP branch."""
        grid, size = self.backbone.grid, self.task.image_size
        text = self.state_text(feats.cls)  # (B, 2, D)
        raw = text_layer_probs(self.heads(feats.patches), text, self.pre_vcp.log_temperature.exp(), grid, size)
        post = []
        for i in range(feats.patches.shape[1]):
            tokens = F.normalize(feats.patches[:, i].float(), dim=-1)  # (B, N, W)
            text_post = self.post_vcp(text, tokens)  # (B, 2, W)
            logits = self.post_vcp.log_temperature.exp() * tokens @ text_post.transpose(1, 2)  # (B, N, 2)
            post.append(patch_logits_to_probs(logits, grid, size))
        return raw, post

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        keep = batch["pixel_truth"]
        if not keep.any():
            return None  # no pixel ground truth in this batch: nothing to learn from
        feats = batch_features(batch, self.layers)
        feats.cls, feats.patches = feats.cls[keep], feats.patches[keep]
        mask = batch["mask"][keep]
        raw, post = self.branch_probs(feats)
        losses = {"raw": layers_segmentation_loss(raw, mask), "post": layers_segmentation_loss(post, mask)}
        return self.log_losses(losses, batch_size=int(keep.sum()))

    def configure_optimizers(self):
        temperatures = [self.pre_vcp.log_temperature, self.post_vcp.log_temperature]
        others = [p for p in self.trainable_parameters() if all(p is not t for t in temperatures)]
        groups = [{"params": others, "lr": self.cfg.lr}, {"params": temperatures, "lr": self.cfg.temperature_lr}]
        return torch.optim.Adam(groups, lr=self.cfg.lr, betas=(0.5, 0.999))

    @torch.no_grad()
    def predict_features(self, feats: ImageFeatures) -> Prediction:
        raw, post = self.branch_probs(feats)
        raw_map = torch.stack([p[:, 1] for p in raw]).mean(0)  # (B, S, S)
        post_map = torch.stack([p[:, 1] for p in post]).mean(0)
        k = self.top_k(raw_map.shape[-1])
        score = top_k_mean(raw_map, k) + top_k_mean(post_map, k)
        fused = self.cfg.raw_weight * raw_map + (1.0 - self.cfg.raw_weight) * post_map
        return Prediction(score=score, anomaly_map=gaussian_smooth(fused, self.cfg.smooth_sigma))

    def top_k(self, size: int) -> int:
        k = round(self.cfg.top_k * size * size / self.cfg.top_k_reference_size**2)
        return max(1, min(size * size, k))


def text_depth(backbone: Backbone) -> int:
    """Number of blocks of an open_clip text transformer."""
    model = backbone.model
    tower = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
    if tower is None or not hasattr(tower, "transformer"):
        raise UsadError(
            "vcp_clip edits the text transformer's blocks; use an OpenAI/OpenCLIP backbone (not BiomedCLIP)"
        )
    return len(tower.transformer.resblocks)


def top_k_mean(maps: torch.Tensor, k: int) -> torch.Tensor:
    """(B, S, S) -> (B,) mean of each map's k largest pixels."""
    return maps.flatten(1).topk(k, dim=1).values.mean(1)


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """scipy's gaussian_filter per (S, S) map (mode 'reflect', truncate 4), as the original's test.py."""
    if sigma <= 0:
        return maps
    from scipy.ndimage import gaussian_filter

    smoothed = gaussian_filter(maps.float().cpu().numpy(), sigma=sigma, axes=(1, 2))
    return torch.from_numpy(smoothed).to(maps.device, maps.dtype)
