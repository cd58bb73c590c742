"""Parity of ``april_gan`` (and so of ``linear_adapter``, its head-only configuration) with the authors'
code, ByChelsea/VAND-APRIL-GAN.

Both sides get the same frozen features: our random-weight parity CLIP encodes random images once,
and the authors' code receives those tokens through a stub ``model.encode_image`` (the stub for the
weights; CLS token prepended, which their ``LinearLayer`` and memory drop) and our text tower through
``model.encode_text``. Their code runs from the clone: ``prompt_ensemble.encode_text_with_prompt_ensemble``
(with their verbatim state words, read from their file), ``model.LinearLayer`` (initial weights copied
from ours), ``loss.FocalLoss`` / ``loss.BinaryDiceLoss``, ``few_shot.memory`` (dataset classes stubbed
to yield our normal shots), and the map / score / training code that lives inline in ``test.py`` and
``train.py``: those lines are read from the files and executed as they are.

Compared: text embeddings, per-image zero-shot score, the full few-shot map (heads + memory), the
memory, focal and Dice losses, and the loss and the heads' parameters after a few identical Adam steps.

    python benchmarks/parity/april_gan.py --original ORIGINALS/VAND-APRIL-GAN
"""

from __future__ import annotations

import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import arguments, diff, import_path, load_file, our_backbone, verbatim_state_prompts, write

from usad_bench.methods.april_gan import AprilGan, AprilGanConfig
from usad_bench.methods.base import SupportSet, Task
from usad_bench.methods.losses import dice_loss, focal_loss
from usad_bench.prompts import load_prompts

REPO, COMMIT = "ByChelsea/VAND-APRIL-GAN", "f13b8a634e04f9fde8fa03db125b25af5695d8e1"
OBJECT = "breast"
STEPS = 3
CLASSES = ["normal", "benign", "malignant"]


def their_prompt_file(original: Path) -> Path:
    return verbatim_state_prompts(original / "prompt_ensemble.py", OBJECT, "april_gan")


class StubModel:
    """The weights stub: returns our frozen features for 'images' that are indices into them."""

    def __init__(self, backbone, feats):
        self.backbone, self.feats = backbone, feats

    def encode_text(self, tokens):
        return self.backbone.model.encode_text(tokens)

    def encode_image(self, image, layers):
        index = image.long().flatten()
        cls, patches = self.feats.cls[index], self.feats.patches[index]  # (B, D), (B, L, N, W)
        pick = [self.feats.layers.index(layer) for layer in layers]
        with_cls = [torch.cat([torch.zeros_like(patches[:, i, :1]), patches[:, i]], 1) for i in pick]
        return cls.clone(), with_cls


def inline_block(path: Path, first: str, last: str, indent: int) -> str:
    """Lines of the authors' file from the one starting with ``first`` up to (excluding) ``last``."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(first))
    stop = next(i for i in range(start + 1, len(lines)) if lines[i].strip().startswith(last))
    return textwrap.dedent("\n".join(line[indent:] if line.strip() else "" for line in lines[start:stop]))


def main() -> None:
    args = arguments("april_gan", REPO, COMMIT)
    import_path(args.original)
    sys.modules["pkg_resources"] = types.ModuleType("pkg_resources")  # unused import of prompt_ensemble.py
    sys.modules["pkg_resources"].packaging = None
    dataset = types.ModuleType("dataset")  # stub of their dataset classes (used by few_shot.memory)
    dataset.VisaDataset = dataset.MVTecDataset = None  # replaced below by a stub yielding our normal shots
    sys.modules["dataset"] = dataset
    prompt_ensemble = load_file("april_prompt_ensemble", args.original / "prompt_ensemble.py")
    their_model = load_file("april_model", args.original / "model.py")
    their_loss = load_file("april_loss", args.original / "loss.py")
    few_shot = load_file("april_few_shot", args.original / "few_shot.py")
    from sklearn.metrics import pairwise

    torch.manual_seed(0)
    backbone = our_backbone()
    size = backbone.image_size
    task = Task(CLASSES, 2, "synth", load_prompts(str(their_prompt_file(args.original))), size)
    cfg = AprilGanConfig(prompts=str(their_prompt_file(args.original)), layers=[1, 2])
    ours = AprilGan(cfg, backbone, task)
    images = torch.rand(8, 3, size, size)
    feats = backbone.encode_images(images, ours.feature_layers())
    normals = [0, 1]  # images 0, 1 are the normal shots; 2..7 are tested / trained on
    labels = torch.tensor([0, 0, 1, 2, 1, 2, 1, 2])
    table = types.SimpleNamespace(patches=feats.patches, layers=feats.layers)
    ours.setup_support(
        SupportSet([None] * 8, {"orig": table}, {}, torch.ones(8, dtype=bool), labels, labels.clamp(max=1))
    )
    model = StubModel(backbone, feats)
    compared, notes = {}, []

    # text branch: their ensemble function on our text tower
    theirs_text = prompt_ensemble.encode_text_with_prompt_ensemble(model, [OBJECT], backbone.tokenizer, "cpu")[OBJECT]
    compared["text_embeddings"] = diff(ours.state_text, theirs_text.T)

    # their heads with our initial weights
    layer = their_model.LinearLayer(backbone.vision_width, backbone.embed_dim, len(ours.layers), "ViT-parity")
    layer.load_state_dict({k.replace("adapters", "fc"): v for k, v in ours.heads.state_dict().items()})

    # memory: their few_shot.memory over a stub dataset that yields our normal shots
    class Shots(torch.utils.data.Dataset):
        def __init__(self, **kwargs):
            self.items = [{"img": torch.tensor([float(i)])} for i in normals]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    few_shot.VisaDataset = few_shot.MVTecDataset = Shots
    mem = few_shot.memory("ViT-parity", model, [OBJECT], "", "", None, None, 2, list(ours.memory_layers), "visa", "cpu")
    compared["memory"] = diff(ours.memory_bank, torch.stack(mem[OBJECT]))

    # maps and zero-shot score: test.py's lines, per image (their batch size is 1)
    block = inline_block(
        args.original / "test.py", "image_features, patch_tokens = model.encode_image", "results['anomaly_maps']", 12
    )
    our_pred = ours.eval().predict_features(feats.__class__(feats.cls[2:], feats.patches[2:], feats.layers))
    our_text = AprilGan(AprilGanConfig(**{**cfg.to_dict(), "image_score": "text"}), backbone, task)
    our_text.load_state_dict(ours.state_dict())
    our_score = our_text.eval().predict_features(feats.__class__(feats.cls[2:], feats.patches[2:], feats.layers)).score
    maps, scores = [], []
    for i in range(2, 8):
        scope = dict(
            model=model,
            image=torch.tensor([float(i)]),
            features_list=list(ours.layers),
            text_prompts={OBJECT: theirs_text},
            cls_name=[OBJECT],
            results={"pr_sp": []},
            linearlayer=layer,
            np=np,
            F=F,
            torch=torch,
            img_size=size,
            args=types.SimpleNamespace(mode="few_shot", model="ViT-parity"),
            few_shot_features=list(ours.memory_layers),
            mem_features=mem,
            pairwise=pairwise,
        )
        with torch.no_grad():
            exec(block, scope)
        maps.append(torch.as_tensor(scope["anomaly_map"])[0])
        scores.append(scope["results"]["pr_sp"][0])
    compared["few_shot_map"] = diff(our_pred.anomaly_map, torch.stack(maps))
    compared["zero_shot_image_score"] = diff(our_score, torch.tensor(scores))
    notes.append(
        "image score with memory: the original's test-set min-max is not compared (we divide by the block count)"
    )

    # losses on one set of probabilities
    probs = ours.layer_probs(feats.__class__(feats.cls[2:], feats.patches[2:], feats.layers))[0]
    mask = (torch.rand(6, size, size) > 0.8).float()
    compared["focal_loss"] = diff(focal_loss(probs, mask), their_loss.FocalLoss()(probs, mask))
    compared["dice_loss"] = diff(dice_loss(probs[:, 1], mask), their_loss.BinaryDiceLoss()(probs[:, 1], mask))

    compared.update(train_steps(args.original, ours, layer, model, theirs_text, feats, mask))
    write(args, "april_gan", REPO, COMMIT, compared, notes)


def train_steps(original: Path, ours, layer, model, theirs_text, feats, mask) -> dict:
    """STEPS Adam steps on the same batch: ours through training_step, theirs through train.py's lines."""
    their_loss = sys.modules["april_loss"]
    ours.train()
    ours.log_losses = lambda losses, batch_size: sum(losses.values())
    opt_ours = ours.configure_optimizers()
    opt_theirs = torch.optim.Adam(list(layer.parameters()), lr=1e-3, betas=(0.5, 0.999))  # train.py:92
    block = inline_block(original / "train.py", "image = items['img'].to(device)", "loss_list.append(loss.item())", 12)
    # On CUDA, autocast computes the norm on an fp32 copy, so their in-place division leaves autograd intact;
    # on a CPU (no autocast) the same line breaks backward. The out-of-place form is the same arithmetic.
    inplace = "patch_tokens[layer] /= patch_tokens[layer].norm(dim=-1, keepdim=True)"
    assert inplace in block, "train.py changed: update the parity script"
    block = block.replace(
        inplace, "patch_tokens[layer] = patch_tokens[layer] / patch_tokens[layer].norm(dim=-1, keepdim=True)"
    )
    batch = {
        "cls": feats.cls[2:],
        "patches": feats.patches[2:],
        "pixel_truth": torch.ones(6, dtype=bool),
        "mask": mask,
    }
    losses_ours, losses_theirs = [], []
    for _ in range(STEPS):
        loss = ours.training_step(batch, 0)
        opt_ours.zero_grad()
        loss.backward()
        opt_ours.step()
        losses_ours.append(float(loss.detach()))
        scope = dict(
            items={"img": torch.arange(2, 8).float(), "cls_name": [OBJECT] * 6, "img_mask": mask[:, None].clone()},
            device="cpu",
            model=model,
            features_list=list(ours.layers),
            text_prompts={OBJECT: theirs_text},
            trainable_layer=layer,
            np=np,
            F=F,
            torch=torch,
            image_size=mask.shape[-1],
            loss_focal=their_loss.FocalLoss(),
            loss_dice=their_loss.BinaryDiceLoss(),
            optimizer=opt_theirs,
            loss_list=[],
        )
        exec(block, scope)
        losses_theirs.append(float(scope["loss"]))
    ours_params = torch.cat([p.detach().flatten() for p in ours.heads.parameters()])
    theirs_params = torch.cat([p.detach().flatten() for p in layer.parameters()])
    return {
        "train_losses": diff(losses_ours, losses_theirs),
        f"head_params_after_{STEPS}_steps": diff(ours_params, theirs_params),
    }


if __name__ == "__main__":
    main()
