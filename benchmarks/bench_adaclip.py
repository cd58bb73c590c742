"""Wall time per stage of ``adaclip`` (random weights; CPU unless a GPU is present): what is cached once per
image, one training step (batch 1) and one prediction, with the share of each part, the saving of the
cached prefix over re-encoding every step from the image, and the shared text prefix (an image's start token
and prompts run once for all its sentences, ``stream.run_text_shared_prompts``) against every sentence
through every text block, measured in the same run.

    python benchmarks/bench_adaclip.py [--model ViT-B-16] [--steps 5] [--threads 1]
    -> results/bench/adaclip_stages.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from usad_bench.backbone import Backbone, BackboneSpec
from usad_bench.feature_kinds import STREAM, FeatureRequest
from usad_bench.io import write_json
from usad_bench.methods.adaclip import AdaCLIP, AdaCLIPConfig
from usad_bench.methods.base import Task
from usad_bench.prompts import load_prompts

OUT = Path(__file__).resolve().parents[1] / "results" / "bench" / "adaclip_stages.json"


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = Backbone.load(BackboneSpec(name=args.model, pretrained=None, activation="gelu"), device=device)
    task = Task(["normal", "benign", "malignant"], 4, "bench", load_prompts("april_gan"), backbone.image_size)
    method = AdaCLIP(AdaCLIPConfig(), backbone, task).to(device)
    size = backbone.image_size
    image = torch.rand(1, 3, size, size, device=device)
    request = FeatureRequest(kind=STREAM, layers=(0,))
    feats = backbone.encode_features(image, request)
    mask = torch.zeros(1, size, size, device=device)
    mask[:, size // 4 : size // 2, size // 4 : size // 2] = 1
    optimiser = method.configure_optimizers()
    frozen = feats.cls

    def step():
        losses = method.losses(
            feats, mask, torch.ones(1, device=device), torch.ones(1, dtype=torch.bool, device=device)
        )
        optimiser.zero_grad()
        sum(losses.values()).backward()
        optimiser.step()

    def hsf():
        with torch.no_grad():
            cls, patches, text = method.encode(feats)
            method.similarities(cls, patches, text)

    def reference(fn):  # the same call with every sentence through every text block (issue 16's before)
        def run():
            method.shared_text_prefix = False
            try:
                return fn()
            finally:
                method.shared_text_prefix = True

        return run

    r = args.steps
    stages = {
        "cache_per_image (ln_pre output + frozen CLS: one frozen forward)": timed(
            lambda: backbone.encode_features(image, request), r
        ),
        "train_step (forward + backward + AdamW, batch 1)": timed(step, r),
        "predict_per_image": timed(lambda: method.predict_features(feats), r),
        "forward: text tower, 48 sentences": timed(lambda: method.text_features(frozen), r),
        "forward: image encode (prompted blocks + text) no grad": timed(lambda: method.encode(feats), r),
        "forward: encode + similarities incl. HSF k-means": timed(hsf, r),
        "reference text path: train_step": timed(reference(step), r),
        "reference text path: predict_per_image": timed(reference(lambda: method.predict_features(feats)), r),
        "reference text path: text tower, 48 sentences": timed(reference(lambda: method.text_features(frozen)), r),
    }
    seconds = {k: round(v, 4) for k, v in stages.items()}
    cache, train = (
        stages["cache_per_image (ln_pre output + frozen CLS: one frozen forward)"],
        stages["train_step (forward + backward + AdamW, batch 1)"],
    )
    result = {
        "model": args.model,
        "weights": "random (not a benchmark of accuracy)",
        "device": device,
        "threads": args.threads,
        "image_size": size,
        "median_seconds": seconds,
        "step_from_image_over_cached_step": round((train + cache) / train, 3),
        "shared_text_prefix_speedup": {
            name: round(stages[f"reference text path: {name}"] / stages[key], 2)
            for name, key in (
                ("train_step", "train_step (forward + backward + AdamW, batch 1)"),
                ("predict_per_image", "predict_per_image"),
                ("text tower, 48 sentences", "forward: text tower, 48 sentences"),
            )
        },
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "note": "re-encoding from the image would add the patch embedding and the frozen forward (for the "
        "dynamic prompts' CLS) to every step; the ratio is (step + cache) / step from this one run",
    }
    write_json(args.out, result)
    for name, value in seconds.items():
        print(f"{name:70s} {value:.3f} s")
    print("step from image / cached step:", result["step_from_image_over_cached_step"])
    print("shared text prefix (reference / shared):", result["shared_text_prefix_speedup"])


if __name__ == "__main__":
    main()
