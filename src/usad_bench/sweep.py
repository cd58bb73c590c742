"""Experiment grids: a YAML file expands to runs (method x shots x seed), each fitted then evaluated.

Grid file (see experiments/*.yaml)::

    name: table1
    backbone: {name: ViT-L-14-336, pretrained: openai}
    data: {bus_uclm: data/bus_uclm/manifest.csv, busi: data/busi/manifest.csv}
    source: bus_uclm            # the adaptation domain
    targets: [busi]             # tested unchanged; add the source name for an in-domain test
    methods:                    # a name, or {label, method, config, set}
      - ultraad
      - {label: ultraad-no-pif, method: ultraad, set: {pif: false}}
    shots: [4, 8, 16]
    seeds: [0, 1, 2]
    out: results/runs/table1

Runs live in ``<out>/<label>/<source>/k<shots>/s<seed>``. A run whose metrics.json covers every
target is skipped; a fitted run that lacks some targets is only evaluated; an unfinished fit is
redone. So a killed sweep resumes where it stopped, and ``--shard i/n`` (run points i, i+n, ...)
splits a grid across machines without coordination.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from usad_bench.backbone import BackboneSpec
from usad_bench.errors import UsadError
from usad_bench.io import read_json, read_yaml

log = logging.getLogger(__name__)


@dataclass
class MethodEntry:
    label: str
    method: str
    overrides: dict = field(default_factory=dict)


@dataclass
class RunPoint:
    entry: MethodEntry
    shots: int
    seed: int
    run_dir: Path


@dataclass
class Experiment:
    name: str
    backbone: BackboneSpec
    data: dict[str, Path]
    source: str
    targets: list[str]
    methods: list[MethodEntry]
    shots: list[int]
    seeds: list[int]
    out: Path

    def points(self) -> list[RunPoint]:
        return [
            RunPoint(m, k, s, self.out / m.label / self.source / f"k{k}" / f"s{s}")
            for m in self.methods
            for k in self.shots
            for s in self.seeds
        ]


def load_experiment(path: Path) -> Experiment:
    if not Path(path).is_file():
        raise UsadError(f"experiment file not found: {path}")
    raw = read_yaml(path) or {}
    missing = [k for k in ("data", "source", "targets", "methods", "shots", "seeds") if k not in raw]
    if missing:
        raise UsadError(f"{path}: missing keys {missing}; see experiments/README.md for the format")
    data = {name: Path(p) for name, p in raw["data"].items()}
    unknown = [d for d in [raw["source"], *raw["targets"]] if d not in data]
    if unknown:
        raise UsadError(f"{path}: source/targets {unknown} are not under data:")
    return Experiment(
        name=raw.get("name", Path(path).stem),
        backbone=_backbone(raw.get("backbone") or {}),
        data=data,
        source=raw["source"],
        targets=list(raw["targets"]),
        methods=[_method_entry(m, path) for m in raw["methods"]],
        shots=[int(k) for k in raw["shots"]],
        seeds=[int(s) for s in raw["seeds"]],
        out=Path(raw.get("out", f"results/runs/{raw.get('name', Path(path).stem)}")),
    )


def _backbone(raw: dict) -> BackboneSpec:
    pretrained = raw.get("pretrained", "openai")
    if pretrained is not None and str(pretrained).lower() in ("none", "random"):
        pretrained = None
    return BackboneSpec(
        name=raw.get("name", "ViT-L-14-336"),
        pretrained=pretrained,
        image_size=raw.get("image_size"),
        precision=raw.get("precision", "fp32"),
    )


def _method_entry(raw, path: Path) -> MethodEntry:
    if isinstance(raw, str):
        return MethodEntry(label=raw, method=raw)
    method = raw.get("method") or raw.get("label")
    overrides = dict(read_yaml(_config_path(raw["config"], path)) or {}) if raw.get("config") else {}
    overrides.update(raw.get("set") or {})
    if not method:
        raise UsadError(f"{path}: a methods entry needs `method:` ({raw})")
    return MethodEntry(label=raw.get("label", method), method=method, overrides=overrides)


def _config_path(config: str, experiment: Path) -> Path:
    """A method's config YAML, relative to the working directory or else to the repository of the grid file."""
    for candidate in (Path(config), Path(experiment).resolve().parent.parent / config):
        if candidate.is_file():
            return candidate
    raise UsadError(f"{experiment}: method config {config} not found; run from the repository root or fix the path")


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsadError(f"--shard expects i/n with 0 <= i < n, got {text!r}") from None
    if not 0 <= index < count:
        raise UsadError(f"--shard expects i/n with 0 <= i < n, got {text!r}")
    return index, count


def run_sweep(
    path: Path, shard: str = "0/1", device: str = "auto", cache_dir: Path | None = None, dry_run: bool = False
) -> None:
    """Fit and evaluate every unfinished run of this shard; ``cache_dir=None`` disables the cache."""
    exp = load_experiment(path)
    index, count = parse_shard(shard)
    points = exp.points()[index::count]
    print(f"{exp.name}: {len(points)} runs in shard {index}/{count} ({len(exp.points())} in the grid)")
    from usad_bench.runner import is_fitted  # heavy (torch, Lightning): imported when a sweep runs

    for n, point in enumerate(points, 1):
        opts = fit_options(exp, point, device, cache_dir)
        if is_fitted(point.run_dir):
            check_same_config(point.run_dir, opts)  # a finished run of other settings is never reused
        todo = missing_targets(point.run_dir, exp.targets)
        status = "done" if not todo else f"to do: {', '.join(todo)}"
        print(f"[{n}/{len(points)}] {point.run_dir} {status}", flush=True)
        if todo and not dry_run:
            started = time.perf_counter()
            run_point(exp, opts, todo)
            print(f"    finished in {time.perf_counter() - started:.1f}s", flush=True)


def missing_targets(run_dir: Path, targets: list[str]) -> list[str]:
    metrics_path = Path(run_dir) / "metrics.json"
    done = read_json(metrics_path).get("tests", {}) if metrics_path.is_file() else {}
    return [t for t in targets if t not in done]


def fit_options(exp: Experiment, point: RunPoint, device: str, cache_dir: Path | None):
    from usad_bench.runner import FitOptions

    return FitOptions(
        method=point.entry.method,
        label=point.entry.label,
        train=exp.data[exp.source],
        shots=point.shots,
        seed=point.seed,
        out=point.run_dir,
        backbone=exp.backbone,
        overrides=point.entry.overrides,
        cache_dir=cache_dir,
        device=device,
    )


def run_point(exp: Experiment, opts, targets: list[str]) -> None:
    """Fit the point unless a finished fit is there, then evaluate it on the missing targets."""
    from usad_bench.runner import evaluate, fit, is_fitted

    if not is_fitted(opts.out):
        fit(opts)
    evaluate(opts.out, [(t, exp.data[t]) for t in targets], device=opts.device, cache_dir=opts.cache_dir)


def check_same_config(run_dir: Path, opts) -> None:
    """Refuse to count a finished run made with other settings or other training data as this grid's."""
    from usad_bench.cache import file_digest
    from usad_bench.methods import get_method

    saved = read_yaml(Path(run_dir) / "config.yaml")
    if not Path(opts.train).is_file():
        raise UsadError(f"training manifest not found: {opts.train}; create it with `make data` or fix `data:`")
    wanted = {
        "method": opts.method,
        "method_config": get_method(opts.method).config_class.from_dict(opts.overrides).to_dict(),
        "backbone": opts.backbone.to_dict(),
        "shots": opts.shots,
        "seed": opts.seed,
        "train_manifest_sha256": file_digest(Path(opts.train).resolve()),
    }
    differ = [key for key, value in wanted.items() if saved.get(key) != value]
    if differ:
        raise UsadError(
            f"{run_dir} was fitted with other {', '.join(differ)} than this experiment now asks for; "
            "delete that folder to refit it, or change `out:` in the experiment file"
        )
