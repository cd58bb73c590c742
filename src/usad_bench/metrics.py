"""Image, pixel and multi-class metrics as pure NumPy functions.

Conventions:

* Scores: higher = more anomalous (or more likely the positive class). Labels are 0/1 or bool.
* Every metric is a fraction in [0, 1]; ``nan`` when the inputs cannot define it (one class only).
* Pixel metrics pool every pixel of every image passed in. The runner passes maps and masks at the
  model's input resolution (README, "Images and maps").
* Threshold-dependent numbers are of three kinds: ``*_f1_max`` is the best F1 over all thresholds of
  the data it is given (an oracle ceiling, never used for decisions); ``dice`` takes a threshold
  fitted elsewhere (``fit_dice_threshold`` on the support set); ``dice_at_0.5`` / ``iou_at_0.5``
  use a threshold fixed in advance on the map's probability scale.

AUROC, AP and F1 share one exact curve (``binary_curve``), tested against scikit-learn. Pixel
metrics sort the pixels once (``rank_descending``, an integer sort of packed (score bits, index)
keys) for both the curve and AUPRO, which keeps tens of millions of pixels affordable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

AUPRO_FPR_LIMIT = 0.3  # MVTec AD's integration limit for the per-region-overlap curve


# ----------------------------------------------------------------------------- the shared curve
@dataclass(frozen=True)
class Ranking:
    """Scores sorted high to low, ties in input order (what a stable argsort of ``-scores`` gives)."""

    order: np.ndarray  # (N,) indices into the flattened scores
    scores: np.ndarray  # (N,) the scores in that order


def rank_descending(scores: np.ndarray, packed: bool = True) -> Ranking:
    """Sort once; every curve over the same scores (pixel AUROC/AP/F1 and AUPRO) can share the result.

    ``packed`` sorts float32 scores as one uint64 array of (order-preserving score bits, index): a
    plain integer sort of tens of millions of keys is ~2x faster than NumPy's stable argsort of the
    floats and yields the same order, ties included (equal bits, then the smaller index first).
    ``packed=False``, float64 scores, NaN or over 2**32 scores take the stable argsort.
    """
    scores = np.asarray(scores).ravel()
    if scores.dtype.kind != "f" or scores.dtype.itemsize < 4:
        scores = scores.astype(np.float32)  # float16 maps are exact in float32; other types go up, never down
    if packed and scores.dtype == np.float32 and scores.size < 2**32 and not np.isnan(scores).any():
        return _packed_ranking(scores)
    order = np.argsort(-scores, kind="stable")
    return Ranking(order=order, scores=scores[order])


def _packed_ranking(scores: np.ndarray) -> Ranking:
    bits = (scores + np.float32(0.0)).view(np.uint32)  # + 0.0 turns -0.0 into 0.0: equal scores, equal bits
    negative = bits >= np.uint32(0x80000000)
    ascending = np.where(negative, ~bits, bits | np.uint32(0x80000000))  # unsigned order = float order
    keys = (~ascending).astype(np.uint64) << np.uint64(32)  # high word: descending score
    keys |= np.arange(scores.size, dtype=np.uint64)  # low word: index, so ties keep input order
    keys.sort()
    order = (keys & np.uint64(0xFFFFFFFF)).astype(np.intp)
    ascending = ~(keys >> np.uint64(32)).astype(np.uint32)
    positive = ascending >= np.uint32(0x80000000)
    sorted_bits = np.where(positive, ascending & np.uint32(0x7FFFFFFF), ~ascending)
    return Ranking(order=order, scores=sorted_bits.view(np.float32))


def binary_curve(
    labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None, ranking: Ranking | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (weighted) true and false positives at each distinct threshold, high to low.

    Args:
        labels: (N,) 0/1 ground truth.
        scores: (N,) scores; a sample is predicted positive when its score >= the threshold.
        weights: optional (N,) sample weights (AUPRO weights lesion pixels by their region's size).
        ranking: ``rank_descending(scores)`` when the caller already sorted these scores.

    Returns:
        tps, fps, thresholds: (T,) arrays, one entry per distinct score, thresholds decreasing.
    """
    ranking = ranking if ranking is not None else rank_descending(scores)
    order, scores = ranking.order, ranking.scores
    labels = np.asarray(labels).ravel().astype(bool)[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # ties share one threshold
    if weights is None:  # counts: no float copy of the (possibly huge) pixel arrays
        tps = np.cumsum(labels, dtype=np.int64)[last_of_tie]
        fps = last_of_tie + 1 - tps
    else:
        w = np.asarray(weights, dtype=np.float64).ravel()[order]
        tps = np.cumsum(np.where(labels, w, 0.0))[last_of_tie]
        fps = np.cumsum(np.where(labels, 0.0, w))[last_of_tie]
    return tps.astype(np.float64), fps.astype(np.float64), scores[last_of_tie]


def _defined(labels: np.ndarray) -> bool:
    labels = np.asarray(labels).astype(bool)
    return 0 < labels.sum() < labels.size


def curve_metrics(labels: np.ndarray, scores: np.ndarray, ranking: Ranking | None = None) -> dict[str, float]:
    """AUROC, AP, best F1 and its threshold from one sort (nan when only one class is present).

    AUROC is trapezoidal over the exact ROC curve and AP = sum over thresholds of
    (R_n - R_{n-1}) * P_n, both as scikit-learn defines them. ``ranking``: a sort of ``scores``
    already made (``rank_descending``).
    """
    nan = float("nan")
    if not _defined(labels):
        return {"auroc": nan, "ap": nan, "f1_max": nan, "f1_threshold": nan}
    tps, fps, thresholds = binary_curve(labels, scores, ranking=ranking)
    tpr, fpr = np.r_[0.0, tps / tps[-1]], np.r_[0.0, fps / fps[-1]]
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=tps > 0)
    best = int(np.argmax(f1))
    return {
        "auroc": float(np.trapezoid(tpr, fpr)),
        "ap": float(np.sum(np.diff(np.r_[0.0, recall]) * precision)),
        "f1_max": float(f1[best]),
        "f1_threshold": float(thresholds[best]),
    }


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve."""
    return curve_metrics(labels, scores)["auroc"]


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (scikit-learn's definition, no interpolation)."""
    return curve_metrics(labels, scores)["ap"]


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds, and the threshold that reaches it (score >= threshold is positive)."""
    m = curve_metrics(labels, scores)
    return m["f1_max"], m["f1_threshold"]


# ----------------------------------------------------------------------------- image level
def image_metrics(is_anomaly: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Normal-vs-abnormal detection from image scores."""
    m = curve_metrics(is_anomaly, scores)
    return {"image_auroc": m["auroc"], "image_ap": m["ap"], "image_f1_max": m["f1_max"]}


# ----------------------------------------------------------------------------- pixel level
def pixel_metrics(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = AUPRO_FPR_LIMIT) -> dict[str, float]:
    """Localisation over all pixels of (N, H, W) boolean masks and float maps, pooled.

    The pixels are sorted once (``rank_descending``) for both the pixel curve and AUPRO's.
    """
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    ranking = rank_descending(maps)
    m = curve_metrics(masks, maps, ranking)
    return {
        "pixel_auroc": m["auroc"],
        "pixel_ap": m["ap"],
        "pixel_f1_max": m["f1_max"],
        "aupro": aupro(masks, maps, fpr_limit, ranking),
    }


def aupro(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float = AUPRO_FPR_LIMIT, ranking: Ranking | None = None
) -> float:
    """Area under the per-region-overlap curve for FPR in [0, fpr_limit], divided by fpr_limit.

    PRO(t) is the mean, over every connected lesion region of every image, of the fraction of
    the region scored >= t; FPR(t) is the fraction of background pixels scored >= t. Giving each
    lesion pixel the weight 1 / (region size * number of regions) turns PRO into the weighted
    true-positive rate of one exact curve, so no threshold grid is needed. ``ranking``: a sort of
    ``maps`` already made (``rank_descending``).
    """
    masks = np.asarray(masks).astype(bool)
    weights = np.zeros(masks.shape, dtype=np.float64)
    regions = 0
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask)  # 4-connectivity, as MVTec's evaluation
        if count:
            sizes = np.bincount(labelled.ravel())  # sizes[0] is the background
            weights[i][mask] = 1.0 / sizes[labelled[mask]]
            regions += count
    if regions == 0 or masks.all():
        return float("nan")
    weights[masks] /= regions
    weights[~masks] = 1.0
    pro, fp, _ = binary_curve(masks, maps, weights, ranking)
    fpr = np.r_[0.0, fp / fp[-1]]
    pro = np.r_[0.0, pro]
    # Cut the curve at fpr_limit, interpolating PRO linearly on the segment that crosses it.
    inside = fpr <= fpr_limit
    last = np.flatnonzero(inside)[-1]
    xs, ys = list(fpr[inside]), list(pro[inside])
    if last + 1 < len(fpr) and fpr[last] < fpr_limit:
        x0, x1, y0, y1 = fpr[last], fpr[last + 1], pro[last], pro[last + 1]
        xs.append(fpr_limit)
        ys.append(y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    return float(np.trapezoid(ys, xs) / fpr_limit)


def dice(masks: np.ndarray, maps: np.ndarray, threshold: float) -> float:
    """Mean per-image Dice over images that have a lesion, with pixels >= threshold predicted."""
    masks = np.asarray(masks).astype(bool)
    lesion = masks.reshape(len(masks), -1).any(axis=1)
    if not lesion.any():
        return float("nan")
    return float(np.mean(_dice_per_image(masks[lesion], np.asarray(maps)[lesion] >= threshold)))


def iou(masks: np.ndarray, maps: np.ndarray, threshold: float) -> float:
    """Mean per-image IoU (Jaccard) over images that have a lesion, with pixels >= threshold predicted."""
    masks = np.asarray(masks).astype(bool)
    lesion = masks.reshape(len(masks), -1).any(axis=1)
    if not lesion.any():
        return float("nan")
    truth = masks[lesion].reshape(int(lesion.sum()), -1)
    predicted = (np.asarray(maps)[lesion] >= threshold).reshape(len(truth), -1)
    overlap = (truth & predicted).sum(axis=1)
    union = (truth | predicted).sum(axis=1)  # >= 1: every image here has a lesion
    return float(np.mean(overlap / union))


def fixed_threshold_metrics(masks: np.ndarray, maps: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """``dice_at_<t>`` and ``iou_at_<t>``: Dice and IoU at one threshold fixed in advance, no fitting.

    Meant for maps on a probability scale (0.5 = the abnormal class is the more probable one), which is
    how the paper's second localisation number is most likely computed (docs/METHODS.md). Both are
    means over the images with a lesion, like ``dice``.
    """
    return {
        f"dice_at_{threshold:g}": dice(masks, maps, threshold),
        f"iou_at_{threshold:g}": iou(masks, maps, threshold),
    }


def _dice_per_image(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    truth = truth.reshape(len(truth), -1)
    predicted = predicted.reshape(len(predicted), -1)
    overlap = (truth & predicted).sum(axis=1)
    total = truth.sum(axis=1) + predicted.sum(axis=1)
    return np.where(total > 0, 2.0 * overlap / np.maximum(total, 1), 1.0)


def fit_dice_threshold(masks: np.ndarray, maps: np.ndarray, candidates: int = 101) -> float | None:
    """The map threshold that maximises mean Dice on these (support) images; None without lesions.

    Candidates are quantiles of the map values, so the search adapts to any score range.
    """
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float32)
    lesion = masks.reshape(len(masks), -1).any(axis=1)
    if not lesion.any():
        return None
    values = maps[lesion]
    thresholds = np.unique(np.quantile(values, np.linspace(0.5, 0.999, candidates)))
    scores = [np.mean(_dice_per_image(masks[lesion], values >= t)) for t in thresholds]
    return float(thresholds[int(np.argmax(scores))])


# ----------------------------------------------------------------------------- classes
def class_branch_image_metrics(is_anomaly: np.ndarray, logits: np.ndarray, normal_index: int) -> dict[str, float]:
    """``image_auroc_class_branch``: normal-vs-abnormal AUROC of a classifier's 1 - p(normal) alone.

    Ranked by the log-odds log(1 - p(normal)) - log p(normal), which orders the images exactly as
    1 - p(normal) does but keeps them apart when p(normal) rounds to 1 in floating point.
    """
    z = np.asarray(logits, dtype=np.float64)
    others = np.delete(z, normal_index, axis=1)
    peak = others.max(axis=1, keepdims=True)
    log_abnormal = peak[:, 0] + np.log(np.exp(others - peak).sum(axis=1))  # logsumexp over the abnormal classes
    return {"image_auroc_class_branch": auroc(is_anomaly, log_abnormal - z[:, normal_index])}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def multiclass_metrics(labels: np.ndarray, logits: np.ndarray, class_names: list[str]) -> dict[str, float]:
    """Macro one-vs-rest AUROC, balanced accuracy and macro-F1 over the classes present in ``labels``.

    Args:
        labels: (N,) class indices into ``class_names``.
        logits: (N, C) class logits (or probabilities; they are softmax-normalised either way).
        class_names: the run's classes, in logit order.

    Classes the test set lacks are left out of every average (their AUROC is undefined); the
    arg-max may still predict them, which counts against recall and precision as it should.
    ``cls_auroc_malignant_vs_benign`` ranks the malignant against the benign images by
    p(malignant) / (p(benign) + p(malignant)): the only detection-like number a test set without
    normal images (BUS-BRA) defines.
    """
    labels = np.asarray(labels)
    probs = softmax(logits)
    present = [c for c in range(len(class_names)) if (labels == c).any()]
    out: dict[str, float] = {}
    for c in present:
        out[f"cls_auroc_{class_names[c]}"] = auroc(labels == c, probs[:, c])
    out["cls_auroc_macro"] = float(np.nanmean([out[f"cls_auroc_{class_names[c]}"] for c in present]))
    predicted = probs.argmax(axis=1)
    recalls, f1s = [], []
    for c in present:
        tp = float(((predicted == c) & (labels == c)).sum())
        recall = tp / float((labels == c).sum())
        n_pred = float((predicted == c).sum())
        precision = tp / n_pred if n_pred else 0.0
        recalls.append(recall)
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    out["cls_balanced_accuracy"] = float(np.mean(recalls))
    out["cls_macro_f1"] = float(np.mean(f1s))
    if "benign" in class_names and "malignant" in class_names:
        b, m = class_names.index("benign"), class_names.index("malignant")
        pair = (labels == b) | (labels == m)
        if (labels == b).any() and (labels == m).any():
            p_malignant = probs[pair, m] / np.maximum(probs[pair, m] + probs[pair, b], 1e-12)
            out["cls_auroc_malignant_vs_benign"] = auroc(labels[pair] == m, p_malignant)
    return out
