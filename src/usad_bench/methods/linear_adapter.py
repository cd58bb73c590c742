"""Linear patch adapter: the trainable reference method, APRIL-GAN's head-only configuration.

The same code as ``april_gan`` (``AprilGan`` in april_gan.py, heads in patch_heads.py) with the
few-shot memory and the CLS-text image score switched off: one linear layer per chosen encoder
block maps that block's raw patch tokens into the joint space, each block's tokens are compared
with the normal / abnormal prompt ensembles (logit scale 100), the 2-channel logits are upsampled
bilinearly and soft-maxed, and every block's map is trained with focal + Dice against the lesion
mask (Adam, lr 1e-3, betas 0.5 / 0.999, batch 8). ``usad-bench fit --method april_gan --set
memory=false --set image_score=map_max --set layer_reduce=mean --set prompts=breast_ultrasound
--set epochs=20 --set flip_augment=true`` trains the same model.

Why it stays registered: it isolates what the trained heads learn, with the project's own
ultrasound vocabulary, from APRIL-GAN's zero-shot CLS score and its memory; the foundation tests,
the demo and the tables use it as the trainable reference.

Its differences from APRIL-GAN, on purpose: the project's ``breast_ultrasound`` vocabulary; the
blocks' maps are averaged rather than summed (same ranking, scores stay in [0, 1]); the image
score is the map's maximum; mirrored support images are added (APRIL-GAN's only augmentation is a
2x2 mosaic of four training images with probability 0.2, ``dataset.py:98-144``, which cached
features cannot reproduce); 20 epochs; images without a mask contribute nothing to the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

from usad_bench.methods.april_gan import AprilGan, AprilGanConfig
from usad_bench.methods.registry import register


@dataclass
class LinearAdapterConfig(AprilGanConfig):
    epochs: int = 20  # passes over the (tiny) support set
    prompts: str = "breast_ultrasound"  # the project's ultrasound vocabulary
    layers: list[int] | None = None  # None = APRIL-GAN's blocks: 3/6/9 (12 blocks), 6/12/18/24 (24 blocks)
    memory: bool = False  # head only
    image_score: str = "map_max"  # the maximum of the map
    layer_reduce: str = "mean"  # average of the blocks' maps: stays in [0, 1]
    flip_augment: bool = True  # also train on mirrored support images


@register("linear_adapter")
class LinearAdapter(AprilGan):
    config_class = LinearAdapterConfig
    # The project's reference keeps open_clip's build of the weights (shares the feature cache with
    # zero_shot_clip and ultraad); --activation gelu gives APRIL-GAN's.
    activation = None
