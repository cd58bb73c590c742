"""Parity of ``zero_shot_clip``'s class logits with CoOp's ``ZeroshotCLIP`` (trainers/zsclip.py).

Both sides get the same random CLIP weights and the same random images. Theirs: ``build_model``
(prompt "a photo of a {}." -- their ImageNet template, our ``prompts: generic``) and
``model_inference``. Stubbed: ``load_clip_to_cpu`` (downloads weights) returns their own ``CLIP``
class filled with our random weights; the Dassl trainer harness (see _common.stub_dassl_harness).

    python benchmarks/parity/zero_shot_clip.py --original ORIGINALS/CoOp [--dassl.pytorch ORIGINALS/Dassl.pytorch]
"""

from __future__ import annotations

import types

import torch
from _common import arguments, diff, import_path, our_backbone, stub_dassl_harness, their_clip, write

REPO, COMMIT = "KaiyangZhou/CoOp", "ff61507c790454bce7c5052c3ac39e60772f1f89"
CLASSES = ["normal", "benign", "malignant"]


def main() -> None:
    args = arguments("zero_shot_clip", REPO, COMMIT, extra=("Dassl.pytorch",))
    import_path(args.original)
    stub_dassl_harness(args.dassl_pytorch)
    from clip import model as clip_model_module
    from trainers import zsclip

    from usad_bench.runner import build_method

    backbone = our_backbone()
    zsclip.load_clip_to_cpu = lambda cfg: their_clip(clip_model_module, backbone)  # stub: the weight download
    trainer = zsclip.ZeroshotCLIP.__new__(zsclip.ZeroshotCLIP)  # their harness's __init__ reads datasets
    trainer.cfg = types.SimpleNamespace(
        MODEL=types.SimpleNamespace(BACKBONE=types.SimpleNamespace(NAME="parity")),
        DATASET=types.SimpleNamespace(NAME="ImageNet"),  # template "a photo of a {}."
    )
    ours = build_method(
        "zero_shot_clip", {"prompts": "generic", "maps": False, "image_score": "classes"}, backbone, CLASSES, 1, []
    )
    words = [ours.task.prompts.class_words(c) for c in CLASSES]
    trainer.dm = types.SimpleNamespace(dataset=types.SimpleNamespace(classnames=words))
    trainer.device = torch.device("cpu")
    trainer.build_model()

    compared: dict = {}
    torch.manual_seed(0)
    images = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        feats = backbone.encode_images(images)
        compared["image_features"] = diff(feats.cls, trainer.clip_model.encode_image(images))
        compared["text_features"] = diff(ours.class_text, trainer.text_features)
        compared["class_logits"] = diff(ours.predict_features(feats).class_logits, trainer.model_inference(images))
    notes = [
        "class words from our generic prompt file, passed to their build_model as class names",
        "logit scale: theirs exp(logit_scale) with the parameter set to ln 100 (the pretrained value); ours 1/0.01",
    ]
    write(args, "zero_shot_clip", REPO, COMMIT, compared, notes)


if __name__ == "__main__":
    main()
