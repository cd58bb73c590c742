"""Encoder variants (raw tokens, AnomalyCLIP's DPAM, WinCLIP's windows) and their place in the cache key."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from usad_bench.backbone import Backbone, BackboneSpec
from usad_bench.cache import FeatureCache, feature_key
from usad_bench.data.manifest import Sample
from usad_bench.errors import UsadError
from usad_bench.feature_kinds import (
    DPAM,
    RAW,
    WINDOWS,
    FeatureRequest,
    dpam_first_block,
    embed_tokens,
    require_vit,
    vv_attention,
    window_indices,
)
from usad_bench.features import FeatureExtractor


@torch.no_grad()
def test_vv_attention_matches_a_direct_two_token_computation():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(4, num_heads=2, batch_first=True)
    nn.init.normal_(attn.in_proj_bias)
    x = torch.randn(1, 2, 4)  # two tokens of width 4, two heads of width 2
    wv, bv = attn.in_proj_weight[8:], attn.in_proj_bias[8:]
    v = [x[0, i] @ wv.T + bv for i in range(2)]  # the value of each token
    heads = []
    for h in range(2):
        vh = [t[2 * h : 2 * h + 2] for t in v]
        rows = []
        for i in range(2):  # softmax over j of <v_i, v_j> / sqrt(2), then the weighted sum of v_j
            logits = [float(vh[i] @ vh[j]) / math.sqrt(2) for j in range(2)]
            weights = [math.exp(a) / sum(math.exp(b) for b in logits) for a in logits]
            rows.append(weights[0] * vh[0] + weights[1] * vh[1])
        heads.append(torch.stack(rows))  # (2 tokens, 2)
    expected = attn.out_proj(torch.cat(heads, dim=1))  # (2, 4)
    assert torch.allclose(vv_attention(attn, x)[0], expected, atol=1e-6)


def test_dpam_recurrence_against_the_blocks(tiny_backbone: Backbone):
    visual, images = tiny_backbone.visual, torch.randn(2, 3, 64, 64)
    blocks = visual.transformer.resblocks  # 4 blocks; start the V-V path at block 2
    with torch.no_grad():
        x1 = blocks[0](visual.ln_pre(embed_tokens(visual, images)))
        vv2 = x1 + vv_attention(blocks[1].attn, blocks[1].ln_1(x1))  # starts from the original state
        x2 = blocks[1](x1)
        vv3 = vv2 + vv_attention(blocks[2].attn, blocks[2].ln_1(x2))  # reads the original path, no FFN
        x4 = blocks[3](blocks[2](x2))
        feats = tiny_backbone.encode_features(images, FeatureRequest(DPAM, layers=(1, 3), dpam_start=2))
    assert feats.patches.shape == (2, 2, 64, tiny_backbone.embed_dim) and feats.kind == DPAM
    assert torch.allclose(feats.patches[:, 0], visual.ln_post(x1[:, 1:]) @ visual.proj, atol=1e-5)
    assert torch.allclose(feats.patches[:, 1], visual.ln_post(vv3[:, 1:]) @ visual.proj, atol=1e-5)
    assert torch.allclose(feats.cls, x4[:, 0] @ visual.proj, atol=1e-5)  # original path, no ln_post
    assert torch.isfinite(feats.patches).all()


def test_dpam_first_block_scales_with_depth():
    assert [dpam_first_block(n) for n in (24, 12, 4)] == [6, 3, 1]


def test_window_indices_by_hand():
    assert window_indices((3, 3), 2).tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    assert window_indices((8, 8), 3).shape == (36, 9)
    with pytest.raises(UsadError, match="larger than"):
        window_indices((3, 3), 4)


def test_window_embedding_is_cls_plus_window_tokens_with_their_positions(tiny_backbone: Backbone):
    visual, images = tiny_backbone.visual, torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = tiny_backbone.encode_features(images, FeatureRequest(WINDOWS, scales=(2, 3)))
        window = 8  # the 2x2 window at row 1, column 1 of the 7x7 windows: patches 9, 10, 17, 18
        tokens = embed_tokens(visual, images)[:, [0, 10, 11, 18, 19]]  # CLS + the window, +1 for the CLS
        x = visual.ln_pre(tokens)
        for block in visual.transformer.resblocks:
            x = block(x)
        expected = visual.ln_post(x[:, 0]) @ visual.proj
        full = tiny_backbone.encode_images(images, (4,))
    assert window_indices((8, 8), 2)[window].tolist() == [9, 10, 17, 18]
    assert feats.windows[2].shape == (2, 49, tiny_backbone.embed_dim) and feats.windows[3].shape[1] == 36
    assert torch.allclose(feats.windows[2][:, window], expected, atol=1e-5)
    for side in (2, 3):  # every window equals its own whole forward (the last block runs the CLS alone)
        index = torch.cat([torch.zeros(1, dtype=torch.long), window_indices((8, 8), side)[-1] + 1])
        with torch.no_grad():
            x = visual.ln_pre(embed_tokens(visual, images)[:, index])
            for block in visual.transformer.resblocks:
                x = block(x)
        assert torch.allclose(feats.windows[side][:, -1], visual.ln_post(x[:, 0]) @ visual.proj, atol=1e-5)
    assert torch.allclose(feats.cls, full.cls, atol=1e-5)
    assert torch.allclose(feats.patches[:, 0], visual.ln_post(full.patches[:, 0]), atol=1e-5)


def test_a_variant_the_tower_cannot_produce_is_a_clear_error():
    with pytest.raises(UsadError, match="open_clip VisionTransformer"):
        require_vit(nn.Identity(), DPAM)
    with pytest.raises(UsadError, match="unknown feature kind"):
        FeatureRequest("surgery")


def test_the_variant_and_its_parameters_enter_the_cache_key(tiny_backbone: Backbone):
    desc = tiny_backbone.describe()
    keys = {
        feature_key(desc, (4,), "orig", FeatureRequest(**kw).key_fields())
        for kw in (
            {"kind": RAW, "layers": (4,)},
            {"kind": DPAM, "layers": (4,), "dpam_start": 1},
            {"kind": DPAM, "layers": (4,), "dpam_start": 2},
            {"kind": WINDOWS, "scales": (2, 3)},
            {"kind": WINDOWS, "scales": (2,)},
        )
    }
    assert len(keys) == 5
    assert FeatureRequest(layers=(4,)).key_fields() == {}  # raw features keep the keys they had
    quick = Backbone.load(BackboneSpec(name="usad-tiny", pretrained=None, activation="quick_gelu"))
    assert quick.activation == "quick_gelu" and tiny_backbone.activation == "gelu"
    assert feature_key(quick.describe(), (4,), "orig") != feature_key(desc, (4,), "orig")


def test_window_features_round_trip_through_the_cache(tmp_path, tiny_backbone: Backbone):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(f"{i}", path, (), "normal", False, f"p{i}", "toy", "toy"))
    request = FeatureRequest(WINDOWS, scales=(2, 3))
    cache = FeatureCache(tmp_path / "cache")
    first = FeatureExtractor(tiny_backbone, cache, request, batch_size=2).extract(samples)
    second = FeatureExtractor(tiny_backbone, cache, request, batch_size=2).extract(samples)
    assert cache.stats()["hits"] == 3 and sorted(second.windows) == [2, 3] and second.kind == WINDOWS
    assert torch.equal(first.windows[3], second.windows[3]) and torch.equal(first.patches, second.patches)
    batch = second.batch(slice(0, 2))
    assert batch.windows[2].shape == (2, 49, tiny_backbone.embed_dim) and batch.layers == (4,)


def test_synthetic_weights_keep_the_activation_they_were_trained_with():
    synth = BackboneSpec(name="usad-tiny", pretrained="synth")
    assert synth.with_default_activation("quick_gelu").activation is None  # open_clip's build: exact GELU
    random = BackboneSpec(name="usad-tiny", pretrained=None)
    assert random.with_default_activation("quick_gelu").activation == "quick_gelu"
    assert (
        BackboneSpec(name="usad-tiny", pretrained="synth", activation="gelu")
        .with_default_activation("quick_gelu")
        .activation
        == "gelu"
    )
