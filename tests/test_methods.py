"""Every registered method, on the tiny backbone: shapes, no NaNs, gradients, determinism, saving.

New methods are covered automatically: register them and import them in methods/__init__.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from usad_bench.backbone import Backbone
from usad_bench.cache import FeatureCache
from usad_bench.data.manifest import read_manifest
from usad_bench.data.sampler import sample_support
from usad_bench.errors import UsadError
from usad_bench.features import FeatureExtractor
from usad_bench.methods import Method, Prediction, get_method, list_methods
from usad_bench.methods.base import MethodConfig
from usad_bench.runner import build_method, build_support

SHOTS = 2


def make_method(name: str, backbone: Backbone, manifest_path, overrides=None) -> tuple[Method, object]:
    manifest = read_manifest(manifest_path)
    split = sample_support(manifest, SHOTS, seed=0)
    samples = manifest.subset(split.support_ids).samples
    torch.manual_seed(0)
    method = build_method(name, overrides or {}, backbone, split.classes, SHOTS, samples)
    extractor = FeatureExtractor(backbone, FeatureCache(None), method.feature_request())
    support = build_support(samples, extractor, method.task, method.train_variants())
    method.setup_support(support)
    return method, support


@pytest.fixture(params=list_methods())
def method_name(request) -> str:
    return request.param


def test_registry_lists_reference_methods():
    assert {"zero_shot_clip", "linear_adapter"} <= set(list_methods())
    with pytest.raises(UsadError, match="unknown method"):
        get_method("no-such-method")


def test_prediction_shapes_and_finiteness(method_name, tiny_backbone, synth_domains):
    method, support = make_method(method_name, tiny_backbone, synth_domains["source"])
    method.eval()
    pred = method.predict_features(support.features["orig"].batch(slice(0, 3)))
    assert isinstance(pred, Prediction)
    assert pred.score.shape == (3,) and torch.isfinite(pred.score).all()
    size = tiny_backbone.image_size
    if "map" in method.outputs:
        assert pred.anomaly_map.shape == (3, size, size) and torch.isfinite(pred.anomaly_map).all()
    else:
        assert pred.anomaly_map is None
    if "logits" in method.outputs:
        assert pred.class_logits.shape == (3, len(method.task.classes))
        assert torch.isfinite(pred.class_logits).all()
    else:
        assert pred.class_logits is None


def test_trainable_parameters_get_gradients_and_backbone_none(method_name, tiny_backbone, synth_domains):
    cls = get_method(method_name)
    if not cls.trainable:
        pytest.skip("training-free")
    method, support = make_method(method_name, tiny_backbone, synth_domains["source"])
    method.train()
    loader = torch.utils.data.DataLoader(support.training_dataset(), batch_size=len(support), shuffle=False)
    batch = next(iter(loader))
    method.log = lambda *a, **k: None  # outside a Trainer, Lightning's logging has nowhere to go
    loss = method.training_step(batch, 0)
    loss.backward()
    params = dict(method.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    assert trainable and all(not n.startswith("backbone.") for n in trainable)
    missing = [n for n in trainable if params[n].grad is None or params[n].grad.abs().sum() == 0]
    if missing:  # a zero-initialised output layer (UltraAD's MiniNet) passes no gradient back before its first step
        torch.optim.SGD([params[n] for n in trainable], lr=0.1).step()
        method.zero_grad()
        method.training_step(batch, 0).backward()
        missing = [n for n in missing if params[n].grad is None or params[n].grad.abs().sum() == 0]
    assert not missing, f"no gradient reaches {missing}"
    assert all(p.grad is None for p in tiny_backbone.parameters())


def test_state_round_trip_reproduces_predictions(method_name, tiny_backbone, synth_domains):
    method, support = make_method(method_name, tiny_backbone, synth_domains["source"])
    method.eval()
    feats = support.features["orig"].batch(slice(0, 4))
    before = method.predict_features(feats)
    state = method.trainable_state_dict()
    assert not any(k.startswith("backbone.") for k in state)
    fresh, _ = make_method(method_name, tiny_backbone, synth_domains["source"])
    for p in fresh.trainable_parameters():  # make sure loading is what restores the values
        torch.nn.init.normal_(p)
    fresh.load_trainable_state_dict(state)
    fresh.eval()
    after = fresh.predict_features(feats)
    assert torch.allclose(before.score, after.score, atol=1e-6)


def test_config_defaults_round_trip_and_reject_unknown_keys(method_name):
    cls = get_method(method_name)
    cfg = cls.config_class()
    assert isinstance(cfg, MethodConfig)
    assert cls.config_class.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UsadError, match="no option"):
        cls.config_class.from_dict({"definitely_not_an_option": 1})


def test_focal_loss_is_april_gans_formula():
    """APRIL-GAN's FocalLoss (alpha 1, gamma 2, smooth 1e-5), written out per pixel from its definition:
    the one-hot target of class t is clamped into [smooth / (K - 1), 1 - smooth] (K = 2 classes),
    p_t = <smoothed target, probabilities> + smooth, and the loss is the mean of -(1 - p_t)^2 log p_t."""
    from usad_bench.methods.losses import focal_loss

    g = torch.Generator().manual_seed(0)
    logits = 6.0 * torch.randn(2, 2, 5, 5, generator=g, dtype=torch.float64)  # some confidently wrong pixels
    probs = logits.softmax(1)
    target = (torch.rand(2, 5, 5, generator=g) > 0.5).double()
    smooth, total = 1e-5, 0.0
    for b in range(2):
        for y in range(5):
            for x in range(5):
                t = int(target[b, y, x])
                smoothed = [min(max(1.0 if k == t else 0.0, smooth), 1.0 - smooth) for k in range(2)]
                p_t = sum(smoothed[k] * float(probs[b, k, y, x]) for k in range(2)) + smooth
                total += -((1.0 - p_t) ** 2) * math.log(p_t)
    assert float(focal_loss(probs, target)) == pytest.approx(total / 50, rel=1e-12)
    # Every pixel keeps a gradient, even one whose true-class probability is below the smoothing term.
    worst = torch.tensor([[[[1e-9]], [[1.0 - 1e-9]]]], dtype=torch.float64, requires_grad=True)  # p(normal) ~ 0
    focal_loss(worst, torch.zeros(1, 1, 1, dtype=torch.float64)).backward()
    assert worst.grad[0, 0].abs().item() > 1.0
