"""Fit a method on a few-shot support set, evaluate it on test manifests, predict on new images.

A *run directory* holds everything needed to rebuild and judge a fitted method:

    config.yaml   resolved config: method + its options, backbone, task, shots, seed, train manifest
    split.json    the support ids, their patients, the in-domain held-out ids
    model.pt      the method's learned state and memory (the frozen backbone is not copied)
    support.json  what was calibrated on the support set (Dice threshold, score threshold, map range)
    logs/         Lightning's CSV log of the training losses
    metrics.json  written by eval: per test set, the metrics of README "metrics.json"
    predictions/  written by eval: one CSV of per-image scores per test set

Nothing is ever selected on test data: training runs for a fixed number of epochs and the last
state is kept; thresholds are fitted on the support set.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

import usad_bench
from usad_bench import metrics
from usad_bench.backbone import Backbone, BackboneSpec, resolve_device
from usad_bench.cache import FeatureCache, file_digest
from usad_bench.data.images import IMAGE_SUFFIXES, load_rgb
from usad_bench.data.manifest import Manifest, Sample, read_manifest
from usad_bench.data.preprocess import has_pixel_truth, mask_tensor
from usad_bench.data.sampler import read_split, sample_support, write_split
from usad_bench.errors import UsadError
from usad_bench.features import FeatureExtractor
from usad_bench.io import read_json, read_yaml, save_png, write_json, write_text, write_yaml
from usad_bench.methods import Method, Prediction, SupportSet, Task, get_method
from usad_bench.prompts import load_prompts
from usad_bench.viz import overlay

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(".usad_cache")


@dataclass
class FitOptions:
    method: str
    train: Path  # manifest of the adaptation domain
    shots: int
    seed: int
    out: Path
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    overrides: dict = field(default_factory=dict)  # method config values (YAML or --set key=value)
    classes: list[str] | None = None  # None = every class of the train manifest
    cache_dir: Path | None = DEFAULT_CACHE  # None = --no-cache
    device: str = "auto"
    wandb: bool = False  # also log to Weights & Biases (offline when no API key is set)
    label: str | None = None  # name in tables (ablation variants share a method); None = the method name


def fit(opts: FitOptions) -> Path:
    """Sample the support set, build and train the method, calibrate, save. Returns the run dir."""
    timing: dict[str, float] = {}
    get_method(opts.method).config_class.from_dict(opts.overrides)  # bad name or option: fail before writing
    L.seed_everything(opts.seed, workers=True, verbose=False)
    manifest = read_manifest(opts.train)
    split = sample_support(manifest, opts.shots, opts.seed, opts.classes)
    run = Path(opts.out)
    clear_run(run)
    write_split(split, run / "split.json")

    started = time.perf_counter()
    backbone = Backbone.load(opts.backbone, resolve_device(opts.device))
    support_samples = manifest.subset(split.support_ids).samples
    method = build_method(opts.method, opts.overrides, backbone, split.classes, opts.shots, support_samples)
    timing["load_s"] = time.perf_counter() - started

    started = time.perf_counter()
    extractor = FeatureExtractor(backbone, FeatureCache(opts.cache_dir), method.feature_layers())
    support = build_support(support_samples, extractor, method.task, method.train_variants())
    timing["features_s"] = time.perf_counter() - started

    started = time.perf_counter()
    method.setup_support(support)
    if method.trainable and method.cfg.epochs > 0:
        train(method, support, run, opts.seed, opts.wandb)
    timing["train_s"] = time.perf_counter() - started

    calibration = calibrate(method, support)
    save_run(run, opts, method, manifest, calibration, timing)
    return run


RUN_OUTPUTS = ("config.yaml", "metrics.json", "model.pt", "support.json", "split.json")


def clear_run(run: Path) -> None:
    """Remove an earlier fit's outputs from ``run`` so none of them can be mixed with the new one.

    ``config.yaml`` goes first: without it the folder reads as an unfinished fit, whatever happens
    next, so a killed re-fit can never pair an old model with a new split (or the reverse).
    """
    for name in RUN_OUTPUTS:
        (run / name).unlink(missing_ok=True)
    predictions = run / "predictions"
    if predictions.is_dir():
        for path in predictions.glob("*.csv"):
            path.unlink()


def build_method(
    name: str, overrides: dict, backbone: Backbone, classes: list[str], shots: int, support: list[Sample]
) -> Method:
    cls = get_method(name)
    cfg = cls.config_class.from_dict(overrides)
    datasets = sorted({s.dataset for s in support})
    task = Task(
        classes=list(classes),
        shots=shots,
        dataset=datasets[0] if len(datasets) == 1 else "default",
        prompts=load_prompts(cfg.prompts),
        image_size=backbone.image_size,
    )
    return cls(cfg, backbone, task).to(backbone.device)


def build_support(samples: list[Sample], extractor: FeatureExtractor, task: Task, variants) -> SupportSet:
    variants = tuple(dict.fromkeys(("orig", *variants)))
    index = {c: i for i, c in enumerate(task.classes)}
    return SupportSet(
        samples=samples,
        features={v: extractor.extract(samples, v) for v in variants},
        masks={v: torch.stack([mask_tensor(s, task.image_size, v) for s in samples]) for v in variants},
        pixel_truth=torch.tensor([has_pixel_truth(s) for s in samples]),
        labels=torch.tensor([index[s.label] for s in samples]),
        is_anomaly=torch.tensor([float(s.is_anomaly) for s in samples]),
        variants=variants,
    )


def train(method: Method, support: SupportSet, run: Path, seed: int, use_wandb: bool) -> None:
    """Fixed-length training with Lightning; the last state is kept (no checkpoint selection)."""
    loader = DataLoader(
        support.training_dataset(),
        batch_size=method.cfg.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    device = method.backbone.device
    trainer = L.Trainer(
        max_epochs=method.cfg.epochs,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        logger=_loggers(run, use_wandb),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        deterministic="warn",
    )
    trainer.fit(method, loader)
    method.to(device).eval()


def _loggers(run: Path, use_wandb: bool) -> list:
    from lightning.pytorch.loggers import CSVLogger

    loggers = [CSVLogger(run, name="logs", version="")]
    if use_wandb:
        from lightning.pytorch.loggers import WandbLogger

        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        loggers.append(WandbLogger(project="usad_bench", name=run.name, save_dir=str(run), mode=mode))
    return loggers


# ----------------------------------------------------------------------------- support calibration
@torch.no_grad()
def predict_table(method: Method, features) -> Prediction:
    """Predict on an in-memory FeatureTable (the support set), in chunks."""
    method.eval()
    parts = [method.predict_features(features.batch(slice(i, i + 32))) for i in range(0, len(features), 32)]
    cat = lambda xs: torch.cat(xs) if xs[0] is not None else None  # noqa: E731
    return Prediction(
        score=cat([p.score for p in parts]),
        anomaly_map=cat([p.anomaly_map for p in parts]),
        class_logits=cat([p.class_logits for p in parts]),
    )


def calibrate(method: Method, support: SupportSet) -> dict:
    """Thresholds and display range fitted on the support set (never on test data)."""
    pred = predict_table(method, support.features["orig"])
    out: dict = {"dice_threshold": None, "score_threshold": None, "map_range": None}
    labels = support.is_anomaly.numpy()
    if 0 < labels.sum() < len(labels):
        out["score_threshold"] = metrics.f1_max(labels, pred.score.cpu().numpy())[1]
    if pred.anomaly_map is not None:
        maps = pred.anomaly_map.cpu().numpy()
        out["map_range"] = [float(np.quantile(maps, 0.01)), float(np.quantile(maps, 0.999))]
        keep = support.pixel_truth.numpy()
        masks = support.masks["orig"].numpy().astype(bool)[keep]
        if masks.any():
            out["dice_threshold"] = metrics.fit_dice_threshold(masks, maps[keep])
    return out


# ----------------------------------------------------------------------------- saving and loading
def save_run(run: Path, opts: FitOptions, method: Method, manifest: Manifest, calibration: dict, timing: dict) -> None:
    config = {
        "usad_bench": usad_bench.__version__,
        "method": method.name,
        "label": opts.label or method.name,
        "method_config": method.cfg.to_dict(),
        "backbone": opts.backbone.to_dict(),
        "weights": method.backbone.weights_id,
        "random_weights": opts.backbone.is_random,
        "task": {
            "classes": method.task.classes,
            "shots": method.task.shots,
            "dataset": method.task.dataset,
            "image_size": method.task.image_size,
        },
        "shots": opts.shots,
        "seed": opts.seed,
        "train_manifest": str(Path(opts.train).resolve()),
        "train_manifest_sha256": file_digest(Path(opts.train).resolve()),
        "scoring": method.scoring,  # "per-image", or a transductive recipe's name (labelled in tables)
    }
    torch.save(method.trainable_state_dict(), run / "model.pt.tmp")
    (run / "model.pt.tmp").replace(run / "model.pt")
    write_json(run / "support.json", {**calibration, "timing": timing})
    write_yaml(run / "config.yaml", config)  # written last: its presence marks a finished fit


def is_fitted(run: Path) -> bool:
    return all((Path(run) / f).is_file() for f in ("config.yaml", "model.pt", "split.json", "support.json"))


def load_run(run: Path, device: str = "auto", backbone_override: BackboneSpec | None = None) -> tuple[Method, dict]:
    """Rebuild a fitted method from its run directory."""
    run = Path(run)
    if not is_fitted(run):
        raise UsadError(
            f"{run} is not a finished run (needs config.yaml, model.pt, split.json, support.json); run `usad-bench fit`"
        )
    config = read_yaml(run / "config.yaml")
    spec = backbone_override or BackboneSpec(**config["backbone"])
    backbone = Backbone.load(spec, resolve_device(device))
    if backbone.weights_id != config["weights"]:
        raise UsadError(f"backbone weights {backbone.weights_id} differ from the run's {config['weights']}")
    cls = get_method(config["method"])
    cfg = cls.config_class.from_dict(config["method_config"])
    t = config["task"]
    task = Task(t["classes"], t["shots"], t["dataset"], load_prompts(cfg.prompts), t["image_size"])
    method = cls(cfg, backbone, task).to(backbone.device)
    method.load_trainable_state_dict(torch.load(run / "model.pt", map_location=backbone.device))
    method.eval()
    return method, config


# ----------------------------------------------------------------------------- evaluation
@dataclass
class Collected:
    """Per-image outputs on one test set, gathered batch by batch."""

    ids: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    is_anomaly: list[bool] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)  # pixel-truth rows only, float32 (float16 would tie)
    masks: list[np.ndarray] = field(default_factory=list)  # same rows, bool


def parse_test_arg(arg: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH``; a bare path is named after its folder (``data/busi/manifest.csv`` -> busi)."""
    if "=" in arg:
        name, path = arg.split("=", 1)
        return name, Path(path)
    path = Path(arg)
    return (path.parent.name if path.name == "manifest.csv" else path.stem), path


def evaluate(
    run: Path,
    tests: list[tuple[str, Path]],
    out: Path | None = None,
    device: str = "auto",
    cache_dir: Path | None = DEFAULT_CACHE,
) -> dict:
    """Evaluate a fitted run on test manifests; writes metrics.json and predictions/ under ``out``."""
    method, config = load_run(run, device)
    out = Path(out or run)
    split = read_split(Path(run) / "split.json")
    support_info = read_json_safe(Path(run) / "support.json")
    extractor = FeatureExtractor(method.backbone, FeatureCache(cache_dir), method.feature_layers())
    results = {}
    for name, path in tests:
        manifest = read_manifest(path)
        test = manifest.where(lambda s: s.group not in set(split.support_groups))
        started = time.perf_counter()
        collected = collect(method, extractor, test.samples)
        results[name] = {
            **score_test(collected, method.task.classes, support_info.get("dice_threshold")),
            "manifest": str(Path(path).resolve()),
            "excluded_support_rows": len(manifest) - len(test),
            "eval_s": round(time.perf_counter() - started, 3),
        }
        write_predictions(out / "predictions" / f"{name}.csv", collected, method.task.classes)
    return write_metrics(out / "metrics.json", config, results, extractor.cache.stats())


@torch.no_grad()
def collect(method: Method, extractor: FeatureExtractor, samples: list[Sample]) -> Collected:
    if not samples:
        raise UsadError("test set is empty after removing the support patients")
    c = Collected()
    size = method.task.image_size
    for chunk, feats in extractor.iter_batches(samples):
        feats.cls, feats.patches = _to(feats.cls, method), _to(feats.patches, method)
        pred = method.predict_features(feats)
        c.ids += [s.id for s in chunk]
        c.labels += [s.label for s in chunk]
        c.is_anomaly += [s.is_anomaly for s in chunk]
        c.scores.append(pred.score.float().cpu().numpy())
        if pred.class_logits is not None:
            c.logits.append(pred.class_logits.float().cpu().numpy())
        if pred.anomaly_map is not None:
            for s, amap in zip(chunk, pred.anomaly_map, strict=True):
                if has_pixel_truth(s):
                    c.maps.append(amap.float().cpu().numpy())
                    c.masks.append(mask_tensor(s, size).numpy().astype(bool))
    return c


def _to(x: torch.Tensor | None, method: Method) -> torch.Tensor | None:
    return None if x is None else x.to(method.backbone.device)


def score_test(c: Collected, classes: list[str], dice_threshold: float | None) -> dict:
    """Every metric that the test set's labels allow; undefined ones are None with a note."""
    scores, anomalous = np.concatenate(c.scores), np.array(c.is_anomaly)
    out: dict = {"n_images": len(c.ids), "n_abnormal": int(anomalous.sum()), "notes": []}
    out.update(metrics.image_metrics(anomalous, scores))  # nan (-> null) when one of normal/abnormal is absent
    if not 0 < anomalous.sum() < len(anomalous):
        out["notes"].append("image metrics undefined: the test set has only one of normal/abnormal")
    if c.maps:
        masks, maps = np.stack(c.masks), np.stack(c.maps)
        out["n_pixel_images"] = len(masks)
        out.update(metrics.pixel_metrics(masks, maps))
        if dice_threshold is not None:
            out["dice"] = metrics.dice(masks, maps, dice_threshold)
    if c.logits:
        class_metrics = _class_metrics(c, classes)
        if class_metrics is None:
            out["notes"].append("class metrics undefined: fewer than two of the run's classes in the test set")
        else:
            out.update(class_metrics)
    return out


def _class_metrics(c: Collected, classes: list[str]) -> dict | None:
    index = {name: i for i, name in enumerate(classes)}
    known = np.array([label in index for label in c.labels])
    labels = np.array([index.get(label, -1) for label in c.labels])[known]
    logits = np.concatenate(c.logits)[known]
    if len(set(labels.tolist())) < 2:
        return None
    return metrics.multiclass_metrics(labels, logits, class_names=classes)


def write_predictions(path: Path, c: Collected, classes: list[str]) -> None:
    probs = torch.from_numpy(np.concatenate(c.logits)).softmax(-1).numpy() if c.logits else None
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "class", "is_anomaly", "score"] + ([f"p_{k}" for k in classes] if probs is not None else []))
    for i, score in enumerate(np.concatenate(c.scores)):
        row = [c.ids[i], c.labels[i], int(c.is_anomaly[i]), f"{score:.6g}"]
        writer.writerow(row + ([f"{p:.6g}" for p in probs[i]] if probs is not None else []))
    write_text(path, buf.getvalue())


def write_metrics(path: Path, config: dict, results: dict, cache_stats: dict) -> dict:
    """Merge these test sets into metrics.json (atomically); NaN becomes null."""
    existing = read_json_safe(path)
    earlier = existing.get("tests", {}) if existing.get("config") == config else {}  # never mix two runs' results
    payload = {
        "config": config,
        "tests": {**earlier, **_nan_to_none(results)},
        "cache": cache_stats,
    }
    if config.get("random_weights"):
        payload["warning"] = "random backbone weights: these numbers check the pipeline, they are not results"
    write_json(path, payload)
    return payload


def read_json_safe(path: Path) -> dict:
    return read_json(path) if Path(path).is_file() else {}


def _nan_to_none(obj):
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


# ----------------------------------------------------------------------------- prediction on new images
@torch.no_grad()
def predict(
    run: Path,
    images: Path,
    out: Path,
    device: str = "auto",
    cache_dir: Path | None = DEFAULT_CACHE,
    overlays: bool = True,
) -> Path:
    """Score every image under ``images``; write ``out/scores.csv`` and ``out/overlays/*.png``."""
    method, _ = load_run(run, device)
    calibration = read_json_safe(Path(run) / "support.json")
    samples = _unlabelled_samples(Path(images))
    extractor = FeatureExtractor(method.backbone, FeatureCache(cache_dir), method.feature_layers())
    classes, threshold = method.task.classes, calibration.get("score_threshold")
    class_columns = ["predicted_class"] + [f"p_{k}" for k in classes] if "logits" in method.outputs else []
    header = ["image", "score", "flagged", *class_columns]
    rows = []
    for chunk, feats in extractor.iter_batches(samples):
        feats.cls, feats.patches = _to(feats.cls, method), _to(feats.patches, method)
        pred = method.predict_features(feats)
        probs = pred.class_logits.softmax(-1).cpu().numpy() if pred.class_logits is not None else None
        for i, sample in enumerate(chunk):
            score = float(pred.score[i])
            flagged = "" if threshold is None else int(score >= threshold)
            cls_cols = [classes[int(probs[i].argmax())], *[f"{p:.6g}" for p in probs[i]]] if probs is not None else []
            rows.append([sample.id, f"{score:.6g}", flagged, *cls_cols])
            if overlays and pred.anomaly_map is not None:
                _save_overlay(out, sample, pred.anomaly_map[i].cpu().numpy(), calibration.get("map_range"))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(Path(out) / "scores.csv", buf.getvalue())
    return Path(out) / "scores.csv"


def _unlabelled_samples(folder: Path) -> list[Sample]:
    if not folder.is_dir():
        raise UsadError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UsadError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return [
        Sample(
            id=p.relative_to(folder).as_posix(),
            image=p,
            masks=(),
            label="unknown",
            is_anomaly=False,
            group=p.relative_to(folder).as_posix(),
            domain="predict",
            dataset="predict",
        )
        for p in paths
    ]


def _save_overlay(out: Path, sample: Sample, anomaly_map: np.ndarray, value_range) -> None:
    image = overlay(load_rgb(sample.image), anomaly_map, tuple(value_range) if value_range else None)
    # The id keeps the image's suffix (scan.png and scan.jpg must not share an overlay).
    save_png(image, Path(out) / "overlays" / (sample.id.replace("/", "__") + ".png"))
