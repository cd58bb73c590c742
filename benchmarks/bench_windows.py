"""WinCLIP's window features (feature kind ``windows``): seconds per image, the last block run for the CLS
alone (``feature_kinds._window_cls``) vs the whole last block (the computation before issue 16's change).

    python benchmarks/bench_windows.py [--backbone ViT-B-16] [--scales 2 3] [--repeats 3] [--threads 1]

Both are timed in one process on the same random image, alternating, median of ``--repeats`` after a
warm-up; the script also checks that both give the same window embeddings. Writes results/bench/windows.json.
The backbone has **random weights**: timing, not results.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from unittest import mock

import torch

from usad_bench import feature_kinds
from usad_bench.backbone import Backbone, BackboneSpec
from usad_bench.feature_kinds import WINDOWS, FeatureRequest
from usad_bench.io import write_json

OUT = Path(__file__).resolve().parent.parent / "results" / "bench" / "windows.json"


def whole_last_block(visual, windows: torch.Tensor) -> torch.Tensor:
    """The reference: every position through every block, then the CLS read."""
    return visual.ln_post(feature_kinds._run_blocks(visual, visual.ln_pre(windows))[:, 0]) @ visual.proj


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 3])  # WinCLIP's few-shot scales
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights" line
    backbone = Backbone.load(BackboneSpec(name=args.backbone, pretrained=None), device="cpu")
    image = torch.rand(1, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(0))
    request = FeatureRequest(WINDOWS, scales=tuple(args.scales))

    def encode():
        with torch.no_grad():
            return backbone.encode_features(image, request)

    def encode_reference():
        with mock.patch.object(feature_kinds, "_window_cls", whole_last_block):
            return encode()

    cls_alone, fast = timed(encode, args.repeats)
    whole, reference = timed(encode_reference, args.repeats)
    worst = max((fast.windows[s] - reference.windows[s]).abs().max().item() for s in args.scales)
    result = {
        "backbone": args.backbone,
        "weights": "random (timing only, not results)",
        "threads": args.threads,
        "scales": args.scales,
        "windows_per_image": {s: int(fast.windows[s].shape[1]) for s in args.scales},
        "seconds_per_image": {"last_block_cls_alone": round(cls_alone, 3), "whole_last_block": round(whole, 3)},
        "speedup": round(whole / cls_alone, 3),
        "max_abs_difference": worst,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "command": "python benchmarks/bench_windows.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k != "out"
        ),
    }
    write_json(args.out, result)
    print(
        f"{args.backbone}, {args.threads} thread(s), scales {args.scales}: windows per image "
        f"{result['windows_per_image']}"
    )
    print(
        f"last block, CLS alone {cls_alone:.2f} s/image; whole last block {whole:.2f} s/image; "
        f"{result['speedup']:.3f}x; max |difference| {worst:.2e}"
    )


if __name__ == "__main__":
    main()
