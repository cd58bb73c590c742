"""Parity of ``tip_adapter`` and ``tip_adapter_f`` with gaopengcuhk/Tip-Adapter (``utils.py``:
clip_classifier, build_cache_model, search_hp; ``main.py``: run_tip_adapter_F).

Same random CLIP weights, same support features (an original and a mirrored view per image, i.e.
two augment epochs), same validation features. Compared: the class text weights, the cache keys
and values, the alpha/beta their search picks vs ours (ours run with one "fold": the whole cache,
scored on the same validation features, over several random draws), and for Tip-Adapter-F the keys
after one epoch of identical batches and the alpha/beta searched with them. Stubbed: the weight
download (their ``CLIP`` class gets our random weights), ``encode_image`` of the support loader
(returns the given features: the network), the ``datasets`` package (dataset downloads),
``.cuda()`` on a CPU machine. Both sides compute in float64 here (theirs runs fp16 on a GPU).

    python benchmarks/parity/tip_adapter.py --original ORIGINALS/Tip-Adapter   # writes tip_adapter{,_f}.json
"""

from __future__ import annotations

import copy
import sys
import tempfile
import types

import torch
import torch.nn.functional as F
from _common import (
    RESULTS,
    arguments,
    diff,
    import_path,
    load_file,
    merge_max,
    our_backbone,
    stub_cuda,
    their_clip,
    write,
)

REPO, COMMIT = "gaopengcuhk/Tip-Adapter", "d0e2d6f8c5feb8b6ce937b757810761f7155d4d5"
CLASSES = ["normal", "benign", "malignant"]
SHOTS, N_VAL, DRAWS = 4, 24, 1


class FeatureModel:
    """Stands in for CLIP's image encoder in their cache builder: each call returns the next view's features."""

    def __init__(self, views: torch.Tensor):
        self.views, self.calls = views, 0  # (V, N, D)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        view = self.views[self.calls % len(self.views)]
        self.calls += 1
        return view[images]


def load_theirs(args):
    import_path(args.original)
    stub_cuda()
    datasets = types.ModuleType("datasets")  # dataset downloads (gdown); not compared
    datasets.build_dataset = None
    datasets_utils = types.ModuleType("datasets.utils")
    datasets_utils.build_data_loader = None
    sys.modules.update({"datasets": datasets, "datasets.utils": datasets_utils})
    import clip
    import utils

    main_module = load_file("their_tip_main", args.original / "main.py")
    utils.cls_acc = main_module.cls_acc = numpy2_cls_acc(utils.cls_acc)
    return clip, utils, main_module


def numpy2_cls_acc(original):
    """Their ``cls_acc`` calls ``float()`` on a 1-element 1-D array, which NumPy >= 2 refuses; the same
    top-1 accuracy is computed through ``.item()`` (NumPy < 2 runs theirs unchanged)."""
    import numpy as np

    if int(np.__version__.split(".")[0]) < 2:
        return original

    def cls_acc(output, target, topk=1):
        pred = output.topk(topk, 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return 100 * correct[:topk].reshape(-1).float().sum().item() / target.shape[0]

    return cls_acc


def draw(seed: int, text: torch.Tensor):
    """Support views and validation features around class centres that lean towards the class texts
    (so that zero-shot logits carry some signal and the search has something to trade off)."""
    g = torch.Generator().manual_seed(seed)
    n, dim = SHOTS * len(CLASSES), text.shape[1]
    labels = torch.arange(n) % len(CLASSES)
    centres = 2.0 * text + 0.5 * torch.randn(len(CLASSES), dim, generator=g, dtype=torch.float64)
    raw = centres[labels] + 0.5 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    views = torch.stack([raw, raw + 0.3 * torch.randn(n, dim, generator=g, dtype=torch.float64)])  # (2, N, D)
    val_labels = torch.arange(N_VAL) % len(CLASSES)
    val = F.normalize(centres[val_labels] + 0.5 * torch.randn(N_VAL, dim, generator=g, dtype=torch.float64), dim=-1)
    return labels, views, val, val_labels


def search_cfg(ours) -> dict:
    c = ours.cfg
    return {"search_hp": True, "search_scale": [c.beta_max, c.alpha_max], "search_step": [c.beta_steps, c.alpha_steps]}


def our_search(ours, val, val_labels, keys, values, text):
    """Our search_alpha_beta with one fold: the whole cache, scored on the validation features."""
    from usad_bench.methods.tip_adapter import search_alpha_beta, tip_grid

    folds = [(torch.arange(len(keys)), torch.arange(len(val)))]
    clip_logits = ours.cfg.logit_scale * val @ text.T
    c = ours.cfg
    alpha, beta, _ = search_alpha_beta(
        clip_logits,
        val_labels,
        folds,
        lambda train, held: (val[held] @ keys[train].T, values[train]),
        tip_grid(c.beta_max, c.beta_steps),
        tip_grid(c.alpha_max, c.alpha_steps),
    )
    return alpha, beta


def main() -> None:
    args = arguments("tip_adapter", REPO, COMMIT)
    clip, utils, their_main = load_theirs(args)
    from usad_bench.runner import build_method

    backbone = our_backbone()
    clip_model = their_clip(clip.model, backbone)
    ours = build_method("tip_adapter", {}, backbone, CLASSES, SHOTS, [])
    prompts = ours.task.prompts
    words = [prompts.class_words(c) for c in CLASSES]
    assert all(
        prompts.class_prompts(c) == [t.format(w) for t in prompts.class_templates]
        for c, w in zip(CLASSES, words, strict=True)
    )
    their_text = utils.clip_classifier(words, prompts.class_templates, clip_model).T  # (C, D)
    compared = {"class_text": diff(ours.class_text, their_text)}
    text = ours.class_text.double()

    keys_diff, values_diff, alpha_diff, beta_diff, picks = [], [], [], [], []
    f_results: dict = {"keys_after_training": [], "alpha": [], "beta": []}
    for seed in range(DRAWS):
        labels, views, val, val_labels = draw(seed, text)
        cache_dir = tempfile.mkdtemp(prefix="tip_parity_")
        cfg = {"load_cache": False, "augment_epoch": 2, "cache_dir": cache_dir, "shots": SHOTS, **search_cfg(ours)}
        loader = [(torch.arange(len(labels)), labels)]  # one batch; "images" are indices into the views
        their_keys, their_values = utils.build_cache_model(cfg, FeatureModel(views), loader)  # (D, N), (N, C)
        our_keys = F.normalize(views.mean(0), dim=-1)  # what tip_adapter.cache_keys computes, from two views
        support = types.SimpleNamespace(
            features={v: types.SimpleNamespace(cls=views[i]) for i, v in enumerate(("orig", "hflip"))}
        )
        from usad_bench.methods.tip_adapter import cache_keys

        our_keys = cache_keys(support, flip_views=True).double()
        values = F.one_hot(labels, len(CLASSES)).double()
        keys_diff.append(diff(our_keys, their_keys.T))
        values_diff.append(diff(values, their_values.double()))
        their_beta, their_alpha = utils.search_hp(
            cfg, their_keys.double(), their_values.double(), val, val_labels, text.T
        )
        alpha, beta = our_search(ours, val, val_labels, our_keys, values, text)
        alpha_diff.append(diff(alpha, their_alpha))
        beta_diff.append(diff(beta, their_beta))
        picks.append({"seed": seed, "ours": [alpha, beta], "theirs": [their_alpha, their_beta]})
        tip_f_draw(
            ours,
            backbone,
            their_main,
            utils,
            cfg,
            labels,
            views,
            val,
            val_labels,
            their_keys,
            their_values,
            text,
            f_results,
        )
    compared.update(
        cache_keys=merge_max(keys_diff),
        cache_values=merge_max(values_diff),
        searched_alpha=merge_max(alpha_diff),
        searched_beta=merge_max(beta_diff),
    )
    notes = [
        f"search picks (alpha, beta) per draw: {picks}",
        "search on validation features (their setting) with our rule",
    ]
    write(args, "tip_adapter", REPO, COMMIT, compared, notes)
    f_args = copy.copy(args)
    f_args.out = (
        RESULTS / "tip_adapter_f.json"
        if args.out == RESULTS / "tip_adapter.json"
        else args.out.with_name("tip_adapter_f.json")
    )
    f_compared = {name: merge_max(items) for name, items in f_results.items()}
    write(
        f_args,
        "tip_adapter_f",
        REPO,
        COMMIT,
        f_compared,
        [
            "one epoch of identical batches (their best-test-epoch checkpoint is then the last one), "
            "trained with the initial alpha/beta",
            "their loop encodes images each step; the stub returns the given view features, normalised by their code",
        ],
    )


def tip_f_draw(
    ours_f_base, backbone, their_main, utils, cfg, labels, views, val, val_labels, their_keys, their_values, text, out
):
    """Tip-Adapter-F on one draw: one epoch over identical batches, then the alpha/beta search."""
    from usad_bench.methods.base import SupportEpochSampler
    from usad_bench.methods.tip_adapter_f import tip_f_optimizer
    from usad_bench.runner import build_method

    ours = build_method("tip_adapter_f", {"batch_size": 5, "epochs": 1}, backbone, CLASSES, SHOTS, [])
    n = len(labels)
    flat = views.flatten(0, 1)  # item view * N + image, as our loader indexes
    order = list(SupportEpochSampler(n, 2, seed=0))
    batches = [torch.tensor(order[i : i + 5]) for i in range(0, n, 5)]  # keep the last partial batch, as theirs
    train_loader = [(b, labels[b % n]) for b in batches]

    class Encoder:
        dtype = torch.float64

        def encode_image(self, items):
            return flat[items].clone()

    f_cfg = {
        **cfg,
        "lr": ours.cfg.lr,
        "train_epoch": 1,
        "init_beta": ours.cfg.init_beta,
        "init_alpha": ours.cfg.init_alpha,
    }
    their_main.run_tip_adapter_F(
        f_cfg,
        their_keys.double().clone(),  # their adapter trains a view of this tensor in place
        their_values.double(),
        val,
        val_labels,
        F.normalize(flat[:n], dim=-1),
        labels,
        text.T,
        Encoder(),
        train_loader,
    )
    tuned_theirs = torch.load(f"{cfg['cache_dir']}/best_F_{SHOTS}shots.pt").detach()  # (N, D)
    keys = torch.nn.Parameter(their_keys.T.double().clone())
    values = F.one_hot(labels, len(CLASSES)).double()
    optimizer, scheduler = tip_f_optimizer([keys], ours.cfg, len(batches))
    ours.class_text = text
    for b in batches:
        image = F.normalize(flat[b], dim=-1)
        loss = F.cross_entropy(ours.training_logits(image, keys, values), labels[b % n])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    out["keys_after_training"].append(diff(keys.detach(), tuned_theirs))
    adapter = torch.nn.Linear(keys.shape[1], keys.shape[0], bias=False).double()
    adapter.weight = torch.nn.Parameter(tuned_theirs.clone())
    their_beta, their_alpha = utils.search_hp(
        cfg, None, their_values.double(), val, val_labels, text.T, adapter=adapter
    )
    alpha, beta = our_search(ours_f_base, val, val_labels, keys.detach(), values, text)
    out["alpha"].append(diff(alpha, their_alpha))
    out["beta"].append(diff(beta, their_beta))


if __name__ == "__main__":
    main()
