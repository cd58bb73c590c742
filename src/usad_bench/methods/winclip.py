"""WinCLIP and WinCLIP+ (Jeong et al., CVPR 2023): training-free zero- and few-shot anomaly maps.

Follows anomalib's implementation (``src/anomalib/models/image/winclip``; see baselines/winclip.md):

* Text: the compositional prompt ensemble -- every state phrase in every template -- and each state's
  embedding is the mean of the *un-normalised* sentence embeddings. ``prompt_ensemble: vocabulary``
  (default) takes the states and templates of the prompt file (ultrasound wording);
  ``prompt_ensemble: winclip`` takes WinCLIP's own MVTec lists with the file's object word.
* Zero-shot: s(e) = softmax(cos(e, [t_n, t_a]) / 0.07)[abnormal] for the image CLS and for every 2x2 and
  3x3 window embedding (encoder variant ``windows``); windows are aggregated to patches by the harmonic
  mean of the windows covering each patch, and the map is the harmonic mean of {image score, 2x2 map,
  3x3 map}. The image score is the image's s.
* WinCLIP+ (with normal support images): window and patch memories of the k normal shots; a window or
  patch scores min_r (1 - cos(e, r)) / 2 over all references of its scale; windows are aggregated
  harmonically; the few-shot map is the mean over {patches, 2x2, 3x3}. Fusion as anomalib:
  map = (zero-shot + few-shot) / 2, score = (s_image + max few-shot map) / 2 (``fusion: sum`` gives
  Accurate-WinCLIP's map = zero-shot + few-shot).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from usad_bench.backbone import ImageFeatures
from usad_bench.errors import UsadError
from usad_bench.feature_kinds import WINDOWS, FeatureRequest, window_indices
from usad_bench.methods.base import Method, MethodConfig, Prediction, SupportSet
from usad_bench.methods.registry import register
from usad_bench.prompts import STATES, PromptSet

log = logging.getLogger(__name__)

# WinCLIP's own lists (anomalib prompting.py; the paper's supplementary): MVTec state words and templates.
WINCLIP_STATES = {
    "normal": ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
               "{} without damage"],
    "abnormal": ["damaged {}", "{} with flaw", "{} with defect", "{} with damage"],
}  # fmt: skip
WINCLIP_TEMPLATES = [
    "a cropped photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.", "a dark photo of the {}.", "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.",
    "a blurry photo of a {}.", "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.",
    "a photo of the small {}.", "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
]  # fmt: skip
ENSEMBLES = ("vocabulary", "winclip")
FUSIONS = ("mean", "sum")


@dataclass
class WinCLIPConfig(MethodConfig):
    scales: list[int] | None = None  # window sides in patches; None = (2, 3) as WinCLIP
    temperature: float = 0.07  # softmax temperature of the text scores
    few_shot: bool = True  # WinCLIP+: use the normal support images as references (false = zero-shot WinCLIP)
    prompt_ensemble: str = "vocabulary"  # "vocabulary": states/templates of the prompt file; "winclip": MVTec lists
    fusion: str = "mean"  # zero-/few-shot map fusion: "mean" (anomalib) or "sum" (Accurate-WinCLIP)


def sentence_lists(prompts: PromptSet, ensemble: str) -> dict[str, list[str]]:
    """The compositional ensemble: state -> every template filled with every state phrase."""
    if ensemble == "vocabulary":
        return {state: prompts.state_prompts(state) for state in STATES}
    phrases = {state: [p.format(prompts.object) for p in WINCLIP_STATES[state]] for state in STATES}
    return {state: [t.format(p) for p in phrases[state] for t in WINCLIP_TEMPLATES] for state in STATES}


def class_scores(embeddings: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """(..., D) embeddings, (2, D) text -> (...) abnormal probability softmax(cos / T)[1]."""
    cos = F.normalize(embeddings, dim=-1) @ F.normalize(text, dim=-1).T
    return (cos / temperature).softmax(dim=-1)[..., 1]


def harmonic_aggregation(window_scores: torch.Tensor, windows: torch.Tensor, n_patches: int) -> torch.Tensor:
    """(B, n) window scores -> (B, n_patches): the harmonic mean of the windows covering each patch.

    ``windows`` is (n, s*s) patch indices. A zero score makes its patches zero; an uncovered patch is 0.
    """
    inverse = (1.0 / window_scores).unsqueeze(-1).expand(-1, -1, windows.shape[1])  # (B, n, s*s)
    index = windows.flatten().expand(window_scores.shape[0], -1)  # (B, n*s*s)
    total = window_scores.new_zeros(window_scores.shape[0], n_patches).scatter_add_(1, index, inverse.flatten(1))
    count = torch.bincount(windows.flatten(), minlength=n_patches).to(window_scores)  # windows per patch
    return (count / total).nan_to_num(nan=0.0, posinf=0.0)


def association_scores(embeddings: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(B, n, D) embeddings, (R, D) references -> (B, n): min over references of (1 - cos) / 2."""
    cos = F.normalize(embeddings, dim=-1) @ F.normalize(references, dim=-1).T  # (B, n, R)
    return (1.0 - cos).amin(dim=-1) / 2.0


@register("winclip")
class WinCLIP(Method):
    """See the module docstring."""

    config_class = WinCLIPConfig
    trainable = False
    outputs = ("score", "map")
    activation = "native"  # anomalib runs open_clip's build of the pretrained tag (QuickGELU for OpenAI weights)

    def __init__(self, cfg: WinCLIPConfig, backbone, task):
        super().__init__(cfg, backbone, task)
        if cfg.prompt_ensemble not in ENSEMBLES or cfg.fusion not in FUSIONS:
            raise UsadError(f"winclip: prompt_ensemble must be one of {ENSEMBLES} and fusion one of {FUSIONS}")
        self.scales = tuple(cfg.scales or (2, 3))
        for side in self.scales:
            self.register_buffer(f"windows_{side}", window_indices(backbone.grid, side), persistent=False)
        self.register_buffer("state_text", self.text_embeddings())  # (2, D), not normalised
        # Memory sizes are fixed by the task (k normal shots), so a saved run loads into the same shapes.
        k = task.shots if cfg.few_shot and task.normal_index is not None else 0
        n_patches = backbone.grid[0] * backbone.grid[1]
        self.register_buffer("patch_memory", torch.zeros(k * n_patches, backbone.vision_width))  # (k*N, W)
        for side in self.scales:
            n_windows = getattr(self, f"windows_{side}").shape[0]
            self.register_buffer(f"window_memory_{side}", torch.zeros(k * n_windows, backbone.embed_dim))
        self.register_buffer("has_memory", torch.tensor(False))

    @torch.no_grad()
    def text_embeddings(self) -> torch.Tensor:
        """(2, D) mean of the un-normalised sentence embeddings per state (normal, abnormal)."""
        sentences = sentence_lists(self.task.prompts, self.cfg.prompt_ensemble)
        return torch.stack([self.backbone.encode_text(sentences[state]).mean(0) for state in STATES])

    def feature_request(self) -> FeatureRequest:
        return FeatureRequest(kind=WINDOWS, scales=self.scales)

    @torch.no_grad()
    def setup_support(self, support: SupportSet) -> None:
        if self.patch_memory.shape[0] == 0:
            return
        normal = (support.is_anomaly == 0).nonzero().flatten()
        table = support.features["orig"]
        if len(normal) * table.patches.shape[2] != self.patch_memory.shape[0]:
            log.warning("winclip: %d normal support images, expected %d; zero-shot only", len(normal), self.task.shots)
            return
        self.patch_memory.copy_(table.patches[normal, -1].flatten(0, 1).float())  # (k*N, W)
        for side in self.scales:
            getattr(self, f"window_memory_{side}").copy_(table.windows[side][normal].flatten(0, 1).float())
        self.has_memory.fill_(True)

    @torch.no_grad()
    def predict_features(self, feats: ImageFeatures) -> Prediction:
        if feats.kind != WINDOWS:
            raise UsadError("winclip needs the 'windows' feature kind; the runner passes feature_request()")
        device = self.state_text.device
        windows = {side: feats.windows[side].to(device) for side in self.scales}
        image_score = class_scores(feats.cls.to(device), self.state_text, self.cfg.temperature)  # (B,)
        patch_map = self.zero_shot_map(image_score, windows)  # (B, N)
        if bool(self.has_memory):
            few = self.few_shot_map(feats.patches[:, -1].to(device), windows)  # (B, N)
            patch_map = (patch_map + few) / 2 if self.cfg.fusion == "mean" else patch_map + few
            image_score = (image_score + few.amax(dim=-1)) / 2
        grid = patch_map.reshape(-1, 1, *self.backbone.grid)
        size = (self.task.image_size, self.task.image_size)
        anomaly_map = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[:, 0]
        return Prediction(score=image_score, anomaly_map=anomaly_map)

    def zero_shot_map(self, image_score: torch.Tensor, windows: dict[int, torch.Tensor]) -> torch.Tensor:
        """(B,) image scores, {s: (B, n_s, D)} -> (B, N) harmonic mean over {image, each scale}."""
        n_patches = self.backbone.grid[0] * self.backbone.grid[1]
        maps = [image_score[:, None].expand(-1, n_patches)]
        for side in self.scales:
            scores = class_scores(windows[side], self.state_text, self.cfg.temperature)  # (B, n_s)
            maps.append(harmonic_aggregation(scores, getattr(self, f"windows_{side}"), n_patches))
        return len(maps) / (1.0 / torch.stack(maps)).sum(dim=0)

    def few_shot_map(self, patches: torch.Tensor, windows: dict[int, torch.Tensor]) -> torch.Tensor:
        """(B, N, W) patch tokens, {s: (B, n_s, D)} -> (B, N) mean over {patches, each scale} of memory scores."""
        n_patches = patches.shape[1]
        maps = [association_scores(patches, self.patch_memory)]
        for side in self.scales:
            scores = association_scores(windows[side], getattr(self, f"window_memory_{side}"))  # (B, n_s)
            maps.append(harmonic_aggregation(scores, getattr(self, f"windows_{side}"), n_patches))
        return torch.stack(maps).mean(dim=0)
