"""Seconds per run of the few-shot classification baselines on cached CLS features.

    python benchmarks/bench_classifiers.py [--backbone usad-tiny|ViT-B-16] [--shots 4 8 16] [--seeds 0 1 2]
                                           [--methods ...] [--out results/bench/classifiers.json]

Every run goes through the normal runner path, ``usad_bench.runner.fit`` then ``evaluate``, with a
cache directory that is warmed first (the source's support candidates in both views, the test
set), so the figures are what a sweep over shots and seeds costs once features exist: loading the
backbone and the text prompts, reading cached features, searching / training, predicting and
scoring. Feature extraction itself is measured by ``bench_features.py``.

Images are synthetic (``usad_bench.data.synth``) and the backbone has **random weights**: the
figures are timing, not results; the AUROCs in the JSON only show the run completed.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from usad_bench.backbone import Backbone, BackboneSpec, resolve_device
from usad_bench.cache import FeatureCache
from usad_bench.data.manifest import read_manifest
from usad_bench.data.synth import synthesise
from usad_bench.features import FeatureExtractor
from usad_bench.io import read_json, write_json
from usad_bench.runner import FitOptions, evaluate, fit

METHODS = (
    "zero_shot_clip",
    "linear_probe",
    "lp_plus_plus",
    "clip_adapter",
    "tip_adapter",
    "tip_adapter_f",
    "coop",
    "cocoop",
)
# Options that make a method CLS-only, as in experiments/table_cls.yaml (zero-shot CLIP's maps need patch tokens).
OVERRIDES = {"zero_shot_clip": {"image_score": "classes", "maps": False}}
NOTICE = "random-weight timing, not results: synthetic images, randomly initialised backbone"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="usad-tiny", help="open_clip model name, random weights (e.g. ViT-B-16)")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--shots", nargs="+", type=int, default=[4, 8, 16])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--n-source", type=int, default=150, help="synthetic source images (>= 2 x 16 shots x 3 classes)")
    p.add_argument("--n-test", type=int, default=60, help="synthetic target-domain test images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run fastest on one)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--out", type=Path, default=Path("results/bench/classifiers.json"))
    return p.parse_args()


def prepare(work: Path, spec: BackboneSpec, args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """Synthesise source and target images at the model's size, and warm the feature cache with them."""
    backbone = Backbone.load(spec, resolve_device(args.device))
    size = backbone.image_size
    source = synthesise(work / "source", n=args.n_source, seed=0, style="source", size=size)
    target = synthesise(work / "target", n=args.n_test, seed=1, style="target", size=size)
    cache_dir = work / "cache"
    extractor = FeatureExtractor(backbone, FeatureCache(cache_dir), layers=())  # CLS only
    extractor.extract(read_manifest(source).samples, "orig")
    extractor.extract(read_manifest(source).samples, "hflip")  # the flipped view training / keys use
    extractor.extract(read_manifest(target).samples, "orig")
    return source, target, cache_dir


def one_run(method: str, shots: int, seed: int, paths, spec: BackboneSpec, args, work: Path) -> dict:
    source, target, cache_dir = paths
    run_dir = work / "runs" / method / f"k{shots}" / f"s{seed}"
    opts = FitOptions(
        method=method,
        train=source,
        shots=shots,
        seed=seed,
        out=run_dir,
        backbone=spec,
        overrides=dict(OVERRIDES.get(method, {})),
        cache_dir=cache_dir,
        device=args.device,
    )
    started = time.perf_counter()
    fit(opts)
    fitted = time.perf_counter()
    metrics = evaluate(run_dir, [("target", target)], device=args.device, cache_dir=cache_dir)
    done = time.perf_counter()
    timing = read_json(run_dir / "support.json")["timing"]
    test = metrics["tests"]["target"]
    return {
        "method": method,
        "shots": shots,
        "seed": seed,
        "fit_s": round(fitted - started, 3),
        "eval_s": round(done - fitted, 3),
        "total_s": round(done - started, 3),
        "load_s": round(timing["load_s"], 3),
        "features_s": round(timing["features_s"], 3),
        "train_s": round(timing["train_s"], 3),
        "cache_misses_at_eval": metrics["cache"].get("misses"),
        "cls_auroc_macro_random_weights": test.get("cls_auroc_macro"),
    }


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation of the seconds per run over seeds, per (method, shots)."""
    table = []
    for method in dict.fromkeys(r["method"] for r in rows):
        for shots in dict.fromkeys(r["shots"] for r in rows):
            runs = [r for r in rows if r["method"] == method and r["shots"] == shots]
            if not runs:
                continue
            total = [r["total_s"] for r in runs]
            table.append(
                {
                    "method": method,
                    "shots": shots,
                    "runs": len(runs),
                    "total_s_mean": round(statistics.mean(total), 3),
                    "total_s_std": round(statistics.pstdev(total), 3),
                    "train_s_mean": round(statistics.mean(r["train_s"] for r in runs), 3),
                    "eval_s_mean": round(statistics.mean(r["eval_s"] for r in runs), 3),
                }
            )
    return table


def print_table(table: list[dict], backbone: str) -> None:
    print(f"\n{NOTICE}\nbackbone {backbone}; seconds per run (fit + eval), mean ± std over seeds\n")
    shots = sorted({r["shots"] for r in table})
    print(f"{'method':16s}" + "".join(f"{f'{k} shots':>18s}" for k in shots))
    for method in dict.fromkeys(r["method"] for r in table):
        rows = [r for r in table if r["method"] == method]
        cells = {r["shots"]: f"{r['total_s_mean']:.2f} ± {r['total_s_std']:.2f}" for r in rows}
        print(f"{method:16s}" + "".join(f"{cells.get(k, '-'):>18s}" for k in shots))


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.ERROR)  # the random-weights notice, once per run
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # per-run Trainer banners
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    spec = BackboneSpec(name=args.backbone, pretrained=None)
    work = args.work or Path(tempfile.mkdtemp(prefix="usad-bench-cls-"))
    try:
        started = time.perf_counter()
        paths = prepare(work, spec, args)
        prepare_s = time.perf_counter() - started
        rows = []
        for method in args.methods:
            for shots in args.shots:
                for seed in args.seeds:
                    rows.append(one_run(method, shots, seed, paths, spec, args, work))
                    print(f"{method} k={shots} s={seed}: {rows[-1]['total_s']:.2f} s", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    table = summarise(rows)
    print_table(table, args.backbone)
    write_json(
        args.out,
        {
            "warning": NOTICE,
            "backbone": args.backbone,
            "weights": "random",
            "device": args.device,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "n_source_images": args.n_source,
            "n_test_images": args.n_test,
            "prepare_s": round(prepare_s, 3),
            "summary": table,
            "runs": rows,
        },
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
