"""Feature-extraction throughput: the cache path (cold and warm) against a bare ``encode_image``.

    python benchmarks/bench_features.py --out results/bench/features.json [--model ViT-B-16] [--n 64]

* bare: ``model.encode_image`` on pre-decoded, pre-normalised tensors — the ceiling.
* cold: ``FeatureExtractor.extract`` with an empty cache: hash each file, decode, preprocess,
  encode (CLS + patch tokens of four blocks), write one safetensors entry per image.
* warm: the same call again: hash each file, read and verify the entries.

Random weights are fine for speed (the arithmetic does not depend on the values). Images are
synthetic ultrasound-like PNGs at the model's input size. Figures are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from usad_bench.backbone import Backbone, BackboneSpec, default_layers, resolve_device
from usad_bench.cache import FeatureCache
from usad_bench.data.manifest import read_manifest
from usad_bench.data.synth import synthesise
from usad_bench.features import FeatureExtractor
from usad_bench.io import write_json


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--n", type=int, default=64, help="images per pass")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("results/bench/features.json"))
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_encode(backbone: Backbone, images: torch.Tensor, batch_size: int) -> float:
    """Seconds for encode_image over pre-made tensors (one warm-up batch first)."""
    device = backbone.device
    with torch.no_grad():
        backbone.model.encode_image(images[:batch_size].to(device))
        sync(device)
        started = time.perf_counter()
        for i in range(0, len(images), batch_size):
            backbone.model.encode_image(images[i : i + batch_size].to(device))
        sync(device)
    return time.perf_counter() - started


def timed_extract(extractor: FeatureExtractor, samples) -> float:
    sync(extractor.backbone.device)
    started = time.perf_counter()
    extractor.extract(samples)
    sync(extractor.backbone.device)
    return time.perf_counter() - started


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one (platform.processor() is often empty on Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    backbone = Backbone.load(BackboneSpec(name=args.model, pretrained=None, image_size=args.image_size), device)
    layers = default_layers(backbone.num_layers)
    work = Path(tempfile.mkdtemp(prefix="usad-bench-"))
    try:
        samples = read_manifest(synthesise(work / "images", n=args.n, seed=0, size=args.image_size)).samples
        cache = FeatureCache(work / "cache")
        extractor = FeatureExtractor(backbone, cache, layers, batch_size=args.batch_size)
        extractor.extract(samples[: args.batch_size])  # warm-up: first-call overheads, not counted
        shutil.rmtree(work / "cache")
        images = torch.stack([extractor.preprocess.load(s) for s in samples])
        bare_s = bare_encode(backbone, images, args.batch_size)
        cold_s = timed_extract(extractor, samples)
        warm_s = timed_extract(extractor, samples)
        entry_bytes = sum(p.stat().st_size for p in (work / "cache").rglob("*.safetensors")) / len(samples)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "model": args.model,
        "weights": "random (speed only)",
        "image_size": args.image_size,
        "layers": list(layers),
        "n_images": args.n,
        "batch_size": args.batch_size,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "images_per_s": {
            "bare_encode_image": round(args.n / bare_s, 2),
            "cache_cold": round(args.n / cold_s, 2),
            "cache_warm": round(args.n / warm_s, 2),
        },
        "cache_entry_mb": round(entry_bytes / 2**20, 3),
    }
    write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
