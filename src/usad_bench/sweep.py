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
    wandb: {project: usad_bench, group: table1, tags: [paper]}   # optional, used with --wandb

Runs live in ``<out>/<label>/<source>/k<shots>/s<seed>``. A run whose metrics.json covers every
target is skipped; a fitted run that lacks some targets is only evaluated; an unfinished fit is
redone. So a killed sweep resumes where it stopped, and ``--shard i/n`` (run points i, i+n, ...)
splits a grid across machines without coordination. ``<out>/sweep.json`` records the grid (for
`usad-bench table`'s incomplete-cell report) and ``<run>.failed.json`` a run that raised.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from usad_bench.backbone import BackboneSpec
from usad_bench.errors import Stopped, UsadError
from usad_bench.io import exclusive_lock, read_json, read_yaml, write_json
from usad_bench.tables import GRID_FILE, failure_path

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
    wandb: dict = field(default_factory=dict)  # optional `wandb:` block: project, entity, group, tags
    share_runs: bool = True  # reuse identical fitted runs of the grids beside ``out`` (run_store); --no-share-runs

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
        wandb=_wandb_block(raw.get("wandb"), path),
    )


def _wandb_block(raw, path: Path) -> dict:
    allowed = {"project", "entity", "group", "tags"}
    if raw is None:
        return {}
    if not isinstance(raw, dict) or set(raw) - allowed:
        raise UsadError(f"{path}: `wandb:` takes only {', '.join(sorted(allowed))} (got {raw!r})")
    return dict(raw)


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


def override_grid(exp: Experiment, grid: dict | None) -> Experiment:
    """The grid with ``backbone`` (name), ``pretrained`` and/or ``out`` replaced; None values keep the file's."""
    from dataclasses import replace

    grid = {k: v for k, v in (grid or {}).items() if v is not None}
    if "backbone" in grid or "pretrained" in grid:
        raw = exp.backbone.to_dict() | {"name": grid.get("backbone", exp.backbone.name)}
        raw["pretrained"] = grid.get("pretrained", exp.backbone.pretrained)
        exp = replace(exp, backbone=_backbone(raw))
    return replace(exp, out=Path(grid["out"])) if "out" in grid else exp


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsadError(f"--shard expects i/n with 0 <= i < n, got {text!r}") from None
    if not 0 <= index < count:
        raise UsadError(f"--shard expects i/n with 0 <= i < n, got {text!r}")
    return index, count


def run_sweep(
    path: Path,
    shard: str = "0/1",
    device: str = "auto",
    cache_dir: Path | None = None,
    dry_run: bool = False,
    wandb: bool = False,
    launch=None,
    grid: dict | None = None,
    workers: int = 1,
    share_runs: bool = True,
) -> None:
    """Fit and evaluate every unfinished run of this shard; ``cache_dir=None`` disables the cache.

    ``workers`` > 1 runs that many points at once in worker processes, the CPU threads split between
    them (``sweep_workers``). ``share_runs`` reuses identical fitted runs of sibling grids (``run_store``).

    ``launch`` (a ``launch.LaunchOptions``) other than the local default submits the unfinished runs
    as a job array through submitit instead of running them here. ``grid`` overrides the file's
    backbone name / weights and ``out`` (``make table1-cpu``: the same grid on ViT-B-16).
    """
    exp = override_grid(load_experiment(path), grid)
    exp.share_runs = share_runs
    index, count = parse_shard(shard)
    if workers < 1 or (workers > 1 and launch is not None and launch.launcher != "local"):
        raise UsadError(f"--workers N (N >= 1, got {workers}) runs points on this machine: use --launcher local")
    points = exp.points()[index::count]
    print(f"{exp.name}: {len(points)} runs in shard {index}/{count} ({len(exp.points())} in the grid)")
    # One process per shard at a time; other shards (other machines, array tasks) run freely beside it.
    lock = contextlib.nullcontext() if dry_run else shard_lock(exp.out, index, count)
    with lock:
        if not dry_run:
            write_grid_record(exp)
        if launch is not None and launch.launcher != "local":
            from usad_bench.launch import submit_points

            todo = [p for p in points if missing_targets(p.run_dir, exp.targets)]
            options = {"device": device, "cache_dir": cache_dir, "wandb": wandb, "dry_run": dry_run, "grid": grid}
            submit_points(Path(path), exp, todo, launch, **options)
            return
        if not dry_run:
            plan_features(exp, points, device, cache_dir)
        if workers > 1 and not dry_run:
            from usad_bench.sweep_workers import run_points_in_workers

            run_points_in_workers(exp, points, device, cache_dir, wandb, workers)
        else:
            run_points(exp, points, device, cache_dir, dry_run, wandb)
    if wandb and not dry_run:
        from usad_bench.tracking import log_sweep_summary

        log_sweep_summary(exp)


def plan_features(exp: Experiment, points: list[RunPoint], device: str, cache_dir) -> None:
    """Record in the feature cache every raw block the unfinished runs need, so one pass serves them all."""
    from usad_bench.feature_plan import plan_raw_layers
    from usad_bench.runner import pick_device

    todo = [fit_options(exp, p, device, cache_dir) for p in points if missing_targets(p.run_dir, exp.targets)]
    if todo and cache_dir is not None:
        plan_raw_layers(todo, pick_device(device))


def shard_lock(out: Path, index: int, count: int):
    """The lock of one shard of a sweep's output root (``<out>/.sweep-shard-0-of-1.lock``)."""
    return exclusive_lock(Path(out) / f".sweep-shard-{index}-of-{count}.lock", f"{out} (shard {index}/{count})")


def run_points(exp: Experiment, points: list[RunPoint], device: str, cache_dir, dry_run: bool, wandb) -> None:
    """Each point in turn; on SIGINT/SIGTERM the CLI's last line says how many were finished."""
    finished = 0
    try:
        for n, point in enumerate(points, 1):
            process_point(exp, point, device, cache_dir, dry_run=dry_run, wandb=wandb, prefix=f"[{n}/{len(points)}] ")
            finished += 1
    except Stopped as stop:
        stop.done = (
            f"{finished} of the {len(points)} runs of this shard are finished and kept (the run in progress is "
            "not: its folder is as it was)"
        )
        raise


def process_point(
    exp: Experiment, point: RunPoint, device: str, cache_dir, dry_run: bool = False, wandb: bool = False, prefix=""
) -> None:
    """Check, then fit and/or evaluate one grid point as needed; a failure is recorded for `usad-bench table`."""
    from usad_bench.runner import is_fitted  # heavy (torch, Lightning): imported when a sweep runs

    opts = fit_options(exp, point, device, cache_dir)
    if wandb:
        from usad_bench.tracking import sweep_settings

        opts.wandb = sweep_settings(exp, point)
    if is_fitted(point.run_dir):
        check_same_config(point.run_dir, opts)  # a finished run of other settings is never reused
    todo = missing_targets(point.run_dir, exp.targets)
    status = "done" if not todo else f"to do: {', '.join(todo)}"
    print(f"{prefix}{point.run_dir} {status}", flush=True)
    if todo and not dry_run:
        started = time.perf_counter()
        try:
            run_point(exp, opts, todo)
        except Exception as exc:  # recorded so tables can say why a cell is incomplete, then re-raised
            write_json(failure_path(point.run_dir), {"error": f"{type(exc).__name__}: {exc}"[:300]})
            raise
        failure_path(point.run_dir).unlink(missing_ok=True)
        print(f"    finished in {time.perf_counter() - started:.1f}s", flush=True)


def write_grid_record(exp: Experiment) -> None:
    """``<out>/sweep.json``: the grid asked for, so `usad-bench table` knows which cells are missing and why."""
    record = {
        "name": exp.name,
        "source": exp.source,
        "labels": [m.label for m in exp.methods],
        "targets": exp.targets,
        "shots": exp.shots,
        "seeds": exp.seeds,
        "runs": [
            {"label": p.entry.label, "shots": p.shots, "seed": p.seed, "dir": p.run_dir.relative_to(exp.out).as_posix()}
            for p in exp.points()
        ],
    }
    write_json(exp.out / GRID_FILE, record)


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
    """Fit the point unless a finished fit is there (or shared by another grid), then evaluate the missing targets."""
    from usad_bench.runner import evaluate, fit, is_fitted

    if not is_fitted(opts.out) and not adopt_shared(exp, opts):
        fit(opts)
    targets = missing_targets(opts.out, targets)  # a shared run may bring some targets' results along
    if not targets:
        return
    evaluate(
        opts.out, [(t, exp.data[t]) for t in targets], device=opts.device, cache_dir=opts.cache_dir, wandb=opts.wandb
    )


def adopt_shared(exp: Experiment, opts) -> bool:
    """Copy an identical finished run of a sibling grid (``run_store``) into this point; False if none."""
    from usad_bench.run_store import adopt_shared_run, find_shared_run

    if not exp.share_runs:
        return False
    found = find_shared_run(exp.out.parent, exp.source, opts)
    if found is None:
        return False
    if not adopt_shared_run(found, opts, {t: exp.data[t] for t in exp.targets}):
        return False
    check_same_config(opts.out, opts)  # the copy is checked like any finished run
    print(f"    shared the fitted run {found}", flush=True)
    return True


def check_same_config(run_dir: Path, opts) -> None:
    """Refuse to count a finished run made with other settings or other training data as this grid's."""
    from usad_bench.run_store import differing_keys, run_identity

    saved = read_yaml(Path(run_dir) / "config.yaml")
    differ = differing_keys(saved, run_identity(opts))
    if differ:
        raise UsadError(
            f"{run_dir} was fitted with other {', '.join(differ)} than this experiment now asks for; "
            "delete that folder to refit it, or change `out:` in the experiment file"
        )
