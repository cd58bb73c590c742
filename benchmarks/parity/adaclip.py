"""Parity of ``adaclip`` with caoyunkang/AdaCLIP: frozen CLS, prompt tokens, projected CLS and patch tokens,
text features, maps, scores, losses, and every learned parameter after a few identical AdamW steps.

Both sides get the same random CLIP weights (a 4-block open_clip-layout ViT, exact GELU as AdaCLIP builds it,
so that prompts enter blocks 1..4 and all four blocks are feature layers; a 4-block text tower, so the text
prompts enter text blocks 2..4) and the same random images and masks, batch 1 (their text prompting needs it).
Theirs: ``method.adaclip.AdaCLIP`` (``forward`` with and without aggregation, ``extract_feat``), their
``CLIP`` class filled with our weights, ``FocalLoss`` / ``BinaryDiceLoss``, and the loss / optimiser / map
arithmetic of ``trainer.py:87,103-141,194`` (methods of a trainer that downloads weights; their lines are
reproduced here, marked). Stubbed: the weight download, ``pkg_resources`` (setuptools' copy of ``packaging``,
absent from new setuptools), the ``method`` package ``__init__`` (it imports the trainer, which needs cv2 and
the download), and their KMeans is given our seed (theirs is unseeded; ``adaclip.py:239``).

Their prompt tokens pass through ``.half()`` in every forward (``adaclip.py:87,118,123``; on their GPU the
whole forward runs under fp16 autocast). The comparison is run twice: as their code is, and with
``Tensor.half`` made the identity during their calls, which isolates the arithmetic from that rounding.

    python benchmarks/parity/adaclip.py --original ORIGINALS/AdaCLIP
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from _common import arguments, diff, write
from scipy.ndimage import gaussian_filter

REPO, COMMIT = "caoyunkang/AdaCLIP", "e27ee32bf19be149795c8c8972d4c3c88cd5a496"
MODEL = "usad-parity-adaclip"
CONFIG = {  # open_clip layout, exact GELU (AdaCLIP rebuilds its CLIP without quick_gelu)
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 64, "patch_size": 8},
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 32,
        "heads": 1,
        "layers": 4,
    },  # width = embed_dim: their text prompts are embed_dim wide
}
SIZE, LAYERS, LENGTH, DEPTH, K_CLUSTERS, SEED, STEPS = 64, [1, 2, 3, 4], 5, 4, 4, 0, 3
CLASS_NAME = "bottle"
NORMAL = ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect"]
NORMAL += ["{} without damage"]  # adaclip.py:151-154
ABNORMAL = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]


def stub_imports(original: Path) -> None:
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        import packaging.version

        sys.modules["pkg_resources"] = types.SimpleNamespace(packaging=packaging)
    package = types.ModuleType("method")  # their package without its __init__ (which imports the trainer)
    package.__path__ = [str(original / "method")]
    sys.modules["method"] = package
    sys.path.insert(0, str(original))


def their_prompt_file() -> Path:
    """Our vocabulary file with AdaCLIP's own words (industrial states, class name ``bottle``), so both
    sides encode the same 48 sentences."""
    from importlib import resources

    data = yaml.safe_load((resources.files("usad_bench") / "resources" / "prompts" / "april_gan.yaml").read_text())
    data.update(object=CLASS_NAME, states={"normal": NORMAL, "abnormal": ABNORMAL})
    path = Path(tempfile.mkdtemp(prefix="usad_parity_prompts_")) / "adaclip_original_words.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def our_side():
    import open_clip

    from usad_bench.backbone import Backbone, BackboneSpec
    from usad_bench.runner import build_method

    folder = Path(tempfile.mkdtemp(prefix="usad_parity_cfg_"))
    (folder / f"{MODEL}.json").write_text(json.dumps(CONFIG))
    open_clip.add_model_config(folder)
    backbone = Backbone.load(BackboneSpec(name=MODEL, pretrained=None, seed=0, activation="gelu"))
    options = {"layers": LAYERS, "k_clusters": K_CLUSTERS, "kmeans_seed": SEED, "prompts": str(their_prompt_file())}
    return backbone, build_method("adaclip", options, backbone, ["normal", "abnormal"], 2, [])


def open_clip_bpe() -> str:
    """CLIP's BPE vocabulary from open_clip: the clone's ``method/bpe_simple_vocab_16e6.txt.gz`` is a Git LFS
    pointer, not the file (the same vocabulary; the token ids are compared through the text features)."""
    from open_clip.tokenizer import default_bpe

    return default_bpe()


def their_side(backbone):
    from sklearn.cluster import KMeans

    clip_model = importlib.import_module("method.clip_model")
    adaclip = importlib.import_module("method.adaclip")
    adaclip._Tokenizer = functools.partial(adaclip._Tokenizer, bpe_path=open_clip_bpe())
    loss = importlib.import_module("loss")
    clip = clip_model.CLIP(CONFIG["embed_dim"], CONFIG["vision_cfg"], CONFIG["text_cfg"], quick_gelu=False)
    missing, unexpected = clip.load_state_dict(backbone.model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "attn_mask" not in k]:
        raise SystemExit(f"error: weight layouts differ (missing {missing[:4]}, unexpected {unexpected[:4]})")
    clip.eval()
    model = adaclip.AdaCLIP(
        freeze_clip=clip,
        text_channel=CONFIG["embed_dim"],
        visual_channel=CONFIG["vision_cfg"]["width"],
        prompting_length=LENGTH,
        prompting_depth=DEPTH,
        prompting_branch="VL",
        prompting_type="SD",
        use_hsf=True,
        k_clusters=K_CLUSTERS,
        output_layers=LAYERS,
        device="cpu",
        image_size=SIZE,
    )  # fmt: skip  (train.py:155-170 defaults: branch VL, type SD, HSF on)
    model.HSF.cluster_performer = KMeans(n_clusters=K_CLUSTERS, n_init="auto", random_state=SEED)  # seeded as ours
    names = [
        "text_prompter",
        "visual_prompter",
        "patch_token_layer",
        "cls_token_layer",
        "dynamic_visual_prompt_generator",
        "dynamic_text_prompt_generator",
    ]  # fmt: skip  (trainer.py:69-84)
    params = [p for n, p in model.named_parameters() if any(k in n for k in names)]
    optimiser = torch.optim.AdamW(params, lr=0.01, betas=(0.5, 0.999))  # trainer.py:87
    return types.SimpleNamespace(model=model, optimiser=optimiser, focal=loss.FocalLoss(), dice=loss.BinaryDiceLoss())


def copy_parameters(theirs, ours) -> None:
    """Our learned parameters := theirs (the two sides draw their initial values in different orders)."""
    t = theirs.model
    pairs = [(ours.cls_head, t.cls_token_layer.head[0])]
    pairs += list(zip(ours.patch_heads.adapters, t.patch_token_layer.head, strict=True))
    pairs += list(zip(ours.visual_prompts.generator, t.dynamic_visual_prompt_generator.head, strict=True))
    pairs += list(zip(ours.text_prompts.generator, t.dynamic_text_prompt_generator.head, strict=True))
    with torch.no_grad():
        for mine, their in pairs:
            mine.load_state_dict(their.state_dict())
        for mine, their in zip(ours.visual_prompts.static, t.visual_prompter.static_prompts, strict=True):
            mine.copy_(their)
        for mine, their in zip(ours.text_prompts.static, list(t.text_prompter.static_prompts)[1:], strict=True):
            mine.copy_(their)  # their text static[0] is never used (adaclip.py:81-82); ours starts at depth 1


def parameter_pairs(theirs, ours) -> dict:
    t = theirs.model

    def stack(items):
        return torch.stack([getattr(i, "weight", i) for i in items])

    return {
        "visual_static_prompts": (stack(ours.visual_prompts.static), stack(t.visual_prompter.static_prompts)),
        "text_static_prompts": (stack(ours.text_prompts.static), stack(list(t.text_prompter.static_prompts)[1:])),
        "visual_generators": (stack(ours.visual_prompts.generator), stack(t.dynamic_visual_prompt_generator.head)),
        "text_generators": (stack(ours.text_prompts.generator), stack(t.dynamic_text_prompt_generator.head)),
        "patch_heads": (stack(ours.patch_heads.adapters), stack(t.patch_token_layer.head)),
        "cls_head": (ours.cls_head.weight, t.cls_token_layer.head[0].weight),
    }


def their_loss(theirs, image, gt, is_anomaly) -> dict:
    """trainer.py:103-135, loss only (the optimiser step is done by the caller)."""
    anomaly_map, anomaly_score = theirs.model(image, [CLASS_NAME], aggregation=False)
    gt = gt.squeeze()
    classification = theirs.focal(anomaly_score, is_anomaly.unsqueeze(1))
    seg = 0
    for am in anomaly_map:
        seg += theirs.focal(am, gt) + theirs.dice(am[:, 1, :, :], gt) + theirs.dice(am[:, 0, :, :], 1 - gt)
    return {"image": classification, "pixel": seg}


def their_prediction(theirs, image):
    """trainer.py:188-196: aggregated map, Gaussian sigma 4 per image, and the score."""
    with torch.no_grad():
        anomaly_map, score = theirs.model(image, [CLASS_NAME], aggregation=True)
    smoothed = np.stack([gaussian_filter(m, sigma=4) for m in anomaly_map.numpy()])
    return torch.from_numpy(smoothed), score


@contextlib.contextmanager
def half_is_identity(enabled: bool):
    """Their prompts' ``.half()`` made a no-op (only while their code runs, only when ``enabled``)."""
    if not enabled:
        yield
        return
    half = torch.Tensor.half
    torch.Tensor.half = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.half = half


@contextlib.contextmanager
def norms_read_a_copy():
    """``Tensor.norm`` reads a copy of its input while their training code runs.

    Their in-place normalisations (``x /= x.norm(...)``, adaclip.py:223-225,482,486) modify a tensor autograd
    saved for the norm's backward, which fp32 on CPU rejects. Under their GPU autocast the norm reads an fp32
    copy of the fp16 tensor; a clone gives fp32 the same semantics (same values, gradients flow through it).
    (``torch.autograd.graph.allow_mutation_on_saved_tensors`` did this before and failed about one run in two
    with a shape error in the backward: it matches saved tensors to their clones by address.)
    """
    norm = torch.Tensor.norm
    torch.Tensor.norm = lambda self, *a, **k: norm(self.clone(), *a, **k)
    try:
        yield
    finally:
        torch.Tensor.norm = norm


def data():
    torch.manual_seed(0)
    images = torch.randn(3, 3, SIZE, SIZE)
    gt = (F.avg_pool2d(torch.rand(3, 1, SIZE, SIZE), 9, 1, 4)[:, 0] > 0.55).float()
    gt[0] = 0
    return images, gt, (gt.flatten(1).amax(1) > 0).float()


def compare(exact_half: bool) -> dict:
    from usad_bench.feature_kinds import STREAM, FeatureRequest

    backbone, ours = our_side()
    torch.manual_seed(0)
    theirs = their_side(backbone)
    copy_parameters(theirs, ours)
    images, gt, is_anomaly = data()
    with torch.no_grad():
        feats = backbone.encode_features(images, FeatureRequest(kind=STREAM, layers=(0,)))
    compared: dict = {}
    with torch.no_grad(), half_is_identity(exact_half):
        frozen, _ = theirs.model.visual.forward(images, LAYERS)
        compared["frozen_cls"] = diff(feats.cls, frozen)
        theirs.model.generate_and_set_dynamic_promtps(images[:1])
        mine = ours.visual_prompts(feats.cls[:1])
        prompter = theirs.model.visual_prompter
        their_tokens = [static + prompter.dynamic_prompts for static in prompter.static_prompts]  # adaclip.py:104-106
        compared["visual_prompt_tokens"] = diff(torch.stack(mine), torch.stack(their_tokens))
        cls, patches, text = ours.encode(_first(feats))
        their_cls, their_patches, their_text = theirs.model.extract_feat(images[:1], [CLASS_NAME])
        compared["projected_cls"] = diff(cls, their_cls)
        compared["patch_tokens"] = diff(patches, torch.stack(their_patches, 1))
        compared["text_features"] = diff(text, their_text.transpose(1, 2))
    for i in range(len(images)):
        with half_is_identity(exact_half):
            smoothed, score = their_prediction(theirs, images[i : i + 1])
        pred = ours.predict_features(_first(feats, i))
        compared[f"anomaly_map_image{i}"] = diff(pred.anomaly_map, smoothed)
        compared[f"image_score_image{i}"] = diff(pred.score, score)
    our_optimiser = ours.configure_optimizers()
    for step in range(STEPS):
        i = step % len(images)
        mine = ours.losses(_first(feats, i), gt[i : i + 1], is_anomaly[i : i + 1], torch.ones(1, dtype=torch.bool))
        our_optimiser.zero_grad()
        sum(mine.values()).backward()
        our_optimiser.step()
        with half_is_identity(exact_half), norms_read_a_copy():
            their = their_loss(theirs, images[i : i + 1], gt[i : i + 1], is_anomaly[i : i + 1])
            theirs.optimiser.zero_grad()
            sum(their.values()).backward()
            theirs.optimiser.step()
        for name in ("image", "pixel"):
            compared[f"loss_{name}_step{step}"] = diff(mine[name].detach(), their[name].detach())
    for name, (mine, their) in parameter_pairs(theirs, ours).items():
        compared[f"{name}_after_{STEPS}_steps"] = diff(mine, their)
    return compared


def _first(feats, i: int = 0):
    from usad_bench.backbone import ImageFeatures

    return ImageFeatures(feats.cls[i : i + 1], feats.patches[i : i + 1], feats.layers, feats.kind)


def main() -> None:
    args = arguments("adaclip", REPO, COMMIT)
    stub_imports(args.original)
    torch.set_num_threads(1)
    exact = compare(exact_half=True)
    as_is = compare(exact_half=False)
    notes = [
        f"model: 4-block open_clip-layout ViT (width 128, 2 heads, 8-px patches, {SIZE} px, 64 patches) + 4-block "
        "text tower, exact GELU, random weights (seed 0) on both sides; batch 1 (their text prompting needs it)",
        f"prompts: length {LENGTH}, depth {DEPTH}; feature layers {LAYERS}; HSF with k = {K_CLUSTERS} clusters over "
        f"the {5 * K_CLUSTERS} most anomalous of 64 patches (k = 20 needs 100 patches), KMeans seeded {SEED} on "
        "both sides (theirs is unseeded)",
        f"sentences: AdaCLIP's own states for class {CLASS_NAME!r} x its 4 templates (ours read from a vocabulary "
        "file with those words); ours stop at the last end-of-text position (exact for the causal tower)",
        "'compared': their .half() on prompt tokens made the identity during their calls; "
        "'compared_with_their_fp16_prompt_cast': their code exactly as it is, whose prompt tokens are rounded "
        "to fp16 in every forward (on their GPU the whole forward is fp16 autocast); ours run fp32",
        "during their training steps Tensor.norm reads a clone of its input: their in-place normalisations "
        "(adaclip.py:223-225,482,486) modify tensors autograd saved, which fp32 on CPU rejects (under their GPU "
        "autocast the norms read fp32 copies); same values, gradients flow through the clone",
        f"training: {STEPS} AdamW steps (lr 0.01, betas (0.5, 0.999), weight decay 0.01) on images 0, 1, 2 "
        "(image 0 normal with an empty mask), losses of trainer.py:125-135 on both sides",
    ]
    write(args, "adaclip", REPO, COMMIT, exact, notes)
    add_fp16_rows(args.out, as_is)


def add_fp16_rows(path: Path, as_is: dict) -> None:
    """Their code exactly as it is (prompt tokens rounded to fp16), kept beside the tolerance-checked rows."""
    from usad_bench.io import write_json

    result = json.loads(path.read_text())
    result["compared_with_their_fp16_prompt_cast"] = as_is
    result["worst_rel_with_their_fp16_prompt_cast"] = max(d["max_rel"] for d in as_is.values())
    write_json(path, result)
    for name, d in as_is.items():
        print(f"adaclip (their fp16 cast) {name:34s} max_abs {d['max_abs']:.3g}  max_rel {d['max_rel']:.3g}")


if __name__ == "__main__":
    main()
