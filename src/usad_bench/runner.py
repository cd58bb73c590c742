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

import collections
import contextlib
import csv
import io
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
from tqdm import tqdm

import usad_bench
from usad_bench import metrics
from usad_bench.backbone import Backbone, BackboneSpec, resolve_device
from usad_bench.cache import FeatureCache, file_digest
from usad_bench.data.images import IMAGE_SUFFIXES, image_size, load_rgb, masks_among, open_image
from usad_bench.data.manifest import Manifest, Sample, read_manifest
from usad_bench.data.preprocess import has_pixel_truth, mask_tensor
from usad_bench.data.sampler import read_split, sample_support, write_split
from usad_bench.errors import UsadError
from usad_bench.features import FeatureExtractor
from usad_bench.io import (
    exclusive_lock,
    lock_path_for,
    read_json,
    read_yaml,
    save_png,
    write_json,
    write_text,
    write_yaml,
)
from usad_bench.methods import Method, Prediction, SupportSet, Task, get_method
from usad_bench.methods.base import PER_IMAGE
from usad_bench.prompts import load_prompts
from usad_bench.tables import weights_label
from usad_bench.viz import label_image, overlay

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
    wandb: bool | dict = False  # also log to Weights & Biases: True, or tracking settings (offline without a key)
    label: str | None = None  # name in tables (ablation variants share a method); None = the method name


def fit(opts: FitOptions) -> Path:
    """Validate everything, build the run in a temporary sibling folder, then swap it in when complete.

    Method, options, manifest, shots, device and weights are checked before anything is written, and
    the folder ``opts.out`` is replaced only by a finished run: a failure or a kill at any point
    leaves an earlier run there exactly as it was. A lock keeps a second process out meanwhile.
    """
    run = Path(os.path.abspath(opts.out))  # "--out ." has a parent and a name too
    get_method(opts.method).config_class.from_dict(opts.overrides)  # bad name or option: fail before writing
    # The method's authors' MLP activation unless the user chose one; config.yaml records the resolved spec.
    opts = replace(opts, backbone=opts.backbone.with_default_activation(get_method(opts.method).activation))
    device = pick_device(opts.device)
    L.seed_everything(opts.seed, workers=True, verbose=False)
    manifest = read_manifest(opts.train)
    split = sample_support(manifest, opts.shots, opts.seed, opts.classes)
    support_samples = manifest.subset(split.support_ids).samples
    warn_about_images(support_samples, "support")
    warn_if_one_sided(support_samples)
    with exclusive_lock(lock_path_for(run), str(run)):
        check_replaceable(run)
        started = time.perf_counter()
        log.info("loading backbone %s (weights: %s)", opts.backbone.name, opts.backbone.pretrained or "random")
        backbone = Backbone.load(opts.backbone, device)
        staging = Path(tempfile.mkdtemp(prefix=f".{run.name}.new-", dir=run.parent))
        try:
            new = staging / run.name  # the final name inside, so loggers (wandb) see the run's own name
            new.mkdir()
            _fit_into(new, opts, manifest, split, support_samples, backbone, time.perf_counter() - started)
            swap_in(new, run)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("fit finished: %s", run)
    return Path(opts.out)


def _fit_into(run: Path, opts: FitOptions, manifest: Manifest, split, support_samples, backbone, load_s) -> None:
    """Every stage of a fit, writing into the (temporary) folder ``run``."""
    timing: dict[str, float] = {"load_s": load_s}
    write_split(split, run / "split.json")
    method = build_method(opts.method, opts.overrides, backbone, split.classes, opts.shots, support_samples)

    started = time.perf_counter()
    log.info("extracting features of %d support images", len(support_samples))
    extractor = FeatureExtractor(backbone, FeatureCache(opts.cache_dir), method.feature_request())
    support = build_support(support_samples, extractor, method.task, method.train_variants())
    timing["features_s"] = time.perf_counter() - started

    started = time.perf_counter()
    wandb_run = _start_tracking(run, opts)
    method.setup_support(support)
    if method.trainable and method.cfg.epochs > 0:
        log.info("training %s for %d epochs", opts.method, method.cfg.epochs)
        train(method, support, run, opts.seed, wandb_run=wandb_run)
    timing["train_s"] = time.perf_counter() - started

    log.info("calibrating thresholds on the support set")
    calibration = calibrate(method, support)
    save_run(run, opts, method, manifest, calibration, timing)
    if wandb_run is not None:
        from usad_bench import tracking

        tracking.log_fit(wandb_run, run)
        wandb_run.finish()


def _start_tracking(run: Path, opts: FitOptions):
    """The wandb run of this fit (None without --wandb); its config is completed from config.yaml at the end."""
    from usad_bench import tracking

    settings = tracking.settings_from(opts.wandb)
    if settings is None:
        return None
    preview = {
        "method": opts.method,
        "label": opts.label or opts.method,
        "shots": opts.shots,
        "seed": opts.seed,
        "train_manifest": str(Path(opts.train).resolve()),
        "backbone": opts.backbone.to_dict(),
        "random_weights": opts.backbone.is_random,
        "method_config": get_method(opts.method).config_class.from_dict(opts.overrides).to_dict(),
    }
    return tracking.start(run, settings, preview, job_type="fit")


RUN_OUTPUTS = ("config.yaml", "metrics.json", "model.pt", "support.json", "split.json")
RUN_MARKERS = (*RUN_OUTPUTS, "logs", "predictions")  # any of these: the folder is a (possibly unfinished) run


def check_replaceable(run: Path) -> None:
    """Refuse to replace a folder that is not a run: ``--out ~`` must never delete a home directory."""
    recover_interrupted_swap(run)
    if not run.exists():
        return
    if not run.is_dir():
        raise UsadError(f"--out {run} is a file, not a run folder; choose another --out")
    if any(run.iterdir()) and not any((run / name).exists() for name in RUN_MARKERS):
        raise UsadError(
            f"--out {run} holds files that are not a usad_bench run (no config.yaml, split.json, model.pt or "
            "logs/); a fit replaces the whole folder, so choose a new or empty --out"
        )


def swap_in(new: Path, run: Path) -> None:
    """Replace ``run`` by the finished folder ``new``: two renames, with SIGINT/SIGTERM held back between them."""
    old = run.parent / f".{run.name}.old-{os.getpid()}"
    with signals_held():
        if run.exists():
            os.rename(run, old)
        os.rename(new, run)
    shutil.rmtree(old, ignore_errors=True)


def recover_interrupted_swap(run: Path) -> None:
    """After a SIGKILL or power cut mid-swap: put the earlier run back, drop half-built folders (lock held)."""
    leftovers = sorted(run.parent.glob(f".{run.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if leftovers and not run.exists():
        os.rename(leftovers.pop(), run)
    for path in [*leftovers, *run.parent.glob(f".{run.name}.new-*")]:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def signals_held():
    """Defer SIGINT and SIGTERM (delivered on exit) so a swap is never cut between its two renames."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def pick_device(device: str) -> torch.device:
    """``--device`` checked before any work: a one-line error for a device this machine does not have."""
    try:
        resolved = resolve_device(str(device).strip().lower())
    except (RuntimeError, ValueError):
        raise UsadError(f"unknown device {device!r}; use --device auto, cpu, cuda or cuda:N (mps on Apple)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UsadError(
                f"--device {device}: PyTorch sees no CUDA GPU on this machine (torch {torch.__version__}); use "
                "--device cpu or auto, or install a CUDA build of PyTorch that matches the driver (nvidia-smi)"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UsadError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) here (cuda:0 ...)")
    elif resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsadError(f"--device {device}: Apple MPS is not available here; use --device cpu or auto")
    elif resolved.type != "cpu":
        raise UsadError(f"--device {device}: usad_bench runs on cpu, cuda or mps; use --device auto, cpu or cuda")
    return resolved


# ----------------------------------------------------------------------------- input checks (warnings)
TINY_SIDE = 32  # px; smaller images hold too little to resize up to a CLIP input meaningfully
EXTREME_ASPECT = 4.0  # width/height beyond 4:1 (either way) is badly distorted by the square resize


def warn_about_images(samples: list[Sample], what: str) -> None:
    """A warning with counts for tiny or extremely elongated images (resized, not cropped, to a square)."""
    sizes = {s.image: image_size(s.image) for s in samples}
    tiny = [(p, wh) for p, wh in sizes.items() if min(wh) < TINY_SIDE]
    elongated = [(p, wh) for p, wh in sizes.items() if max(wh) > EXTREME_ASPECT * min(wh)]
    if tiny:
        p, (w, h) = tiny[0]
        log.warning(
            "%d of %d %s images are smaller than %d px on a side (e.g. %s, %dx%d); they are scaled up to the "
            "model's input and their results are unreliable",
            len(tiny), len(sizes), what, TINY_SIDE, Path(p).name, w, h,
        )  # fmt: skip
    if elongated:
        p, (w, h) = elongated[0]
        log.warning(
            "%d of %d %s images have an aspect ratio beyond %g:1 (e.g. %s, %dx%d); they are squashed to a square "
            "input (not cropped); crop them to the scan region first",
            len(elongated), len(sizes), what, EXTREME_ASPECT, Path(p).name, w, h,
        )  # fmt: skip


def warn_if_one_sided(samples: list[Sample]) -> None:
    """A support set of only normal (or only abnormal) images calibrates no score threshold."""
    abnormal = sum(bool(s.is_anomaly) for s in samples)
    if abnormal in (0, len(samples)):
        kind = "normal" if abnormal == 0 else "abnormal"
        log.warning(
            "the support set has only %s images (%d); no score threshold can be fitted (predict leaves `flagged` "
            "empty) and classifiers learn a single class; add the other classes or drop --classes",
            kind, len(samples),
        )  # fmt: skip


def weights_warning(config: dict) -> str | None:
    """The sentence every artefact of a random- or synthetic-weights run carries (None for real weights)."""
    label = weights_label(config)  # "random weights", "synthetic-only weights" or None
    if label is None:
        return None
    return f"{label.replace('random ', 'random backbone ')}: these numbers check the pipeline, they are not results"


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


def train(method: Method, support: SupportSet, run: Path, seed: int, use_wandb: bool = False, wandb_run=None) -> None:
    """Fixed-length training with Lightning; the last state is kept (no checkpoint selection).

    The training curves also go to ``wandb_run`` when given (``use_wandb`` alone starts one with defaults).
    """
    # An epoch is one pass over the support images, each in one random cached view (base.SupportSet).
    loader = support.training_loader(method.cfg.batch_size, seed, drop_last=method.drop_last)
    device = method.backbone.device
    trainer = L.Trainer(
        max_epochs=method.cfg.epochs,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        logger=_loggers(run, use_wandb, wandb_run),
        enable_checkpointing=False,
        enable_progress_bar=_on_terminal(),  # a bar on a terminal, nothing in logs and CI
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        deterministic="warn",
    )
    trainer.fit(method, loader)
    method.to(device).eval()


def _loggers(run: Path, use_wandb: bool, wandb_run=None) -> list:
    from lightning.pytorch.loggers import CSVLogger

    from usad_bench import tracking

    loggers = [CSVLogger(run, name="logs", version="")]
    if wandb_run is None and use_wandb:
        wandb_run = tracking.start(run, {}, {"label": run.name}, job_type="train")
    if wandb_run is not None:
        loggers.append(tracking.lightning_logger(wandb_run))
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
    backbone = Backbone.load(spec, pick_device(device))
    if backbone.weights_id != config["weights"]:
        raise UsadError(f"backbone weights {backbone.weights_id} differ from the run's {config['weights']}")
    cls = get_method(config["method"])
    cfg = cls.config_class.from_dict(config["method_config"])
    t = config["task"]
    task = Task(t["classes"], t["shots"], t["dataset"], load_prompts(cfg.prompts), t["image_size"])
    method = cls(cfg, backbone, task).to(backbone.device)
    load_model_state(method, run / "model.pt")
    method.eval()
    return method, config


def load_model_state(method: Method, path: Path) -> None:
    """``model.pt`` into the rebuilt method; a damaged or foreign file is a one-line error, not a traceback."""
    try:
        state = torch.load(path, map_location=method.backbone.device)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError ... for a damaged file
        raise UsadError(
            f"{path} cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())}); the file is damaged: "
            "fit the run again"
        ) from exc
    try:
        method.load_trainable_state_dict(state)
    except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise UsadError(
            f"{path} does not fit {method.name} as configured in config.yaml ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())}); the run folder mixes two fits or was edited: fit it again"
        ) from exc


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
    predicts_maps: bool = False  # the method gave anomaly maps (pixel metrics possible at all)
    empty_lesion_masks: list[str] = field(default_factory=list)  # abnormal ids whose mask has no lesion pixel
    scoring: str = PER_IMAGE  # or the method's transductive recipe (the test set scored as a whole)


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
    wandb: bool | dict = False,
) -> dict:
    """Evaluate a fitted run on test manifests; writes metrics.json and predictions/ under ``out``.

    ``wandb`` (True or tracking settings) adds the metrics and a few overlays to the run's wandb run.
    """
    out = Path(out or run)
    with exclusive_lock(lock_path_for(Path(os.path.abspath(out))), str(out)):  # no fit may swap it meanwhile
        return _evaluate(Path(run), tests, out, device, cache_dir, wandb)


def _evaluate(
    run: Path, tests: list[tuple[str, Path]], out: Path, device: str, cache_dir: Path | None, wandb=False
) -> dict:
    method, config = load_run(run, device)
    split = read_split(Path(run) / "split.json")
    support_info = read_json_safe(Path(run) / "support.json")
    extractor = FeatureExtractor(method.backbone, FeatureCache(cache_dir), method.feature_request())
    results, tested = {}, {}
    for name, path in tests:
        manifest = read_manifest(path)
        test, excluded = exclude_support(manifest, split, config)
        tested[name] = test.samples
        started = time.perf_counter()
        log.info("evaluating on %s: %d images", name, len(test))
        collected = collect(method, extractor, test.samples, desc=f"eval {name}")
        results[name] = {
            **score_test(collected, method.task.classes, support_info.get("dice_threshold")),
            "manifest": str(Path(path).resolve()),
            **excluded,
            "eval_s": round(time.perf_counter() - started, 3),
        }
        write_predictions(out / "predictions" / f"{name}.csv", collected, method.task.classes, weights_warning(config))
    payload = write_metrics(out / "metrics.json", config, results, extractor.cache.stats())
    _track_eval(run, payload, wandb, method, extractor, tested, support_info.get("map_range"))
    return payload


def _track_eval(run: Path, payload: dict, wandb, method: Method, extractor, tested: dict, map_range) -> None:
    """Metrics of every test set and a few overlays per test set into the run's wandb run (with --wandb)."""
    from usad_bench import tracking

    settings = tracking.settings_from(wandb)
    if settings is None:
        return
    wandb_run = tracking.start(run, settings, payload["config"], job_type="eval")
    overlays = {name: tracking.overlay_panels(method, extractor, rows, map_range) for name, rows in tested.items()}
    tracking.log_eval(wandb_run, payload, overlays)
    wandb_run.finish()


def exclude_support(manifest: Manifest, split, config: dict) -> tuple[Manifest, dict]:
    """Test rows without the support set: by patient (``group``), then by image content (file sha256).

    The content rule catches the same image under another name or id (prepared twice, copied into
    another folder). Returns the test manifest and how many rows each rule removed.
    """
    support_groups = set(split.support_groups)
    by_patient = manifest.where(lambda s: s.group not in support_groups)
    digests = set(split.support_sha256.values()) or _support_digests(split, config)
    test = by_patient.where(lambda s: not Path(s.image).is_file() or file_digest(Path(s.image)) not in digests)
    counts = {
        "excluded_support_rows": len(manifest) - len(test),
        "excluded_by_patient": len(manifest) - len(by_patient),
        "excluded_by_content": len(by_patient) - len(test),
    }
    if counts["excluded_by_content"]:
        log.warning("%d test rows are support images under another name: left out", counts["excluded_by_content"])
    return test, counts


def _support_digests(split, config: dict) -> set[str]:
    """Digests of the support images for runs whose split.json predates ``support_sha256`` (from the train manifest)."""
    path = Path(config.get("train_manifest", ""))
    if not path.is_file():
        log.warning("train manifest %s not found: test rows are excluded by patient only, not by image content", path)
        return set()
    index = read_manifest(path).by_id()
    return {file_digest(index[i].image) for i in split.support_ids if i in index and index[i].image.is_file()}


@torch.no_grad()
def collect(method: Method, extractor: FeatureExtractor, samples: list[Sample], desc: str = "eval") -> Collected:
    if not samples:
        raise UsadError("test set is empty after removing the support patients")
    if method.transductive:
        return _collect_test_set(method, extractor, samples, desc)
    c = Collected()
    for chunk, feats in progress(extractor.iter_batches(samples), len(samples), desc):
        feats.cls, feats.patches = _to(feats.cls, method), _to(feats.patches, method)
        _add_prediction(c, chunk, method.predict_features(feats), method.task.image_size)
    return c


def _collect_test_set(method: Method, extractor: FeatureExtractor, samples: list[Sample], desc: str) -> Collected:
    """A transductive method's two passes: every batch's parts (on the CPU), then one prediction for the set."""
    parts: list[dict[str, torch.Tensor]] = []
    for _, feats in progress(extractor.iter_batches(samples), len(samples), desc):
        feats.cls, feats.patches = _to(feats.cls, method), _to(feats.patches, method)
        parts.append({k: v.cpu() for k, v in method.predict_parts(feats).items()})
    pred = method.finish_test_set({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    c = Collected(scoring=method.scoring)
    _add_prediction(c, samples, pred, method.task.image_size)
    return c


def _add_prediction(c: Collected, chunk: list[Sample], pred: Prediction, size: int) -> None:
    """Append the prediction for ``chunk`` (a batch, or a transductive method's whole test set)."""
    c.ids += [s.id for s in chunk]
    c.labels += [s.label for s in chunk]
    c.is_anomaly += [s.is_anomaly for s in chunk]
    c.scores.append(pred.score.float().cpu().numpy())
    if pred.class_logits is not None:
        c.logits.append(pred.class_logits.float().cpu().numpy())
    if pred.anomaly_map is not None:
        c.predicts_maps = True
        for s, amap in zip(chunk, pred.anomaly_map, strict=True):
            if has_pixel_truth(s):
                _add_pixel_truth(c, s, amap, size)


def _add_pixel_truth(c: Collected, s: Sample, amap: torch.Tensor, size: int) -> None:
    """An abnormal image whose mask is empty (at the input size) has unknown, not all-background, ground truth."""
    mask = mask_tensor(s, size).numpy().astype(bool)
    if s.is_anomaly and not mask.any():
        c.empty_lesion_masks.append(s.id)
        return
    c.maps.append(amap.float().cpu().numpy())
    c.masks.append(mask)


def progress(batches, total: int, desc: str):
    """Yield ``(chunk, feats)`` batches, drawing a bar on a terminal; silent in logs and CI (not a TTY)."""
    with tqdm(total=total, desc=desc, unit="img", disable=not _on_terminal(), leave=False) as bar:
        for chunk, feats in batches:
            yield chunk, feats
            bar.update(len(chunk))


def _on_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _to(x: torch.Tensor | None, method: Method) -> torch.Tensor | None:
    return None if x is None else x.to(method.backbone.device)


def score_test(c: Collected, classes: list[str], dice_threshold: float | None) -> dict:
    """Every metric that the test set's labels allow; undefined ones are None with a note."""
    scores, anomalous = np.concatenate(c.scores), np.array(c.is_anomaly)
    out: dict = {"n_images": len(c.ids), "n_abnormal": int(anomalous.sum()), "notes": []}
    if c.scoring != PER_IMAGE:  # the support's threshold is on per-image maps, another scale (see the note)
        dice_threshold = None
    out.update(metrics.image_metrics(anomalous, scores))  # nan (-> null) when one of normal/abnormal is absent
    if not 0 < anomalous.sum() < len(anomalous):
        out["notes"].append("image metrics undefined: the test set has only one of normal/abnormal")
    elif np.ptp(scores) == 0:  # e.g. a classifier fitted without a "normal" class scores every image 1
        out.update({k: float("nan") for k in ("image_auroc", "image_ap", "image_f1_max")})
        why = "" if "normal" in classes else f" (the run's classes {', '.join(classes)} include no 'normal')"
        out["notes"].append(f"image metrics undefined: every image has the same score{why}")
    if c.maps:
        masks, maps = np.stack(c.masks), np.stack(c.maps)
        out["n_pixel_images"] = len(masks)
        out.update(metrics.pixel_metrics(masks, maps))
        if dice_threshold is not None:
            out["dice"] = metrics.dice(masks, maps, dice_threshold)
        out.update(_fixed_threshold_metrics(masks, maps, out["notes"]))
    if c.logits and "normal" in classes and 0 < anomalous.sum() < len(anomalous):
        # The class branch's own detection figure (UltraAD's ablation reports I-AUROC from p(abnormal)).
        logits = np.concatenate(c.logits)
        out.update(metrics.class_branch_image_metrics(anomalous, logits, classes.index("normal")))
    if c.logits:
        class_metrics = _class_metrics(c, classes)
        if class_metrics is None:
            out["notes"].append("class metrics undefined: fewer than two of the run's classes in the test set")
        else:
            out.update(class_metrics)
    out["notes"] += missing_metric_notes(out, c, dice_threshold)
    return out


def missing_metric_notes(out: dict, c: Collected, dice_threshold: float | None) -> list[str]:
    """A note for every pixel / Dice / class metric that is null or absent, and for any other null left unexplained."""
    notes = []
    if c.empty_lesion_masks:
        notes.append(
            f"{len(c.empty_lesion_masks)} abnormal images have an empty mask at the input size (e.g. "
            f"{', '.join(c.empty_lesion_masks[:3])}): left out of pixel metrics"
        )
    if not c.predicts_maps:
        notes.append("pixel metrics and dice absent: the method predicts no anomaly maps")
    elif not c.maps:
        notes.append("pixel metrics and dice absent: no test image has pixel ground truth (no lesion mask, no normal)")
    else:
        fixed = [k for k in out if k.startswith(("dice_at_", "iou_at_"))]
        undefined = [k for k in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro", *fixed) if not _finite(out.get(k))]
        if undefined:
            notes.append(f"{', '.join(undefined)} undefined: no test image has a lesion mask (all pixels background)")
        if c.scoring != PER_IMAGE:
            notes.append(f"dice absent: its threshold is fitted on per-image support maps, not on {c.scoring} maps")
        elif dice_threshold is None:
            notes.append("dice absent: the support set has no lesion mask to fit its threshold on")
        elif not _finite(out.get("dice")):
            notes.append("dice undefined: no test image has a lesion mask")
    if not c.logits:
        notes.append("class metrics absent: the method predicts no class logits")
    explained = " ".join(out["notes"] + notes)
    unexplained = [k for k, v in out.items() if isinstance(v, float) and not _finite(v) and k not in explained]
    groups = {"image_": "image metrics", "cls_": "class metrics"}
    unexplained = [k for k in unexplained if not any(k.startswith(p) and g in explained for p, g in groups.items())]
    if unexplained:
        notes.append(f"{', '.join(unexplained)} undefined on this test set (a class or label it needs is absent)")
    return notes


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and bool(np.isfinite(value))


def _fixed_threshold_metrics(masks: np.ndarray, maps: np.ndarray, notes: list[str]) -> dict:
    """Dice / IoU at 0.5, for maps on a probability scale only (0.5 means nothing on another scale)."""
    if maps.min() < 0.0 or maps.max() > 1.0:
        notes.append("dice_at_0.5 / iou_at_0.5 undefined: the maps are not probabilities in [0, 1]")
        return {}
    return metrics.fixed_threshold_metrics(masks, maps, 0.5)


def _class_metrics(c: Collected, classes: list[str]) -> dict | None:
    index = {name: i for i, name in enumerate(classes)}
    known = np.array([label in index for label in c.labels])
    labels = np.array([index.get(label, -1) for label in c.labels])[known]
    logits = np.concatenate(c.logits)[known]
    if len(set(labels.tolist())) < 2:
        return None
    return metrics.multiclass_metrics(labels, logits, class_names=classes)


def write_predictions(path: Path, c: Collected, classes: list[str], warning: str | None = None) -> None:
    """One row per test image; a random/synthetic-weights run starts with a '# <warning>' comment row."""
    probs = torch.from_numpy(np.concatenate(c.logits)).softmax(-1).numpy() if c.logits else None
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    write_comment(buf, warning)
    writer.writerow(["id", "class", "is_anomaly", "score"] + ([f"p_{k}" for k in classes] if probs is not None else []))
    for i, score in enumerate(np.concatenate(c.scores)):
        row = [c.ids[i], c.labels[i], int(c.is_anomaly[i]), f"{score:.6g}"]
        writer.writerow(row + ([f"{p:.6g}" for p in probs[i]] if probs is not None else []))
    write_text(path, buf.getvalue())


def write_comment(buf: io.StringIO, warning: str | None) -> None:
    """A '# ...' first line that travels with the CSV (pandas: ``read_csv(path, comment="#")``)."""
    if warning:
        buf.write(f"# {' '.join(warning.split())}\n")


def read_csv_rows(path: Path) -> list[dict]:
    """The rows of a CSV this package wrote, skipping '# ' comment rows."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def write_metrics(path: Path, config: dict, results: dict, cache_stats: dict) -> dict:
    """Merge these test sets into metrics.json (atomically); NaN becomes null."""
    existing = read_json_safe(path)
    earlier = existing.get("tests", {}) if existing.get("config") == config else {}  # never mix two runs' results
    payload = {
        "config": config,
        "tests": {**earlier, **_nan_to_none(results)},
        "cache": cache_stats,
    }
    if weights_warning(config):
        payload["warning"] = weights_warning(config)
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
    """Score every image under ``images`` (a folder, searched recursively, or one file).

    Writes ``out/scores.csv`` (one row per image; an unreadable image gets its reason in ``error``
    and is skipped) and ``out/overlays/<image name>.png``.
    """
    method, config = load_run(run, device)
    if method.transductive:  # new images are no test set: score them as the support calibration was fitted
        log.warning("run scored with %r: predict scores each image on its own (per-image recipe)", method.scoring)
    calibration = read_json_safe(Path(run) / "support.json")
    samples = _unlabelled_samples(Path(images))
    errors = unreadable_images(samples)
    readable = [s for s in samples if s.id not in errors]
    warn_about_images(readable, "input")
    log.info("scoring %d images from %s", len(readable), images)
    extractor = FeatureExtractor(method.backbone, FeatureCache(cache_dir), method.feature_request())
    classes, threshold = method.task.classes, calibration.get("score_threshold")
    class_columns = ["predicted_class"] + [f"p_{k}" for k in classes] if "logits" in method.outputs else []
    names = overlay_names(readable)
    stamp = weights_stamp(config)
    scored: dict[str, list] = {}
    for chunk, feats in progress(extractor.iter_batches(readable), len(readable), "predict"):
        feats.cls, feats.patches = _to(feats.cls, method), _to(feats.patches, method)
        pred = method.predict_features(feats)
        probs = pred.class_logits.softmax(-1).cpu().numpy() if pred.class_logits is not None else None
        for i, sample in enumerate(chunk):
            score = float(pred.score[i])
            flagged = "" if threshold is None else int(score >= threshold)
            cls_cols = [classes[int(probs[i].argmax())], *[f"{p:.6g}" for p in probs[i]]] if probs is not None else []
            scored[sample.id] = [f"{score:.6g}", flagged, *cls_cols, ""]
            if overlays and pred.anomaly_map is not None:
                amap = pred.anomaly_map[i].cpu().numpy()
                _save_overlay(Path(out) / "overlays" / names[sample.id], sample, amap, calibration, stamp)
    blank = [""] * (2 + len(class_columns))
    rows = [[s.id, *(scored[s.id] if s.id in scored else [*blank, errors[s.id]])] for s in samples]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    write_comment(buf, weights_warning(config))
    writer.writerow(["image", "score", "flagged", *class_columns, "error"])
    writer.writerows(rows)
    write_text(Path(out) / "scores.csv", buf.getvalue())
    _report_unreadable(errors, len(samples), Path(out) / "scores.csv")
    return Path(out) / "scores.csv"


def unreadable_images(samples: list[Sample]) -> dict[str, str]:
    """id -> reason, for images that cannot be decoded (checked up front so one bad file stops nothing)."""
    errors = {}
    for sample in samples:
        try:
            open_image(sample.image)
        except UsadError as exc:
            errors[sample.id] = str(exc)
    return errors


def _report_unreadable(errors: dict[str, str], total: int, scores: Path) -> None:
    if not errors:
        return
    first = next(iter(errors))
    if len(errors) == total:
        raise UsadError(f"none of the {total} images could be read (e.g. {first}: {errors[first]}); see {scores}")
    log.warning("%d of %d images could not be read and were skipped (e.g. %s); their reasons are in %s",
                len(errors), total, first, scores)  # fmt: skip


def overlay_names(samples: list[Sample]) -> dict[str, str]:
    """id -> overlay file name: ``a/scan.png`` -> ``a__scan.png``; ``scan_jpg.png`` when a stem is shared."""
    stems = {s.id: Path(s.id).with_suffix("").as_posix().replace("/", "__") for s in samples}
    counts = collections.Counter(stems.values())
    return {
        i: f"{stem}.png" if counts[stem] == 1 else f"{stem}_{Path(i).suffix.lstrip('.').lower()}.png"
        for i, stem in stems.items()
    }


def weights_stamp(config: dict) -> str | None:
    """The short form burnt into figures: 'RANDOM WEIGHTS: not a result'."""
    label = weights_label(config)
    return None if label is None else f"{label.upper()}: not a result"


def _unlabelled_samples(folder: Path) -> list[Sample]:
    if folder.is_file():  # a single image: its file name is its id
        if folder.suffix.lower() not in IMAGE_SUFFIXES:
            raise UsadError(f"{folder} is not an image ({', '.join(IMAGE_SUFFIXES)}); pass an image or a folder")
        folder, paths = folder.parent, [folder]
    elif not folder.is_dir():
        raise UsadError(f"image folder or file not found: {folder}")
    else:
        paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        paths = _without_masks(paths, folder)
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


def _without_masks(paths: list[Path], folder: Path) -> list[Path]:
    """Never score a file that is another image's mask (``x_mask.png`` beside ``x.png``, ``masks/x.png``)."""
    masks = set(masks_among(paths, folder))
    if masks:
        names = sorted(p.relative_to(folder).as_posix() for p in masks)
        more = ", ..." if len(names) > 3 else ""
        log.warning("predict: %d mask files skipped, not scored (%s%s)", len(names), ", ".join(names[:3]), more)
    return [p for p in paths if p not in masks]


def _save_overlay(path: Path, sample: Sample, anomaly_map: np.ndarray, calibration: dict, stamp: str | None) -> None:
    value_range = calibration.get("map_range")
    image = overlay(load_rgb(sample.image), anomaly_map, tuple(value_range) if value_range else None)
    save_png(label_image(image, stamp), path, comment=stamp)
