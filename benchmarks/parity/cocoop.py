"""Parity of ``cocoop`` with CoCoOp's ``trainers/cocoop.py`` (PromptLearner with meta-net, CustomCLIP)
and Dassl's optimiser and learning-rate schedule.

Same random CLIP weights, same images, same initial context ("a photo of a") and meta-net (theirs
is drawn, then copied into ours), batch 1 as CoCoOp: compares text features, logits, the loss
their CustomCLIP returns in training mode, and context + meta-net after a few epochs of SGD.
Stubbed: the weight download (their ``CLIP`` class gets our random weights), the Dassl trainer harness.

    python benchmarks/parity/cocoop.py --original ORIGINALS/CoOp [--dassl.pytorch ORIGINALS/Dassl.pytorch]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _common import arguments, dassl_optim_cfg, diff, our_backbone, their_clip, train_both, write
from coop import CLASSES, load_theirs, their_cfg

REPO, COMMIT = "KaiyangZhou/CoOp", "ff61507c790454bce7c5052c3ac39e60772f1f89"

EPOCHS = 2


def main() -> None:
    args = arguments("cocoop", REPO, COMMIT, extra=("Dassl.pytorch",))
    clip_model_module, build_optimizer, build_lr_scheduler = load_theirs(args)
    from trainers import cocoop as their_cocoop

    from usad_bench.runner import build_method

    backbone = our_backbone()
    clip_model = their_clip(clip_model_module, backbone)
    ours = build_method("cocoop", {"prompts": "generic", "epochs": EPOCHS}, backbone, CLASSES, 4, [])
    words = [ours.task.prompts.class_words(c) for c in CLASSES]
    torch.manual_seed(0)
    theirs = their_cocoop.CustomCLIP(their_cfg(4, ours.cfg.ctx_init, "COCOOP"), words, clip_model)
    meta = theirs.prompt_learner.meta_net
    with torch.no_grad():  # the same initial parameters
        ours.prompt_learner.ctx.copy_(theirs.prompt_learner.ctx)
        for mine, their_layer in ((ours.meta_net.net[0], meta.linear1), (ours.meta_net.net[2], meta.linear2)):
            mine.weight.copy_(their_layer.weight)
            mine.bias.copy_(their_layer.bias)

    compared: dict = {"n_ctx": diff(float(ours.prompt_learner.n_ctx), float(theirs.prompt_learner.n_ctx))}
    torch.manual_seed(1)
    images = torch.randn(4, 3, 64, 64)
    labels = torch.arange(4) % len(CLASSES)
    with torch.no_grad():
        cls = backbone.encode_images(images).cls
        theirs.eval()
        image = F.normalize(cls, dim=-1)
        prompts = theirs.prompt_learner(image)  # (B, C, 77, W)
        their_text = torch.stack([theirs.text_encoder(p, theirs.tokenized_prompts) for p in prompts])
        ctx = ours.prompt_learner.ctx[None] + ours.meta_net(image)[:, None]
        compared["text_features"] = diff(
            ours.prompt_learner.text_features(backbone, ctx), F.normalize(their_text, dim=-1)
        )
        compared["logits"] = diff(ours.class_logits(cls), theirs(images))
    theirs.train()
    ours.train()
    our_opt = ours.configure_optimizers()
    optim_cfg = dassl_optim_cfg(ours.cfg.lr, EPOCHS)
    their_opt = build_optimizer(theirs.prompt_learner, optim_cfg)
    batches = [slice(i, i + 1) for i in range(4)]  # batch 1, as CoCoOp
    log = train_both(
        batches,
        EPOCHS,
        {
            "loss": lambda b: F.cross_entropy(ours.class_logits(cls[b]), labels[b]),
            "optimizer": our_opt["optimizer"],
            "scheduler": our_opt["lr_scheduler"]["scheduler"],
        },
        {
            "loss": lambda b: theirs(images[b], labels[b]),  # their training-mode forward returns the loss
            "optimizer": their_opt,
            "scheduler": build_lr_scheduler(their_opt, optim_cfg),
        },
    )
    compared["train_losses"] = diff(log["ours"]["loss"], log["theirs"]["loss"])
    compared["learning_rates"] = diff(log["ours"]["lr"], log["theirs"]["lr"])
    compared["ctx_after_training"] = diff(ours.prompt_learner.ctx, theirs.prompt_learner.ctx)
    compared["meta_net_after_training"] = diff(ours.meta_net.net[2].weight, meta.linear2.weight)
    notes = [
        f"ours cuts the prompts after the end-of-text token ({ours.prompt_learner.tokens.shape[1]} of 77 positions)",
        "their CustomCLIP encodes the images itself; ours gets the same backbone's cached CLS features",
    ]
    write(args, "cocoop", REPO, COMMIT, compared, notes)


if __name__ == "__main__":
    main()
