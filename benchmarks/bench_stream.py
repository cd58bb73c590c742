"""What MVFA's cached prefix saves: a training step and a prediction from the cached stream vs from the image.

    python benchmarks/bench_stream.py [--backbone ViT-B-16] [--image-size 0] [--threads 2] [--repeats 5]
                                      [--out results/bench/stream.json]

One MVFA (random backbone weights, default recipe: adapters at 3/6/9/12 of ViT-B-16's 12 blocks, so the
cache holds the stream leaving block 3) on random inputs:

* ``train_step``: adapters + blocks after the first adapted one, forward and backward, batch 1 (MVFA's);
  ``from_cache`` starts from the cached (1, 1 + N, W) stream, ``from_image`` first runs patch embedding
  and the frozen blocks up to the first adapted one (no gradient), as a pipeline without the cache would;
* ``predict``: the same for a batch of 16 test images (memory of 8 normal views already built);
* ``prefix``: the cost of computing the cached part once per image (what the cache pays once).

Timings are CPU seconds of this process (``time.process_time``: on a shared machine wall time mostly
measures the other jobs), the variants alternate, the median of ``--repeats`` is reported, and the
saving is the ratio from_image / from_cache measured in the same run. Random weights: timing, not results.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from usad_bench.backbone import Backbone, BackboneSpec, ImageFeatures
from usad_bench.io import write_json
from usad_bench.methods.base import Task
from usad_bench.methods.mvfa import Mvfa, MvfaConfig
from usad_bench.prompts import load_prompts
from usad_bench.stream import embed_stream, run_visual_blocks

NOTICE = "random-weight timing, not results: random images, randomly initialised backbone"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="ViT-B-16", help="open_clip name, random weights")
    p.add_argument("--image-size", type=int, default=0, help="input size override (0 = the model's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("results/bench/stream.json"))
    return p.parse_args()


def build(args) -> Mvfa:
    spec = BackboneSpec(name=args.backbone, pretrained=None, image_size=args.image_size or None, activation="gelu")
    backbone = Backbone.load(spec)
    task = Task(["normal", "benign", "malignant"], 4, "busi", load_prompts("april_gan"), backbone.image_size)
    torch.manual_seed(0)
    method = Mvfa(MvfaConfig(), backbone, task)
    method.log = lambda *a, **k: None  # no Trainer here
    return method


def prefix(method: Mvfa, images: torch.Tensor) -> torch.Tensor:
    """What the cache holds: the stream leaving the first adapted block, (B, 1 + N, W)."""
    visual = method.backbone.visual
    with torch.no_grad():
        return run_visual_blocks(visual, embed_stream(visual, images), 0, stop=method.layers[0])


def train_step(method: Mvfa, stream: torch.Tensor, batch: dict) -> None:
    method.zero_grad()
    method.training_step({**batch, "patches": stream.unsqueeze(1)}, 0).backward()


def predict(method: Mvfa, stream: torch.Tensor) -> None:
    cls = torch.zeros(stream.shape[0], method.backbone.embed_dim)  # unused by MVFA's prediction
    method.predict_features(ImageFeatures(cls=cls, patches=stream.unsqueeze(1), layers=(method.layers[0],)))


def timed(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    method = build(args)
    size = method.backbone.image_size
    gen = torch.Generator().manual_seed(0)
    image1, images16 = torch.rand(1, 3, size, size, generator=gen), torch.rand(16, 3, size, size, generator=gen)
    mask = torch.zeros(1, size, size)
    mask[:, size // 4 : size // 2, size // 4 : size // 2] = 1.0
    batch = {"is_anomaly": torch.ones(1), "pixel_truth": torch.ones(1, dtype=torch.bool), "mask": mask}
    method.support_stream = prefix(method, torch.rand(8, 3, size, size, generator=gen))
    method.memory()  # built once after training, as in a run
    cached1, cached16 = prefix(method, image1), prefix(method, images16)
    stages = {
        "train_step": (
            lambda: train_step(method, cached1, batch),
            lambda: train_step(method, prefix(method, image1), batch),
        ),
        "predict_16": (lambda: predict(method, cached16), lambda: predict(method, prefix(method, images16))),
    }
    times = {name: {"from_cache": [], "from_image": []} for name in stages}
    prefix_times = []
    for name, (cached, full) in stages.items():
        cached(), full()  # warm-up
        for _ in range(args.repeats):
            times[name]["from_cache"].append(timed(cached))
            times[name]["from_image"].append(timed(full))
    for _ in range(args.repeats):
        prefix_times.append(timed(lambda: prefix(method, images16)))
    report = {name: _summary(t) for name, t in times.items()}
    write_json(args.out, {
        "notice": NOTICE,
        "backbone": args.backbone,
        "image_size": size,
        "layers": list(method.layers),
        "cached_block": method.layers[0],
        "num_layers": method.backbone.num_layers,
        "threads": args.threads,
        "repeats": args.repeats,
        "cpu_seconds_median": report,
        "prefix_16_images_cpu_s": round(statistics.median(prefix_times), 4),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "processor": platform.processor()},
    })  # fmt: skip
    print({k: v["saving"] for k, v in report.items()}, "->", args.out)


def _summary(t: dict) -> dict:
    cached, full = statistics.median(t["from_cache"]), statistics.median(t["from_image"])
    return {"from_cache": round(cached, 4), "from_image": round(full, 4), "saving": round(full / cached, 3)}


if __name__ == "__main__":
    main()
