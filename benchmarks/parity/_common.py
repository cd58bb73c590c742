"""Shared plumbing of the parity scripts: load the authors' code from a local clone, build one random
CLIP shared by both sides, compare tensors, write ``results/parity/<method>.json``.

Nothing of the authors' repositories is copied here: their modules are imported from ``--original``
at run time. What is stubbed is said where it is done; it is only ever the network (weight
downloads), the datasets / data loaders, the GPU (``.cuda()`` calls, on a CPU machine) and the
training harness around the compared functions (Dassl's trainer registry), never a formula.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results" / "parity"
TOLERANCE = 1e-4  # relative difference the issue asks for
torch.set_num_threads(1)  # tiny tensors: on a shared CPU, thread hand-offs cost more than the arithmetic

# A small OpenAI-layout CLIP: open_clip's config for our side; the same numbers build the authors'
# `clip.model.CLIP` (whose ViT has width // 64 heads, hence the 128 / 64 widths and quick GELU).
PARITY_MODEL = "usad-parity-tiny"
PARITY_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}


def arguments(method: str, repo: str, commit: str, extra: tuple[str, ...] = ()) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=f"parity of usad_bench's {method} with {repo} @ {commit[:10]}")
    parser.add_argument("--original", type=Path, required=True, help=f"local clone of {repo}")
    for name in extra:  # further clones, by default beside --original (make parity's layout)
        parser.add_argument(f"--{name.lower()}", type=Path, default=None, help=f"local clone of {name}")
    parser.add_argument("--out", type=Path, default=RESULTS / f"{method}.json")
    args = parser.parse_args()
    if not args.original.is_dir():
        sys.exit(f"error: --original {args.original} is not a directory; clone {repo} there (commit {commit})")
    for name in extra:
        key = name.lower().replace("-", "_").replace(".", "_")
        path = getattr(args, key, None) or args.original.parent / name
        if not path.is_dir():
            sys.exit(f"error: {path} is not a directory; clone {name} there or pass --{name.lower()} PATH")
        setattr(args, key, path)
    return args


def clone_commit(path: Path) -> str:
    """HEAD of a local clone (recorded in the JSON beside the commit the script was written against)."""
    try:
        return subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def import_path(path: Path) -> None:
    """Put a clone first on sys.path so that its packages (``clip``, ``dassl``, ...) are the ones imported."""
    sys.path.insert(0, str(path))


def load_file(name: str, path: Path) -> types.ModuleType:
    """Import one of the authors' files as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def stub_cuda() -> None:
    """The authors' code calls ``.cuda()`` unconditionally; on a CPU machine it becomes a no-op.

    Only the device placement is stubbed (nothing else changes), and only when no GPU is present.
    """
    if torch.cuda.is_available():
        return
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    tensor_to = torch.Tensor.to

    def on_cpu(value):
        is_cuda = (isinstance(value, str) and value.startswith("cuda")) or getattr(value, "type", None) == "cuda"
        return "cpu" if is_cuda else value

    def to(self, *args, **kwargs):  # ``x.to('cuda')`` -> ``x.to('cpu')``; every other use unchanged
        return tensor_to(self, *map(on_cpu, args), **{k: on_cpu(v) for k, v in kwargs.items()})

    torch.Tensor.to = to


def stub_dassl_harness(dassl_clone: Path) -> None:
    """Dassl's trainer harness (registry, base trainer, checkpoint I/O, accuracy) is not compared and
    needs packages of its own (yacs, tensorboard); the trainers' modules import it, so it is stubbed.
    ``dassl.optim`` (optimiser and LR schedule) stays the real one from the Dassl clone."""
    import_path(dassl_clone)
    _torch_scheduler_compat()


def _torch_scheduler_compat() -> None:
    """Dassl's warm-up scheduler passes ``verbose`` positionally to ``_LRScheduler.__init__``, which
    PyTorch >= 2.2 no longer accepts; this base class takes and ignores it (the schedule is unchanged)."""
    from torch.optim import lr_scheduler

    class LRSchedulerAcceptingVerbose(lr_scheduler.LRScheduler):
        def __init__(self, optimizer, last_epoch=-1, verbose=False):
            super().__init__(optimizer, last_epoch)

    lr_scheduler._LRScheduler = LRSchedulerAcceptingVerbose

    class Registry:
        def register(self, obj=None):
            return obj if obj is not None else (lambda o: o)

    engine = types.ModuleType("dassl.engine")
    engine.TRAINER_REGISTRY, engine.TrainerX = Registry(), object
    metrics = types.ModuleType("dassl.metrics")
    metrics.compute_accuracy = lambda *a, **k: [0.0]
    utils = types.ModuleType("dassl.utils")
    utils.load_pretrained_weights = utils.load_checkpoint = lambda *a, **k: None
    for name, module in (("dassl.engine", engine), ("dassl.metrics", metrics), ("dassl.utils", utils)):
        sys.modules[name] = module


def our_backbone():
    """Our frozen Backbone on the parity model, random weights (seed 0)."""
    import open_clip

    from usad_bench.backbone import Backbone, BackboneSpec

    if PARITY_MODEL not in open_clip.list_models():
        folder = Path(tempfile.mkdtemp(prefix="usad_parity_cfg_"))
        (folder / f"{PARITY_MODEL}.json").write_text(json.dumps(PARITY_CONFIG))
        open_clip.add_model_config(folder)
    return Backbone.load(BackboneSpec(name=PARITY_MODEL, pretrained=None, seed=0))


def their_clip(clip_model_module, backbone, logit_scale: float = 100.0):
    """The authors' ``clip.model.CLIP`` with exactly our backbone's weights (the stub for the weight download).

    ``logit_scale`` is set to the pretrained CLIP's value (exp 4.6052 = 100), which the methods use.
    """
    v, t = PARITY_CONFIG["vision_cfg"], PARITY_CONFIG["text_cfg"]
    model = clip_model_module.CLIP(
        embed_dim=PARITY_CONFIG["embed_dim"],
        image_resolution=v["image_size"],
        vision_layers=v["layers"],
        vision_width=v["width"],
        vision_patch_size=v["patch_size"],
        context_length=t["context_length"],
        vocab_size=t["vocab_size"],
        transformer_width=t["width"],
        transformer_heads=t["heads"],
        transformer_layers=t["layers"],
    )
    state = {k: v for k, v in backbone.model.state_dict().items() if k != "attn_mask"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "attn_mask" not in k]:
        raise SystemExit(f"error: weight layouts differ (missing {missing[:4]}, unexpected {unexpected[:4]})")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(logit_scale))
    return model.float().eval()


def diff(ours, theirs) -> dict:
    """Max absolute difference and max relative difference (to the largest magnitude of the reference)."""
    a = torch.as_tensor(ours, dtype=torch.float64).detach().cpu()
    b = torch.as_tensor(theirs, dtype=torch.float64).detach().cpu()
    if a.shape != b.shape:
        raise SystemExit(f"error: shapes differ: ours {tuple(a.shape)} vs theirs {tuple(b.shape)}")
    max_abs = float((a - b).abs().max()) if a.numel() else 0.0
    scale = float(b.abs().max()) if b.numel() else 0.0
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else max_abs, "shape": list(a.shape)}


def merge_max(items: list[dict]) -> dict:
    """The worst of several draws of the same comparison."""
    return {
        "max_abs": max(d["max_abs"] for d in items),
        "max_rel": max(d["max_rel"] for d in items),
        "shape": items[0]["shape"],
        "draws": len(items),
    }


def write(args, method: str, repo: str, commit: str, compared: dict, notes: list[str]) -> None:
    """Write the JSON (atomically) and print one line per compared quantity."""
    from usad_bench.io import write_json

    worst = max((d["max_rel"] for d in compared.values()), default=0.0)
    result = {
        "method": method,
        "original": {"repository": repo, "pinned_commit": commit, "clone_head": clone_commit(args.original)},
        "weights": "random (seed 0) on both sides; random inputs; not a benchmark result",
        "tolerance_rel": TOLERANCE,
        "within_tolerance": worst <= TOLERANCE,
        "compared": compared,
        "notes": notes,
    }
    write_json(args.out, result)
    for name, d in compared.items():
        print(f"{method:15s} {name:34s} max_abs {d['max_abs']:.3g}  max_rel {d['max_rel']:.3g}")
    print(f"{method}: worst relative difference {worst:.3g} ({'ok' if worst <= TOLERANCE else 'ABOVE tolerance'})")


def dassl_optim_cfg(lr: float, max_epoch: int, **overrides) -> types.SimpleNamespace:
    """Dassl's OPTIM defaults (dassl/config/defaults.py) with CoOp's few-shot values; read by the real
    ``dassl.optim.build_optimizer`` / ``build_lr_scheduler``."""
    cfg = {
        "NAME": "sgd",
        "LR": lr,
        "WEIGHT_DECAY": 5e-4,
        "MOMENTUM": 0.9,
        "SGD_DAMPNING": 0,
        "SGD_NESTEROV": False,
        "RMSPROP_ALPHA": 0.99,
        "ADAM_BETA1": 0.9,
        "ADAM_BETA2": 0.999,
        "STAGED_LR": False,
        "NEW_LAYERS": (),
        "BASE_LR_MULT": 0.1,
        "LR_SCHEDULER": "cosine",
        "STEPSIZE": (-1,),
        "GAMMA": 0.1,
        "MAX_EPOCH": max_epoch,
        "WARMUP_EPOCH": 1,
        "WARMUP_RECOUNT": True,
        "WARMUP_TYPE": "constant",
        "WARMUP_CONS_LR": 1e-5,
        "WARMUP_MIN_LR": 1e-5,
    }
    cfg.update(overrides)
    return types.SimpleNamespace(**cfg)


def train_both(batches, epochs: int, ours: dict, theirs: dict) -> dict:
    """Run the same batches through both sides' optimisers: per batch loss, zero_grad, backward, step;
    the LR schedulers step once per epoch (Dassl's ``update_lr``). Each side is a dict with
    ``loss(batch) -> tensor``, ``optimizer`` and ``scheduler``. Returns per-side losses and learning rates."""
    log = {"ours": {"loss": [], "lr": []}, "theirs": {"loss": [], "lr": []}}
    for _ in range(epochs):
        for side, name in ((ours, "ours"), (theirs, "theirs")):
            log[name]["lr"].append(side["optimizer"].param_groups[0]["lr"])
            for batch in batches:
                loss = side["loss"](batch)
                side["optimizer"].zero_grad()
                loss.backward()
                side["optimizer"].step()
                log[name]["loss"].append(float(loss.detach()))
            side["scheduler"].step()
    return log


def verbatim_state_prompts(source: Path, object_word: str, method: str) -> Path:
    """Our APRIL-GAN vocabulary with the authors' exact state words and templates, read from their ``source``.

    APRIL-GAN (prompt_ensemble.py) and MVFA (utils.py) define the same three lists; both sides then encode the
    same sentences.
    """
    names = ("prompt_normal", "prompt_abnormal", "prompt_templates")
    found = {
        t.id: ast.literal_eval(node.value)
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name) and t.id in names
    }
    vocab = yaml.safe_load((ROOT / "src/usad_bench/resources/prompts/april_gan.yaml").read_text())
    vocab.update(object=object_word, templates=found["prompt_templates"])
    vocab["states"] = {"normal": found["prompt_normal"], "abnormal": found["prompt_abnormal"]}
    path = Path(tempfile.mkdtemp(prefix=f"{method}_parity_")) / "verbatim.yaml"
    path.write_text(yaml.safe_dump(vocab))
    return path
