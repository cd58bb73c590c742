"""The built-in default job: synthetic source -> shifted target, end to end in a few minutes on CPU.

1. synthesise a *source* and a visibly shifted *target* domain (gain, speckle grain, attenuation);
2. fit a method on k shots per class of the source, and zero-shot CLIP beside it;
3. evaluate both unchanged on the target (and on the source's held-out patients), side by side;
4. write metrics.json and heat-map overlays of target images with the true lesion outlined.

The default backbone is ``usad-tiny`` with ``--pretrained synth``: a tiny CLIP pretrained (Ultrasound-CLIP's
semantic-aware objective, ``make pretrain-tiny``) on synthetic images only, in scanner styles that never
include the demo's target style. It is for offline checks and teaching, not a clinical model; its figures
are synthetic, not results. ``--pretrained none`` gives the random tiny model (pipeline checks only);
``--backbone ViT-B-16 --pretrained openai`` (or a checkpoint file) runs the same job on a real CLIP model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from usad_bench.backbone import BackboneSpec, check_weights
from usad_bench.cache import FeatureCache
from usad_bench.data.images import load_mask, load_rgb
from usad_bench.data.manifest import read_manifest
from usad_bench.data.synth import synthesise
from usad_bench.features import FeatureExtractor
from usad_bench.io import read_json, save_png
from usad_bench.runner import FitOptions, evaluate, fit, load_run, weights_stamp
from usad_bench.tables import format_metrics
from usad_bench.viz import label_image, overlay, side_by_side

DEFAULT_BACKBONE = BackboneSpec(name="usad-tiny", pretrained="synth")
SYNTH_NOTE = (
    "note: usad-tiny --pretrained synth is pretrained on synthetic images only, for offline checks and teaching, "
    "not a clinical model; these figures are synthetic, not results"
)
COMPARED = (  # (metrics.json key, label) of the side-by-side table
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("cls_auroc_macro", "class macro AUROC"),
    ("cls_auroc_malignant_vs_benign", "malignant-vs-benign AUROC"),
)


def run_demo(
    out: Path,
    method: str = "linear_adapter",
    shots: int = 4,
    n: int = 60,
    seed: int = 0,
    backbone: BackboneSpec | None = None,
    overrides: dict | None = None,
    device: str = "auto",
    cache_dir: Path | None = Path(".usad_cache"),
    wandb: bool = False,
) -> dict:
    """Run the demo under ``out``; ``cache_dir=None`` computes features without the cache.

    ``wandb``: log the run (config, curves, metrics, overlays) to Weights & Biases, offline without a key.
    Returns the adapted method's metrics payload, with zero-shot CLIP's under ``"zero_shot"``.
    """
    out = Path(out)
    backbone = backbone or DEFAULT_BACKBONE
    if not backbone.is_random:
        check_weights(backbone)  # offline without the weights: the one-line error before any file is written
    if str(backbone.pretrained) == "synth":
        print(SYNTH_NOTE)
    source = synthesise(out / "data" / "source", n=n, seed=seed, style="source")
    target = synthesise(out / "data" / "target", n=n, seed=seed + 1000, style="target")
    print(f"synthesised {n} source and {n} target images under {out / 'data'}")

    tracking = {"source": "synthetic", "tags": ["demo"]} if wandb else False
    tests = [("target", target), ("source_heldout", source)]
    payloads = {}
    for name, run, options in (("zero_shot_clip", out / "zero_shot", {}), (method, out / "run", overrides or {})):
        opts = FitOptions(name, source, shots, seed, run, backbone, options, cache_dir=cache_dir, device=device,
                          wandb=tracking)  # fmt: skip
        fit(opts)
        payloads[name] = evaluate(run, tests, device=device, cache_dir=cache_dir, wandb=tracking)
    print(f"fitted {method} on {shots} shots/class of the source domain -> {out / 'run'}")
    print(format_metrics(payloads[method], ["target", "source_heldout"]))
    print(compare_table(payloads["zero_shot_clip"], payloads[method], method, shots))
    figure = draw_overlays(out / "run", target, out / "overlays", device, cache_dir)
    if figure is not None:
        print(f"heat maps: {figure}")
    print(f"metrics: {out / 'run' / 'metrics.json'} (zero-shot: {out / 'zero_shot' / 'metrics.json'})")
    if str(backbone.pretrained) == "synth":
        print(SYNTH_NOTE)
    return {**payloads[method], "zero_shot": payloads["zero_shot_clip"]}


def compare_table(zero_shot: dict, adapted: dict, method: str, shots: int) -> str:
    """Zero-shot CLIP vs the adapted method, per test set and metric, as aligned text."""
    head = f"{'test':16s} {'metric':28s} {'zero_shot_clip':>15s} {f'{method} ({shots}-shot)':>24s}"
    lines = ["zero-shot vs adapted (same backbone, same test images):", head, "-" * len(head)]
    for test in ("target", "source_heldout"):
        for key, label in COMPARED:
            before = zero_shot["tests"].get(test, {}).get(key)
            after = adapted["tests"].get(test, {}).get(key)
            if before is None and after is None:
                continue
            lines.append(f"{test:16s} {label:28s} {_fmt(before):>15s} {_fmt(after):>24s}")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


@torch.no_grad()
def draw_overlays(run: Path, manifest_path: Path, out: Path, device: str, cache_dir, count: int = 6) -> Path | None:
    """Overlays of the first ``count`` abnormal target images, one PNG each plus a montage."""
    method, config = load_run(run, device)
    stamp = weights_stamp(config)  # burnt into every PNG of a random/synthetic-weights run
    value_range = read_json(run / "support.json").get("map_range")
    samples = [s for s in read_manifest(manifest_path) if s.has_mask][:count]
    extractor = FeatureExtractor(method.backbone, FeatureCache(cache_dir), method.feature_request())
    panels = []
    for chunk, feats in extractor.iter_batches(samples):
        feats.cls = feats.cls.to(method.backbone.device)
        feats.patches = feats.patches.to(method.backbone.device) if feats.patches is not None else None
        pred = method.predict_features(feats)
        if pred.anomaly_map is None:
            return None
        for sample, amap in zip(chunk, pred.anomaly_map.cpu().numpy(), strict=True):
            image = load_rgb(sample.image)
            mask = load_mask(sample.masks, image.size, sample.image)
            panel = overlay(image, amap, tuple(value_range) if value_range else None, mask=mask)
            save_png(label_image(panel, stamp), out / f"{sample.id.replace('/', '__')}.png", comment=stamp)
            panels.append(panel)
    if not panels:
        return None
    figure = out / "montage.png"
    save_png(side_by_side(panels, height=192, caption=stamp), figure, comment=stamp)
    return figure
