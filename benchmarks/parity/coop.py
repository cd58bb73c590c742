"""Parity of ``coop`` with CoOp's ``trainers/coop.py`` (PromptLearner, TextEncoder, CustomCLIP) and
Dassl's optimiser and learning-rate schedule.

Same random CLIP weights, same images, same initial context (theirs is drawn, then copied into
ours), same batches: compares text features, logits, the cross-entropy, and the context after a few
epochs of SGD with warm-up + cosine (``dassl.optim``, the real one), plus ``ctx_init`` handling
("a sonogram of a": word count and initial vectors). Stubbed: the weight download (their ``CLIP``
class gets our random weights), the Dassl trainer harness.

    python benchmarks/parity/coop.py --original ORIGINALS/CoOp [--dassl.pytorch ORIGINALS/Dassl.pytorch]
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from _common import (
    PARITY_CONFIG,
    arguments,
    dassl_optim_cfg,
    diff,
    import_path,
    our_backbone,
    stub_dassl_harness,
    their_clip,
    train_both,
    write,
)

REPO, COMMIT = "KaiyangZhou/CoOp", "ff61507c790454bce7c5052c3ac39e60772f1f89"
CLASSES = ["normal", "benign", "malignant"]
EPOCHS = 3


def their_cfg(n_ctx: int, ctx_init: str, trainer: str = "COOP") -> types.SimpleNamespace:
    ns = types.SimpleNamespace
    options = ns(N_CTX=n_ctx, CTX_INIT=ctx_init, CSC=False, CLASS_TOKEN_POSITION="end", PREC="fp32")
    return ns(TRAINER=ns(**{trainer: options}), INPUT=ns(SIZE=(PARITY_CONFIG["vision_cfg"]["image_size"],) * 2))


def load_theirs(args):
    import_path(args.original)
    stub_dassl_harness(args.dassl_pytorch)
    from clip import model as clip_model_module
    from dassl.optim import build_lr_scheduler, build_optimizer

    return clip_model_module, build_optimizer, build_lr_scheduler


def main() -> None:
    args = arguments("coop", REPO, COMMIT, extra=("Dassl.pytorch",))
    clip_model_module, build_optimizer, build_lr_scheduler = load_theirs(args)
    from trainers import coop as their_coop

    from usad_bench.runner import build_method

    backbone = our_backbone()
    clip_model = their_clip(clip_model_module, backbone)
    ours = build_method("coop", {"prompts": "generic", "epochs": EPOCHS}, backbone, CLASSES, 4, [])
    words = [ours.task.prompts.class_words(c) for c in CLASSES]
    torch.manual_seed(0)
    theirs = their_coop.CustomCLIP(their_cfg(16, ""), words, clip_model)
    with torch.no_grad():
        ours.prompt_learner.ctx.copy_(theirs.prompt_learner.ctx)  # the same initial parameters

    compared: dict = {}
    torch.manual_seed(1)
    images = torch.randn(12, 3, 64, 64)
    labels = torch.arange(12) % len(CLASSES)
    with torch.no_grad():
        cls = backbone.encode_images(images).cls
        their_text = theirs.text_encoder(theirs.prompt_learner(), theirs.tokenized_prompts)
        compared["text_features"] = diff(ours.prompt_learner.text_features(backbone), F.normalize(their_text, dim=-1))
        compared["logits"] = diff(ours.class_logits(cls), theirs(images))
        compared["loss"] = diff(
            F.cross_entropy(ours.class_logits(cls), labels), F.cross_entropy(theirs(images), labels)
        )

    # A few epochs of identical batches: Dassl's SGD + constant warm-up + cosine vs ours.
    batches = [(slice(0, 6), None), (slice(6, 12), None)]
    ours.train()
    our_opt = ours.configure_optimizers()
    optim_cfg = dassl_optim_cfg(ours.cfg.lr, EPOCHS)
    their_opt = build_optimizer(theirs.prompt_learner, optim_cfg)
    log = train_both(
        batches,
        EPOCHS,
        {
            "loss": lambda b: F.cross_entropy(ours.class_logits(cls[b[0]]), labels[b[0]]),
            "optimizer": our_opt["optimizer"],
            "scheduler": our_opt["lr_scheduler"]["scheduler"],
        },
        {
            "loss": lambda b: F.cross_entropy(theirs(images[b[0]]), labels[b[0]]),
            "optimizer": their_opt,
            "scheduler": build_lr_scheduler(their_opt, optim_cfg),
        },
    )
    compared["train_losses"] = diff(log["ours"]["loss"], log["theirs"]["loss"])
    compared["learning_rates"] = diff(log["ours"]["lr"], log["theirs"]["lr"])
    compared["ctx_after_training"] = diff(ours.prompt_learner.ctx, theirs.prompt_learner.ctx)

    # ctx_init: counted in words, initial vectors = the first n_ctx token embeddings.
    init_words = "a sonogram of a"
    init_ours = build_method("coop", {"prompts": "generic", "ctx_init": init_words}, backbone, CLASSES, 4, [])
    init_theirs = their_coop.PromptLearner(their_cfg(16, init_words), words, clip_model)
    compared["ctx_init_n_ctx"] = diff(float(init_ours.prompt_learner.n_ctx), float(init_theirs.n_ctx))
    compared["ctx_init_vectors"] = diff(init_ours.prompt_learner.ctx, init_theirs.ctx)
    with torch.no_grad():
        length = init_ours.prompt_learner.tokens.shape[1]
        compared["ctx_init_prompt_embeddings"] = diff(
            init_ours.prompt_learner.embeddings(init_ours.prompt_learner.ctx), init_theirs()[:, :length]
        )
    notes = [
        f"ours cuts the prompts after the end-of-text token ({length} of 77 positions); theirs runs all 77",
        f"learning rates per epoch, ours {log['ours']['lr']}, theirs {log['theirs']['lr']}",
        "their CustomCLIP encodes the images itself; ours gets the same backbone's cached CLS features",
    ]
    write(args, "coop", REPO, COMMIT, compared, notes)


if __name__ == "__main__":
    main()
