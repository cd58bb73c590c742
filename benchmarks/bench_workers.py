"""`sweep --workers 2` vs `--workers 1` on the same small grid, warm feature cache, in one run.

    python benchmarks/bench_workers.py [--backbone ViT-B-16] [--test-n 40] [--seeds 0 1 2 3]

A grid of zero-shot CLIP and the linear adapter (BUS-UCLM k=4 shots -> a stratified BUSI subsample),
run first to fill the feature cache, then timed with one worker (torch's default threads) and with
two one-thread workers, each into a fresh output folder on that cache (``--no-share-runs``: otherwise
the sweep would copy the warm-up's identical runs instead of running them); the metrics of both must
be equal. Writes results/bench/workers.json. **Random weights**: timing, not results.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grid import subsample

from usad_bench.io import read_json, write_json

REPO = Path(__file__).resolve().parent.parent


def grid_file(folder: Path, args, test: Path, out: Path) -> Path:
    experiment = {
        "name": out.name,
        "backbone": {"name": args.backbone, "pretrained": "none"},
        "data": {"bus_uclm": str(args.source), "busi": str(test)},
        "source": "bus_uclm",
        "targets": ["busi"],
        "methods": ["zero_shot_clip", "linear_adapter"],
        "shots": [4],
        "seeds": args.seeds,
        "out": str(out),
    }
    path = folder / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(experiment))
    return path


def timed_sweep(path: Path, cache: Path, workers: int) -> float:
    cli = Path(sys.executable).with_name("usad-bench")
    command = [str(cli), "sweep", str(path), "--cache-dir", str(cache), "--device", "cpu", "--workers", str(workers)]
    command.append("--no-share-runs")  # a sibling grid's identical runs would be copied, not run
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    return round(time.perf_counter() - started, 1)


def metrics(out: Path) -> dict:
    return {str(p.relative_to(out)): read_json(p)["tests"]["busi"]["image_auroc"] for p in out.rglob("metrics.json")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, default=Path("/tmp/data/bus_uclm/manifest.csv"))
    p.add_argument("--target", type=Path, default=Path("/tmp/data/busi/manifest.csv"))
    p.add_argument("--backbone", default="ViT-B-16")
    p.add_argument("--test-n", type=int, default=40)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--out", type=Path, default=REPO / "results/bench/workers.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        work = Path(tmp)
        test, n_test = subsample(args.target, args.test_n, 0, work / "data")
        cache = work / "cache"
        warm_up = timed_sweep(grid_file(work, args, test, work / "warm_up"), cache, 1)
        seconds, results = {}, {}
        for workers in (1, 2):
            out = work / f"workers{workers}"
            seconds[workers] = timed_sweep(grid_file(work, args, test, out), cache, workers)
            results[workers] = metrics(out)
            print(f"--workers {workers}: {seconds[workers]:.1f} s for {len(results[workers])} runs")
    same = results[1] == results[2]
    print(f"speed-up {seconds[1] / seconds[2]:.2f}x; image AUROC equal: {same}")
    write_json(
        args.out,
        {
            "notice": "random-weight timing, not results; zero_shot_clip + linear_adapter, warm feature cache",
            "backbone": args.backbone,
            "runs": len(results[1]),
            "test_images": n_test,
            "warm_up_s": warm_up,
            "seconds": {f"workers_{w}": s for w, s in seconds.items()},
            "speedup_2_over_1": round(seconds[1] / seconds[2], 2),
            "metrics_equal": same,
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
        },
    )


if __name__ == "__main__":
    main()
