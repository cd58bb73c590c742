"""MVFA's test-set min-max (``test_minmax: true``): a named transductive scoring, never the default."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from usad_bench.cache import FeatureCache
from usad_bench.data.manifest import read_manifest
from usad_bench.data.sampler import read_split
from usad_bench.data.synth import synthesise
from usad_bench.features import FeatureExtractor
from usad_bench.io import read_json, read_yaml
from usad_bench.methods.base import Task
from usad_bench.methods.mvfa import TEST_MINMAX, Mvfa, MvfaConfig, fused_prediction, minmax_over_set
from usad_bench.prompts import load_prompts
from usad_bench.runner import FitOptions, evaluate, exclude_support, fit, load_run, predict, read_csv_rows
from usad_bench.tables import run_label

CLASSES = ["normal", "benign", "malignant"]


def mvfa(backbone, **options) -> Mvfa:
    task = Task(CLASSES, 2, "synth", load_prompts("april_gan"), backbone.image_size)
    return Mvfa(MvfaConfig.from_dict({"epochs": 0, **options}), backbone, task)


def direct_minmax_fusion(zero: np.ndarray, few: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """test_few.py's recipe written out in numpy: one min and max per branch over all maps, 0.5/0.5, max."""
    z = (zero - zero.min()) / (zero.max() - zero.min())
    f = (few - few.min()) / (few.max() - few.min())
    fused = 0.5 * z + 0.5 * f
    return fused, fused.max(axis=(1, 2))


def test_finish_test_set_equals_the_direct_min_max_computation(tiny_backbone):
    g = torch.Generator().manual_seed(0)
    zero, few = 3 * torch.rand(5, 4, 4, generator=g) + 1, 0.2 * torch.rand(5, 4, 4, generator=g)
    pred = mvfa(tiny_backbone, test_minmax=True).finish_test_set({"zero_map": zero, "few_map": few})
    fused, score = direct_minmax_fusion(zero.numpy(), few.numpy())
    np.testing.assert_allclose(pred.anomaly_map.numpy(), fused, rtol=1e-6)
    np.testing.assert_allclose(pred.score.numpy(), score, rtol=1e-6)
    alone = mvfa(tiny_backbone, test_minmax=True).finish_test_set({"zero_map": zero})  # no normal shots
    np.testing.assert_allclose(alone.anomaly_map.numpy(), minmax_over_set(zero).numpy())
    assert torch.equal(minmax_over_set(torch.full((2, 3, 3), 7.0)), torch.zeros(2, 3, 3))  # no 0/0


def test_min_max_changes_the_ranking_on_a_hand_made_pair():
    # image A: zero map up to 10, few map flat; image B: zero map up to 8, few map up to 1
    zero = torch.tensor([[[0.0, 10.0]], [[0.0, 8.0]]])  # (2, 1, 2)
    few = torch.tensor([[[0.0, 0.0]], [[0.0, 1.0]]])
    per_image = fused_prediction(zero, few).score  # 0.5 * 10 = 5.0 vs 0.5 * 8 + 0.5 * 1 = 4.5
    transductive = fused_prediction(minmax_over_set(zero), minmax_over_set(few)).score  # 0.5 vs 0.4 + 0.5
    assert per_image.tolist() == [5.0, 4.5]
    assert transductive.tolist() == pytest.approx([0.5, 0.9])


def test_the_option_names_the_scoring_and_the_table_labels_it(tiny_backbone):
    default, minmax = mvfa(tiny_backbone), mvfa(tiny_backbone, test_minmax="true")
    assert (default.scoring, default.transductive) == ("per-image", False)
    assert (minmax.scoring, minmax.transductive) == (TEST_MINMAX, True)
    assert run_label({"label": "mvfa", "scoring": default.scoring}) == "mvfa"
    assert run_label({"label": "mvfa", "scoring": minmax.scoring}) == "mvfa (transductive)"


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    return synthesise(tmp_path_factory.mktemp("mvfa_tr") / "d", n=24, seed=0, size=64)


def fit_and_eval(tmp_path, domain, tiny_spec, **options):
    run = tmp_path / ("minmax" if options else "default")
    opts = FitOptions("mvfa", domain, 2, 0, run, tiny_spec, {"epochs": 0, **options}, cache_dir=None, device="cpu")
    fit(opts)
    return run, evaluate(run, [("synth", domain)], device="cpu", cache_dir=None)


def branch_maps_of_test_set(run):
    """The raw (T, S, S) branch maps of the run's test images, one image at a time (no runner involved)."""
    method, config = load_run(run, "cpu")
    test, _ = exclude_support(read_manifest(config["train_manifest"]), read_split(run / "split.json"), config)
    table = FeatureExtractor(method.backbone, FeatureCache(None), method.feature_request()).extract(test.samples)
    with torch.no_grad():
        maps = [method.branch_maps(table.batch(slice(i, i + 1))) for i in range(len(table))]
    return [s.id for s in test.samples], *(torch.cat([m[k] for m in maps]).numpy() for k in range(2))


def test_runs_record_their_scoring_and_eval_follows_it(tmp_path, domain, tiny_spec, caplog):
    """usad-tiny with random weights, no training: the figures are meaningless; only the recipe is checked."""
    default_run, default = fit_and_eval(tmp_path, domain, tiny_spec)
    minmax_run, minmax = fit_and_eval(tmp_path, domain, tiny_spec, test_minmax=True)
    assert read_yaml(default_run / "config.yaml")["scoring"] == "per-image"
    assert read_yaml(minmax_run / "config.yaml")["scoring"] == TEST_MINMAX
    assert run_label(read_json(minmax_run / "metrics.json")["config"]) == "mvfa (transductive)"
    assert run_label(read_json(default_run / "metrics.json")["config"]) == "mvfa"

    ids, zero, few = branch_maps_of_test_set(default_run)  # same seed and support: same maps in both runs
    rows = {
        name: read_csv_rows(run / "predictions" / "synth.csv") for name, run in [("d", default_run), ("m", minmax_run)]
    }
    assert [r["id"] for r in rows["d"]] == [r["id"] for r in rows["m"]] == ids
    per_image = (0.5 * zero + 0.5 * few).max(axis=(1, 2))  # the default stays per image, unchanged
    np.testing.assert_allclose([float(r["score"]) for r in rows["d"]], per_image, rtol=1e-4)
    np.testing.assert_allclose([float(r["score"]) for r in rows["m"]], direct_minmax_fusion(zero, few)[1], rtol=1e-4)
    assert "dice" not in minmax["tests"]["synth"]  # a per-image support threshold does not fit min-maxed maps
    assert any("dice absent" in n and TEST_MINMAX in n for n in minmax["tests"]["synth"]["notes"])
    assert default["tests"]["synth"]["pixel_auroc"] != minmax["tests"]["synth"]["pixel_auroc"]

    with caplog.at_level(logging.WARNING):  # predict on new images falls back to per-image scoring, and says so
        out = predict(minmax_run, domain.parent / "images", tmp_path / "pred", "cpu", cache_dir=None, overlays=False)
    assert any("per-image" in r.getMessage() for r in caplog.records)
    predicted = {r["image"]: float(r["score"]) for r in read_csv_rows(out)}
    assert len(predicted) == 24 and all(np.isfinite(list(predicted.values())))
