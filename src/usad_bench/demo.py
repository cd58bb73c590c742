"""The built-in default job: synthetic source -> shifted target, end to end in about a minute on CPU.

1. synthesise a *source* and a visibly shifted *target* domain (gain, speckle grain, attenuation);
2. fit a method on k shots per class of the source;
3. evaluate it unchanged on the target (and on the source's held-out patients);
4. write metrics.json and heat-map overlays of target images with the true lesion outlined.

With the default tiny random backbone the figures only show that the pipeline works. Pass
``--backbone ViT-B-16 --pretrained openai`` (or a checkpoint file) to run the same job on a real
CLIP model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from usad_bench.backbone import BackboneSpec
from usad_bench.cache import FeatureCache
from usad_bench.data.images import load_mask, load_rgb
from usad_bench.data.manifest import read_manifest
from usad_bench.data.synth import synthesise
from usad_bench.features import FeatureExtractor
from usad_bench.io import read_json, save_png
from usad_bench.runner import FitOptions, evaluate, fit, load_run
from usad_bench.tables import format_metrics
from usad_bench.viz import overlay, side_by_side


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
) -> dict:
    """Run the demo under ``out``; ``cache_dir=None`` computes features without the cache."""
    out = Path(out)
    backbone = backbone or BackboneSpec(name="usad-tiny", pretrained=None)
    source = synthesise(out / "data" / "source", n=n, seed=seed, style="source")
    target = synthesise(out / "data" / "target", n=n, seed=seed + 1000, style="target")
    print(f"synthesised {n} source and {n} target images under {out / 'data'}")

    run = out / "run"
    opts = FitOptions(method, source, shots, seed, run, backbone, overrides or {}, cache_dir=cache_dir, device=device)
    fit(opts)
    print(f"fitted {method} on {shots} shots/class of the source domain -> {run}")
    payload = evaluate(run, [("target", target), ("source_heldout", source)], device=device, cache_dir=cache_dir)
    print(format_metrics(payload, ["target", "source_heldout"]))
    figure = draw_overlays(run, target, out / "overlays", device, cache_dir)
    if figure is not None:
        print(f"heat maps: {figure}")
    print(f"metrics: {run / 'metrics.json'}")
    return payload


@torch.no_grad()
def draw_overlays(run: Path, manifest_path: Path, out: Path, device: str, cache_dir, count: int = 6) -> Path | None:
    """Overlays of the first ``count`` abnormal target images, one PNG each plus a montage."""
    method, _ = load_run(run, device)
    value_range = read_json(run / "support.json").get("map_range")
    samples = [s for s in read_manifest(manifest_path) if s.has_mask][:count]
    extractor = FeatureExtractor(method.backbone, FeatureCache(cache_dir), method.feature_layers())
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
            save_png(panel, out / f"{sample.id.replace('/', '__')}.png")
            panels.append(panel)
    if not panels:
        return None
    figure = out / "montage.png"
    save_png(side_by_side(panels, height=192), figure)
    return figure
