"""Parity of ``clip_adapter`` with the authors' ``clip_adapter.py`` (gaopengcuhk/CLIP-Adapter: Adapter,
TextEncoder, CustomCLIP) and Dassl's optimiser and schedule.

Same random CLIP weights, same images, same initial adapter (theirs is drawn, then copied into
ours): compares logits, the cross-entropy, and the adapter after a few epochs of plain SGD (lr 0.01,
warm-up + cosine, the values ours uses; the authors released no config). Stubbed: the weight
download (CoOp's ``CLIP`` class, which their file imports, gets our random weights), the Dassl
trainer harness, ``.to('cuda')`` on a CPU machine. Their CustomCLIP hard-codes ``Adapter(1024, 4)``
(ResNet-50's width); it is replaced by their own ``Adapter`` class at the parity model's width.

    python benchmarks/parity/clip_adapter.py --original ORIGINALS/CLIP-Adapter \
        [--coop ORIGINALS/CoOp --dassl.pytorch ORIGINALS/Dassl.pytorch]
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from _common import (
    arguments,
    dassl_optim_cfg,
    diff,
    import_path,
    load_file,
    our_backbone,
    stub_cuda,
    stub_dassl_harness,
    their_clip,
    train_both,
    write,
)

REPO, COMMIT = "gaopengcuhk/CLIP-Adapter", "08d07f8b2ecafc6f1479fe636b26d464d7a5574e"
CLASSES = ["normal", "benign", "malignant"]
EPOCHS = 3


def main() -> None:
    args = arguments("clip_adapter", REPO, COMMIT, extra=("CoOp", "Dassl.pytorch"))
    import_path(args.coop)  # their file imports CoOp's `clip` package
    stub_dassl_harness(args.dassl_pytorch)
    stub_cuda()
    from clip import model as clip_model_module
    from dassl.optim import build_lr_scheduler, build_optimizer

    theirs_module = load_file("their_clip_adapter", args.original / "clip_adapter.py")
    from usad_bench.runner import build_method

    backbone = our_backbone()
    clip_model = their_clip(clip_model_module, backbone)
    ours = build_method("clip_adapter", {"prompts": "generic", "epochs": EPOCHS}, backbone, CLASSES, 4, [])
    words = [ours.task.prompts.class_words(c) for c in CLASSES]
    cfg = types.SimpleNamespace(DATASET=types.SimpleNamespace(NAME="ImageNet"))  # "a photo of a {}."
    theirs = theirs_module.CustomCLIP(cfg, words, clip_model)
    torch.manual_seed(0)
    theirs.adapter = theirs_module.Adapter(backbone.embed_dim, ours.cfg.reduction)
    with torch.no_grad():
        for mine, their_layer in zip(ours.adapter.fc, theirs.adapter.fc, strict=True):
            if isinstance(mine, torch.nn.Linear):
                mine.weight.copy_(their_layer.weight)

    compared: dict = {}
    torch.manual_seed(1)
    images = torch.randn(12, 3, 64, 64)
    labels = torch.arange(12) % len(CLASSES)
    with torch.no_grad():
        cls = backbone.encode_images(images).cls
        compared["text_features"] = diff(ours.class_text, F.normalize(theirs.text_encoder(), dim=-1))
        compared["logits"] = diff(ours.class_logits(cls), theirs(images))
        compared["loss"] = diff(
            F.cross_entropy(ours.class_logits(cls), labels), F.cross_entropy(theirs(images), labels)
        )
    our_opt = ours.configure_optimizers()
    optim_cfg = dassl_optim_cfg(ours.cfg.lr, EPOCHS, MOMENTUM=0.0, WEIGHT_DECAY=0.0)
    their_opt = build_optimizer(theirs.adapter, optim_cfg)
    batches = [slice(0, 6), slice(6, 12)]
    log = train_both(
        batches,
        EPOCHS,
        {
            "loss": lambda b: F.cross_entropy(ours.class_logits(cls[b]), labels[b]),
            "optimizer": our_opt["optimizer"],
            "scheduler": our_opt["lr_scheduler"]["scheduler"],
        },
        {
            "loss": lambda b: F.cross_entropy(theirs(images[b]), labels[b]),
            "optimizer": their_opt,
            "scheduler": build_lr_scheduler(their_opt, optim_cfg),
        },
    )
    compared["train_losses"] = diff(log["ours"]["loss"], log["theirs"]["loss"])
    compared["learning_rates"] = diff(log["ours"]["lr"], log["theirs"]["lr"])
    compared["adapter_after_training"] = diff(ours.adapter.fc[2].weight, theirs.adapter.fc[2].weight)
    notes = [
        "their Adapter(1024, 4) (ResNet-50 width) replaced by their Adapter at the parity width",
        "optimiser: Dassl's SGD + constant warm-up + cosine with ours' values (lr 0.01, no momentum or decay)",
    ]
    write(args, "clip_adapter", REPO, COMMIT, compared, notes)


if __name__ == "__main__":
    main()
