"""From image files to model inputs, and masks to the same pixel grid.

Images are resized to the backbone's square input size without cropping (as APRIL-GAN,
AnomalyCLIP and MVFA do): a centre crop would cut lesions near the image border out of both the
input and the ground truth. Masks follow the same resize with nearest neighbour, so pixel metrics
are computed at the model's input resolution (e.g. 336 x 336 for ViT-L-14-336).

A *variant* is a deterministic view of an image. ``orig`` is the image itself; ``hflip`` is its
mirror image, the one augmentation that is label- and mask-preserving for breast ultrasound
(vertical flips would put the skin line at the bottom). Variants are cached like any feature.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from usad_bench.data.images import image_size as image_size_of
from usad_bench.data.images import load_mask, load_rgb, to_rgb8
from usad_bench.data.manifest import Sample
from usad_bench.errors import UsadError

VARIANTS = ("orig", "hflip")


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise UsadError(f"unknown image variant {variant!r}; known: {', '.join(VARIANTS)}")


class Preprocess:
    """PIL image -> normalised (3, S, S) tensor for a given variant."""

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: Image.Image, variant: str = "orig") -> torch.Tensor:
        check_variant(variant)
        image = to_rgb8(image).resize((self.image_size, self.image_size), Image.BICUBIC)  # any mode, as load_rgb
        if variant == "hflip":
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std

    def load(self, sample: Sample, variant: str = "orig") -> torch.Tensor:
        return self(load_rgb(sample.image), variant)


def has_pixel_truth(sample: Sample) -> bool:
    """Pixel ground truth exists for images with masks and for normal images (all background)."""
    return sample.has_mask or not sample.is_anomaly


def mask_tensor(sample: Sample, image_size: int, variant: str = "orig") -> torch.Tensor:
    """(S, S) float mask in {0, 1} on the model's input grid; zeros when there is no lesion mask."""
    check_variant(variant)
    if not sample.has_mask:
        return torch.zeros(image_size, image_size)
    mask = load_mask(sample.masks, image_size_of(sample.image), sample.image)
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((image_size, image_size), Image.NEAREST)
    if variant == "hflip":
        resized = resized.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(resized) > 127).float()
