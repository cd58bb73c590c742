"""Hybrid Tuning: its adapter's pieces checked by hand, gradients, and learning on the tiny backbone."""

from __future__ import annotations

import math

import pytest
import torch

from usad_bench.cache import FeatureCache
from usad_bench.data.manifest import read_manifest
from usad_bench.data.sampler import sample_support
from usad_bench.data.synth import synthesise
from usad_bench.features import FeatureExtractor
from usad_bench.methods.hybrid_adapter import FrequencyFilter, HybridAdapter, HybridPatchAdapter, NoiseEstimator
from usad_bench.runner import FitOptions, build_method, build_support, evaluate, fit


def make_method(name: str, backbone, manifest_path, overrides=None):
    """A method set up on 2 shots per class of a manifest, and its support set."""
    manifest = read_manifest(manifest_path)
    split = sample_support(manifest, 2, seed=0)
    samples = manifest.subset(split.support_ids).samples
    torch.manual_seed(0)
    method = build_method(name, overrides or {}, backbone, split.classes, 2, samples)
    support = build_support(
        samples,
        FeatureExtractor(backbone, FeatureCache(None), method.feature_request()),
        method.task,
        method.train_variants(),
    )
    method.setup_support(support)
    return method, support


def cosine_grid(h: int, w: int, fy: int, fx: int) -> torch.Tensor:
    """(H, W) cos(2 pi (fy y / H + fx x / W)): all its energy sits in rFFT2 bin (fy, fx)."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cos(2 * math.pi * (fy * y / h + fx * x / w))


def test_spectral_filter_removes_exactly_the_zeroed_frequency():
    h = w = 8
    periodic, kept = cosine_grid(h, w, 0, 2), cosine_grid(h, w, 1, 1)  # an artefact and a structure to keep
    x = torch.stack([periodic + kept, periodic]).unsqueeze(0)  # (1, 2, H, W)
    filt = FrequencyFilter(2, (h, w), mode="spectral")
    assert torch.allclose(filt(x), x, atol=1e-5)  # initialised to ones: the identity
    with torch.no_grad():
        filt.weight[:, 0, 2] = 0.0  # stop bin (fy=0, fx=2) in both channels
    out = filt(x)[0]
    assert torch.allclose(out[0], kept, atol=1e-5)  # only the artefact went
    assert out[1].abs().max() < 1e-5
    with torch.no_grad():
        filt.weight[:, 0, 2] = 0.5
    assert torch.allclose(filt(x)[0, 1], 0.5 * periodic, atol=1e-5)  # attenuated by exactly that factor


def test_channel_filter_is_a_per_channel_rescaling():
    """The original code's filter (one value per channel) treats every frequency alike."""
    x = torch.randn(2, 3, 5, 6)
    filt = FrequencyFilter(3, (5, 6), mode="channel")
    with torch.no_grad():
        filt.weight.copy_(torch.tensor([0.0, 0.5, 2.0]))
    assert torch.allclose(filt(x), x * filt.weight.view(1, 3, 1, 1), atol=1e-5)


def test_noise_estimator_weights_are_a_distribution_from_global_statistics():
    est = NoiseEstimator(8)
    x = torch.randn(4, 8, 6, 6)
    weights = est(x)
    assert weights.shape == (4, 3, 1, 1)
    assert (weights >= 0).all() and torch.allclose(weights.sum(1), torch.ones(4, 1, 1))
    shuffled = x.flatten(2)[:, :, torch.randperm(36)].view_as(x)  # same per-channel means
    assert torch.allclose(est(shuffled), weights, atol=1e-6)  # depends on the pooled level only
    assert not torch.allclose(est(x + 3.0), weights, atol=1e-4)  # a different level, different weights


def test_adapter_shapes_identity_start_and_gradients():
    torch.manual_seed(0)
    adapter = HybridAdapter(16, (3, 4), bottleneck=8).eval()
    tokens = torch.randn(2, 12, 16, requires_grad=True)
    out = adapter(tokens)
    assert out.shape == tokens.shape
    out.sum().backward()
    assert all(p.grad is not None for p in adapter.parameters())
    assert HybridPatchAdapter(16, 5, (3, 4))(torch.randn(2, 12, 16)).shape == (2, 12, 5)


def test_only_adapter_and_heads_get_gradients(tiny_backbone, synth_domains):
    method, support = make_method("hybrid_tuning", tiny_backbone, synth_domains["source"])
    batch = next(iter(support.training_loader(batch_size=4, seed=0)))
    method.training_step(batch, 0).backward()
    assert all(p.grad is None for p in tiny_backbone.parameters())
    trained = {name.split(".")[0] for name, p in method.named_parameters() if p.grad is not None}
    assert trained == {"adapters", "heads"}
    assert all(p.grad is not None for p in method.adapters.parameters())


def test_ultraad_hybrid_adapter_option(tiny_backbone, synth_domains):
    method, support = make_method("ultraad", tiny_backbone, synth_domains["source"], {"adapter": "hybrid"})
    assert all(isinstance(a, HybridPatchAdapter) for a in method.adapters)
    batch = next(iter(support.training_loader(batch_size=4, seed=0)))
    method.training_step(batch, 0).backward()
    assert all(p.grad is not None for a in method.adapters for p in a.parameters())
    assert all(p.grad is None for p in tiny_backbone.parameters())


@pytest.fixture(scope="module")
def domains(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hybrid_learning")
    return {
        "source": synthesise(root / "source", n=30, seed=21, style="source"),
        "target": synthesise(root / "target", n=40, seed=22, style="target"),
    }


def target_metrics(method, domains, spec, tmp_path, overrides=None) -> dict:
    opts = FitOptions(
        method, domains["source"], 4, 0, tmp_path / method, spec, overrides or {},
        cache_dir=tmp_path / "cache", device="cpu",
    )  # fmt: skip
    run = fit(opts)
    return evaluate(run, [("target", domains["target"])], device="cpu", cache_dir=tmp_path / "cache")["tests"]["target"]


@pytest.mark.slow  # two fits + evaluations through the runner
def test_learns_from_four_shots_per_class(domains, pretrained_tiny_spec, tmp_path):
    """4 shots per class on the pretrained tiny model (synthetic weights), scored on an unseen style."""
    zero = target_metrics("zero_shot_clip", domains, pretrained_tiny_spec, tmp_path)
    hybrid = target_metrics(
        "hybrid_tuning", domains, pretrained_tiny_spec, tmp_path, {"lr": 1e-3, "epochs": 25}
    )  # short schedule for CI
    print("zero_shot_clip", {k: round(zero[k], 3) for k in ("image_auroc", "cls_auroc_macro")})
    print("hybrid_tuning", {k: round(hybrid[k], 3) for k in ("image_auroc", "cls_auroc_macro", "pixel_auroc")})
    assert hybrid["image_auroc"] > 0.7
    assert hybrid["pixel_auroc"] > 0.7
