"""Metrics against scikit-learn and against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from usad_bench import metrics


def random_binary(seed: int, n: int = 500, ties: bool = False):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    scores = rng.normal(size=n) + labels * 0.8
    if ties:
        scores = np.round(scores, 1)  # many equal scores: the curve must group them like sklearn
    return labels, scores


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
def test_auroc_ap_match_sklearn(seed, ties):
    labels, scores = random_binary(seed, ties=ties)
    assert metrics.auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.average_precision(labels, scores) == pytest.approx(
        skm.average_precision_score(labels, scores), abs=1e-12
    )


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_matches_sklearn_curve_and_threshold_reproduces_it(seed):
    labels, scores = random_binary(seed, ties=seed % 2 == 0)
    precision, recall, _ = skm.precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.nanmax(2 * precision * recall / (precision + recall))
    best, threshold = metrics.f1_max(labels, scores)
    assert best == pytest.approx(expected, abs=1e-12)
    assert skm.f1_score(labels, scores >= threshold) == pytest.approx(best, abs=1e-12)


def test_hand_made_image_metrics():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    # Pairs (pos, neg): (0.35>0.1) yes, (0.35>0.4) no, (0.8>0.1) yes, (0.8>0.4) yes -> 3/4.
    assert metrics.auroc(labels, scores) == pytest.approx(0.75)
    # Ranked: 0.8 (P) 0.4 (N) 0.35 (P) 0.1 (N): AP = 0.5 * 1 + 0.5 * 2/3.
    assert metrics.average_precision(labels, scores) == pytest.approx(0.5 + 1 / 3)
    assert metrics.image_metrics(labels, -scores)["image_auroc"] == pytest.approx(0.25)  # sign matters


def test_undefined_metrics_are_nan():
    assert np.isnan(metrics.auroc(np.ones(4), np.arange(4)))
    assert np.isnan(metrics.average_precision(np.zeros(4), np.arange(4)))
    assert np.isnan(metrics.f1_max(np.zeros(4), np.arange(4))[0])


def test_pixel_metrics_pool_every_pixel():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 16, 16), bool)
    masks[0, 4:9, 4:9] = True
    masks[1, 10:14, 2:6] = True
    maps = rng.random(masks.shape) + masks * 0.5
    out = metrics.pixel_metrics(masks, maps)
    assert out["pixel_auroc"] == pytest.approx(skm.roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert out["pixel_ap"] == pytest.approx(skm.average_precision_score(masks.ravel(), maps.ravel()), abs=1e-9)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.pixel_metrics(masks, maps[:, :8])


def brute_force_aupro(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    """Reference: PRO and FPR evaluated at every distinct threshold with explicit loops over regions."""
    regions = []
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask)
        regions += [(i, labelled == r) for r in range(1, count + 1)]
    background = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        predicted = maps >= t
        fprs.append((predicted & background).sum() / background.sum())
        pros.append(np.mean([(predicted[i] & region).sum() / region.sum() for i, region in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= limit
    xs, ys = list(fprs[keep]), list(pros[keep])
    j = np.flatnonzero(keep)[-1]
    if j + 1 < len(fprs) and fprs[j] < limit:
        xs.append(limit)
        ys.append(pros[j] + (pros[j + 1] - pros[j]) * (limit - fprs[j]) / (fprs[j + 1] - fprs[j]))
    return float(np.trapezoid(ys, xs) / limit)


@pytest.mark.parametrize("seed", range(3))
def test_aupro_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 12, 12), bool)
    masks[0, 1:4, 1:4] = True  # two regions of different size in one image: each counts once
    masks[0, 7:11, 6:12] = True
    masks[1, 5:7, 5:9] = True  # image 2 is normal: background only
    maps = np.round(rng.random(masks.shape) + masks * rng.random(), 2)
    assert metrics.aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps, 0.3), abs=1e-9)


def test_aupro_hand_made_extremes():
    masks = np.zeros((1, 8, 8), bool)
    masks[0, 2:4, 2:4] = True
    assert metrics.aupro(masks, masks.astype(float)) == pytest.approx(1.0)  # perfect separation
    assert metrics.aupro(masks, 1.0 - masks) == pytest.approx(0.0)  # lesions scored lowest
    assert np.isnan(metrics.aupro(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4))))


def test_dice_and_support_threshold():
    masks = np.zeros((3, 10, 10), bool)
    masks[0, 2:6, 2:6] = True
    masks[1, 5:9, 5:9] = True  # image 2 has no lesion and does not enter the mean
    maps = masks * 0.8 + 0.1
    assert metrics.dice(masks, maps, 0.5) == pytest.approx(1.0)
    half = maps.copy()
    half[1] = 0.0  # second lesion missed entirely -> Dice 0 for it
    assert metrics.dice(masks, half, 0.5) == pytest.approx(0.5)
    threshold = metrics.fit_dice_threshold(masks, maps)
    assert 0.1 < threshold <= 0.9
    assert metrics.dice(masks, maps, threshold) == pytest.approx(1.0)
    assert metrics.fit_dice_threshold(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4))) is None


@pytest.mark.parametrize("seed", range(4))
def test_multiclass_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=300)
    logits = rng.normal(size=(300, 3)) + np.eye(3)[labels] * 1.0
    out = metrics.multiclass_metrics(labels, logits, ["normal", "benign", "malignant"])
    probs = metrics.softmax(logits)
    assert out["cls_auroc_macro"] == pytest.approx(
        skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"), abs=1e-12
    )
    assert out["cls_balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, probs.argmax(1)))
    assert out["cls_macro_f1"] == pytest.approx(skm.f1_score(labels, probs.argmax(1), average="macro"))
    pair = labels > 0
    expected = skm.roc_auc_score(labels[pair] == 2, probs[pair, 2] / (probs[pair, 1] + probs[pair, 2]))
    assert out["cls_auroc_malignant_vs_benign"] == pytest.approx(expected)


def test_multiclass_with_a_class_absent_from_the_test_set():
    # BUS-BRA has no normal images: normal is left out of every average, but predicting it still costs.
    labels = np.array([1, 1, 2, 2])
    logits = np.log(np.array([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.1, 0.6, 0.3]]))
    out = metrics.multiclass_metrics(labels, logits, ["normal", "benign", "malignant"])
    assert "cls_auroc_normal" not in out
    assert out["cls_balanced_accuracy"] == pytest.approx(0.5)  # recall benign 1/2, malignant 1/2
    assert out["cls_macro_f1"] == pytest.approx(
        skm.f1_score(labels, logits.argmax(1), labels=[1, 2], average="macro", zero_division=0)
    )


def reference_ranking(scores: np.ndarray) -> metrics.Ranking:
    """The straightforward sort: a stable argsort of the negated scores."""
    scores = np.asarray(scores).ravel()
    order = np.argsort(-scores, kind="stable")
    return metrics.Ranking(order=order, scores=scores[order])


def tied_maps(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Float32 maps full of ties (coarse values, exact zeros of both signs, infinities) and lesion masks."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 20, 20), bool)
    masks[0, 3:9, 4:12] = True
    masks[1, 10:18, 10:15] = True
    masks[1, 1:3, 1:3] = True
    maps = np.round(rng.normal(size=masks.shape) + masks * 1.2, 1).astype(np.float32)
    maps[2, :3] = -0.0
    maps[2, 3:6] = 0.0
    maps[3, 0, :4] = [np.inf, -np.inf, -1e-30, 1e-30]
    return masks, maps


@pytest.mark.parametrize("seed", range(3))
def test_packed_sort_equals_stable_argsort(seed):
    _, maps = tied_maps(seed)
    packed, reference = metrics.rank_descending(maps), reference_ranking(maps)
    np.testing.assert_array_equal(packed.order, reference.order)  # ties in input order, as the stable sort
    np.testing.assert_array_equal(packed.scores, reference.scores)
    with_nan = maps.copy()
    with_nan[0, 0, 0] = np.nan  # NaN takes the argsort path: same result as before
    np.testing.assert_array_equal(metrics.rank_descending(with_nan).order, reference_ranking(with_nan).order)


@pytest.mark.parametrize("seed", range(3))
def test_pixel_metrics_with_one_shared_sort_equal_the_reference_path(seed):
    masks, maps = tied_maps(seed)
    maps[3, 0, :2] = 5.0, -5.0  # finite: scikit-learn and the brute force take no infinities
    shared = metrics.pixel_metrics(masks, maps)
    # Reference: the curve and AUPRO each from their own stable argsort (the code before the shared sort).
    curve = metrics.curve_metrics(masks, maps, reference_ranking(maps))
    reference = {
        "pixel_auroc": curve["auroc"],
        "pixel_ap": curve["ap"],
        "pixel_f1_max": curve["f1_max"],
        "aupro": metrics.aupro(masks, maps, ranking=reference_ranking(maps)),
    }
    assert shared == reference  # identical, not merely close
    assert shared["pixel_auroc"] == pytest.approx(skm.roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert shared["aupro"] == pytest.approx(brute_force_aupro(masks, maps, 0.3), abs=1e-9)
    tps, fps, thresholds = metrics.binary_curve(masks, maps)
    ref = metrics.binary_curve(masks, maps, ranking=reference_ranking(maps))
    for a, b in zip((tps, fps, thresholds), ref, strict=True):
        np.testing.assert_array_equal(a, b)


def test_dice_and_iou_at_a_fixed_threshold_hand_made():
    masks = np.zeros((3, 4, 4), bool)
    masks[0, 0, :4] = True  # 4 lesion pixels
    masks[1, 1:3, 1:3] = True  # 4 lesion pixels
    maps = np.zeros((3, 4, 4), np.float32)
    maps[0, 0, :2] = 0.9  # 2 of 4 found: Dice 2*2/(4+2) = 2/3, IoU 2/4
    maps[0, 3, 3] = 0.7  # plus one false positive: Dice 4/7, IoU 2/5
    maps[1, 1:3, 1:3] = 0.5  # exactly 0.5 counts as predicted: Dice 1, IoU 1
    maps[2] = 0.99  # no lesion: not in the means
    out = metrics.fixed_threshold_metrics(masks, maps, 0.5)
    assert set(out) == {"dice_at_0.5", "iou_at_0.5"}
    assert out["dice_at_0.5"] == pytest.approx((4 / 7 + 1) / 2)
    assert out["iou_at_0.5"] == pytest.approx((2 / 5 + 1) / 2)
    assert np.isnan(metrics.iou(np.zeros((1, 4, 4), bool), maps[:1], 0.5))


def test_class_branch_image_auroc_hand_made():
    # Classes (normal, benign, malignant); 1 - p(normal) = 0.9, 0.2, 0.6, 0.3 for labels 1, 0, 1, 0.
    p = np.array([[0.1, 0.5, 0.4], [0.8, 0.1, 0.1], [0.4, 0.3, 0.3], [0.7, 0.2, 0.1]])
    is_anomaly = np.array([1, 0, 1, 0])
    out = metrics.class_branch_image_metrics(is_anomaly, np.log(p), normal_index=0)
    assert out == {"image_auroc_class_branch": pytest.approx(1.0)}
    is_anomaly = np.array([1, 1, 0, 0])  # pairs: 0.9>0.6, 0.9>0.3, 0.2<0.6, 0.2<0.3 -> 2/4
    assert metrics.class_branch_image_metrics(is_anomaly, np.log(p), 0)["image_auroc_class_branch"] == 0.5
    # p(normal) rounds to 1 for every image: the log-odds still rank them.
    logits = np.array([[60.0, 1.0, 0.0], [60.0, 0.0, 0.0], [60.0, 3.0, 0.0], [60.0, -1.0, 0.0]])
    out = metrics.class_branch_image_metrics(np.array([1, 0, 1, 0]), logits, 0)
    assert out["image_auroc_class_branch"] == pytest.approx(1.0)


def test_score_test_reports_fixed_threshold_and_class_branch_metrics():
    from usad_bench.runner import Collected, score_test

    masks = np.zeros((4, 8, 8), bool)
    masks[0, 2:5, 2:5] = True
    masks[1, 0:2, :] = True
    maps = (masks * 0.7 + 0.1).astype(np.float32)
    maps[1, 0, :] = 0.2  # half of the second lesion missed at 0.5
    logits = np.log(np.array([[0.2, 0.5, 0.3], [0.3, 0.3, 0.4], [0.9, 0.05, 0.05], [0.6, 0.2, 0.2]]))
    c = Collected(
        ids=list("abcd"),
        labels=["benign", "malignant", "normal", "normal"],
        is_anomaly=[True, True, False, False],
        scores=[np.array([0.1, 0.9, 0.5, 0.2])],  # the mask-guided score ranks differently from the class branch
        logits=[logits],
        maps=list(maps),
        masks=list(masks),
        predicts_maps=True,
    )
    out = score_test(c, ["normal", "benign", "malignant"], dice_threshold=None)
    assert out["dice_at_0.5"] == pytest.approx((1.0 + 2 * 8 / (16 + 8)) / 2)  # lesion 2: 8 of 16 found
    assert out["iou_at_0.5"] == pytest.approx((1.0 + 8 / 16) / 2)
    assert out["image_auroc_class_branch"] == pytest.approx(1.0)  # 1 - p(normal): 0.8, 0.7 vs 0.1, 0.4
    assert out["image_auroc"] == pytest.approx(0.5)  # pairs: 0.1 < 0.5, 0.1 < 0.2, 0.9 > 0.5, 0.9 > 0.2
    c.maps = [m * 3.0 for m in c.maps]  # not probabilities: no fixed-threshold numbers, a note instead
    out = score_test(c, ["normal", "benign", "malignant"], dice_threshold=None)
    assert "dice_at_0.5" not in out and any("dice_at_0.5" in n for n in out["notes"])
