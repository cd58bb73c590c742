"""Parity of ``vcp_clip`` with the authors' code, xiaozhen228/VCP-CLIP.

Their own modules run from the clone: ``models.model_CLIP.CLIP`` (text tower with the image-conditioned
class token and the deep text prompts, built at a small size and given our random weights: the stub for
the weight file), ``models.model_CLIP.tokenize`` (with its ``<|class|>`` token), ``models.prompt_ensemble``,
``models.pre_vcp.Context_Prompting``, ``models.post_vcp.Zero_Parameter``, ``utils.loss``, and the lines
of ``train.py`` / ``test.py`` that compute the maps, the losses and the optimiser step (read from the
files and executed as they are; ``train.py``'s ``LinearLayer`` class likewise). Their vision tower is not
run: both sides get the same frozen tokens (their ``model.encode_image`` returns ours; CLS token
prepended, which their code drops). Learned parts start from our values, copied into theirs.

Compared: Pre-VCP class tokens, text embeddings, raw and Post-VCP maps per block, the pixel map (after
their test-set min-max, which ours leaves out) and the image score (before it), focal and Dice losses,
and the losses and parameters after a few identical Adam steps (dropout off on both sides: it draws
different masks).

    python benchmarks/parity/vcp_clip.py --original ORIGINALS/VCP-CLIP
"""

from __future__ import annotations

import ast
import json
import os
import sys
import tempfile
import textwrap
import types
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from _common import arguments, diff, import_path, write

from usad_bench.backbone import Backbone, BackboneSpec
from usad_bench.methods.base import Task
from usad_bench.methods.losses import dice_loss, focal_loss
from usad_bench.methods.vcp_clip import VcpClip, VcpClipConfig
from usad_bench.prompts import load_prompts

REPO, COMMIT = "xiaozhen228/VCP-CLIP", "4dd96ec6e6391d0bbe5d9a42c7ba02bb15647f27"
STEPS = 3
B = 4
# VCP needs text width == embed dim (pre_vcp.py asserts it) and runs nn.GELU (transformer.py:499).
MODEL = "usad-parity-vcp"
CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "head_width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 3},
}


def our_backbone() -> Backbone:
    if MODEL not in open_clip.list_models():
        folder = Path(tempfile.mkdtemp(prefix="usad_parity_vcp_"))
        (folder / f"{MODEL}.json").write_text(json.dumps(CONFIG))
        open_clip.add_model_config(folder)
    return Backbone.load(BackboneSpec(name=MODEL, pretrained=None, seed=0))


def their_clip(mc, backbone: Backbone, ours: VcpClip):
    """Their CLIP (vocabulary + 1 for <|class|>, deep prompts in text blocks 1..L-1) with our weights."""
    v, t = CONFIG["vision_cfg"], CONFIG["text_cfg"]
    model = mc.CLIP(
        CONFIG["embed_dim"],
        v["image_size"],
        v["layers"],
        v["width"],
        v["patch_size"],
        t["context_length"],
        t["vocab_size"] + 1,
        t["width"],
        t["heads"],
        t["layers"],
        1,
        t["layers"] - 1,
    )
    state = {k: v for k, v in backbone.model.state_dict().items() if k != "attn_mask"}
    mc.add_word_embedding(state, model)  # their zero row for <|class|>
    p = ours.prompts
    state.update(
        {
            "prompt_embeddings": p.prompt_embeddings[None],
            "deep_prompt_embeddings": p.deep_prompt_embeddings,
            "prompt_proj.weight": p.prompt_proj.weight,
            "prompt_proj.bias": p.prompt_proj.bias,
            "prompt_norm.weight": p.prompt_norm.weight,
            "prompt_norm.bias": p.prompt_norm.bias,
        }
    )
    missing, unexpected = model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    if unexpected or [k for k in missing if k not in ("prompt_text_projection", "logit_scale")]:
        raise SystemExit(f"error: weight layouts differ (missing {missing[:6]}, unexpected {unexpected[:6]})")
    return model.float()


def copy_vcp_modules(ours: VcpClip, pre_vcp, post_vcp) -> None:
    with torch.no_grad():
        pre_vcp.prompt_query.copy_(ours.pre_vcp.prompt_query)
        pre_vcp.prompt_linear1.fc.load_state_dict(ours.pre_vcp.prompt_linear.state_dict())
        pre_vcp.prompt_temp.copy_(ours.pre_vcp.log_temperature)
        pairs = [
            ("q_proj_pre", "q_proj"),
            ("k_proj_pre_1", "k_proj"),
            ("v_proj_pre_1", "v_proj"),
            ("proj_post_t", "out_proj"),
        ]
        for theirs_name, ours_name in pairs:
            getattr(post_vcp, theirs_name).weight.copy_(getattr(ours.post_vcp, ours_name).weight[..., None])
            getattr(post_vcp, theirs_name).bias.copy_(getattr(ours.post_vcp, ours_name).bias)
        post_vcp.prompt_temp_l1.copy_(ours.post_vcp.log_temperature)


def source_block(path: Path, first: str, last: str, indent: int) -> str:
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(first))
    stop = next(i for i in range(start + 1, len(lines)) if lines[i].strip().startswith(last))
    return textwrap.dedent("\n".join(line[indent:] if line.strip() else "" for line in lines[start:stop]))


def their_class(path: Path, name: str, scope: dict):
    """A class defined in one of their scripts (train.py), executed from its source."""
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    exec(compile(ast.Module([node], []), str(path), "exec"), scope)
    return scope[name]


def main() -> None:
    args = arguments("vcp_clip", REPO, COMMIT)
    import packaging.version

    sys.modules["pkg_resources"] = types.SimpleNamespace(packaging=packaging)  # setuptools' re-export they import
    import_path(args.original)
    cwd = Path.cwd()
    os.chdir(args.original)  # their tokenizer opens ./models/bpe_simple_vocab_16e6.txt.gz
    from models import model_CLIP as mc
    from models.post_vcp import Zero_Parameter
    from models.pre_vcp import Context_Prompting
    from models.prompt_ensemble import Prompt_Ensemble
    from utils.loss import BinaryDiceLoss, FocalLoss

    os.chdir(cwd)

    torch.manual_seed(0)
    backbone = our_backbone()
    size = backbone.image_size
    task = Task(["normal", "benign", "malignant"], 2, "synth", load_prompts("breast_ultrasound"), size)
    cfg = VcpClipConfig(layers=[1, 2], top_k=2000, top_k_reference_size=size, batch_size=B)
    ours = VcpClip(cfg, backbone, task).eval()
    model = their_clip(mc, backbone, ours).eval()
    model_configs = {
        "embed_dim": CONFIG["embed_dim"],
        "text_cfg": CONFIG["text_cfg"],
        "vision_cfg": CONFIG["vision_cfg"],
    }
    pre_vcp = Context_Prompting(model_configs, cla_len=cfg.prompt_len).eval()
    post_vcp = Zero_Parameter(dim_v=backbone.vision_width, dim_t=CONFIG["embed_dim"], dim_out=backbone.vision_width)
    copy_vcp_modules(ours, pre_vcp, post_vcp.eval())
    prompt_pre = Prompt_Ensemble(cfg.prompt_len, mc.tokenize)
    scope = {"nn": torch.nn, "torch": torch}
    linear_layer_cls = their_class(args.original / "train.py", "LinearLayer", scope)
    layer = linear_layer_cls(backbone.vision_width, CONFIG["embed_dim"], len(ours.layers), "ViT-parity")
    layer.load_state_dict({k.replace("adapters", "fc"): v for k, v in ours.heads.state_dict().items()})

    images = torch.rand(B, 3, size, size)
    feats = backbone.encode_images(images, ours.layers)
    model.encode_image = (
        lambda image, layers: (  # the frozen vision tower's output: our tokens
            feats.cls.clone(),
            [
                torch.cat([torch.zeros_like(feats.patches[:, i, :1]), feats.patches[:, i]], 1)
                for i in range(len(layers))
            ],
        )
    )
    compared, notes = {}, []
    with torch.no_grad():
        compared["pre_vcp_class_tokens"] = diff(ours.pre_vcp(feats.cls), pre_vcp.before_extract_feat(None, feats.cls))
        theirs_text = prompt_pre.forward_ensemble(model, pre_vcp.before_extract_feat(None, feats.cls), "cpu")
        compared["text_embeddings"] = diff(ours.state_text(feats.cls), theirs_text)
        compared.update(compare_maps(args.original, ours, feats, model, pre_vcp, post_vcp, prompt_pre, layer, size))
    mask = (torch.rand(B, size, size) > 0.8).float()
    probs = ours.branch_probs(feats)[1][0]
    compared["focal_loss"] = diff(focal_loss(probs, mask), FocalLoss()(probs, mask))
    compared["dice_loss"] = diff(dice_loss(probs[:, 1], mask), BinaryDiceLoss()(probs[:, 1], mask))
    compared.update(train_steps(args.original, ours, feats, mask, model, pre_vcp, post_vcp, prompt_pre, layer))
    notes.append("pixel map compared after applying their utils.tools.normalize (test-set min-max) to ours")
    notes.append("training steps with dropout off on both sides (Dropout(0.1) draws different masks)")
    write(args, "vcp_clip", REPO, COMMIT, compared, notes)


def compare_maps(original, ours, feats, model, pre_vcp, post_vcp, prompt_pre, layer, size) -> dict:
    """test.py's map lines and calcuate_metric's score and smoothing lines against ours."""
    block = source_block(
        original / "test.py", "image_features, patch_tokens = model.encode_image", "results['anomaly_map_raw']", 12
    )
    scope = dict(
        model=model,
        image=None,
        features_list=list(ours.layers),
        New_Lan_Embed=pre_vcp,
        prompt_ceshi=prompt_pre,
        device="cpu",
        args=types.SimpleNamespace(use_global=True),
        Zero_try=post_vcp,
        np=np,
        F=F,
        torch=torch,
        img_size=size,
        linearlayer=layer,
    )
    exec(block, scope)
    raw, post = ours.branch_probs(feats)
    raw_map, post_map = torch.stack([p[:, 1] for p in raw]).mean(0), torch.stack([p[:, 1] for p in post]).mean(0)
    pred = ours.predict_features(feats)
    from scipy.ndimage import gaussian_filter

    for name in ("cv2", "skimage", "skimage.measure"):  # utils/tools.py's drawing / AUPRO imports, unused here
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["skimage"].measure = sys.modules["skimage.measure"]
    from utils.tools import normalize

    metric = source_block(original / "test.py", "pr_px =  normalize(gaussian_filter", "#pr_sp_tmp = np.max", 8)
    their = dict(pr_px_1=scope["anomaly_map_raw"], pr_px_2=scope["anomaly_map_new"], alpha=0.2, can_k=-2000, np=np)
    exec(metric, {**their, "normalize": normalize, "gaussian_filter": gaussian_filter}, their)
    return {
        "raw_branch_map": diff(raw_map, scope["anomaly_map_raw"]),
        "post_vcp_branch_map": diff(post_map, scope["anomaly_map_new"]),
        "pixel_map_after_test_minmax": diff(normalize(pred.anomaly_map.numpy()), their["pr_px"]),
        "image_score_before_test_minmax": diff(pred.score, their["pr_sp_tmp"]),
    }


def train_steps(original, ours, feats, mask, model, pre_vcp, post_vcp, prompt_pre, layer) -> dict:
    """STEPS Adam steps on one batch: ours through training_step, theirs through train.py's lines."""
    for module in (ours, model):
        for m in module.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    ours.train()
    ours.log_losses = lambda losses, batch_size: sum(losses.values())
    opt_ours = ours.configure_optimizers()
    for name, p in model.named_parameters():  # their _freeze_stages(model, "prompt")
        p.requires_grad = "prompt" in name
    prompt_params = [p for n, p in model.named_parameters() if "prompt" in n]
    group1 = [p for n, p in post_vcp.named_parameters() if n != "prompt_temp_l1"]
    group1 += (
        list(layer.parameters()) + [p for n, p in pre_vcp.named_parameters() if n != "prompt_temp"] + prompt_params
    )
    lr = ours.cfg.lr
    groups = [{"params": group1, "lr": lr}, {"params": [post_vcp.prompt_temp_l1, pre_vcp.prompt_temp], "lr": 0.01}]
    opt_theirs = torch.optim.Adam(groups, lr=lr, betas=(0.5, 0.999))  # train.py:162
    block = source_block(original / "train.py", "with torch.cuda.amp.autocast():", "loss_list.append(loss.item())", 16)
    batch = {"cls": feats.cls, "patches": feats.patches, "pixel_truth": torch.ones(B, dtype=bool), "mask": mask}
    log = {"ours": [], "theirs": []}
    for _ in range(STEPS):
        loss = ours.training_step(batch, 0)
        opt_ours.zero_grad()
        loss.backward()
        opt_ours.step()
        log["ours"].append(float(loss.detach()))
        scope = dict(
            items={"img": None, "cls_name": ["x"] * B, "img_mask": mask[:, None].clone()},
            image=None,
            device="cpu",
            model=model,
            features_list=list(ours.layers),
            New_Lan_Embed=pre_vcp,
            prompt_pre=prompt_pre,
            args=types.SimpleNamespace(use_global=True),
            Zero_try=post_vcp,
            trainable_layer=layer,
            np=np,
            F=F,
            torch=torch,
            image_size=mask.shape[-1],
            loss_focal=sys.modules["utils.loss"].FocalLoss(),
            loss_dice=sys.modules["utils.loss"].BinaryDiceLoss(),
            optimizer=opt_theirs,
        )
        exec(block, scope)
        log["theirs"].append(float(scope["loss"].detach()))
    pairs = {
        "heads": (ours.heads.parameters(), layer.parameters()),
        "pre_vcp": (
            [ours.pre_vcp.prompt_query, *ours.pre_vcp.prompt_linear.parameters()],
            [pre_vcp.prompt_query, *pre_vcp.prompt_linear1.parameters()],
        ),
        "post_vcp_q": (ours.post_vcp.q_proj.parameters(), post_vcp.q_proj_pre.parameters()),
        "temperatures": (
            [ours.pre_vcp.log_temperature, ours.post_vcp.log_temperature],
            [pre_vcp.prompt_temp, post_vcp.prompt_temp_l1],
        ),
        "text_prompts": (
            [ours.prompts.deep_prompt_embeddings, ours.prompts.prompt_proj.weight, ours.prompts.prompt_norm.weight],
            [model.deep_prompt_embeddings, model.prompt_proj.weight, model.prompt_norm.weight],
        ),
    }
    out = {"train_losses": diff(log["ours"], log["theirs"])}
    for name, (a, b) in pairs.items():
        flat = lambda ps: torch.cat([p.detach().flatten() for p in ps])  # noqa: E731
        out[f"{name}_after_{STEPS}_steps"] = diff(flat(a), flat(b))
    return out


if __name__ == "__main__":
    main()
