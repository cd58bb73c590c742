"""UltraAD on the tiny random backbone: component shapes, memory gradients, ablation switches, losses.

The generic checks every method gets (finite outputs, gradients, state round trip) are in
test_methods.py; these are UltraAD's own. Whether UltraAD learns lesions and classes is tested through the
real pipeline on the pretrained tiny model, in tests/test_pretrained_learning.py.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from usad_bench.cache import FeatureCache
from usad_bench.data.manifest import read_manifest
from usad_bench.data.preprocess import mask_tensor
from usad_bench.data.sampler import sample_support
from usad_bench.errors import UsadError
from usad_bench.features import FeatureExtractor
from usad_bench.methods.base import batch_features
from usad_bench.methods.ultraad import SHORTCUTS
from usad_bench.runner import build_method, build_support, predict_table, train

SHOTS = 4


def make(backbone, manifest_path, overrides=None, seed=0):
    """An UltraAD with its support set filled, from ``SHOTS`` images per class drawn with ``seed``."""
    manifest = read_manifest(manifest_path)
    split = sample_support(manifest, SHOTS, seed=seed)
    samples = manifest.subset(split.support_ids).samples
    torch.manual_seed(seed)
    method = build_method("ultraad", overrides or {}, backbone, split.classes, SHOTS, samples)
    extractor = FeatureExtractor(backbone, FeatureCache(None), method.feature_layers())
    support = build_support(samples, extractor, method.task, method.train_variants())
    method.setup_support(support)
    method.log = lambda *a, **k: None  # outside a Trainer, Lightning's logging has nowhere to go
    return method, support, split, extractor


def full_batch(support) -> dict[str, torch.Tensor]:
    loader = torch.utils.data.DataLoader(support.training_dataset(), batch_size=len(support), shuffle=False)
    return next(iter(loader))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's tensors are small: on a busy 2-core machine two threads spend more time handing
    work over than computing (the learning test ran several times slower), so this module uses one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def built(tiny_backbone, synth_domains):
    return make(tiny_backbone, synth_domains["source"])


def test_component_shapes(built, tiny_backbone):
    method, support, _, _ = built
    feats = support.features["orig"].batch(slice(0, 3))
    d, c, size = tiny_backbone.embed_dim, len(method.task.classes), tiny_backbone.image_size
    assert method.layers == (1, 2, 3, 4)  # four evenly spaced blocks of a 4-block encoder
    image = torch.nn.functional.normalize(feats.cls, dim=-1)
    z = method.mini_net(image)
    assert z.shape == (3, d)
    instance = method.token_head(z)
    assert instance.shape == (3, method.prompt_learner.width)
    aware = method.prompt_learner(tiny_backbone, instance)
    assert aware.shape == (3, 2, d) and torch.allclose(aware.norm(dim=-1), torch.ones(3, 2), atol=1e-5)
    assert method.prototypes.shape == (2, d)
    tokens = method.adapters[0](feats.patches[:, 0])
    assert tokens.shape == (3, tiny_backbone.grid[0] * tiny_backbone.grid[1], d)
    assert method.fusion(aware, tokens).shape == (3, 2, d)
    assert method.memory(torch.nn.functional.normalize(z, dim=-1)).shape == (3, c)
    parts, logits = method.forward_parts(feats)
    assert len(parts.plain) == len(parts.fused) == len(method.layers)  # map 1 and the PIF map for every block
    probs = method.abnormal_probs(parts.plain + parts.fused)
    assert probs.shape == (3, 2 * len(method.layers), size, size) and ((probs >= 0) & (probs <= 1)).all()
    assert logits.shape == (3, c)


def test_image_aware_tokens_change_the_prompts(built, tiny_backbone):
    method, _, _, _ = built
    width = method.prompt_learner.width
    a = method.prompt_learner(tiny_backbone, torch.zeros(1, width))
    b = method.prompt_learner(tiny_backbone, torch.randn(1, width))
    assert not torch.allclose(a, b)  # the instance token reaches the text tower
    assert not torch.allclose(a[0, 0], a[0, 1])  # normal and abnormal prompts differ by their state word


def test_text_memory_frozen_image_memory_learns(tiny_backbone, synth_domains):
    method, support, _, _ = make(tiny_backbone, synth_domains["source"])
    memory = method.memory
    labels = support.labels
    assert torch.equal(memory.text_memory, method.class_descriptions[labels])
    assert torch.equal(memory.label_memory.argmax(1), labels)
    params = {n for n, _ in method.named_parameters()}
    assert "memory.image_memory" in params
    assert not any("text_memory" in n or "class_descriptions" in n for n in params)
    method.train()
    method.training_step(full_batch(support), 0).backward()
    assert memory.image_memory.grad is not None and memory.image_memory.grad.abs().sum() > 0
    assert not memory.text_memory.requires_grad and memory.text_memory.grad is None
    state = method.trainable_state_dict()
    assert {"memory.image_memory", "memory.text_memory", "memory.label_memory"} <= set(state)


def predict(method, support):
    method.eval()
    return method.predict_features(support.features["orig"].batch(slice(0, 6)))


def test_ablation_no_classification_branch(tiny_backbone, synth_domains):
    full, support, _, _ = make(tiny_backbone, synth_domains["source"])
    ablated, _, _, _ = make(tiny_backbone, synth_domains["source"], {"classification": False})
    assert ablated.memory is None and not any(n.startswith("memory.") for n, _ in ablated.named_parameters())
    pred = predict(ablated, support)
    assert pred.class_logits is None
    assert torch.allclose(pred.score, pred.anomaly_map.flatten(1).amax(1))  # score from the map only
    ablated.train()
    batch = full_batch(support)
    maps, logits = ablated.forward_parts(batch_features(batch, ablated.layers))
    assert logits is None and set(ablated.losses(maps, logits, batch)) == {"seg", "seg_pif"}
    full.train()
    maps, logits = full.forward_parts(batch_features(batch, full.layers))
    assert set(full.losses(maps, logits, batch)) == {"ce", "seg", "seg_pif"}


def test_ablation_no_pif(tiny_backbone, synth_domains):
    full, support, _, _ = make(tiny_backbone, synth_domains["source"])
    ablated, _, _, _ = make(tiny_backbone, synth_domains["source"], {"pif": False})
    assert ablated.fusion is None and not any(n.startswith("fusion.") for n, _ in ablated.named_parameters())
    assert {n for n, _ in full.named_parameters()} - {n for n, _ in ablated.named_parameters()} == {
        f"fusion.w_{x}.{p}" for x in "qkvo" for p in ("weight", "bias")
    } - {"fusion.w_k.bias"}  # a key bias would cancel in the softmax
    feats = support.features["orig"].batch(slice(0, 6))
    maps, _ = ablated.forward_parts(feats)
    assert len(maps.plain) == len(ablated.layers) and not maps.fused  # linearly projected patch tokens only
    full_map, ablated_map = predict(full, support).anomaly_map, predict(ablated, support).anomaly_map
    assert not torch.allclose(full_map, ablated_map)
    batch = full_batch(support)
    assert "seg_pif" not in ablated.losses(maps, None, {**batch, "pixel_truth": batch["pixel_truth"][:0]})


def test_ablation_us_unaware_prompts(tiny_backbone, synth_domains):
    aware, support, _, _ = make(tiny_backbone, synth_domains["source"])
    generic, _, _, _ = make(tiny_backbone, synth_domains["source"], {"prompts": "generic"})
    assert {n for n, _ in aware.named_parameters()} == {n for n, _ in generic.named_parameters()}
    assert not torch.allclose(aware.class_descriptions, generic.class_descriptions)  # the text memory's wording
    assert not torch.allclose(aware.prototypes, generic.prototypes)
    assert generic.task.prompts.describe("benign", "synth") == ["This is a benign image."]
    assert not torch.allclose(predict(aware, support).class_logits, predict(generic, support).class_logits)


def test_score_fuses_class_probability_and_map_peak(tiny_backbone, synth_domains):
    method, support, _, _ = make(tiny_backbone, synth_domains["source"], {"score_weight": 0.3})
    pred = predict(method, support)
    p_abnormal = 1 - pred.class_logits.softmax(-1)[:, method.task.normal_index]
    expected = 0.3 * p_abnormal + 0.7 * pred.anomaly_map.flatten(1).amax(1)
    assert torch.allclose(pred.score, expected, atol=1e-6)


def test_images_without_pixel_truth_get_no_map_loss(tiny_backbone, synth_domains):
    method, support, _, _ = make(tiny_backbone, synth_domains["source"])
    batch = full_batch(support)
    batch["pixel_truth"] = torch.zeros_like(batch["pixel_truth"])  # an image-level-only support set
    method.train()
    maps, logits = method.forward_parts(batch_features(batch, method.layers))
    assert set(method.losses(maps, logits, batch)) == {"ce"}
    seg_only, _, _, _ = make(tiny_backbone, synth_domains["source"], {"classification": False})
    assert seg_only.training_step(batch, 0) is None  # nothing to learn from: the step is skipped


def test_training_lowers_the_loss(tiny_backbone, synth_domains):
    method, support, _, _ = make(tiny_backbone, synth_domains["source"])
    batch = full_batch(support)
    method.train()
    optimizer = method.configure_optimizers()
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = method.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    # Observed: 14.8 -> 8.9 in 15 full-batch steps, falling at every step (most of the loss is the
    # cross-entropy at logit scale 100 against the random text tower's descriptions: 6.9 at the end).
    assert losses[-1] < 0.85 * losses[0]
    assert all(b < a for a, b in itertools.pairwise(losses))


def test_mininet_starts_at_the_clip_embedding_cocoop_keeps_its_init(tiny_backbone, synth_domains):
    fresh, support, _, _ = make(tiny_backbone, synth_domains["source"])  # untrained
    f = torch.nn.functional.normalize(support.features["orig"].cls, dim=-1)
    z = torch.nn.functional.normalize(f + fresh.mini_net(f), dim=-1)
    cos = (z * f).sum(-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-6)  # was ~0.43 with PyTorch's default init
    from usad_bench.methods.common import MetaNet

    torch.manual_seed(0)
    assert MetaNet(32, 16).net[-1].bias.abs().sum() > 0  # the shared default (CoCoOp's meta-net) is unchanged


def test_cache_query_clip_or_projected(tiny_backbone, synth_domains):
    feats = None
    logits = {}
    for query in ("clip", "projected"):
        method, support, _, _ = make(tiny_backbone, synth_domains["source"], {"cache_query": query})
        torch.nn.init.normal_(method.mini_net.net[-1].weight, std=0.5)  # move z away from f
        feats = support.features["orig"].batch(slice(0, 6))
        _, logits[query] = method.forward_parts(feats, branches=())
        f = torch.nn.functional.normalize(feats.cls, dim=-1)
        z = torch.nn.functional.normalize(f + method.mini_net(f), dim=-1)
        expected = method.memory(z, f if query == "clip" else z)
        assert torch.allclose(logits[query], expected)
    assert not torch.allclose(logits["clip"], logits["projected"])
    with pytest.raises(UsadError, match="cache_query"):
        make(tiny_backbone, synth_domains["source"], {"cache_query": "text"})


def test_final_map_choices(tiny_backbone, synth_domains):
    method, support, _, _ = make(tiny_backbone, synth_domains["source"])
    assert method.cfg.final_map == "fused"  # the paper's full model localises with the PIF map
    method.eval()
    feats = support.features["orig"].batch(slice(0, 4))
    parts, _ = method.forward_parts(feats)
    plain = method.abnormal_probs(parts.plain).mean(1)
    fused = method.abnormal_probs(parts.fused).mean(1)
    maps = {}
    for choice in ("fused", "plain", "mean"):
        method.cfg.final_map = choice
        maps[choice] = method.predict_features(feats).anomaly_map
    assert torch.allclose(maps["fused"], fused, atol=1e-6) and torch.allclose(maps["plain"], plain, atol=1e-6)
    assert torch.allclose(maps["mean"], (plain + fused) / 2, atol=1e-6)
    assert not torch.allclose(maps["fused"], maps["plain"])
    no_pif, _, _, _ = make(tiny_backbone, synth_domains["source"], {"pif": False})
    assert no_pif.final_branches() == ("plain",)  # the no-PIF ablation localises with map 1
    with pytest.raises(UsadError, match="final_map"):
        make(tiny_backbone, synth_domains["source"], {"final_map": "max"})


def image_level_only(manifest_path, out_dir):
    """The same manifest with every lesion mask removed (image-level labels only)."""
    import csv

    with open(manifest_path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["masks"] = ""
        r["image"] = str((manifest_path.parent / r["image"]).resolve())
    out = out_dir / "manifest.csv"
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_without_lesion_masks_no_map_loss_and_zero_shot_maps(tiny_backbone, synth_domains, tmp_path):
    source = synth_domains["source"]
    method, support, split, extractor = make(tiny_backbone, image_level_only(source, tmp_path), {"epochs": 3})
    assert not method.maps_learned and support.pixel_truth.any()  # normal images alone do not train the maps
    method.train()
    batch = full_batch(support)
    parts, logits = method.forward_parts(batch_features(batch, method.layers))
    assert set(method.losses(parts, logits, batch)) == {"ce"}
    held_out = read_manifest(source).where(lambda s: s.group not in set(split.support_groups)).samples
    test_features = extractor.extract(held_out)
    before = predict_table(method, test_features).anomaly_map
    train(method, support, tmp_path / "run", seed=0, use_wandb=False)
    amap = predict_table(method, test_features).anomaly_map
    assert torch.equal(amap, before)  # the maps are frozen CLIP's zero-shot maps: training leaves them alone
    # Not collapsed (a background-only map loss drove them to [1e-14, 3e-4] before): a full-range signal.
    assert float(amap.max() - amap.min()) > 0.5 and float(amap.std()) > 0.1
    masks = np.stack([mask_tensor(s, tiny_backbone.image_size).numpy() for s in held_out]).astype(bool).ravel()
    pixel = roc_auc_score(masks, amap.numpy().ravel())
    # Random weights: a zero-shot map's sign is arbitrary (0.58 here; 0.21 with backbone seed 1); it must
    # still separate lesion from background pixels, as the collapsed maps did not.
    assert abs(pixel - 0.5) > 0.05


def test_text_prefix_equals_the_whole_prompt_through_the_tower(built, tiny_backbone):
    method, _, _, _ = built
    learner = method.prompt_learner
    assert learner.use_prefix and learner.prefix.shape[:3] == (2, 2, min(learner.positions))  # (L, 2, p)
    grads = []
    outputs = []
    for use_prefix in (True, False):
        instance = torch.randn(5, learner.width, generator=torch.Generator().manual_seed(3), requires_grad=True)
        learner.global_token.grad = None
        out = learner(tiny_backbone, instance, use_prefix=use_prefix)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out.detach())
        grads.append((instance.grad, learner.global_token.grad.clone()))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-6)
    for fast, reference in zip(grads[0], grads[1], strict=True):
        assert torch.allclose(fast, reference, atol=1e-6)


def test_pif_folded_equals_projecting_every_patch(built):
    method, _, _, _ = built
    fusion = copy.deepcopy(method.fusion)
    torch.manual_seed(0)
    for p in fusion.parameters():
        torch.nn.init.normal_(p, std=0.3)  # non-zero biases too: b_v must carry through the folded path
    text = torch.nn.functional.normalize(torch.randn(3, 2, 32), dim=-1)
    patches = torch.nn.functional.normalize(torch.randn(3, 64, 32), dim=-1).requires_grad_()
    results = []
    for folded in (True, False):
        fusion.zero_grad()
        patches.grad = None
        out = fusion(text, patches, folded=folded)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = [p.grad.clone() for p in fusion.parameters()]
        results.append([out.detach(), patches.grad.clone(), *grads])
    for fast, reference in zip(*results, strict=True):
        assert torch.allclose(fast, reference, atol=1e-5)


def test_shortcuts_give_the_reference_predictions_and_losses(tiny_backbone, synth_domains):
    method, support, _, _ = make(tiny_backbone, synth_domains["source"])
    torch.nn.init.normal_(method.mini_net.net[-1].weight, std=0.3)
    batch = full_batch(support)
    feats = support.features["orig"].batch(slice(0, 6))
    results = {}
    for name, shortcuts in (("fast", set(SHORTCUTS)), ("reference", set())):
        method.shortcuts = shortcuts
        method.zero_grad()
        method.train()
        loss = method.training_step(batch, 0)
        loss.backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in method.trainable_parameters()]
        method.eval()
        pred = method.predict_features(feats)
        results[name] = (loss.detach(), pred.anomaly_map, pred.score, grads)
    fast, reference = results["fast"], results["reference"]
    assert torch.allclose(fast[0], reference[0], rtol=1e-5)
    assert torch.allclose(fast[1], reference[1], atol=1e-5) and torch.allclose(fast[2], reference[2], atol=1e-5)
    for a, b in zip(fast[3], reference[3], strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("prefix", [1, 3, 5])
def test_backbone_text_prefix_resumes_the_tower_exactly(tiny_backbone, prefix):
    tokens = tiny_backbone.tokenize(["a photo of a normal breast lesion.", "an abnormal scan of a breast"])  # (2, 77)
    embedding = tiny_backbone.token_embedding(tokens)
    full = tiny_backbone.encode_text_embeddings(embedding, tokens)  # the whole 77 positions
    cached = tiny_backbone.text_prefix(embedding[:, :prefix])
    assert cached.shape == (2, 2, prefix, embedding.shape[-1])  # (blocks, prompts, positions, width)
    resumed = tiny_backbone.encode_text_after_prefix(cached, embedding[:, prefix:], tokens)
    assert torch.allclose(resumed, full, atol=1e-5)
