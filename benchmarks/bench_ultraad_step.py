"""UltraAD's exact shortcuts, each timed against its straightforward path in the same run.

    python benchmarks/bench_ultraad_step.py [--backbones ViT-B-16 usad-tiny] [--threads 1] [--repeats 7]
                                            [--pixel-images 200] [--out results/bench/ultraad_step.json]

Per backbone (random weights, at its own input size: 224 px for ViT-B-16), one UltraAD with the
default recipe, on random features of the right shapes (batch 8 for a training step, 16 for a
prediction):

* ``train_step`` (forward + backward) and ``predict`` with every shortcut off (the reference), with
  each shortcut alone (``text_prefix``: the prompts' fixed words through the causal text tower
  once; ``pif_fold``: PIF's key/value projections folded onto its two queries; ``logit_diff``: one
  upsampled logit difference through a sigmoid instead of two-channel softmax maps), and with all;
* ``pixel_metrics`` on N random 224 x 224 float32 maps with lesion masks: the curve and AUPRO each
  with its own stable argsort (the reference) against one shared packed integer sort.

Timings are CPU seconds of this process (``time.process_time``; wall time on a shared machine mostly
measures the other jobs), alternate between the variants and report the median of ``--repeats``;
every figure is a ratio against the reference measured in the same run. The
shortcuts are exact: the JSON also records the largest difference of outputs against the reference.
Random weights: timing, not results.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from usad_bench import metrics
from usad_bench.backbone import Backbone, BackboneSpec, ImageFeatures
from usad_bench.io import write_json
from usad_bench.methods.base import Task, batch_features
from usad_bench.methods.ultraad import SHORTCUTS, UltraAD, UltraADConfig
from usad_bench.prompts import load_prompts

CLASSES = ["normal", "benign", "malignant"]
SHOTS = 4
NOTICE = "random-weight timing, not results: random features, randomly initialised backbone"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", default=["ViT-B-16", "usad-tiny"], help="open_clip names, random weights")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the issue's profile used 1 and 2)")
    p.add_argument("--repeats", type=int, default=7, help="timed repetitions per variant (median reported)")
    p.add_argument("--pixel-images", type=int, default=200, help="224 x 224 maps for the pixel-metric timing")
    p.add_argument("--out", type=Path, default=Path("results/bench/ultraad_step.json"))
    return p.parse_args()


def build(backbone: Backbone) -> tuple[UltraAD, dict, dict]:
    """An UltraAD with a filled random memory, a training batch of 8 and prediction features of 16 images."""
    torch.manual_seed(0)
    task = Task(CLASSES, SHOTS, "busi", load_prompts("breast_ultrasound"), backbone.image_size)
    method = UltraAD(UltraADConfig(), backbone, task)
    dim, k = backbone.embed_dim, task.n_support
    labels = torch.arange(k) % len(CLASSES)
    method.memory.fill(
        torch.nn.functional.normalize(torch.randn(k, dim), dim=-1), method.class_descriptions[labels], labels
    )
    torch.nn.init.normal_(method.mini_net.net[-1].weight, std=0.05)  # a trained-like MiniNet, not the zero init
    n_tokens = backbone.grid[0] * backbone.grid[1]
    size = backbone.image_size

    def features(b: int) -> dict:
        return {
            "cls": torch.randn(b, dim),
            "patches": torch.randn(b, len(method.layers), n_tokens, backbone.vision_width),
        }

    mask = torch.zeros(8, size, size)
    mask[:4, size // 4 : size // 2, size // 4 : size // 2] = 1.0  # four lesions, four normal images
    batch = {
        **features(8),
        "mask": mask,
        "pixel_truth": torch.ones(8, dtype=torch.bool),
        "label": torch.tensor([1, 2, 1, 2, 0, 0, 0, 0]),
    }
    return method, batch, features(16)


def timed(fn: Callable[[], object]) -> float:
    """CPU seconds of this process: on a shared, oversubscribed machine wall time mostly measures the others."""
    started = time.process_time()
    fn()
    return time.process_time() - started


def compare(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per variant, the variants alternating within each repetition (after one warm-up)."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def step_variants(method: UltraAD, batch: dict, feats: dict) -> tuple[dict, dict]:
    """Closures per shortcut setting: one training step (forward + backward) and one prediction."""
    settings = {"reference": set(), **{name: {name} for name in sorted(SHORTCUTS)}, "all": set(SHORTCUTS)}
    image_feats = ImageFeatures(cls=feats["cls"], patches=feats["patches"], layers=method.layers)

    def train_step(shortcuts: set[str]) -> Callable[[], object]:
        def run():
            method.shortcuts = shortcuts
            method.train()
            method.zero_grad()
            parts, logits = method.forward_parts(batch_features(batch, method.layers))
            loss = sum(method.losses(parts, logits, batch).values())
            loss.backward()
            return loss.detach()

        return run

    def predict(shortcuts: set[str]) -> Callable[[], object]:
        def run():
            method.shortcuts = shortcuts
            method.eval()
            return method.predict_features(image_feats)

        return run

    return (
        {name: train_step(s) for name, s in settings.items()},
        {name: predict(s) for name, s in settings.items()},
    )


def bench_backbone(name: str, repeats: int) -> dict:
    backbone = Backbone.load(BackboneSpec(name=name, pretrained=None))
    method, batch, feats = build(backbone)
    train_fns, predict_fns = step_variants(method, batch, feats)
    fast, reference = predict_fns["all"](), predict_fns["reference"]()
    loss_fast, loss_reference = train_fns["all"](), train_fns["reference"]()
    out = {
        "image_size": backbone.image_size,
        "text_prefix_positions": int(method.prompt_learner.prefix.shape[2]) if method.prompt_learner.use_prefix else 0,
        "text_positions": int(method.prompt_learner.tokens.shape[1]),
        "max_abs_diff": {
            "map": float((fast.anomaly_map - reference.anomaly_map).abs().max()),
            "score": float((fast.score - reference.score).abs().max()),
            "class_logits": float((fast.class_logits - reference.class_logits).abs().max()),
            "train_loss": float((loss_fast - loss_reference).abs()),
        },
    }
    for stage, fns in (("train_step", train_fns), ("predict", predict_fns)):
        seconds = compare(fns, repeats)
        out[stage] = {
            "seconds": {k: round(v, 5) for k, v in seconds.items()},
            "speedup_vs_reference": {k: round(seconds["reference"] / v, 3) for k, v in seconds.items()},
        }
    return out


def bench_pixel_metrics(n_images: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    masks = np.zeros((n_images, 224, 224), bool)
    for i in range(0, n_images, 2):  # half the images have a lesion, the rest are normal
        y, x = rng.integers(20, 150, size=2)
        masks[i, y : y + 50, x : x + 60] = True
    maps = (rng.random(masks.shape, dtype=np.float32) * 0.6 + masks * 0.3).astype(np.float32)
    maps = np.round(maps, 3).astype(np.float32)  # ties, as real maps have after saturation

    def reference() -> dict:
        curve = metrics.curve_metrics(masks, maps, metrics.rank_descending(maps, packed=False))
        return {
            "pixel_auroc": curve["auroc"],
            "pixel_ap": curve["ap"],
            "pixel_f1_max": curve["f1_max"],
            "aupro": metrics.aupro(masks, maps, ranking=metrics.rank_descending(maps, packed=False)),
        }

    def shared() -> dict:
        return metrics.pixel_metrics(masks, maps)

    identical = reference() == shared()
    seconds = compare({"reference": reference, "shared_sort": shared}, max(1, repeats // 2))
    return {
        "pixels": int(masks.size),
        "identical": identical,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "speedup": round(seconds["reference"] / seconds["shared_sort"], 3),
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "notice": NOTICE,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": args.threads},
        "clock": "process CPU seconds (time.process_time), median of repeats",
        "torch": torch.__version__,
        "repeats": args.repeats,
        "backbones": {},
    }
    for name in args.backbones:
        result["backbones"][name] = bench_backbone(name, args.repeats)
        stages = result["backbones"][name]
        print(name, {stage: stages[stage]["speedup_vs_reference"] for stage in ("train_step", "predict")})
    result["pixel_metrics"] = bench_pixel_metrics(args.pixel_images, args.repeats)
    print("pixel_metrics", result["pixel_metrics"])
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
