"""Learning through the real pipeline on ``usad-tiny --pretrained synth`` (no hand-made embeddings).

The built-in weights were pretrained (``make pretrain-tiny``, Ultrasound-CLIP's semantic-aware objective)
on synthetic images only, in scanner styles that exclude the ``target`` preset used here; they are for
offline checks and teaching, not a clinical model, and the figures below are synthetic, not results.
Every test goes manifest -> ``runner.fit`` -> ``runner.evaluate`` -> metrics.json, as a user would.
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


@pytest.fixture(scope="module")
def domains(tmp_path_factory) -> dict:
    """A source (adaptation) domain and a target style pretraining never saw, new patients in both."""
    root = tmp_path_factory.mktemp("pretrained_learning")
    return {
        "source": synthesise(root / "source", n=60, seed=11, style="source"),
        "target": synthesise(root / "target", n=90, seed=12, style="target"),
    }


def run_metrics(method, domains, pretrained_tiny_spec, tmp_path, shots=4, overrides=None) -> dict:
    """Fit on ``shots`` per class of the source, evaluate on the unseen target; the target's metrics."""
    opts = FitOptions(
        method, domains["source"], shots, 0, tmp_path / method, pretrained_tiny_spec, overrides or {},
        cache_dir=tmp_path / "cache", device="cpu",
    )  # fmt: skip
    run = fit(opts)
    payload = evaluate(run, [("target", domains["target"])], device="cpu", cache_dir=tmp_path / "cache")
    assert "synthetic-only" in payload.get("warning", ""), "synthetic-weights runs must say so"
    return payload["tests"]["target"]


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
    metrics = run_metrics("zero_shot_clip", domains, pretrained_tiny_spec, tmp_path)
    assert metrics["image_auroc"] > 0.7
    assert metrics["cls_auroc_malignant_vs_benign"] > 0.6


@pytest.mark.parametrize("method", ["linear_probe", "tip_adapter", "clip_adapter"])
def test_few_shot_classifiers_learn_classes(method, domains, pretrained_tiny_spec, tmp_path):
    """Replaces the hand-made class-structured embeddings of test_classifiers.py's learning test."""
    overrides = {"clip_adapter": {"lr": 0.1}}.get(method)  # as test_classifiers.py: 1 SGD step/epoch at 4 shots
    metrics = run_metrics(method, domains, pretrained_tiny_spec, tmp_path, overrides=overrides)
    assert metrics["cls_auroc_macro"] > 0.7, method


def test_ultraad_learns_lesions_and_classes(domains, pretrained_tiny_spec, tmp_path):
    """Replaces test_ultraad.py's class test on substituted embeddings: real CLS and patch tokens."""
    metrics = run_metrics("ultraad", domains, pretrained_tiny_spec, tmp_path)
    assert metrics["pixel_auroc"] > 0.85
    assert metrics["cls_auroc_macro"] > 0.75
