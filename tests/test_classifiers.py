"""Few-shot classification baselines: hand-checked formulas, support-only searches and scores.

The generic tests in test_methods.py already cover shapes, finiteness, gradients and saving for
every registered method. Here:

* Tip-Adapter's cache term and logits, and LP++'s step sizes and initial alpha, against values
  worked out by hand on tiny matrices;
* the alpha/beta search sees the support set only, never scores an image against its own key,
  and does not move when the test data change;
* every classifier's score is 1 - p(normal) of its own logits.

Whether each trained method *learns* the classes is tested through the real pipeline on the pretrained
tiny model (``tests/test_pretrained_learning.py``: manifest -> fit -> eval on real images). The unit tests
here run on synthetic *features* with a known class structure (a large component shared by every image,
a weaker class direction, per-image noise, a flipped "view" of each image; ``class_features``), fed
through the same Method API the runner uses: ``build_method`` -> ``setup_support`` -> the runner's
Lightning ``train`` -> ``predict_features``; the text side is the tiny backbone's real, random text tower.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from usad_bench.data.manifest import CLASS_ORDER, NORMAL, Sample
from usad_bench.features import FeatureTable
from usad_bench.methods import SupportSet, get_method
from usad_bench.methods.common import cache_affinity_logits, class_anomaly_score
from usad_bench.methods.coop import coop_epochs
from usad_bench.methods.lp_plus_plus import initial_alpha, step_size_alpha, step_size_w
from usad_bench.methods.tip_adapter import search_alpha_beta, tip_grid
from usad_bench.prompts import load_prompts
from usad_bench.runner import FitOptions, build_method, evaluate, fit, train

CLASSIFIERS = [
    "zero_shot_clip",
    "linear_probe",
    "coop",
    "cocoop",
    "clip_adapter",
    "tip_adapter",
    "tip_adapter_f",
    "lp_plus_plus",
]
SHOTS = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: with two threads on a busy 2-core machine, thread hand-offs cost more
    than the arithmetic (CoCoOp's batch-1 training ran 7x slower), so run this module on one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- synthetic features
def class_features(dim: int, labels: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP-like (N, D) embeddings and a flipped view of each: shared + class direction + noise.

    The class directions are fixed by ``seed // 1000`` so that a support set and a test set drawn
    with seeds 1000 and 1001 share them; the noise differs per seed.
    """
    base = torch.Generator().manual_seed(seed // 1000)
    shared = 3.0 * torch.randn(dim, generator=base)  # every image's embedding shares this (CLIP-like)
    directions = 0.8 * torch.randn(len(CLASS_ORDER), dim, generator=base)  # (C, D)
    noise = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels)
    orig = shared + directions[y] + torch.randn(len(y), dim, generator=noise)  # (N, D)
    flipped = orig + 0.3 * torch.randn(len(y), dim, generator=noise)  # another view of the same image
    return orig, flipped


def samples_for(labels: list[int], prefix: str) -> list[Sample]:
    return [
        Sample(
            id=f"{prefix}/{i:03d}",
            image=Path(f"/nonexistent/{prefix}/{i:03d}.png"),  # features are given; no image is read
            masks=(),
            label=CLASS_ORDER[y],
            is_anomaly=CLASS_ORDER[y] != NORMAL,
            group=f"{prefix}:p{i:03d}",
            domain="synthetic-features",
            dataset="synth",
        )
        for i, y in enumerate(labels)
    ]


def feature_support(dim: int, size: int, shots: int, seed: int) -> SupportSet:
    labels = [c for c in range(len(CLASS_ORDER)) for _ in range(shots)]
    samples = samples_for(labels, "support")
    orig, flipped = class_features(dim, labels, seed)
    ids = [s.id for s in samples]
    n = len(labels)
    return SupportSet(
        samples=samples,
        features={"orig": FeatureTable(ids, orig, None, ()), "hflip": FeatureTable(ids, flipped, None, ())},
        masks={v: torch.zeros(n, size, size) for v in ("orig", "hflip")},
        pixel_truth=torch.zeros(n, dtype=torch.bool),
        labels=torch.tensor(labels),
        is_anomaly=torch.tensor([float(y > 0) for y in labels]),
        variants=("orig", "hflip"),
    )


def fitted(name: str, backbone, support: SupportSet, tmp_path: Path, overrides=None, seed: int = 0):
    """The runner's path on a given support set: build, setup_support, train when trainable."""
    torch.manual_seed(seed)
    shots = len(support) // len(CLASS_ORDER)
    method = build_method(name, overrides or {}, backbone, list(CLASS_ORDER), shots, support.samples)
    method.setup_support(support)
    if method.trainable and method.cfg.epochs > 0:
        train(method, support, tmp_path / name, seed, use_wandb=False)
    return method.eval()


# ----------------------------------------------------------------------------- hand-checked formulas
def test_tip_adapter_affinity_by_hand(tiny_backbone):
    # Keys: e1, e2 and (0.6, 0.8); the query e1 has cosines 1, 0 and 0.6 with them.
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # labels 0, 1, 1
    query = torch.tensor([[1.0, 0.0]])
    # beta = 2: exp(-2 (1 - a)) = 1, e^-2, e^-0.8 -> class 0: 1; class 1: e^-2 + e^-0.8
    expected = torch.tensor([[1.0, math.exp(-2.0) + math.exp(-0.8)]])
    assert torch.allclose(cache_affinity_logits(query, keys, values, beta=2.0), expected, atol=1e-6)

    # The method adds alpha times that term to 100 x the zero-shot cosine.
    task_method = build_method("tip_adapter", {}, tiny_backbone, ["normal", "benign"], 1, samples_for([0, 1], "x"))
    dim = tiny_backbone.embed_dim
    pad = lambda t: F.pad(t, (0, dim - 2))  # noqa: E731  (embed the 2-d example in the D-d space)
    task_method.cache_keys = pad(keys)
    task_method.cache_values = values
    task_method.class_text = pad(torch.tensor([[0.8, 0.6], [0.0, 1.0]]))  # zero-shot cosines 0.8 and 0
    task_method.alpha.fill_(3.0)
    task_method.beta.fill_(2.0)
    logits = task_method.predict_features(_feats(pad(query) * 5.0)).class_logits  # any norm: it is normalised
    assert torch.allclose(logits, torch.tensor([[80.0, 0.0]]) + 3.0 * expected, atol=1e-4)


def _feats(cls: torch.Tensor):
    from usad_bench.backbone import ImageFeatures

    return ImageFeatures(cls=cls, patches=None)


def test_lp_plus_plus_step_sizes_by_hand():
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # N = 3
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (C, D)
    labels = torch.tensor([0, 0, 1])
    # F^T F = [[2, 0], [0, 1]], lambda_max = 2 -> step_W = 4N / 2 = 6
    assert step_size_w(features) == pytest.approx(6.0)
    # F T^T = F; column sums of squares 2 and 1 -> step_alpha = N / (4 * 2) = 3/8
    assert step_size_alpha(features, text) == pytest.approx(3.0 / 8.0)
    # The authors' formula: calculate_init_alpha = mean_c(250 / shots x shots x compute_centroids_alpha),
    # compute_centroids_alpha = sum_i (one_hot * F T^T / class count): one_hot * F T^T keeps, for each
    # image, only the cosine with its own class's text. Image cosines F T^T = F; class 0 (images 0, 1)
    # with text 0: (1 + 1) / 2 = 1; class 1 (image 2) with text 1: 1 / 1 = 1. Mean (1 + 1) / 2 = 1 ->
    # alpha_0 = 250 x 1 = 250. (Averaging over every class x text pair instead would give 125.)
    assert initial_alpha(features, labels, text, scale=250.0) == pytest.approx(250.0)
    # Off-diagonal cosines must not count, and classes are averaged after their own means:
    # texts t_0 = (0.3, 0.6), t_1 = (0.7, 0.5) give F T^T rows (0.3, 0.7), (0.3, 0.7), (0.6, 0.5).
    # Own-class: class 0 -> (0.3 + 0.3) / 2 = 0.3, class 1 -> 0.5; mean 0.4 -> alpha_0 = 250 x 0.4 = 100.
    # (All class x text pairs would give 250 x mean(0.3, 0.7, 0.6, 0.5) = 131.25.)
    uneven = torch.tensor([[0.3, 0.6], [0.7, 0.5]])
    assert initial_alpha(features, labels, uneven, scale=250.0) == pytest.approx(100.0)
    # A non-diagonal case: F^T F = [[2, 1], [1, 1]] has lambda_max = (3 + sqrt 5) / 2.
    skew = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert step_size_w(skew) == pytest.approx(4 * 2 / ((3 + math.sqrt(5)) / 2))


def test_lp_plus_plus_solver_moves_w_and_alpha_and_lowers_the_loss(tiny_backbone, tmp_path):
    # LP++ is fitted in setup_support (trainable = False), so the generic gradient test skips it.
    support = feature_support(tiny_backbone.embed_dim, tiny_backbone.image_size, SHOTS, seed=1000)
    start = fitted("lp_plus_plus", tiny_backbone, support, tmp_path, {"epochs": 0})  # the initialisation only
    end = fitted("lp_plus_plus", tiny_backbone, support, tmp_path, {"epochs": 300})
    feats = support.features["orig"].batch(slice(None))
    losses = [F.cross_entropy(m.predict_features(feats).class_logits, support.labels) for m in (start, end)]
    assert losses[1] < 0.5 * losses[0]
    assert not torch.allclose(start.alpha, end.alpha) and not torch.allclose(start.linear.weight, end.linear.weight)
    assert torch.allclose(start.alpha, start.alpha[0].expand(3))  # one initial value for every class


# ----------------------------------------------------------------------------- support-only search
def test_alpha_beta_search_takes_only_support_quantities():
    params = list(inspect.signature(search_alpha_beta).parameters)
    assert params == ["clip_logits", "labels", "folds", "fold_cache", "betas", "alphas"]  # no test data


def test_alpha_beta_search_never_scores_an_image_against_its_own_key():
    # Random features with random labels: nothing to learn. If a held-out image's own key were in
    # its cache, a large beta would match it to itself and reach accuracy 1.
    g = torch.Generator().manual_seed(0)
    n, c = 24, 3
    queries = F.normalize(torch.randn(n, 16, generator=g), dim=-1)
    labels = torch.arange(n) % c
    values = F.one_hot(labels, c).float()
    folds = [(np.delete(np.arange(n), i), np.array([i])) for i in range(n)]  # leave one out

    def fold_cache(train, held):
        return queries[held] @ queries[train].T, values[train]

    def leaky_cache(train, held):
        return queries[held] @ queries.T, values

    zero_shot = torch.zeros(n, c)
    betas, alphas = tip_grid(12.0, 50), tip_grid(10.0, 10)
    _, _, honest = search_alpha_beta(zero_shot, labels, folds, fold_cache, betas, alphas)
    _, _, leaky = search_alpha_beta(zero_shot, labels, folds, leaky_cache, betas, alphas)
    assert leaky == 1.0  # the check can tell a leak
    assert honest < 0.7


def test_alpha_beta_search_keeps_the_first_grid_point_reaching_the_best_accuracy():
    # One held-out image of class 1 whose zero-shot logits (1, 0) are wrong; its fold's cache holds one
    # key of class 1 at cosine 0.5. It is right iff alpha * exp(-beta * 0.5) > 1, so many grid points
    # tie at accuracy 1. The original's loop (beta outer, alpha inner, replace only if strictly better)
    # keeps the first: the smallest beta, and for it the first alpha above exp(0.5 * beta).
    labels = torch.tensor([1, 1])
    zero_shot = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    values = torch.tensor([[0.0, 1.0]])
    folds = [(np.array([1]), np.array([0]))]

    def fold_cache(train, held):
        return torch.tensor([[0.5]]), values

    betas, alphas = tip_grid(12.0, 200), tip_grid(10.0, 20)
    alpha, beta, accuracy = search_alpha_beta(zero_shot, labels, folds, fold_cache, betas, alphas)
    expected_alpha = next(float(a) for a in alphas if a * math.exp(-0.5 * float(betas[0])) > 1.0)
    assert (alpha, beta, accuracy) == (pytest.approx(expected_alpha), pytest.approx(float(betas[0])), 0.5)
    # Already right without the cache: every point ties, and the very first one is kept.
    right = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    alpha, beta, _ = search_alpha_beta(right, labels, folds, fold_cache, betas, alphas)
    assert (alpha, beta) == (pytest.approx(float(alphas[0])), pytest.approx(float(betas[0])))


def test_linear_probe_c_search_follows_lpclip_rules(monkeypatch):
    from usad_bench.methods import linear_probe

    def search(accuracy_of_c) -> float:
        monkeypatch.setattr(linear_probe, "cv_accuracy", lambda x, y, folds, c, max_iter: accuracy_of_c(c))
        return linear_probe.search_c(None, None, [], steps=8, max_iter=1)

    # Every C equally accurate: the coarse peak is the first in lpclip's order (1e6); each halving
    # step then keeps the left end on ties (10^5), and the interval closes in on it.
    assert search(lambda c: 3) == pytest.approx(1e5)
    # Only C > 3e5 right: step 1 (1e5 vs 1e7) takes the right end 1e7, range [6, 7]; step 2 ties at
    # 1e6 vs 1e7 -> left 1e6, and every later step ties -> the left end 1e6.
    assert search(lambda c: 1 if c > 3e5 else 0) == pytest.approx(1e6)
    # Only small C right: coarse peak 1e-2 (first of the ties 1e-2, 1e-4, 1e-6); 1e-3 vs 1e-1 -> 1e-3.
    assert search(lambda c: 1 if c <= 1e-2 else 0) == pytest.approx(1e-3)


@pytest.mark.parametrize("name", ["tip_adapter", "tip_adapter_f"])
def test_searched_alpha_beta_do_not_depend_on_test_data(name, tiny_backbone, tmp_path):
    support = feature_support(tiny_backbone.embed_dim, tiny_backbone.image_size, SHOTS, seed=1000)
    overrides = {"epochs": 2} if name == "tip_adapter_f" else {}
    first = fitted(name, tiny_backbone, support, tmp_path, overrides)
    chosen = (float(first.alpha), float(first.beta))
    assert 0.1 <= chosen[0] < first.cfg.alpha_max and 0.1 <= chosen[1] < first.cfg.beta_max
    for seed in (1001, 2001):  # two unrelated test sets
        test, _ = class_features(tiny_backbone.embed_dim, [0, 1, 2] * 5, seed)
        first.predict_features(_feats(test))
        assert (float(first.alpha), float(first.beta)) == chosen
    again = fitted(name, tiny_backbone, support, tmp_path / "again", overrides)
    assert (float(again.alpha), float(again.beta)) == chosen  # a function of the support set alone


# ----------------------------------------------------------------------------- scores and options
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_score_is_one_minus_p_normal(name, tiny_backbone, tmp_path):
    support = feature_support(tiny_backbone.embed_dim, tiny_backbone.image_size, 2, seed=3000)
    overrides = {"epochs": 1} if get_method(name).trainable else {}
    if name == "zero_shot_clip":
        overrides = {"image_score": "classes", "maps": False}
    method = fitted(name, tiny_backbone, support, tmp_path, overrides)
    pred = method.predict_features(support.features["orig"].batch(slice(0, 5)))
    assert pred.class_logits.shape == (5, 3)
    expected = 1.0 - pred.class_logits.softmax(-1)[:, 0]
    assert torch.allclose(pred.score, expected, atol=1e-6)
    assert torch.allclose(class_anomaly_score(pred.class_logits, None), torch.ones(5))


def test_zero_shot_clip_cls_only_option(tiny_backbone):
    samples = samples_for([0, 1, 2], "z")
    method = build_method("zero_shot_clip", {"maps": False}, tiny_backbone, list(CLASS_ORDER), 1, samples)
    assert method.feature_layers() == () and "map" not in method.outputs
    pred = method.predict_features(_feats(torch.randn(2, tiny_backbone.embed_dim)))
    assert pred.anomaly_map is None and pred.class_logits.shape == (2, 3)
    classes_only = build_method(
        "zero_shot_clip", {"maps": False, "image_score": "classes"}, tiny_backbone, list(CLASS_ORDER), 1, samples
    )
    assert "state_text" not in classes_only.trainable_state_dict()  # its ~200 state prompts are never encoded
    default = build_method("zero_shot_clip", {}, tiny_backbone, list(CLASS_ORDER), 1, samples)
    assert default.feature_layers() == (tiny_backbone.num_layers,) and "map" in default.outputs


def test_coop_epochs_follow_its_few_shot_schedule(tiny_backbone):
    assert [coop_epochs(k) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    samples = samples_for([0, 1, 2], "c")
    for shots, epochs in ((4, 100), (16, 200)):
        method = build_method("coop", {}, tiny_backbone, list(CLASS_ORDER), shots, samples)
        assert method.cfg.epochs == epochs  # resolved, so the saved config records it
    assert build_method("coop", {"epochs": 7}, tiny_backbone, list(CLASS_ORDER), 16, samples).cfg.epochs == 7
    assert build_method("cocoop", {}, tiny_backbone, list(CLASS_ORDER), 16, samples).cfg.epochs == 10


def test_coop_ctx_init_counts_words_as_the_original(tiny_backbone):
    from usad_bench.methods.coop import PromptLearner

    words = "a sonogram of a"
    init_tokens = tiny_backbone.tokenize([words])
    assert int(init_tokens[0].argmax()) - 1 > 4  # "sonogram" is more than one BPE token: the case matters
    learner = PromptLearner(tiny_backbone, ["benign", "malignant"], n_ctx=16, ctx_init=words)
    assert learner.n_ctx == 4 and learner.ctx.shape[0] == 4
    expected = tiny_backbone.token_embedding(init_tokens)[0, 1:5].float()  # CoOp: the first n_ctx tokens
    assert torch.equal(learner.ctx.detach(), expected)
    cocoop = build_method("cocoop", {}, tiny_backbone, list(CLASS_ORDER), 1, samples_for([0, 1, 2], "w"))
    assert cocoop.prompt_learner.n_ctx == 4  # "a photo of a"


@pytest.mark.parametrize("name", ["coop", "cocoop"])
def test_prompt_text_cut_after_end_of_text_matches_the_full_77_tokens(name, tiny_backbone):
    method = build_method(name, {}, tiny_backbone, list(CLASS_ORDER), 1, samples_for([0, 1, 2], "t"))
    learner = method.prompt_learner
    cut = learner.tokens.shape[1]
    assert cut < 77 and cut == int(learner.tokens.argmax(-1).max()) + 1
    # The reference: the same prompts over all 77 positions, context vectors written in after SOS.
    prefix = " ".join(["X"] * learner.n_ctx) if name == "coop" else method.cfg.ctx_init
    full_tokens = tiny_backbone.tokenize([f"{prefix} {w}." for w in class_words_of(method)])  # (C, 77)
    full = tiny_backbone.token_embedding(full_tokens).float().clone()
    torch.manual_seed(0)
    ctx = learner.ctx.detach() + 0.5 * torch.randn_like(learner.ctx)  # any context, not only the initial one
    full[:, 1 : 1 + learner.n_ctx] = ctx
    with torch.no_grad():
        reference = F.normalize(tiny_backbone.encode_text_embeddings(full, full_tokens), dim=-1)
        assert full_tokens.shape[1] == 77
        assert torch.allclose(learner.text_features(tiny_backbone, ctx), reference, atol=1e-5)
        batched = learner.text_features(tiny_backbone, torch.stack([ctx, ctx]))  # CoCoOp's per-image path
        assert torch.allclose(batched[1], reference, atol=1e-5)


def class_words_of(method) -> list[str]:
    return [method.task.prompts.class_words(c) for c in method.task.classes]


def test_an_epoch_is_one_pass_over_the_support_images(tiny_backbone):
    from usad_bench.methods.base import steps_per_epoch

    support = feature_support(tiny_backbone.embed_dim, tiny_backbone.image_size, 4, seed=1000)  # 12 images x 2 views
    n = len(support)
    dataset = support.training_dataset()
    for drop_last, sizes in ((False, [5, 5, 2]), (True, [5, 5])):
        loader = support.training_loader(batch_size=5, seed=3, drop_last=drop_last)
        assert len(loader) == steps_per_epoch(n, 5, drop_last) == len(sizes)
        views_seen = set()
        for _ in range(3):  # epochs
            batches = list(loader)
            assert [len(b["label"]) for b in batches] == sizes
            images = torch.cat([b["index"] for b in batches]).tolist()
            assert len(set(images)) == len(images)  # each image at most once per epoch, in one view
            if not drop_last:
                assert sorted(images) == list(range(n))
            for b in batches:  # the item is one of that image's cached views
                for cls, j in zip(b["cls"], b["index"].tolist(), strict=True):
                    match = [v for v in support.variants if torch.equal(cls, support.features[v].cls[j])]
                    views_seen.update(match)
                    assert match
        assert views_seen == {"orig", "hflip"}
    # Fewer images than a batch: Dassl's rule keeps the one partial batch instead of training on nothing.
    small = support.training_loader(batch_size=32, seed=0, drop_last=True)
    assert [len(b["label"]) for b in small] == [n] and steps_per_epoch(n, 32, True) == 1
    # Seeded: the same seed repeats the epochs exactly.
    order = lambda seed: [b["cls"] for b in support.training_loader(4, seed)]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(order(7), order(7), strict=True))
    assert len(dataset) == 2 * n  # the dataset still addresses every (view, image) pair


def test_drop_last_follows_each_original():
    # Dassl (CoOp, CoCoOp) drops the last partial batch; Tip-Adapter's and the LP++ harness's loaders keep it.
    assert get_method("coop").drop_last and get_method("cocoop").drop_last
    assert not get_method("clip_adapter").drop_last and not get_method("tip_adapter_f").drop_last


def test_generic_prompts_are_the_originals_wording():
    generic = load_prompts("generic")
    assert generic.class_prompts("benign") == ["a photo of a benign."]
    default = load_prompts("breast_ultrasound")
    assert all("{}" in t for t in default.class_templates)
    assert set(default.class_names) >= set(CLASS_ORDER)


def test_tip_adapter_f_training_moves_only_the_keys(tiny_backbone, tmp_path):
    support = feature_support(tiny_backbone.embed_dim, tiny_backbone.image_size, SHOTS, seed=1000)
    method = fitted("tip_adapter_f", tiny_backbone, support, tmp_path, {"epochs": 0})
    before = method.cache_keys.detach().clone()
    method = fitted("tip_adapter_f", tiny_backbone, support, tmp_path / "t", {"epochs": 5})
    assert not torch.allclose(method.cache_keys, before)
    assert [n for n, p in method.named_parameters() if p.requires_grad] == ["cache_keys"]


@pytest.mark.slow
def test_runner_reports_class_and_detection_metrics_from_one_model(tiny_spec, synth_domains, tmp_path):
    """fit + evaluate on synthetic images: the classifier's logits give the class metrics and its
    1 - p(normal) the detection AUROC; CLS-only methods ask the cache for no patch tokens."""
    run = fit(
        FitOptions(
            method="lp_plus_plus",
            train=synth_domains["source"],
            shots=2,
            seed=0,
            out=tmp_path / "run",
            backbone=tiny_spec,
            cache_dir=tmp_path / "cache",
            device="cpu",
        )
    )
    result = evaluate(run, [("target", synth_domains["target"])], device="cpu", cache_dir=tmp_path / "cache")
    metrics = result["tests"]["target"]
    for key in ("cls_auroc_macro", "cls_balanced_accuracy", "cls_macro_f1", "image_auroc"):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0, key
    assert "pixel_auroc" not in metrics and "warning" in result  # no maps; random weights are labelled
    text = (run / "predictions" / "target.csv").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("#")]  # random weights: a warning row
    header, first = lines[0].split(","), lines[1].split(",")
    p_normal = float(first[header.index("p_normal")])
    assert float(first[header.index("score")]) == pytest.approx(1.0 - p_normal, abs=1e-5)
