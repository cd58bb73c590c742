"""WinCLIP(+) and AnomalyCLIP: pure helpers on hand-computed cases, shapes, frozen parts, learning."""

from __future__ import annotations

import pytest
import torch

from usad_bench.backbone import Backbone
from usad_bench.feature_kinds import DPAM, WINDOWS, window_indices
from usad_bench.features import FeatureTable
from usad_bench.methods import get_method
from usad_bench.methods.base import SupportSet, Task
from usad_bench.methods.winclip import association_scores, harmonic_aggregation, sentence_lists
from usad_bench.prompts import load_prompts
from usad_bench.runner import FitOptions, evaluate, fit

CLASSES = ["normal", "benign", "malignant"]


def build(name: str, backbone: Backbone, shots: int = 2, **options):
    cls = get_method(name)
    cfg = cls.config_class.from_dict(options)
    task = Task(CLASSES, shots, "toy", load_prompts(cfg.prompts), backbone.image_size)
    return cls(cfg, backbone, task)


def support_for(method, backbone: Backbone, shots: int = 2) -> SupportSet:
    torch.manual_seed(0)
    n = shots * len(CLASSES)
    feats = backbone.encode_features(torch.randn(n, 3, 64, 64), method.feature_request())
    table = FeatureTable([str(i) for i in range(n)], feats.cls, feats.patches, feats.layers, feats.kind, feats.windows)
    labels = torch.arange(len(CLASSES)).repeat_interleave(shots)
    masks = (torch.rand(n, 64, 64) > 0.9).float() * (labels > 0).float()[:, None, None]
    return SupportSet(
        [], {"orig": table}, {"orig": masks}, torch.ones(n, dtype=torch.bool), labels, (labels > 0).float()
    )


def test_harmonic_aggregation_by_hand():
    # 3x3 patches, four 2x2 windows scored 1, 0.75, 0.5, 0.25 (anomalib's docstring example)
    scores = torch.tensor([[1.0, 0.75, 0.5, 0.25]])
    out = harmonic_aggregation(scores, window_indices((3, 3), 2), 9).reshape(3, 3)
    assert out[0, 0] == pytest.approx(1.0)  # one window covers the corner
    assert out[0, 1] == pytest.approx(2 / (1 + 1 / 0.75))  # two windows
    assert out[1, 1] == pytest.approx(4 / (1 + 1 / 0.75 + 2 + 4))  # all four: 0.48
    assert out[2, 2] == pytest.approx(0.25)
    zero = harmonic_aggregation(torch.tensor([[0.0, 1.0, 1.0, 1.0]]), window_indices((3, 3), 2), 9)
    assert zero[0, 4] == 0 and zero[0, 2] == pytest.approx(1.0)  # a zero window zeroes the patches it covers


def test_association_scores_by_hand():
    refs = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    emb = torch.tensor([[[3.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]])
    expected = [0.0, (1 - 2**-0.5) / 2, 0.5]  # equal to a reference; 45 degrees; opposite one, orthogonal other
    assert association_scores(emb, refs)[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_winclip_prompt_ensembles():
    prompts = load_prompts("breast_ultrasound")
    ours, theirs = sentence_lists(prompts, "vocabulary"), sentence_lists(prompts, "winclip")
    assert len(ours["normal"]) == len(prompts.states["normal"]) * len(prompts.templates)
    assert len(theirs["normal"]) == 7 * 21 and len(theirs["abnormal"]) == 4 * 21  # 147 and 84, as WinCLIP
    assert "a photo of the breast with defect for anomaly detection." in theirs["abnormal"]


def test_winclip_plus_predicts_finite_maps_and_memory_matters(tiny_backbone: Backbone):
    method = build("winclip", tiny_backbone)
    zero_shot = build("winclip", tiny_backbone, few_shot=False)
    assert method.feature_request().kind == WINDOWS
    support = support_for(method, tiny_backbone)
    method.setup_support(support)
    assert bool(method.has_memory) and method.patch_memory.shape == (2 * 64, tiny_backbone.vision_width)
    test = support.features["orig"].batch(slice(0, 6))
    pred, pred_zs = method.predict_features(test), zero_shot.predict_features(test)
    assert pred.anomaly_map.shape == (6, 64, 64) and torch.isfinite(pred.anomaly_map).all()
    # a normal reference is its own nearest memory entry: its few-shot map is 0, so fusion halves its map
    assert torch.allclose(pred.anomaly_map[0], pred_zs.anomaly_map[0] / 2, atol=1e-4)
    assert ((pred.score >= 0) & (pred.score <= 1)).all()


def test_anomalyclip_trains_only_its_prompts(tiny_backbone: Backbone):
    method = build("anomalyclip", tiny_backbone)
    request = method.feature_request()
    assert request.kind == DPAM and request.layers == (4,) and request.dpam_start == 1
    support = support_for(method, tiny_backbone)
    feats = support.features["orig"].batch(slice(0, 6))
    losses = method.losses(feats, support.masks["orig"], support.is_anomaly, support.pixel_truth)
    sum(losses.values()).backward()
    assert set(losses) == {"image", "pixel"} and all(torch.isfinite(v) for v in losses.values())
    trained = {name for name, p in method.named_parameters() if p.grad is not None}
    assert trained == {"prompts.ctx", "prompts.deep.0"}  # the tiny text tower has 2 blocks: one deep prompt
    assert all(p.grad is None for p in tiny_backbone.parameters())
    assert len(method.trainable_parameters()) == 2
    pred = method.predict_features(feats)
    assert pred.anomaly_map.shape == (6, 64, 64) and torch.isfinite(pred.anomaly_map).all()


@pytest.mark.slow
def test_anomalyclip_learns_a_synthetic_lesion_from_4_shots(tmp_path, synth_domains, tiny_spec):
    scores = {}
    for epochs in (15, 0):  # trained, and the untrained control of the same seed
        run, cache = tmp_path / f"run{epochs}", tmp_path / "cache"
        fit(
            FitOptions(
                "anomalyclip", synth_domains["source"], 4, 0, run, tiny_spec, {"epochs": epochs}, cache_dir=cache
            )
        )
        metrics = evaluate(run, [("heldout", synth_domains["source"])], device="cpu", cache_dir=cache)
        scores[epochs] = metrics["tests"]["heldout"]["pixel_auroc"]
    # Observed with seed 0: held-out pixel AUROC 0.802 after 15 epochs, 0.302 untrained.
    assert scores[15] > 0.75 and scores[15] > scores[0] + 0.2
    print("anomalyclip held-out pixel AUROC", scores)
