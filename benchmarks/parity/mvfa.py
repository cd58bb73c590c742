"""Parity of ``mvfa`` (and of ``usad_bench.stream``, which runs its blocks) with the authors' code,
MediaBrain-SJTU/MVFA-AD.

The authors' ``CLIP_Inplanted`` hard-codes ViT-L's geometry (24 blocks, adapters 1024 -> 768), so both
sides get one random CLIP of that *shape* but small cost: width 1024, 24 blocks, 16 heads, MLP ratio
0.25, 56 px input with patch 14 (4 x 4 patches), exact GELU (MVFA's rebuild), joint width 768, a
one-block text tower. Their ``CLIP.model.CLIP`` is built with the same numbers and loaded with exactly
our weights (the stub for the weight download). Their code runs from the clone: ``CLIP/adapter.py``
(``ClipAdapter``, ``CLIP_Inplanted`` with our adapters' initial weights), ``utils.py``
(``encode_text_with_prompt_ensemble`` with their tokenizer and verbatim states / templates, ``cos_sim``),
``loss.py`` (``FocalLoss``, ``BinaryDiceLoss``), and the training, memory and map code that lives inline
in ``train_few.py``: those lines are read from the file and executed as they are. Stubbed: ``kornia``
(imported by ``utils.py`` for the x11 augmentation, which is not compared) and ``.to('cuda')`` on a CPU.

Our side starts from the stream leaving block 6, computed by ``usad_bench.stream.encode_stream`` in
float32 (the run's feature cache stores it in float16; not compared here).

Compared: text embeddings, seg/det adapter tokens at 6/12/18/24, the memory, per-image zero-shot and
few-shot maps, the per-step training losses and all adapter parameters after a few identical Adam steps
(batch 1, their two Adam instances vs our one).

    python benchmarks/parity/mvfa.py --original ORIGINALS/MVFA-AD
"""

from __future__ import annotations

import json
import sys
import tempfile
import textwrap
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import arguments, diff, import_path, load_file, stub_cuda, verbatim_state_prompts, write

from usad_bench.methods.base import SupportSet, Task
from usad_bench.methods.mvfa import Mvfa, MvfaConfig
from usad_bench.prompts import load_prompts
from usad_bench.stream import encode_stream

REPO, COMMIT = "MediaBrain-SJTU/MVFA-AD", "a30bf7bb2c51772a36e7be58d3c072be480620fe"
OBJECT = "Brain"  # CLASS_INDEX['Brain'] > 0: the branch with masks (seg + det losses, seg maps)
STEPS = 4
MODEL = "usad-parity-mvfa"
CONFIG = {
    "embed_dim": 768,
    "quick_gelu": False,
    "vision_cfg": {
        "image_size": 56,
        "layers": 24,
        "width": 1024,
        "head_width": 64,
        "patch_size": 14,
        "mlp_ratio": 0.25,
    },
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}


def our_backbone():
    import open_clip

    from usad_bench.backbone import Backbone, BackboneSpec

    folder = Path(tempfile.mkdtemp(prefix="usad_parity_mvfa_"))
    (folder / f"{MODEL}.json").write_text(json.dumps(CONFIG))
    open_clip.add_model_config(folder)
    return Backbone.load(BackboneSpec(name=MODEL, pretrained=None, seed=0, activation="gelu"))


def their_clip(model_module, backbone):
    """Their CLIP (CLIP/model.py) with our weights; patch dropout is off in eval mode, as in their runs."""
    v, t = CONFIG["vision_cfg"], CONFIG["text_cfg"]
    model = model_module.CLIP(CONFIG["embed_dim"], v, t, quick_gelu=False)
    state = {k: x for k, x in backbone.model.state_dict().items() if k != "attn_mask"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "attn_mask" not in k]:
        raise SystemExit(f"error: weight layouts differ (missing {missing[:4]}, unexpected {unexpected[:4]})")
    return model.float().eval()


def their_prompt_file(original: Path) -> Path:
    return verbatim_state_prompts(original / "utils.py", OBJECT, "mvfa")


def inline_block(path: Path, first: str, last: str, indent: int, after: str = "") -> str:
    """Lines of the authors' file from the one starting with ``first`` (after the line starting with
    ``after``) up to (excluding) ``last``."""
    lines = path.read_text().splitlines()
    begin = next(i for i, line in enumerate(lines) if line.strip().startswith(after)) if after else 0
    start = next(i for i in range(begin, len(lines)) if lines[i].strip().startswith(first))
    stop = next(i for i in range(start + 1, len(lines)) if lines[i].strip().startswith(last))
    return textwrap.dedent("\n".join(line[indent:] if line.strip() else "" for line in lines[start:stop]))


def load_theirs(original: Path):
    stub_cuda()
    sys.modules["kornia"] = types.ModuleType("kornia")  # utils.py's augmentation only (not compared)
    import_path(original)
    import CLIP.adapter as adapter  # their package is named CLIP
    import CLIP.model as model_module

    utils = load_file("mvfa_utils", original / "utils.py")
    loss = load_file("mvfa_loss", original / "loss.py")
    return adapter, model_module, utils, loss


def build_ours(backbone, original: Path) -> tuple[Mvfa, torch.Tensor, SupportSet]:
    """Our MVFA on 8 random images (0, 1 normal shots; 2..7 tested and trained on) and their cached streams."""
    prompts = str(their_prompt_file(original))
    size = backbone.image_size
    task = Task(["normal", "benign", "malignant"], 2, "synth", load_prompts(prompts), size)
    torch.manual_seed(0)
    ours = Mvfa(MvfaConfig(prompts=prompts, flip_augment=False), backbone, task)
    for p in ours.adapters.parameters():  # nn.Linear's init is tiny at width 1024; larger weights move the stream
        torch.nn.init.normal_(p, std=0.05)
    images = torch.rand(8, 3, size, size)
    with torch.no_grad():
        _, streams = encode_stream(backbone.visual, images, ours.layers[0])  # (8, 1, 1 + N, W), float32
    labels = torch.tensor([0, 0, 1, 2, 1, 2, 1, 2])
    table = types.SimpleNamespace(patches=streams, layers=(ours.layers[0],))
    support = SupportSet([None] * 8, {"orig": table}, {}, torch.ones(8, dtype=bool), labels, labels.clamp(max=1))
    ours.setup_support(support)
    return ours.eval(), images, streams


def main() -> None:
    args = arguments("mvfa", REPO, COMMIT)
    pkg_resources = types.ModuleType("pkg_resources")  # CLIP/tokenizer.py reads packaging.version from it
    import packaging.version

    pkg_resources.packaging = packaging
    sys.modules["pkg_resources"] = pkg_resources
    adapter, model_module, utils, their_loss = load_theirs(args.original)
    backbone = our_backbone()
    ours, images, streams = build_ours(backbone, args.original)
    clip_model = their_clip(model_module, backbone)
    model = adapter.CLIP_Inplanted(clip_model=clip_model, features=list(ours.layers)).eval()
    model.seg_adapters.load_state_dict(ours.adapters.seg_adapters.state_dict())
    model.det_adapters.load_state_dict(ours.adapters.det_adapters.state_dict())
    compared, notes = {}, []

    with torch.no_grad():
        text = utils.encode_text_with_prompt_ensemble(clip_model, OBJECT, "cpu")  # (D, 2)
    compared["text_embeddings"] = diff(ours.state_text, text.T)
    with torch.no_grad():
        seg, det = ours.adapted_tokens(streams[:, 0])  # (8, L, 1 + N, D)
        theirs = [model(images[i : i + 1]) for i in range(8)]  # their forward takes batch 1 (adapter.py:78-79)
    compared["seg_adapter_tokens"] = diff(seg, torch.stack([torch.stack(t[1], 1)[0] for t in theirs]))
    compared["det_adapter_tokens"] = diff(det, torch.stack([torch.stack(t[2], 1)[0] for t in theirs]))

    seg_mem, det_mem = their_memory(args.original, model, images[:2])
    compared["seg_memory"] = diff(ours.memory()[0], torch.stack(seg_mem))
    compared["det_memory"] = diff(ours.memory()[1], torch.stack(det_mem))
    zero, few = their_maps(args.original, model, images[2:], text, seg_mem, det_mem, backbone.image_size)
    with torch.no_grad():
        from usad_bench.backbone import ImageFeatures

        our_zero, our_few = ours.branch_maps(ImageFeatures(cls=torch.zeros(6, 1), patches=streams[2:], layers=(6,)))
    compared["zero_shot_map"] = diff(our_zero, zero)
    compared["few_shot_map"] = diff(our_few, few)
    notes.append(
        "fusion: the original min-maxes both maps over the whole test set before 0.5/0.5 (train_few.py:278-292); "
        "ours fuses each image's raw maps (per-image scoring), so the fused map is not compared"
    )
    notes.append("det loss: both sides feed the mean probability as the logit (det_bce=probability_as_logit)")
    initial = {k: v.clone() for k, v in ours.adapters.state_dict().items()}
    compared.update(train_steps(args.original, ours, model, text, their_loss, streams, images))
    compared.update(train_float64(args.original, ours, model, their_loss, images, initial))
    notes.append(
        "float32 (the pipeline's precision): gradients agree to ~4e-5 relative (summation order), but Adam's first "
        "steps move a parameter by about lr whatever the size of its gradient, so entries with near-zero gradients "
        "differ by up to ~lr after a few steps; the *_float64 rows repeat the training comparison in float64 on "
        "both sides (same initial adapters, our text embeddings fed to their lines) to show the arithmetic is the same"
    )
    write(args, "mvfa", REPO, COMMIT, compared, notes)


def their_memory(original: Path, model, normal_images: torch.Tensor):
    """train_few.py's memory-bank lines over a support 'loader' of our normal shots, in order."""
    block = inline_block(original / "train_few.py", "seg_features = []", "result = test(", 8)
    scope = dict(support_loader=[[img[None]] for img in normal_images], device="cpu", model=model, torch=torch)
    exec(block, scope)
    return scope["seg_mem_features"], scope["det_mem_features"]


def their_maps(original: Path, model, test_images, text, seg_mem, det_mem, size: int):
    """test()'s per-image map lines (branch with masks) of train_few.py, one image at a time as there."""
    block = inline_block(
        original / "train_few.py",
        "_, seg_patch_tokens, det_patch_tokens = model(image)",
        "else:",
        12,
        after="def test(",
    )
    zero, few = [], []
    for image in test_images:
        scope = dict(
            model=model, image=image[None], np=np, F=F, torch=torch, cos_sim=sys.modules["mvfa_utils"].cos_sim,
            CLASS_INDEX={OBJECT: 3}, args=types.SimpleNamespace(obj=OBJECT, img_size=size), text_features=text,
            seg_mem_features=seg_mem, det_mem_features=det_mem, seg_score_map_zero=zero, seg_score_map_few=few,
        )  # fmt: skip
        with torch.no_grad():
            exec(block, scope)
    return torch.as_tensor(np.stack(zero))[:, 0], torch.as_tensor(np.stack(few))[:, 0]


def train_float64(original: Path, ours, model, their_loss, images, initial: dict) -> dict:
    """The training comparison again in float64, from the same initial adapters."""
    ours.adapters.load_state_dict(initial)
    model.seg_adapters.load_state_dict(ours.adapters.seg_adapters.state_dict())
    model.det_adapters.load_state_dict(ours.adapters.det_adapters.state_dict())
    ours.double()
    model.double()
    images = images.double()
    with torch.no_grad():
        _, streams = encode_stream(ours.backbone.visual, images, ours.layers[0])
    rows = train_steps(original, ours, model, ours.state_text.T, their_loss, streams, images)
    return {f"{name}_float64": row for name, row in rows.items()}


def train_steps(original: Path, ours, model, text, their_loss, streams, images) -> dict:
    """STEPS Adam steps, batch 1, on images 2..(2+STEPS) (alternately benign / malignant, with masks):
    ours through training_step, theirs through train_few.py's loop body."""
    ours.train()
    ours.log_losses = lambda losses, batch_size: sum(losses.values())
    opt_ours = ours.configure_optimizers()
    seg_opt = torch.optim.Adam(list(model.seg_adapters.parameters()), lr=1e-3, betas=(0.5, 0.999))  # :71-72
    det_opt = torch.optim.Adam(list(model.det_adapters.parameters()), lr=1e-3, betas=(0.5, 0.999))
    block = inline_block(original / "train_few.py", "image = image.to(device)", 'print("Loss: "', 12)
    size = images.shape[-1]
    gen = torch.Generator().manual_seed(1)
    losses_ours, losses_theirs, grads_ours, grads_theirs = [], [], [], []
    for step in range(STEPS):
        i = 2 + step
        mask = (torch.rand(1, size, size, generator=gen) > 0.8).to(images.dtype)
        label = torch.tensor(
            [1.0 if step % 3 else 0.0], dtype=images.dtype
        )  # a normal image (empty mask) every third step
        mask = mask * label
        batch = {
            "patches": streams[i : i + 1],
            "is_anomaly": label,
            "pixel_truth": torch.ones(1, dtype=bool),
            "mask": mask,
        }
        loss = ours.training_step(batch, 0)
        opt_ours.zero_grad()
        loss.backward()
        opt_ours.step()
        losses_ours.append(float(loss.detach()))
        scope = dict(
            image=images[i : i + 1], gt=mask[None].clone(), label=label, device="cpu", model=model, torch=torch,
            np=np, F=F, text_features=text, CLASS_INDEX={OBJECT: 3},
            args=types.SimpleNamespace(obj=OBJECT, img_size=size), loss_bce=torch.nn.BCEWithLogitsLoss(),
            loss_focal=their_loss.FocalLoss(), loss_dice=their_loss.BinaryDiceLoss(),
            seg_optimizer=seg_opt, det_optimizer=det_opt, loss_list=[],
        )  # fmt: skip
        exec(block, scope)
        losses_theirs.append(float(scope["loss"]))
        grads_ours.append(torch.cat([_grad(p) for p in ours.adapters.parameters()]))
        grads_theirs.append(
            torch.cat([_grad(p) for m in (model.seg_adapters, model.det_adapters) for p in m.parameters()])
        )
    ours_params = torch.cat([p.detach().flatten() for p in ours.adapters.parameters()])
    theirs_params = torch.cat(
        [p.detach().flatten() for m in (model.seg_adapters, model.det_adapters) for p in m.parameters()]
    )
    return {
        "train_losses": diff(losses_ours, losses_theirs),
        "adapter_grads_each_step": diff(torch.stack(grads_ours), torch.stack(grads_theirs)),
        f"adapter_params_after_{STEPS}_steps": diff(ours_params, theirs_params),
    }


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad.detach().flatten() if p.grad is not None else torch.zeros(p.numel())


if __name__ == "__main__":
    main()
