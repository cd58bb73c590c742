"""LP++: a linear probe blended with the text classifier (Huang et al., CVPR 2024).

logits = W f + b + alpha_c * (f . t_c), with f the unit image embedding, t_c the class prompt
ensemble and alpha_c a learnable class-wise blending weight. Recipe from the authors' code
(FereshteShakeri/FewShot-CLIP-Strong-Baseline, ``methods/linear_probe_p2.py``):

* W starts at the per-class *sums* of the support embeddings (their ``compute_centroids`` has the
  division by the class count commented out); b keeps ``nn.Linear``'s default initialisation;
* alpha starts, for every class, at 250 x the mean over classes of the mean cosine between a
  class's support images and that class's own text (``compute_centroids_alpha``);
* full-batch gradient descent for 300 iterations: W and b by SGD (momentum 0.9) with step
  4N / lambda_max(F^T F) (from the Lipschitz constant of the cross-entropy gradient, F the (N, D)
  support embeddings); alpha by a plain gradient step N / (4 max_c sum_i (f_i . t_c)^2) every 10
  iterations. Their code never zeroes alpha's gradient, so each alpha step uses the gradient
  summed over all iterations so far; ``accumulate_alpha_grad`` keeps that behaviour.

No hyper-parameter is searched. The solver runs in ``setup_support`` (it is not a mini-batch
loop); see baselines/lp_plus_plus.md for the deviations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from usad_bench.backbone import ImageFeatures
from usad_bench.methods.base import Method, MethodConfig, Prediction, SupportSet
from usad_bench.methods.common import class_anomaly_score, class_text_features
from usad_bench.methods.registry import register


@dataclass
class LPPlusPlusConfig(MethodConfig):
    epochs: int = 300  # full-batch iterations (the authors' train_epoch for LP++)
    momentum: float = 0.9  # SGD momentum on W and b
    alpha_every: int = 10  # alpha takes one gradient step every this many iterations
    init_alpha_scale: float = 250.0  # alpha starts at this x the mean own-class support-text cosine
    accumulate_alpha_grad: bool = True  # as the authors' code: alpha's gradient is never reset


def step_size_w(features: torch.Tensor) -> float:
    """4N / lambda_max(F^T F) for (N, D) features: the authors' step for W."""
    gram = features.double().T @ features.double()  # (D, D)
    return float(4 * features.shape[0] / torch.linalg.eigvalsh(gram).max())


def step_size_alpha(features: torch.Tensor, text: torch.Tensor) -> float:
    """N / (4 max_c sum_i (f_i . t_c)^2): the authors' step for alpha."""
    energy = ((features.double() @ text.double().T) ** 2).sum(0)  # (C,)
    return float(features.shape[0] / (4 * energy.max()))


def initial_alpha(features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    """``scale`` x the mean over classes of the mean cosine between class c's images and class c's text.

    The authors' ``compute_centroids_alpha`` multiplies the one-hot labels elementwise with the (N, C)
    image-text cosines, so each class contributes the cosines with its *own* text only; their
    ``* shots`` and ``250 / shots`` cancel.
    """
    text_logits = features.double() @ text.double().T  # (N, C)
    one_hot = F.one_hot(labels, text.shape[0]).double()  # (N, C)
    own_class_means = (one_hot * text_logits).sum(0) / one_hot.sum(0)  # (C,): class c's images vs text c
    return float(scale * own_class_means.mean())


@register("lp_plus_plus")
class LPPlusPlus(Method):
    config_class = LPPlusPlusConfig
    trainable = False  # fitted by its own full-batch solver in setup_support
    outputs = ("score", "logits")

    def __init__(self, cfg: LPPlusPlusConfig, backbone, task):
        super().__init__(cfg, backbone, task)
        c = len(task.classes)
        self.register_buffer("class_text", class_text_features(backbone, task.prompts, task.classes))  # (C, D)
        self.linear = nn.Linear(backbone.embed_dim, c)  # W, b
        self.alpha = nn.Parameter(torch.ones(c))  # class-wise blending of the text logits

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.linear(image) + self.alpha * (image @ self.class_text.T)

    def setup_support(self, support: SupportSet) -> None:
        image = F.normalize(support.features["orig"].cls.float(), dim=-1).to(self.class_text.device)
        self.fit(image, support.labels.to(image.device))

    def fit(self, image: torch.Tensor, labels: torch.Tensor) -> None:
        """LP++'s solver on (N, D) unit embeddings and their labels."""
        cfg = self.cfg
        with torch.no_grad():
            self.linear.weight.copy_(F.one_hot(labels, len(self.task.classes)).float().T @ image)  # class sums
            self.alpha.fill_(initial_alpha(image, labels, self.class_text, cfg.init_alpha_scale))
        optimizer = torch.optim.SGD(self.linear.parameters(), lr=step_size_w(image), momentum=cfg.momentum)
        alpha_step = step_size_alpha(image, self.class_text)
        self.alpha.grad = None
        with torch.enable_grad():
            for iteration in range(cfg.epochs):
                loss = F.cross_entropy(self.logits(image), labels)
                optimizer.zero_grad()  # W and b only: alpha's gradient builds up, as in the authors' code
                loss.backward()
                optimizer.step()
                if (iteration + 1) % cfg.alpha_every == 0:
                    with torch.no_grad():
                        self.alpha -= alpha_step * self.alpha.grad
                if not cfg.accumulate_alpha_grad:
                    self.alpha.grad = None
        optimizer.zero_grad()
        self.alpha.grad = None

    @torch.no_grad()
    def predict_features(self, feats: ImageFeatures) -> Prediction:
        logits = self.logits(F.normalize(feats.cls.float(), dim=-1))
        return Prediction(score=class_anomaly_score(logits, self.task.normal_index), class_logits=logits)
