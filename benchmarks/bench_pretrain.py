"""Pretraining throughput: images/s of Ultrasound-CLIP's semantic-aware objective (``usad-bench pretrain``).

    python benchmarks/bench_pretrain.py [--backbone usad-tiny] [--device cpu|cuda|auto] [--threads 1 2]
                                        [--batch-size 128] [--steps 6] [--out results/bench/pretrain.json]

Times full optimisation steps (augmentation, both towers forward, the soft-label contrastive + semantic
loss, backward, AdamW) of :class:`usad_bench.pretrain.train.SemanticCLIPModule` on a captioned synthetic
corpus, after one warm-up step; reports the median step. CPU rows are measured per thread count; a GPU
row is added when one is available. The machine's load average is recorded: on a shared machine the
CPU figures are lower bounds. Weights are random (throughput does not depend on them).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from usad_bench.data.synth import synthesise_pretraining
from usad_bench.io import write_json
from usad_bench.pretrain.data import PairDataset, collate, read_pairs
from usad_bench.pretrain.train import PretrainConfig, SemanticCLIPModule, build_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="usad-tiny")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (CPU rows always; a GPU row when available)")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="CPU thread counts to time")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=6, help="timed steps per row (after one warm-up step)")
    p.add_argument("--out", type=Path, default=Path("results/bench/pretrain.json"))
    return p.parse_args()


def time_steps(module: SemanticCLIPModule, dataset: PairDataset, batch_size: int, steps: int, device) -> list[float]:
    """Seconds of each optimisation step; the first (warm-up) is dropped."""
    module.to(device)
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-4)
    batch = collate([dataset[i % len(dataset)] for i in range(batch_size)])
    batch["images"] = batch["images"].to(device)
    seconds = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds[1:]


def measure(args, dataset: PairDataset, device: torch.device, threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = PretrainConfig(backbone=args.backbone, batch_size=args.batch_size)
    model, tokenizer, _ = build_model(cfg)
    module = SemanticCLIPModule(model, tokenizer, cfg, dataset, steps=1)
    module.log_dict = lambda *a, **k: None  # no Trainer attached: logging is a no-op here
    seconds = time_steps(module, dataset, args.batch_size, args.steps, device)
    step = statistics.median(seconds)
    return {
        "device": device.type,
        "threads": threads,
        "batch_size": args.batch_size,
        "step_s_median": round(step, 4),
        "images_per_s": round(args.batch_size / step, 1),
        "steps_timed": len(seconds),
    }


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as work:
        manifest = synthesise_pretraining(Path(work) / "corpus", n=args.batch_size, seed=0)
        cfg = PretrainConfig(backbone=args.backbone)
        _, _, image_size = build_model(cfg)
        dataset = PairDataset(read_pairs(manifest), image_size, seed=0)
        rows = [measure(args, dataset, torch.device("cpu"), t) for t in args.threads] if args.device != "cuda" else []
        if args.device in ("cuda", "auto") and torch.cuda.is_available():
            rows.append(measure(args, dataset, torch.device("cuda"), None))
    payload = {
        "what": "usad-bench pretrain optimisation steps (semantic-aware loss), images/s",
        "backbone": args.backbone,
        "rows": rows,
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "note": "random weights, synthetic images: timing only; on a shared machine CPU figures are lower bounds",
    }
    write_json(args.out, payload)
    for row in rows:
        print(f"{row['device']:5s} threads={row['threads']} batch={row['batch_size']}: {row['images_per_s']} images/s")
    print(f"load average {payload['machine']['load_average_1m']}; wrote {args.out}")


if __name__ == "__main__":
    main()
