"""The method API: what every method receives, stores and predicts.

A method is a :class:`Method` (a LightningModule) built from a config dataclass, the frozen
:class:`~usad_bench.backbone.Backbone` and a :class:`Task`. The runner then

1. extracts the frozen features the method asks for (``feature_request``, by default raw tokens of
   ``feature_layers``; ``train_variants``),
2. calls ``setup_support`` once with the few-shot :class:`SupportSet` (training-free methods
   build their memory here, in buffers, so it is saved with the state dict),
3. if ``trainable``, runs a Lightning ``Trainer`` over ``support.training_loader(...)``, calling
   the method's ``training_step`` (plain PyTorch inside),
4. predicts with ``predict_features`` on batches of test features; a ``transductive`` method (a named
   ``scoring`` recipe) instead returns per-batch ``predict_parts`` and scores the whole test set at once
   in ``finish_test_set``.

Predictions use one sign everywhere: a higher ``score`` means more anomalous.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from usad_bench.backbone import Backbone, ImageFeatures
from usad_bench.data.manifest import NORMAL, Sample
from usad_bench.errors import UsadError
from usad_bench.feature_kinds import FeatureRequest
from usad_bench.features import FeatureTable
from usad_bench.prompts import PromptSet


@dataclass
class Prediction:
    """What a method says about a batch of B images."""

    score: torch.Tensor  # (B,) image anomaly score, higher = more anomalous
    anomaly_map: torch.Tensor | None = None  # (B, S, S) pixel scores at the input resolution, or None
    class_logits: torch.Tensor | None = None  # (B, C) over Task.classes, or None


@dataclass
class Task:
    """What the method is adapted to: the classes, the support size and the wording."""

    classes: list[str]  # class names in canonical order; index 0 is "normal" when present
    shots: int  # support images per class
    dataset: str  # the support set's dataset (selects per-dataset class descriptions)
    prompts: PromptSet
    image_size: int  # side of the square input; anomaly maps are predicted at this size

    @property
    def n_support(self) -> int:
        return self.shots * len(self.classes)

    @property
    def normal_index(self) -> int | None:
        return self.classes.index(NORMAL) if NORMAL in self.classes else None


@dataclass
class MethodConfig:
    """Fields every method shares; each method subclasses this with its own hyper-parameters."""

    epochs: int = 0  # passes over the support set (0 = training-free)
    batch_size: int = 8  # support images per optimisation step
    lr: float = 1e-3  # learning rate
    prompts: str = "breast_ultrasound"  # prompt vocabulary: a built-in name or a YAML file path

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MethodConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UsadError(f"{cls.__name__} has no option(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: _coerce(known[k].type, v, k) for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _coerce(annotation: Any, value: Any, name: str) -> Any:
    """Turn CLI strings (``--set lr=1e-3``) into the field's type; YAML values pass through."""
    if not isinstance(value, str):
        return list(value) if isinstance(value, tuple) else value
    text = str(annotation)
    try:
        if text.startswith("bool"):
            return _parse_bool(value, name)
        if text.startswith("int"):
            return int(value)
        if text.startswith("float"):
            return float(value)
        if text.startswith(("tuple", "list")):
            return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UsadError(f"option {name}={value!r} is not a valid {text}") from None
    return value


PER_IMAGE = "per-image"  # Method.scoring of every method that scores each test image on its own

TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse_bool(value: str, name: str) -> bool:
    word = value.strip().lower()
    if word not in TRUE_WORDS + FALSE_WORDS:
        raise UsadError(f"option {name}={value!r} is not a boolean; use true or false")
    return word in TRUE_WORDS


@dataclass
class SupportSet:
    """The few-shot support set: features per variant, masks and labels."""

    samples: list[Sample]
    features: dict[str, FeatureTable]  # variant -> features, "orig" always present
    masks: dict[str, torch.Tensor]  # variant -> (N, S, S) float {0, 1}
    pixel_truth: torch.Tensor  # (N,) bool: the mask is ground truth (lesion mask, or a normal image)
    labels: torch.Tensor  # (N,) long index into Task.classes
    is_anomaly: torch.Tensor  # (N,) float
    variants: tuple[str, ...] = field(default=("orig",))

    def __len__(self) -> int:
        return len(self.samples)

    def training_dataset(self) -> Dataset:
        """Every (variant, image) pair, addressable by index; ``training_loader`` decides what an epoch holds."""
        return _SupportItems(self)

    def training_loader(self, batch_size: int, seed: int, drop_last: bool = False) -> DataLoader:
        """Batches of one epoch: every support *image* once, each in one randomly chosen view.

        The originals draw one freshly augmented view of each image per epoch; here the augmented
        views are the cached variants, so each image contributes one of them per epoch (seeded, so a
        run is reproducible). ``drop_last`` follows Dassl (CoOp, CoCoOp): the last partial batch is
        dropped only when the support set fills at least one batch, so a tiny support set still trains.
        """
        sampler = SupportEpochSampler(len(self), len(self.variants), seed)
        return DataLoader(
            self.training_dataset(),
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last and len(self) >= batch_size,
        )


def steps_per_epoch(n_images: int, batch_size: int, drop_last: bool) -> int:
    """Optimiser steps in one epoch of ``SupportSet.training_loader`` (documented per method in baselines/)."""
    if drop_last and n_images >= batch_size:
        return n_images // batch_size
    return -(-n_images // batch_size)


class SupportEpochSampler(Sampler[int]):
    """Indices into ``_SupportItems`` for one epoch: a random order of the N images, each in a random view.

    One generator, seeded once, serves every epoch, so epochs differ from each other and a run with the
    same seed repeats them exactly.
    """

    def __init__(self, n_images: int, n_views: int, seed: int):
        self.n_images, self.n_views = n_images, n_views
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n_images

    def __iter__(self):
        order = torch.randperm(self.n_images, generator=self.generator)  # (N,) images
        views = torch.randint(self.n_views, (self.n_images,), generator=self.generator)  # (N,) one view each
        return iter((views * self.n_images + order).tolist())  # item index = view * N + image


class _SupportItems(Dataset):
    """Every (variant, image) pair of the support set as one item: index = variant * N + image."""

    def __init__(self, support: SupportSet):
        self.support = support
        self.n = len(support)

    def __len__(self) -> int:
        return self.n * len(self.support.variants)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        variant, j = self.support.variants[i // self.n], i % self.n
        table = self.support.features[variant]
        item = {
            "cls": table.cls[j],
            "mask": self.support.masks[variant][j],
            "pixel_truth": self.support.pixel_truth[j],
            "label": self.support.labels[j],
            "is_anomaly": self.support.is_anomaly[j],
            "index": torch.tensor(j),
        }
        if table.patches is not None:
            item["patches"] = table.patches[j].float()
        return item


def batch_features(batch: dict[str, torch.Tensor], layers: tuple[int, ...]) -> ImageFeatures:
    """The ImageFeatures view of a training batch."""
    return ImageFeatures(cls=batch["cls"], patches=batch.get("patches"), layers=layers)


class Method(L.LightningModule):
    """Base class; see the module docstring for the life cycle."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    trainable: ClassVar[bool] = False
    outputs: ClassVar[tuple[str, ...]] = ("score",)  # which of score / map / logits it predicts
    # "per-image" scores each test image on its own. A transductive recipe (e.g. normalising over the
    # whole test set) must name itself here; tables then label the method "(transductive)".
    scoring: ClassVar[str] = PER_IMAGE
    # Drop an epoch's last partial batch when the support set fills at least one batch (Dassl's
    # rule, which CoOp and CoCoOp train with); False keeps it (plain PyTorch loaders).
    drop_last: ClassVar[bool] = False
    # The MLP activation the authors ran ("gelu", "quick_gelu", "native" = what the weights were trained
    # with); used when the user sets none (BackboneSpec.activation). None keeps open_clip's choice.
    activation: ClassVar[str | None] = None

    def __init__(self, cfg: MethodConfig, backbone: Backbone, task: Task):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone  # frozen; excluded from saved state (see trainable_state_dict)
        self.task = task

    # -- what the runner asks
    def feature_layers(self) -> tuple[int, ...]:
        """1-indexed blocks whose patch tokens the method needs; () for CLS-only methods."""
        return ()

    def feature_request(self) -> FeatureRequest:
        """What the frozen image encoder must produce (cached per image): raw tokens of ``feature_layers()``
        unless a method needs an encoder variant (AnomalyCLIP's DPAM path, WinCLIP's windows)."""
        return FeatureRequest(layers=tuple(self.feature_layers()))

    def train_variants(self) -> tuple[str, ...]:
        """Image variants the support set is expanded with during training.

        Methods whose config has ``flip_augment: true`` also train on mirrored support images.
        """
        return ("orig", "hflip") if getattr(self.cfg, "flip_augment", False) else ("orig",)

    def setup_support(self, support: SupportSet) -> None:
        """Build memory from the support set; called once, before any training."""

    def predict_features(self, feats: ImageFeatures) -> Prediction:
        raise NotImplementedError

    # -- the two-pass hook of transductive recipes (scoring != "per-image")
    @property
    def transductive(self) -> bool:
        """True when a test set is scored as a whole: the runner then calls ``predict_parts`` on every batch
        and ``finish_test_set`` once, instead of ``predict_features``."""
        return self.scoring != PER_IMAGE

    def predict_parts(self, feats: ImageFeatures) -> dict[str, torch.Tensor]:
        """What ``finish_test_set`` needs of a batch of B images: named tensors with B rows (kept on the CPU)."""
        raise NotImplementedError(f"{self.name} has no transductive recipe")

    def finish_test_set(self, parts: dict[str, torch.Tensor]) -> Prediction:
        """The prediction for a whole test set from its parts, concatenated in test-set order along dim 0."""
        raise NotImplementedError(f"{self.name} has no transductive recipe")

    # -- Lightning glue shared by trainable methods
    def configure_optimizers(self):
        return torch.optim.Adam(self.trainable_parameters(), lr=self.cfg.lr)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("backbone.")]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen backbone: learned weights and memory buffers."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise UsadError(
                f"saved state does not fit method {self.name!r} (missing {missing[:4]}, unexpected {unexpected[:4]}); "
                "was the run made with another version or config?"
            )

    def log_losses(self, losses: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
        """Log each named loss and return their sum."""
        total = sum(losses.values())
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), batch_size=batch_size, on_epoch=True, on_step=False)
        self.log("train/loss", total.detach(), batch_size=batch_size, on_epoch=True, on_step=False, prog_bar=True)
        return total
