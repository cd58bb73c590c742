"""Learning through the real pipeline on ``usad-tiny --pretrained synth`` (no hand-made embeddings).

The built-in weights were pretrained (``make pretrain-tiny``, Ultrasound-CLIP's semantic-aware objective)
on synthetic images only, in scanner styles that exclude the ``target`` preset used here; they are for
offline checks and teaching, not a clinical model, and the figures below are synthetic, not results.
Every test goes manifest -> ``runner.fit`` -> ``runner.evaluate`` -> metrics.json, as a user would:
4 shots per class of a ``source``-style domain, judged on new patients in the unseen ``target`` style.

These replace the learning tests that fed hand-made class-structured embeddings to the classifiers and to
UltraAD (the random tiny tower's embeddings carry no class signal). The thresholds sit below the values
measured with the shipped weights (quoted below) with a margin; the same tests on the random tiny
tower fail them (chance-level class AUROC, see ``test_random_tower_fails_the_same_bar``).
"""

from __future__ import annotations

import pytest
import torch.nn.functional as F

from usad_bench.backbone import Backbone, file_sha256, synth_weights_path
from usad_bench.cache import FeatureCache
from usad_bench.data.manifest import read_manifest
from usad_bench.data.synth import synthesise
from usad_bench.features import FeatureExtractor
from usad_bench.runner import FitOptions, evaluate, fit

pytestmark = pytest.mark.slow

# The trained few-shot classifiers, default recipes except CLIP-Adapter: at 4 shots x 3 classes x 2 views
# its batch of 32 makes one SGD step per epoch, and lr 0.01 leaves it where it started (baselines/clip_adapter.md).
CLASSIFIERS = ["linear_probe", "lp_plus_plus", "clip_adapter", "tip_adapter", "tip_adapter_f", "coop", "cocoop"]
OVERRIDES = {"clip_adapter": {"lr": 0.1}}
# Bars below the values measured with the shipped weights (d79b12fb..., this module's data, seed 0):
# zero-shot image AUROC 1.000, malignant-vs-benign 0.843; the seven classifiers' class macro AUROC 0.919-0.948
# and malignant-vs-benign 0.744 (lp_plus_plus) - 0.853; UltraAD pixel 0.987, class macro 0.952, mal-vs-ben 0.858.
# The random tiny tower through the same pipeline (linear_probe): class macro 0.585, malignant-vs-benign 0.529.
ZERO_SHOT_BAR = {"image_auroc": 0.9, "cls_auroc_malignant_vs_benign": 0.75}
CLASS_BAR = {"cls_auroc_macro": 0.85, "cls_auroc_malignant_vs_benign": 0.68}
ULTRAAD_BAR = {"pixel_auroc": 0.9, "cls_auroc_macro": 0.85, "cls_auroc_malignant_vs_benign": 0.75}


@pytest.fixture(scope="module")
def domains(tmp_path_factory) -> dict:
    """A source (adaptation) domain and a target style pretraining never saw, new patients in both."""
    root = tmp_path_factory.mktemp("pretrained_learning")
    return {
        "source": synthesise(root / "source", n=60, seed=11, style="source"),
        "target": synthesise(root / "target", n=90, seed=12, style="target"),
        "cache": root / "cache",  # one feature cache for the module: its key holds the weights' identity
    }


def run_metrics(method, domains, spec, tmp_path, shots=4, overrides=None) -> dict:
    """Fit on ``shots`` per class of the source, evaluate on the unseen target; the target's metrics."""
    opts = FitOptions(
        method, domains["source"], shots, 0, tmp_path / method, spec, overrides or {},
        cache_dir=domains["cache"], device="cpu",
    )  # fmt: skip
    run = fit(opts)
    payload = evaluate(run, [("target", domains["target"])], device="cpu", cache_dir=domains["cache"])
    if spec.pretrained == "synth":
        assert "synthetic-only" in payload.get("warning", ""), "synthetic-weights runs must say so"
    return payload["tests"]["target"]


def report(name: str, metrics: dict) -> None:
    keys = ("image_auroc", "pixel_auroc", "cls_auroc_macro", "cls_auroc_malignant_vs_benign")
    print(f"\n[pretrained] {name:14s} " + "  ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics))


def test_synth_weights_identity_is_their_content(pretrained_tiny, tiny_backbone):
    path = synth_weights_path()
    assert path.stat().st_size <= 10 * 2**20
    assert pretrained_tiny.weights_id == f"synth:usad-tiny:{file_sha256(path)}"
    assert pretrained_tiny.describe()["weights"] != tiny_backbone.describe()["weights"]  # separate cache entries


def test_pretrained_embeddings_tell_images_apart(pretrained_tiny, tiny_backbone, domains):
    """The random tower maps every image to nearly one point (cosine ~0.99); the pretrained one does not."""
    samples = read_manifest(domains["target"]).samples[:30]

    def mean_cosine(backbone: Backbone) -> float:
        cls = F.normalize(FeatureExtractor(backbone, FeatureCache(None), ()).extract(samples).cls, dim=-1)
        return float((cls @ cls.T).mean())

    assert mean_cosine(pretrained_tiny) < 0.9 < mean_cosine(tiny_backbone)


def test_zero_shot_knows_the_vocabulary(domains, pretrained_tiny_spec, tmp_path):
    """No shots: lesion vs normal and malignant vs benign from the class and state prompts alone."""
    metrics = run_metrics("zero_shot_clip", domains, pretrained_tiny_spec, tmp_path)
    report("zero_shot_clip", metrics)
    assert metrics["image_auroc"] > ZERO_SHOT_BAR["image_auroc"]
    assert metrics["cls_auroc_malignant_vs_benign"] > ZERO_SHOT_BAR["cls_auroc_malignant_vs_benign"]


@pytest.mark.parametrize("method", CLASSIFIERS)
def test_few_shot_classifiers_learn_classes(method, domains, pretrained_tiny_spec, tmp_path):
    """Every trained classifier tells normal / benign / malignant apart on the unseen target style."""
    metrics = run_metrics(method, domains, pretrained_tiny_spec, tmp_path, overrides=OVERRIDES.get(method))
    report(method, metrics)
    assert metrics["cls_auroc_macro"] > CLASS_BAR["cls_auroc_macro"], method
    assert metrics["cls_auroc_malignant_vs_benign"] > CLASS_BAR["cls_auroc_malignant_vs_benign"], method


def test_random_tower_fails_the_same_bar(domains, tiny_spec, tmp_path):
    """The bar above is not trivially low: the random tiny tower, same pipeline, stays below it."""
    metrics = run_metrics("linear_probe", domains, tiny_spec, tmp_path)
    report("random tower", metrics)
    assert metrics["cls_auroc_macro"] < CLASS_BAR["cls_auroc_macro"]
    assert metrics["cls_auroc_malignant_vs_benign"] < CLASS_BAR["cls_auroc_malignant_vs_benign"]


def test_ultraad_learns_lesions_and_classes(domains, pretrained_tiny_spec, tmp_path):
    """Real CLS and patch tokens: UltraAD's maps find the lesions and its class branch the classes."""
    metrics = run_metrics("ultraad", domains, pretrained_tiny_spec, tmp_path)
    report("ultraad", metrics)
    for key, bar in ULTRAAD_BAR.items():
        assert metrics[key] > bar, key
