"""Linear probe: L2-regularised logistic regression on CLIP image embeddings.

CoOp's ``lpclip/linear_probe.py`` (after the CLIP paper's appendix A.3): scikit-learn
``LogisticRegression`` (lbfgs, max_iter 1000, L2); the inverse regularisation C is chosen by a
coarse sweep over 1e6, 1e4, ..., 1e-6, then 8 steps that halve the interval around the best value
in log space, keeping the better end each time.

The original scores each C on a few-shot validation split. A few-shot benchmark has none, so
here each C is scored by cross-validation within the support set: patient-grouped stratified
k-fold (4 folds by default, i.e. one image per class held out per fold at 4 shots). Test data is
never seen. The fitted weights are kept in buffers, so a run directory reloads without sklearn
state or the support set.

Features are L2-normalised by default, as the LP++ harness's linear probe does (``normalize:
false`` gives lpclip's raw embeddings); the C search absorbs the difference in scale.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from usad_bench.backbone import ImageFeatures
from usad_bench.methods.base import Method, MethodConfig, Prediction, SupportSet
from usad_bench.methods.common import class_anomaly_score, support_folds
from usad_bench.methods.registry import register

C_GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)  # lpclip's coarse sweep, in its order


@dataclass
class LinearProbeConfig(MethodConfig):
    search_steps: int = 8  # interval-halving steps after the coarse sweep (lpclip's num_step)
    cv_folds: int = 4  # patient-grouped stratified folds of the support set; 0 = leave-one-patient-out
    max_iter: int = 1000  # lbfgs iterations (lpclip)
    fixed_c: float = 0.0  # > 0: use this C and skip the search
    normalize: bool = True  # L2-normalise embeddings (LP++ harness); false = raw embeddings (lpclip)


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float, max_iter: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # C = 1e6 on separable few-shot data never converges
        return LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter).fit(x, y)


def cv_accuracy(x: np.ndarray, y: np.ndarray, folds: list, c: float, max_iter: int) -> int:
    """Held-out correct count of C over the folds (lpclip scores each C by validation accuracy alone)."""
    correct = 0
    for train, held in folds:
        if len(np.unique(y[train])) < 2:
            continue  # nothing to fit (a 2-class task with a one-patient class); the same for every C
        clf = fit_logistic(x[train], y[train], c, max_iter)
        correct += int((clf.predict(x[held]) == y[held]).sum())
    return correct


def search_c(x: np.ndarray, y: np.ndarray, folds: list, steps: int, max_iter: int) -> float:
    """lpclip's search, each C scored by cross-validated accuracy on the support set.

    lpclip's rules: the coarse peak is the first of equal accuracies in C_GRID's order (np.argmax),
    i.e. the largest C; each halving step keeps the right (larger) end only if it is strictly more
    accurate than the left one, so ties go to the smaller C; the C of the last step is returned.
    """
    memo: dict[float, int] = {}

    def accuracy(c: float) -> int:
        if c not in memo:
            memo[c] = cv_accuracy(x, y, folds, c, max_iter)
        return memo[c]

    peak = max(C_GRID, key=accuracy)  # the first of equal scores, like np.argmax in lpclip
    left, right = np.log10(peak) - 1.0, np.log10(peak) + 1.0
    chosen = peak
    for _ in range(steps):
        middle = 0.5 * (left + right)
        if accuracy(10**left) < accuracy(10**right):
            chosen, left = 10**right, middle
        else:
            chosen, right = 10**left, middle
    return float(chosen)


@register("linear_probe")
class LinearProbe(Method):
    config_class = LinearProbeConfig
    trainable = False
    outputs = ("score", "logits")

    def __init__(self, cfg: LinearProbeConfig, backbone, task):
        super().__init__(cfg, backbone, task)
        c, d = len(task.classes), backbone.embed_dim
        self.register_buffer("weight", torch.zeros(c, d))  # (C, D) fitted coefficients
        self.register_buffer("bias", torch.zeros(c))  # (C,) fitted intercepts
        self.register_buffer("c_value", torch.tensor(float("nan")))  # the chosen inverse regularisation

    def setup_support(self, support: SupportSet) -> None:
        x = self.inputs(support.features["orig"].cls).cpu().numpy().astype(np.float64)
        y = support.labels.cpu().numpy()
        c = self.cfg.fixed_c
        if c <= 0:
            folds = support_folds(y, [s.group for s in support.samples], self.cfg.cv_folds)
            c = search_c(x, y, folds, self.cfg.search_steps, self.cfg.max_iter)
        clf = fit_logistic(x, y, c, self.cfg.max_iter)
        weight, bias = np.zeros(tuple(self.weight.shape)), np.zeros(tuple(self.bias.shape))
        if len(clf.classes_) == 2:  # sklearn keeps one row for two classes: softmax([0, s]) = sigmoid(s)
            weight[clf.classes_[1]], bias[clf.classes_[1]] = clf.coef_[0], clf.intercept_[0]
        else:
            weight[clf.classes_], bias[clf.classes_] = clf.coef_, clf.intercept_
        self.weight.copy_(torch.from_numpy(weight))
        self.bias.copy_(torch.from_numpy(bias))
        self.c_value.fill_(c)

    def inputs(self, cls: torch.Tensor) -> torch.Tensor:
        return F.normalize(cls.float(), dim=-1) if self.cfg.normalize else cls.float()

    @torch.no_grad()
    def predict_features(self, feats: ImageFeatures) -> Prediction:
        logits = self.inputs(feats.cls) @ self.weight.T + self.bias  # (B, C)
        return Prediction(score=class_anomaly_score(logits, self.task.normal_index), class_logits=logits)
