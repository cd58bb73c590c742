"""Synthetic figures of ``usad-tiny --pretrained synth`` through the command line (docs/pretraining.md, section 4).

    python benchmarks/pretrained_figures.py [--work runs/pretrained_figures] [--shots 4 16] [--seeds 0]
                                            [--methods ...] [--out results/pretrained_synth/figures.json]

1. ``usad-bench data synth`` a source domain (the ``source`` style, inside the pretraining range) and a
   target domain in the ``target`` style, which pretraining never saw (new patients in both);
2. for every method and shot count, ``usad-bench fit`` on k shots per class of the source and
   ``usad-bench eval`` on the target, with ``--backbone usad-tiny --pretrained synth``;
3. collect each run's metrics.json into one JSON and print a Markdown table.

The model was pretrained on synthetic images only; it is for offline checks and teaching, not a clinical
model, and these figures are synthetic, not results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from usad_bench.io import write_json

CLI = [sys.executable, "-m", "usad_bench.cli"]
METHODS = (
    "zero_shot_clip",
    "ultraad",
    "linear_probe",
    "lp_plus_plus",
    "clip_adapter",
    "tip_adapter",
    "tip_adapter_f",
    "coop",
    "cocoop",
)
KEYS = ("image_auroc", "pixel_auroc", "cls_auroc_macro", "cls_auroc_malignant_vs_benign")
NOTE = (
    "usad-tiny --pretrained synth: pretrained on synthetic images only, for offline checks and teaching, not a "
    "clinical model; these figures are synthetic, not results"
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/pretrained_figures"))
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--shots", nargs="+", type=int, default=[4, 16])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--n-source", type=int, default=150)
    p.add_argument("--n-target", type=int, default=150)
    p.add_argument("--pretrained", default="synth", help="usad-tiny weights (default: the built-in synth weights)")
    p.add_argument("--out", type=Path, default=Path("results/pretrained_synth/figures.json"))
    return p.parse_args()


def cli(*args: str) -> None:
    print("$ usad-bench " + " ".join(args), flush=True)
    subprocess.run([*CLI, *args], check=True)


def run_one(args, method: str, shots: int, seed: int, source: Path, target: Path) -> dict:
    run = args.work / "runs" / f"{method}_k{shots}_s{seed}"
    backbone = ["--backbone", "usad-tiny", "--pretrained", args.pretrained, "--device", "cpu"]
    cache = ["--cache-dir", str(args.work / "cache")]
    if not (run / "metrics.json").is_file():
        cli("fit", "--method", method, "--train", str(source), "--shots", str(shots), "--seed", str(seed),
            "--out", str(run), *backbone, *cache)  # fmt: skip
        cli("eval", "--run", str(run), "--test", f"target={target}", "--device", "cpu", *cache)
    metrics = json.loads((run / "metrics.json").read_text())["tests"]["target"]
    return {k: metrics.get(k) for k in KEYS}


def table(results: dict, shots: list[int]) -> str:
    """Markdown: one row per method, class macro AUROC per shot count (mean over seeds), other metrics at k=4."""
    head = ["method", *[f"class macro AUROC, {k} shots" for k in shots], "image AUROC (4)", "pixel AUROC (4)",
            "malignant-vs-benign (4)"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, by_shots in results.items():
        cells = [method] + [_mean(by_shots.get(str(k), []), "cls_auroc_macro") for k in shots]
        first = by_shots.get(str(shots[0]), [])
        cells += [_mean(first, key) for key in ("image_auroc", "pixel_auroc", "cls_auroc_malignant_vs_benign")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    return f"{statistics.mean(values):.3f}" if values else "–"


def main() -> None:
    args = parse_args()
    source, target = args.work / "data" / "source", args.work / "data" / "target"
    cli("data", "synth", str(source), "--n", str(args.n_source), "--seed", "0", "--domain", "source")
    cli("data", "synth", str(target), "--n", str(args.n_target), "--seed", "1000", "--domain", "target")
    results: dict = {}
    for method in args.methods:
        for shots in args.shots:
            rows = [
                run_one(args, method, shots, seed, source / "manifest.csv", target / "manifest.csv")
                for seed in args.seeds
            ]
            results.setdefault(method, {})[str(shots)] = rows
            write_json(args.out, {"note": NOTE, "seeds": args.seeds, "results": results})
    print(NOTE)
    print(table(results, args.shots))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
