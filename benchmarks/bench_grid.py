"""What the paper's grids cost: one representative run per method, scaled to each grid by its run counts.

    python benchmarks/bench_grid.py --source /tmp/data/bus_uclm/manifest.csv --target /tmp/data/busi/manifest.csv \\
        [--backbone ViT-B-16] [--methods ultraad coop ...] [--test-n 40] [--out results/bench/grid.json]

Each method runs through the normal runner path (``runner.fit`` then ``runner.evaluate``), at the
options its grid gives it (the first of experiments/{table1,table_cls,ablation}.yaml that names it),
on ``--shots`` shots of the source and a stratified, seeded subsample of ``--test-n`` test images
(``--test-n 0``: the whole test set). Methods run one after the other on ONE feature cache, as a
sweep does (its raw blocks planned first, ``usad_bench.feature_plan``): a method's first run ("cold")
computes only the features no earlier method cached, its second run ("warm") none.

Grid estimates (``derive``): the run counts of ``usad-bench sweep GRID --dry-run`` (every grid on a
fresh out folder) times each method's warm run (fit + loading the run + prediction scaled to the
full test sets by images), plus its test-feature extraction (cold - warm prediction, scaled) once,
plus its support extraction and prompt encoding (cold - warm fit) once per (shots, seed) draw.
"before": every grid fits and evaluates all its runs (table2 reuses table1's folder, so it costs
nothing); "after": runs with the same identity (method, options, backbone, source, shots, seed;
``run_store``) are fitted and evaluated once across the grids. Shots 8 and 16 are costed at the
measured shots' price (a lower bound for trained methods, whose epochs see more images). Methods not
measured are listed and left out of the totals. The backbone has **random weights**
(``--pretrained none``): timing, not results.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from usad_bench.backbone import BackboneSpec
from usad_bench.data.manifest import read_manifest, write_manifest
from usad_bench.feature_plan import plan_raw_layers
from usad_bench.io import read_json, write_json
from usad_bench.run_store import run_identity
from usad_bench.runner import FitOptions, evaluate, fit
from usad_bench.sweep import fit_options, load_experiment, override_grid

GRIDS = (
    "experiments/table1.yaml",
    "experiments/table2.yaml",
    "experiments/table_cls.yaml",
    "experiments/ablation.yaml",
)
NOTICE = "random-weight timing, not results: randomly initialised backbone; figures as measured on a shared CPU"
REPO = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, default=Path("/tmp/data/bus_uclm/manifest.csv"))
    p.add_argument("--target", type=Path, default=Path("/tmp/data/busi/manifest.csv"))
    p.add_argument(
        "--test-images",
        type=int,
        default=2655,
        help="images the grids test on per run (BUSI + BUS-BRA test sets; evaluation is scaled to it)",
    )
    p.add_argument("--backbone", default="ViT-B-16")
    p.add_argument("--methods", nargs="+", help="labels to measure (default: every label of the grids)")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-n", type=int, default=40, help="test images actually run (0 = all of --target)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--before-hours", type=float, default=5.8, help="today's estimate of the four grids (issue 16)")
    p.add_argument("--out", type=Path, default=Path("results/bench/grid.json"))
    p.add_argument(
        "--estimate-only", action="store_true", help="recompute the grid estimates of --out from its measured figures"
    )
    return p.parse_args()


def method_entries(backbone: str) -> dict:
    """label -> (grid name, MethodEntry): the first grid that names each label, in GRIDS order."""
    entries = {}
    for grid in GRIDS:
        exp = override_grid(load_experiment(REPO / grid), {"backbone": backbone, "pretrained": "none"})
        for entry in exp.methods:
            entries.setdefault(entry.label, (exp.name, entry))
    return entries


def subsample(manifest: Path, n: int, seed: int, folder: Path) -> tuple[Path, int]:
    """A stratified (by class), seeded subsample of ``manifest`` written as a manifest; (path, images)."""
    import random

    samples = read_manifest(manifest).samples
    if n and n < len(samples):
        rng, kept = random.Random(seed), []
        for label in sorted({s.label for s in samples}):
            group = [s for s in samples if s.label == label]
            kept += rng.sample(group, max(1, round(len(group) * n / len(samples))))
        samples = kept
    path = write_manifest(samples, folder / manifest.parent.name / "manifest.csv")
    return path, len(read_manifest(path))


def time_run(opts: FitOptions, test: Path, run: Path) -> dict:
    """Fit + eval seconds, and the stages the runner records (support.json, metrics.json)."""
    started = time.perf_counter()
    fit(opts)
    fitted = time.perf_counter()
    metrics = evaluate(run, [("target", test)], device=opts.device, cache_dir=opts.cache_dir)
    fit_s, eval_s = fitted - started, time.perf_counter() - fitted
    timing = read_json(run / "support.json").get("timing", {})
    stages = {name: round(timing.get(f"{name}_s", 0.0), 2) for name in ("load", "features", "train")}
    stages["build_calibrate_save"] = round(fit_s - sum(stages.values()), 2)  # method set-up, thresholds, files
    stages["predict"] = round(metrics["tests"]["target"]["eval_s"], 2)  # test features + scoring + metrics
    stages["eval_load"] = round(eval_s - stages["predict"], 2)  # loading the run (backbone, method) for eval
    return {"fit_s": round(fit_s, 2), "eval_s": round(eval_s, 2), "stages": stages, "cache": metrics.get("cache")}


def measure(args, entries: dict, test: Path, n_test: int, work: Path, report) -> dict:
    """Each method's cold and warm run; ``report(measured)`` after each method keeps partial figures."""
    spec = BackboneSpec(name=args.backbone, pretrained=None)
    cache = work / "cache"
    measured = {}

    def options(label: str, run: Path) -> FitOptions:
        entry = entries[label][1]
        return FitOptions(
            method=entry.method,
            label=label,
            train=args.source,
            shots=args.shots,
            seed=args.seed,
            out=run,
            backbone=spec,
            overrides=entry.overrides,
            cache_dir=cache,
            device=args.device,
        )

    labels = args.methods or list(entries)
    plan_raw_layers([options(label, work / "plan") for label in labels], torch.device(args.device))  # as sweep
    for label in labels:
        grid, entry = entries[label]
        result = {"grid": grid, "method": entry.method}
        for stage in ("cold", "warm"):
            run = work / "runs" / label / stage
            opts = options(label, run)
            try:
                result[stage] = time_run(opts, test, run)
            except Exception as exc:  # one method failing must not lose the others' figures
                result["error"] = f"{type(exc).__name__}: {exc}"[:300]
                break
            print(f"{label:<22} {stage:<5} fit {result[stage]['fit_s']:8.1f}s  eval {result[stage]['eval_s']:8.1f}s")
        measured[label] = result
        report(measured)
    return measured


def derive(result: dict, test_images: int, n_test: int) -> None:
    """A measured method's costs in a grid, from its cold and warm runs (seconds, full test sets).

    * ``run_s_full_test``: one run, warm cache: fit + loading the run for evaluation + prediction
      scaled from ``n_test`` to ``test_images`` images (only prediction grows with the test sets);
    * ``test_extraction_s_full_test``: the test images' features, paid once per method (cold - warm
      prediction, scaled), since every later run of the grid finds them cached;
    * ``support_extraction_s``: the support images' features and the one-off prompt encoding (cold -
      warm fit), paid once per (shots, seed) support set: the methods of a grid share those draws.
    """
    if "warm" not in result:
        return
    cold, warm, scale = result["cold"]["stages"], result["warm"]["stages"], test_images / n_test
    result["run_s_full_test"] = round(result["warm"]["fit_s"] + warm["eval_load"] + warm["predict"] * scale, 2)
    result["test_extraction_s_full_test"] = round(max(0.0, cold["predict"] - warm["predict"]) * scale, 2)
    result["support_extraction_s"] = round(max(0.0, result["cold"]["fit_s"] - result["warm"]["fit_s"]), 2)


def dry_run_counts(backbone: str, work: Path) -> dict:
    """Grid -> run count, as printed by `usad-bench sweep GRID --dry-run` on an empty out folder."""
    cli = Path(sys.executable).with_name("usad-bench")
    counts = {}
    for grid in GRIDS:
        out = work / "dry" / Path(grid).stem
        if Path(grid).stem == "table2":
            counts["table2"] = 0  # it writes into table1's folder (experiments/table2.yaml): nothing left to run
            continue
        command = [str(cli), "sweep", str(REPO / grid), "--dry-run", "--backbone", backbone]
        command += ["--pretrained", "none", "--out", str(out)]
        printed = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO).stdout
        counts[Path(grid).stem] = int(re.search(r": (\d+) runs in shard", printed).group(1))
    return counts


def costed_as(measured: dict, entry) -> dict | None:
    """The figures of this label, else of a measured label of the same method (ablation variants), else None."""
    same_method = [r for r in measured.values() if r.get("method") == entry.method and "run_s_full_test" in r]
    own = measured.get(entry.label, {})
    return own if "run_s_full_test" in own else (same_method[0] if same_method else None)


# The labels the grids had when issue 16 estimated them (5.8 h for 120 fits at ViT-B-16): its "today" figure
# is compared with these labels' estimate now; the grids have gained the detection baselines since.
ISSUE16_LABELS = frozenset(
    [
        "zero_shot_clip",
        "linear_adapter",
        "ultraad",
        "lp_plus_plus",
        "clip_adapter",
        "tip_adapter",
        "coop",
        "linear_probe",
        "cocoop",
        "tip_adapter_f",
        "ultraad-us-unaware",
        "ultraad-no-cls",
        "ultraad-no-pif",
    ]
)


def grid_estimates(args, measured: dict, counts: dict, only: frozenset | None = None) -> dict:
    """Seconds per grid before (every run of every grid) and after (identical runs shared across grids).

    ``only``: cost just these labels (the others are skipped, not reported missing).
    """
    seen, estimates, missing = set(), {}, set()
    keys_paid = set()
    for grid in GRIDS:
        name = Path(grid).stem
        exp = override_grid(load_experiment(REPO / grid), {"backbone": args.backbone, "pretrained": "none"})
        exp.data = {**exp.data, exp.source: args.source}  # the measured source stands in for the grid's path
        points = exp.points() if counts.get(name) else []
        before = after = 0.0
        points = [p for p in points if only is None or p.entry.label in only]
        for point in points:
            figures = costed_as(measured, point.entry)
            if figures is None:
                missing.add(point.entry.label)
                continue
            cost = figures["run_s_full_test"]
            extraction = 0.0
            if id(figures) not in keys_paid:  # test features are extracted once per key, then cached
                keys_paid.add(id(figures))
                extraction = figures["test_extraction_s_full_test"]
            if (id(figures), point.shots, point.seed) not in keys_paid:  # one support draw per (shots, seed)
                keys_paid.add((id(figures), point.shots, point.seed))
                extraction += figures["support_extraction_s"]
            identity = repr(sorted(run_identity(fit_options(exp, point, "cpu", None)).items()))
            before += cost + extraction
            after += 0.0 if identity in seen else cost + extraction
            seen.add(identity)
        estimates[name] = {
            "runs": len(points),
            "dry_run_runs": counts.get(name, 0),
            "before_h": round(before / 3600, 3),
            "after_h": round(after / 3600, 3),
        }
    estimates["all"] = {
        "runs": sum(e["runs"] for e in estimates.values()),
        "dry_run_runs": sum(e["dry_run_runs"] for e in estimates.values()),
        "before_h": round(sum(e["before_h"] for e in estimates.values()), 3),
        "after_h": round(sum(e["after_h"] for e in estimates.values()), 3),
    }
    return {"grids": estimates, "not_measured": sorted(missing)}


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.chdir(REPO)  # the grid files name configs relative to the repository
    entries = method_entries(args.backbone)
    unknown = sorted(set(args.methods or []) - set(entries))
    if unknown:
        sys.exit(f"error: {unknown} are not labels of {', '.join(GRIDS)}")
    if args.estimate_only:
        old = read_json(args.out)
        args.measured_on = old.get("machine")  # the measuring process's threads, not this one's
        print_summary(
            write_report(args, old["methods"], old["dry_run_counts"], old["test_images_run"], old["bench_wall_s"])
        )
        return
    with tempfile.TemporaryDirectory(prefix="bench-grid-") as tmp:
        work = Path(tmp)
        test, n_test = subsample(args.target, args.test_n, args.seed, work / "data")
        counts = dry_run_counts(args.backbone, work)
        started = time.perf_counter()

        def report(measured: dict) -> None:
            write_report(args, measured, counts, n_test, time.perf_counter() - started)

        measured = measure(args, entries, test, n_test, work, report)
    print_summary(write_report(args, measured, counts, n_test, time.perf_counter() - started))


def grid_by_method(args, measured: dict, grid: str = "experiments/table1.yaml") -> dict:
    """One grid's estimated hours per label and stage: warm-run fit and evaluation, feature extraction."""
    exp = override_grid(load_experiment(REPO / grid), {"backbone": args.backbone, "pretrained": "none"})
    rows = {}
    for point in exp.points():
        figures = costed_as(measured, point.entry)
        if figures is None:
            continue
        fit_s = figures["warm"]["fit_s"]
        row = rows.setdefault(point.entry.label, {"runs": 0, "fit": 0.0, "evaluate": 0.0, "draws": set()})
        row["runs"] += 1
        row["fit"] += fit_s
        row["evaluate"] += figures["run_s_full_test"] - fit_s  # loading the run + scaled prediction (derive)
        row["draws"].add((point.shots, point.seed))
        row["figures"] = figures
    table = {}
    for label, row in rows.items():
        seconds = {
            "fit": row["fit"],
            "evaluate": row["evaluate"],
            "test_features": row["figures"]["test_extraction_s_full_test"],
            "support_features_and_prompts": len(row["draws"]) * row["figures"]["support_extraction_s"],
        }
        hours = {stage: round(value / 3600, 3) for stage, value in seconds.items()}
        table[label] = {"runs": row["runs"], **hours, "total": round(sum(hours.values()), 3)}
    return table


def write_report(args, measured: dict, counts: dict, n_test: int, wall_s: float) -> dict:
    for result in measured.values():
        derive(result, args.test_images, n_test)
    estimates = grid_estimates(args, measured, counts)
    report = {
        "notice": NOTICE,
        "machine": getattr(args, "measured_on", None)
        or {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()},
        "load_average_at_end": os.getloadavg(),
        "backbone": args.backbone,
        "source": str(args.source),
        "target": str(args.target),
        "shots": args.shots,
        "seed": args.seed,
        "test_images_run": n_test,
        "test_images_scaled_to": args.test_images,
        "bench_wall_s": round(wall_s, 1),
        "methods": measured,
        "dry_run_counts": counts,
        **estimates,
        "issue16_labels": {
            "labels": sorted(ISSUE16_LABELS),
            **grid_estimates(args, measured, counts, ISSUE16_LABELS),
        },
        "before_estimate_issue_16_h": args.before_hours,
        "table1_hours_by_method": grid_by_method(args, measured),
    }
    write_json(args.out, report)
    return report


def print_summary(report: dict) -> None:
    stages = ("load", "build_calibrate_save", "features", "train", "eval_load", "predict")
    print(f"\n{'method':<18} {'cache':<5} {'total s':>8} " + " ".join(f"{s[:10]:>10}" for s in stages))
    for label, r in report["methods"].items():
        for stage in ("cold", "warm"):
            if stage in r:
                parts = " ".join(f"{r[stage].get('stages', {}).get(s, float('nan')):10.1f}" for s in stages)
                print(f"{label:<18} {stage:<5} {r[stage]['fit_s'] + r[stage]['eval_s']:8.1f} {parts}")
        if "error" in r:
            print(f"{label:<18} error {r['error']}")
    for title, grids in (("all labels", report["grids"]), ("issue 16's labels", report["issue16_labels"]["grids"])):
        print(f"\n{title}: {'grid':<10} {'runs':>5} {'before h':>9} {'after h':>8}")
        for name, e in grids.items():
            print(f"{'':<{len(title) + 2}}{name:<10} {e['runs']:>5} {e['before_h']:>9.2f} {e['after_h']:>8.2f}")
    print("\n| table1 label | runs | fit h | evaluate h | test features h | support features + prompts h | total h |")
    print("|---|---|---|---|---|---|---|")
    for label, row in report["table1_hours_by_method"].items():
        print(
            f"| {label} | {row['runs']} | {row['fit']:.2f} | {row['evaluate']:.2f} | {row['test_features']:.2f} | "
            f"{row['support_features_and_prompts']:.2f} | {row['total']:.2f} |"
        )
    if report["not_measured"]:
        print(f"not measured (left out of the totals): {', '.join(report['not_measured'])}")


if __name__ == "__main__":
    main()
