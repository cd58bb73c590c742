"""CoOp: learnable prompt context for a frozen CLIP (Zhou et al., IJCV 2022; KaiyangZhou/CoOp).

Each class prompt is ``[SOS] [V]_1 ... [V]_M <class words> . [EOS]``: M context vectors shared by
every class ("unified context", class token at the end), learned with cross-entropy on the
few-shot support set while both CLIP towers stay frozen. Logits are CLIP's: a fixed scale times
the cosine of the image and prompt embeddings.

Recipe (CoOp's few-shot configs and ``trainers/coop.py``): M = 16 context vectors drawn from
N(0, 0.02) (the few-shot scripts leave ``CTX_INIT`` empty); SGD lr 0.002, momentum 0.9, weight
decay 5e-4 (Dassl's defaults); batch 32; one warm-up epoch at a constant 1e-5, then a cosine
decay over the run, stepped once per epoch; epochs by shots as CoOp's few-shot scripts (50 for
1 shot, 100 for 2-4 shots, 200 for 8 or more). See baselines/coop.md for the deviations.

The prompt learner and the warm-up schedule are shared with CoCoOp and CLIP-Adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from usad_bench.backbone import Backbone, ImageFeatures
from usad_bench.errors import UsadError
from usad_bench.methods.base import Method, MethodConfig, Prediction
from usad_bench.methods.common import causal_text_length, class_anomaly_score
from usad_bench.methods.registry import register
from usad_bench.prompts import PromptSet


@dataclass
class CoOpConfig(MethodConfig):
    epochs: int = -1  # -1 = CoOp's schedule by shots (1: 50, 2-4: 100, 8+: 200); else this many epochs
    batch_size: int = 32  # CoOp's batch size
    lr: float = 0.002  # SGD learning rate after warm-up
    n_ctx: int = 16  # learnable context vectors (ignored when ctx_init is set: its word count is used, as CoOp)
    ctx_init: str = ""  # "" = random N(0, 0.02) context (CoOp's few-shot default); else words to start from
    momentum: float = 0.9  # SGD momentum (Dassl default)
    weight_decay: float = 5e-4  # SGD weight decay (Dassl default)
    warmup_epochs: int = 1  # epochs at the constant warm-up learning rate
    warmup_lr: float = 1e-5  # the constant warm-up learning rate
    logit_scale: float = 100.0  # CLIP's learned logit scale (exp(4.6052) = 100); fixed, as in CoOp
    flip_augment: bool = True  # also train on mirrored support images (CoOp trains with random flips)


class PromptLearner(nn.Module):
    """Class prompts ``[SOS] ctx <class words>. [EOS]`` with learnable, class-shared context vectors."""

    def __init__(self, backbone: Backbone, class_words: list[str], n_ctx: int, ctx_init: str = ""):
        super().__init__()
        if ctx_init:
            ctx_init = ctx_init.replace("_", " ")
            n_ctx = context_word_count(ctx_init)
            init_tokens = backbone.tokenize([ctx_init])
            if n_ctx > int(init_tokens[0].argmax()) - 1:  # more words than tokens: only a doubled space does this
                raise UsadError(f"ctx_init={ctx_init!r} has empty words; separate its words by single spaces")
            with torch.no_grad():  # the first n_ctx *tokens*, as CoOp (a word of two tokens leaves one behind)
                ctx = backbone.token_embedding(init_tokens)[0, 1 : 1 + n_ctx].float().clone()
            prefix_text = ctx_init
        else:
            width = backbone.token_embedding(backbone.tokenize(["x"])).shape[-1]
            ctx = torch.empty(n_ctx, width)
            nn.init.normal_(ctx, std=0.02)
            prefix_text = " ".join(["X"] * n_ctx)  # placeholders, one token each; replaced by ctx
        if n_ctx < 1:
            raise UsadError(f"prompt context needs at least one token, got n_ctx={n_ctx} (ctx_init={ctx_init!r})")
        tokens = backbone.tokenize([f"{prefix_text} {words}." for words in class_words])  # (C, T)
        with torch.no_grad():
            embedding = backbone.token_embedding(tokens)  # (C, T, W)
        # Cut after the last end-of-text token: the causal tower's padding changes nothing (checked there).
        length = causal_text_length(backbone, embedding, tokens)
        tokens, embedding = tokens[:, :length], embedding[:, :length]
        self.n_ctx = n_ctx
        self.tower_dtype = embedding.dtype  # prompts are cast to it: fp16 towers need fp16 inputs
        embedding = embedding.float()
        self.ctx = nn.Parameter(ctx)  # (n_ctx, W)
        self.register_buffer("tokens", tokens)  # (C, L) token ids up to the last end-of-text token
        self.register_buffer("token_prefix", embedding[:, :1])  # (C, 1, W) start-of-text
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx :])  # (C, L - 1 - n_ctx, W) class words, EOS

    def embeddings(self, ctx: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings for context ``ctx`` of shape (n_ctx, W) -> (C, T, W), or (B, n_ctx, W) -> (B, C, T, W)."""
        n_cls = self.token_prefix.shape[0]
        if ctx.dim() == 2:
            return torch.cat([self.token_prefix, ctx.expand(n_cls, -1, -1), self.token_suffix], dim=1)
        b = ctx.shape[0]
        prefix = self.token_prefix.expand(b, -1, -1, -1)
        suffix = self.token_suffix.expand(b, -1, -1, -1)
        return torch.cat([prefix, ctx[:, None].expand(-1, n_cls, -1, -1), suffix], dim=2)

    def text_features(self, backbone: Backbone, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Unit text embeddings (C, D) of the prompts, or (B, C, D) for per-image context (B, n_ctx, W)."""
        ctx = self.ctx if ctx is None else ctx
        prompts = self.embeddings(ctx).to(self.tower_dtype)
        if prompts.dim() == 3:
            return F.normalize(backbone.encode_text_embeddings(prompts, self.tokens), dim=-1)
        b, c = prompts.shape[:2]
        flat = backbone.encode_text_embeddings(prompts.flatten(0, 1), self.tokens.repeat(b, 1))  # (B*C, D)
        return F.normalize(flat.view(b, c, -1), dim=-1)


def context_word_count(ctx_init: str) -> int:
    """CoOp counts ``ctx_init`` in words (split on single spaces): "a sonogram of a" -> 4 context vectors."""
    return len(ctx_init.split(" "))


def warmup_cosine(optimizer: torch.optim.Optimizer, epochs: int, warmup_epochs: int, warmup_lr: float, lr: float):
    """Dassl's schedule: ``warmup_lr`` for the first epochs, then cosine from ``lr`` over ``epochs``, per epoch.

    Dassl restarts the cosine count after the warm-up (WARMUP_RECOUNT), so epoch e >= warmup uses
    lr * (1 + cos(pi * (e - warmup) / epochs)) / 2: it never quite reaches zero.
    """

    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return warmup_lr / lr
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / max(1, epochs)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def coop_epochs(shots: int) -> int:
    """CoOp's few-shot scripts: 50 epochs for 1 shot, 100 for 2 and 4 shots, 200 for 8 and 16."""
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


def class_words(prompts: PromptSet, classes: list[str]) -> list[str]:
    """The prompt file's words for each class (CoOp puts bare class names after the context)."""
    return [prompts.class_words(c) for c in classes]


@register("coop")
class CoOp(Method):
    config_class = CoOpConfig
    trainable = True
    outputs = ("score", "logits")
    drop_last = True  # Dassl's loader: the last partial batch is dropped when there is a full one

    def __init__(self, cfg: CoOpConfig, backbone, task):
        if cfg.epochs < 0:  # resolved here, so the run's saved config shows the epochs actually run
            cfg = replace(cfg, epochs=coop_epochs(task.shots))
        super().__init__(cfg, backbone, task)
        words = class_words(task.prompts, task.classes)
        self.prompt_learner = PromptLearner(backbone, words, cfg.n_ctx, cfg.ctx_init)

    def class_logits(self, cls: torch.Tensor) -> torch.Tensor:
        text = self.prompt_learner.text_features(self.backbone)  # (C, D)
        return self.cfg.logit_scale * F.normalize(cls, dim=-1) @ text.T

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        loss = F.cross_entropy(self.class_logits(batch["cls"]), batch["label"])
        return self.log_losses({"ce": loss}, batch_size=len(batch["label"]))

    def configure_optimizers(self):
        cfg = self.cfg
        optimizer = torch.optim.SGD(
            self.trainable_parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        scheduler = warmup_cosine(optimizer, cfg.epochs, cfg.warmup_epochs, cfg.warmup_lr, cfg.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    @torch.no_grad()
    def predict_features(self, feats: ImageFeatures) -> Prediction:
        logits = self.class_logits(feats.cls)
        return Prediction(score=class_anomaly_score(logits, self.task.normal_index), class_logits=logits)
