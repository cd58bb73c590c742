"""The paper's qualitative figure (Figure 2): test images, their lesion masks and each method's heat map.

``qualitative_figure(results, n)`` picks ``n`` test images by a seed, stratified by class (never by
score, so the figure cannot be cherry-picked), and draws one row per image: the image, the
ground-truth mask, then one column per method that predicts maps. Each method's colours span the
range fitted on its own support set (``support.json: map_range``), the same for every row, so a
normal image stays dark when the method finds nothing. Writes PNG + PDF (and a JSON of what was
drawn) under ``out``; a figure made with random or synthetic-only weights says so in its title.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from usad_bench.errors import UsadError
from usad_bench.io import atomic_path, read_json, read_yaml, write_json
from usad_bench.tables import GRID_FILE, weights_label


@dataclass
class MethodMaps:
    label: str
    maps: list[np.ndarray]  # one (S, S) map per chosen image
    value_range: tuple[float, float]


def find_runs(results: Path, shots: int | None, seed: int) -> dict[str, Path]:
    """label -> run dir of the fitted runs with ``shots`` (default: the smallest) and few-shot ``seed``."""
    configs = {p.parent: read_yaml(p) or {} for p in sorted(Path(results).rglob("config.yaml"))}
    configs = {run: c for run, c in configs.items() if (run / "metrics.json").is_file() and "method" in c}
    if not configs:
        raise UsadError(f"no evaluated runs under {results}; run `usad-bench sweep` first")
    shots = shots if shots is not None else min(c.get("shots", 0) for c in configs.values())
    chosen = {c.get("label") or c["method"]: run for run, c in configs.items() if c.get("shots") == shots}
    chosen = {label: run for label, run in chosen.items() if configs[run].get("seed") == seed} or chosen
    if not chosen:
        raise UsadError(f"no evaluated run with {shots} shots under {results}")
    grid = Path(results) / GRID_FILE
    order = read_json(grid)["labels"] if grid.is_file() else sorted(chosen)
    return {label: chosen[label] for label in order if label in chosen}


def pick_images(samples: list, n: int, seed: int) -> list:
    """``n`` samples, as even as possible over the classes (in order of appearance), chosen by ``seed``."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    pools = {label: list(rng.permutation(len(rows))) for label, rows in by_class.items()}
    picked = []
    while len(picked) < n and any(pools.values()):
        for label, pool in pools.items():
            if pool and len(picked) < n:
                picked.append(by_class[label][pool.pop(0)])
    return picked


def qualitative_figure(
    results: Path,
    n_images: int,
    out: Path,
    test: str | None = None,
    shots: int | None = None,
    seed: int = 0,
    device: str = "auto",
    cache_dir: Path | None = Path(".usad_cache"),
) -> list[Path]:
    """Draw Figure 2 from the runs under ``results``; returns the PNG, PDF and JSON paths."""
    from usad_bench.data.manifest import read_manifest

    runs = find_runs(Path(results), shots, seed)
    metrics = {label: read_json(run / "metrics.json") for label, run in runs.items()}
    test = test or next(iter(next(iter(metrics.values()))["tests"]))
    manifests = {m["tests"][test]["manifest"] for m in metrics.values() if test in m["tests"]}
    if not manifests:
        raise UsadError(f"no run under {results} was evaluated on {test!r}")
    support_groups = set()
    for run in runs.values():
        support_groups |= set(read_json(run / "split.json")["support_groups"])
    candidates = read_manifest(Path(sorted(manifests)[0])).where(lambda s: s.group not in support_groups).samples
    chosen = pick_images(candidates, n_images, seed)
    columns = [m for m in (method_maps(label, run, chosen, device, cache_dir) for label, run in runs.items()) if m]
    if not columns:
        raise UsadError(f"none of the runs under {results} predicts anomaly maps ({', '.join(runs)})")
    labels = {weights_label(m["config"]) for m in metrics.values()} - {None}
    figure = draw(chosen, columns, title=_title(test, len(columns), labels))
    stem = Path(out) / f"qualitative_{Path(results).name}_{test}"
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path in paths:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format=path.suffix[1:], dpi=150, bbox_inches="tight")
    record = {"test": test, "images": [[s.id, s.label] for s in chosen], "methods": [c.label for c in columns]}
    write_json(stem.with_suffix(".json"), record | {"weights": sorted(labels), "seed": seed})
    return [*paths, stem.with_suffix(".json")]


def _title(test: str, n_methods: int, labels: set) -> str:
    warning = f"  [{' + '.join(sorted(labels)).upper()}: pipeline check, not results]" if labels else ""
    return f"{test}: image, ground truth, heat maps of {n_methods} method(s){warning}"


def method_maps(label: str, run: Path, samples: list, device: str, cache_dir) -> MethodMaps | None:
    """The run's maps for ``samples`` and its support-fitted colour range; None for a method without maps."""
    import torch

    from usad_bench.cache import FeatureCache
    from usad_bench.features import FeatureExtractor
    from usad_bench.runner import load_run

    method, _ = load_run(run, device)
    if "map" not in method.outputs:
        return None
    extractor = FeatureExtractor(method.backbone, FeatureCache(cache_dir), method.feature_request())
    maps = []
    with torch.no_grad():
        for _, feats in extractor.iter_batches(samples):
            feats.cls = feats.cls.to(method.backbone.device)
            feats.patches = None if feats.patches is None else feats.patches.to(method.backbone.device)
            maps += list(method.predict_features(feats).anomaly_map.float().cpu().numpy())
    value_range = read_json(run / "support.json").get("map_range") or [float(np.min(maps)), float(np.max(maps))]
    return MethodMaps(label, maps, (float(value_range[0]), float(value_range[1])))


def draw(samples: list, columns: list[MethodMaps], title: str):
    """rows = images; columns = image, ground truth, one heat map per method (colour bar per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from usad_bench.data.images import load_rgb
    from usad_bench.data.preprocess import mask_tensor

    n_cols = 2 + len(columns)
    fig, axes = plt.subplots(len(samples), n_cols, figsize=(1.8 * n_cols, 1.8 * len(samples) + 0.6), squeeze=False)
    for row, sample in enumerate(samples):
        size = columns[0].maps[row].shape[-1]
        gray = np.asarray(load_rgb(sample.image).convert("L").resize((size, size)))
        axes[row, 0].imshow(gray, cmap="gray")
        axes[row, 0].set_ylabel(sample.label, fontsize=8)
        axes[row, 1].imshow(mask_tensor(sample, size).numpy(), cmap="gray", vmin=0, vmax=1)
        for col, method in enumerate(columns, start=2):
            axes[row, col].imshow(gray, cmap="gray")
            shown = axes[row, col].imshow(
                method.maps[row], cmap="jet", alpha=0.5, vmin=method.value_range[0], vmax=method.value_range[1]
            )
            if row == len(samples) - 1:
                bar = fig.colorbar(shown, ax=axes[:, col], location="bottom", shrink=0.8, pad=0.02)
                bar.ax.tick_params(labelsize=6)
                # the support-fitted range, the same for every row
                bar.set_ticks(method.value_range, labels=[f"{v:.3g}" for v in method.value_range])
    for col, name in enumerate(["image", "ground truth", *[c.label for c in columns]]):
        axes[0, col].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=8)
    return fig
