"""Weights & Biases logging for `fit`, `eval`, `sweep` and `demo` (``--wandb``).

One wandb run per run directory, named ``<label>/<source>/k<shots>/s<seed>``: `fit` creates it and
logs the resolved config, the training curves (through Lightning's ``WandbLogger``), the split and
what was calibrated on the support set; `eval` resumes the same wandb run (its id is kept in
``<run>/wandb/run_id``) and adds every metric of every test set and a few heat-map overlays. A
sweep groups its runs by ``<group>/<label>/k<shots>`` (wandb's UI then shows mean ± std over seeds
per method × shots) and ends with a summary run holding the grid as tables.

Without ``WANDB_API_KEY`` (and no ``WANDB_MODE``) everything is logged offline under
``<run>/wandb/``; ``wandb sync <run>/wandb/offline-run-*`` uploads it later. wandb is an optional
dependency (``pip install -e ".[wandb]"``); asking for it without it installed is an error line.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

from usad_bench.errors import UsadError
from usad_bench.io import read_json, read_yaml, write_text

DEFAULT_PROJECT = "usad_bench"
OVERLAYS_PER_TEST = 4


def _wandb():
    try:
        import wandb
    except ImportError:
        raise UsadError("--wandb needs the wandb package: pip install -e '.[wandb]' (or pip install wandb)") from None
    return wandb


def mode() -> str:
    """WANDB_MODE when set, else online with an API key and offline without one (sync later)."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def settings_from(value) -> dict | None:
    """``--wandb`` as stored in FitOptions: False/None (off), True (defaults) or a settings dict."""
    if not value:
        return None
    return dict(value) if isinstance(value, dict) else {}


def run_name(config: dict, source: str | None = None) -> str:
    source = source or Path(config.get("train_manifest", "?")).parent.name
    return f"{config.get('label') or config.get('method')}/{source}/k{config.get('shots')}/s{config.get('seed')}"


def sweep_settings(exp, point) -> dict:
    """Settings of one grid point: the experiment's `wandb:` block, grouped per method × shots."""
    block = exp.wandb or {}
    base = block.get("group") or exp.name
    return {
        "project": block.get("project", DEFAULT_PROJECT),
        "entity": block.get("entity"),
        "group": f"{base}/{point.entry.label}/k{point.shots}",
        "tags": [*block.get("tags", []), exp.name],
        "source": exp.source,
        "experiment": exp.name,
    }


def _run_id(run_dir: Path) -> str:
    """The wandb id of this run directory (created once per fit, reused by eval)."""
    path = Path(run_dir) / "wandb" / "run_id"
    if not path.is_file():
        write_text(path, uuid.uuid4().hex[:16] + "\n")
    return path.read_text().strip()


def start(run_dir: Path, settings: dict, config: dict, job_type: str):
    """Init (or resume) the wandb run of ``run_dir``; ``config`` is the run's resolved config."""
    wandb = _wandb()
    (Path(run_dir) / "wandb").mkdir(parents=True, exist_ok=True)
    from usad_bench.tables import weights_label

    label = weights_label(config)
    return wandb.init(
        project=settings.get("project") or DEFAULT_PROJECT,
        entity=settings.get("entity"),
        group=settings.get("group"),
        tags=[*settings.get("tags", []), *([label.replace(" ", "-")] if label else [])],
        name=run_name(config, settings.get("source")),
        id=_run_id(run_dir),
        resume="allow",
        dir=str(run_dir),
        mode=mode(),
        job_type=job_type,
        config=_flat_config(config, settings),
        reinit="create_new",
    )


def _flat_config(config: dict, settings: dict) -> dict:
    from usad_bench.tables import weights_label

    return {
        **config,
        "source": settings.get("source") or Path(config.get("train_manifest", "?")).parent.name,
        "experiment": settings.get("experiment"),
        "weights_label": weights_label(config) or "pretrained",
    }


def lightning_logger(run):
    """Lightning's WandbLogger writing into an already started wandb run (the training curves)."""
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(experiment=run)


def log_fit(run, run_dir: Path) -> None:
    """The resolved config, the split and the support-set calibration of a finished fit."""
    wandb = _wandb()
    run_dir = Path(run_dir)
    config = read_yaml(run_dir / "config.yaml")
    run.config.update(_flat_config(config, {}) | dict(run.config), allow_val_change=True)
    split = read_json(run_dir / "split.json")
    ids = split.get("support_ids", [])
    run.log({"split/support": wandb.Table(columns=["support_id"], data=[[i] for i in ids])})
    run.summary.update({"split/n_support_groups": len(split.get("support_groups", []))})
    run.summary.update({"split/n_heldout": len(split.get("heldout_ids", []))})
    support = read_json(run_dir / "support.json")
    run.summary.update({f"support/{k}": v for k, v in support.items() if isinstance(v, (int, float))})
    run.summary.update({f"timing/{k}": v for k, v in (support.get("timing") or {}).items()})
    run.summary["split/n_support"] = len(ids)


def log_eval(run, payload: dict, overlays: dict | None = None) -> None:
    """Every metric of every test set (summary ``<test>/<metric>``) and a few overlays per test set."""
    wandb = _wandb()
    from usad_bench.tables import weights_label

    scalars = {
        f"{test}/{key}": value
        for test, metrics in payload["tests"].items()
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    run.summary.update(scalars)
    label = weights_label(payload["config"])
    caption = f" ({label}: not a result)" if label else ""
    for test, images in (overlays or {}).items():
        run.log({f"{test}/overlays": [wandb.Image(np.asarray(im), caption=f"{name}{caption}") for name, im in images]})


def overlay_panels(method, extractor, samples, map_range, count: int = OVERLAYS_PER_TEST, seed: int = 0) -> list:
    """[(id, PIL image)] heat maps over a few abnormal test images with masks, chosen by seed (never by score)."""
    import torch

    from usad_bench.data.images import load_mask, load_rgb
    from usad_bench.viz import overlay

    candidates = [s for s in samples if s.has_mask]
    if not candidates or "map" not in method.outputs:
        return []
    rng = np.random.default_rng(seed)
    chosen = [candidates[i] for i in sorted(rng.choice(len(candidates), min(count, len(candidates)), replace=False))]
    panels = []
    with torch.no_grad():
        for chunk, feats in extractor.iter_batches(chosen):
            feats.cls = feats.cls.to(method.backbone.device)
            feats.patches = None if feats.patches is None else feats.patches.to(method.backbone.device)
            maps = method.predict_features(feats).anomaly_map
            for sample, amap in zip(chunk, maps.float().cpu().numpy(), strict=True):
                image = load_rgb(sample.image)
                mask = load_mask(sample.masks, image.size, sample.image)
                panels.append((sample.id, overlay(image, amap, tuple(map_range) if map_range else None, mask=mask)))
    return panels


def log_sweep_summary(exp) -> None:
    """One summary run per sweep: a row per run × target, and mean ± std per method × shots × target."""
    wandb = _wandb()
    rows = _grid_rows(exp)
    if not rows:
        return
    block = exp.wandb or {}
    metric_names = sorted({k for r in rows for k in r[5]})
    run = wandb.init(
        project=block.get("project", DEFAULT_PROJECT),
        entity=block.get("entity"),
        group=f"{block.get('group') or exp.name}/summary",
        tags=[*block.get("tags", []), exp.name, "summary"],
        name=f"{exp.name}/summary",
        dir=str(exp.out),
        mode=mode(),
        job_type="sweep-summary",
        reinit="create_new",
    )
    columns = ["label", "source", "shots", "seed", "target", *metric_names]
    runs_table = [[*r[:5], *[r[5].get(m) for m in metric_names]] for r in rows]
    run.log({"grid/runs": wandb.Table(columns=columns, data=runs_table)})
    run.log(
        {
            "grid/mean_std": wandb.Table(
                columns=["label", "shots", "target", "metric", "mean", "std", "n"], data=_mean_std(rows)
            )
        }
    )
    run.finish()


def _grid_rows(exp) -> list[tuple]:
    rows = []
    for point in exp.points():
        path = point.run_dir / "metrics.json"
        if not path.is_file():
            continue
        for target, metrics in read_json(path).get("tests", {}).items():
            numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            rows.append((point.entry.label, exp.source, point.shots, point.seed, target, numbers))
    return rows


def _mean_std(rows: list[tuple]) -> list[list]:
    groups: dict[tuple, list[float]] = {}
    for label, _, shots, _, target, numbers in rows:
        for metric, value in numbers.items():
            groups.setdefault((label, shots, target, metric), []).append(float(value))
    out = []
    for key, values in groups.items():
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        out.append([*key, float(np.mean(values)), std, len(values)])
    return out
