"""Every registered method, on the tiny backbone: shapes, no NaNs, gradients, determinism, saving.

New methods are covered automatically: register them and import them in methods/__init__.py.
"""

from __future__ import annotations

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
    extractor = FeatureExtractor(backbone, FeatureCache(None), method.feature_layers())
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
