"""Fixed-prompt text encoding: all 77 positions vs cut at the end-of-text token vs the process memo.

    python benchmarks/bench_text.py [--backbone ViT-B-16] [--methods zero_shot_clip ultraad] [--threads 1]

For each method, its set-up (``runner.build_method``: prompt ensembles through the frozen text tower)
is timed three ways in one process: ``full`` (open_clip's ``encode_text`` over 77 positions, the
code before issue 16's last change), ``cut`` (``Backbone.encode_text``, memo cleared), ``memo`` (a
second build: what a sweep's evaluation, or the next seed, pays). Writes results/bench/text.json.
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

from usad_bench import backbone as backbone_module
from usad_bench.backbone import Backbone, BackboneSpec
from usad_bench.io import write_json
from usad_bench.runner import build_method
from usad_bench.sweep import load_experiment, override_grid

REPO = Path(__file__).resolve().parent.parent
CLASSES = ["normal", "benign", "malignant"]


def entries(backbone: str) -> dict:
    found = {}
    for grid in ("table1", "table_cls"):
        exp = override_grid(load_experiment(REPO / f"experiments/{grid}.yaml"), {"backbone": backbone})
        for entry in exp.methods:
            found.setdefault(entry.label, entry)
    return found


def time_build(entry, backbone: Backbone) -> float:
    started = time.perf_counter()
    build_method(entry.method, entry.overrides, backbone, CLASSES, 4, [])
    return round(time.perf_counter() - started, 2)


def full_length(self, texts):  # the previous Backbone.encode_text: every one of the 77 positions, no memo
    with torch.no_grad():
        return self.model.encode_text(self.tokenize(texts)).float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="ViT-B-16")
    p.add_argument("--methods", nargs="+", default=["zero_shot_clip", "april_gan", "ultraad", "tip_adapter"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "results/bench/text.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.threads)
    os.chdir(REPO)
    backbone = Backbone.load(BackboneSpec(name=args.backbone, pretrained=None), "cpu")
    known, figures = entries(args.backbone), {}
    for label in args.methods:
        with mock.patch.object(Backbone, "encode_text", full_length):
            full = time_build(known[label], backbone)
        backbone_module._TEXT_MEMO.clear()
        cut = time_build(known[label], backbone)
        memo = time_build(known[label], backbone)
        figures[label] = {"full_s": full, "cut_s": cut, "memo_s": memo, "cut_speedup": round(full / max(cut, 1e-3), 2)}
        print(f"{label:<16} full {full:7.2f}s  cut {cut:7.2f}s  memo {memo:7.2f}s")
    write_json(
        args.out,
        {
            "notice": "random-weight timing, not results; method set-up (prompt encoding) on a shared CPU",
            "backbone": args.backbone,
            "torch_threads": torch.get_num_threads(),
            "load_average_at_end": os.getloadavg(),
            "methods": figures,
        },
    )


if __name__ == "__main__":
    main()
