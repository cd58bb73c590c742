"""The stream-resume call (usad_bench.stream) and the MVFA baseline built on it."""

from __future__ import annotations

import pytest
import torch

from usad_bench.cache import FeatureCache
from usad_bench.data.manifest import read_manifest
from usad_bench.feature_kinds import STREAM, FeatureRequest
from usad_bench.features import FeatureExtractor
from usad_bench.methods.mvfa import AdaptedStream, mvfa_layers
from usad_bench.runner import FitOptions, evaluate, fit
from usad_bench.stream import (
    deep_prompt_edit,
    embed_stream,
    encode_stream,
    finish_visual,
    run_text_blocks,
    run_visual_blocks,
)


def images(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("start", [0, 1, 2, 4])
def test_resume_from_any_block_reproduces_the_plain_forward(tiny_backbone, start):
    visual = tiny_backbone.visual
    x = images()
    with torch.no_grad():
        prefix = run_visual_blocks(visual, embed_stream(visual, x), 0, stop=start)  # tokens leaving block `start`
        resumed = run_visual_blocks(visual, prefix, start)
        plain = visual.forward_intermediates(x, indices=[start - 1 if start else 0], output_fmt="NLC")
        assert torch.allclose(finish_visual(visual, resumed), visual(x), atol=1e-5)
        assert torch.allclose(finish_visual(visual, resumed), plain["image_features"], atol=1e-5)
        if start:  # open_clip's intermediates are raw block outputs without the CLS
            assert torch.allclose(prefix[:, 1:], plain["image_intermediates"][0], atol=1e-5)


def test_stream_feature_kind_is_cached_with_its_cls_and_keyed_apart(tiny_backbone, synth_domains):
    samples = read_manifest(synth_domains["source"]).samples[:3]
    request = FeatureRequest(kind=STREAM, layers=(2,))
    table = FeatureExtractor(tiny_backbone, FeatureCache(None), request).extract(samples)
    grid = tiny_backbone.grid
    assert table.patches.shape == (3, 1, 1 + grid[0] * grid[1], tiny_backbone.vision_width)
    raw = FeatureExtractor(tiny_backbone, FeatureCache(None), (2,)).extract(samples)
    assert torch.allclose(table.cls, raw.cls, atol=1e-5)  # the frozen CLS is the plain forward's
    assert torch.allclose(table.patches[:, :, 1:].float(), raw.patches.float(), atol=2e-3)  # both fp16 in cache
    keys = {
        FeatureExtractor(tiny_backbone, FeatureCache(None), r).key("orig")
        for r in (request, FeatureRequest(layers=(2,)), FeatureRequest(kind=STREAM, layers=(2,), unnormalised=True))
    }
    assert len(keys) == 3


def test_text_resume_matches_the_backbone_with_and_without_deep_prompts(tiny_backbone):
    tokens = tiny_backbone.tokenize(["a photo of a breast", "a breast with a lesion"])
    embeddings = tiny_backbone.token_embedding(tokens)
    with torch.no_grad():
        plain = run_text_blocks(tiny_backbone, embeddings, tokens)
        assert torch.allclose(
            plain, tiny_backbone.encode_text(["a photo of a breast", "a breast with a lesion"]), atol=1e-5
        )
        deep = [torch.randn(3, embeddings.shape[-1]) for _ in range(tiny_backbone.text_num_layers - 1)]
        edited = run_text_blocks(tiny_backbone, embeddings, tokens, deep_prompt_edit(deep))
        expected = tiny_backbone.encode_text_embeddings(embeddings, tokens, deep_prompts=deep)
        assert torch.allclose(edited, expected, atol=1e-5) and not torch.allclose(edited, plain, atol=1e-3)


def test_gradients_reach_inserted_parameters_never_the_backbone(tiny_backbone):
    visual = tiny_backbone.visual
    width = tiny_backbone.vision_width
    prompt = torch.nn.Parameter(torch.randn(2, width))  # AdaCLIP-like: tokens inserted after the CLS
    scale = torch.nn.Parameter(torch.ones(width))  # MVFA-like: a transform re-injected after a block

    def edit(index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            return torch.cat([x[:, :1], prompt.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        return x * scale if index == 2 else x

    out = run_visual_blocks(visual, embed_stream(visual, images()), 0, edit)
    assert out.shape[1] == 1 + 2 + tiny_backbone.grid[0] * tiny_backbone.grid[1]
    finish_visual(visual, out).square().sum().backward()
    assert prompt.grad.abs().sum() > 0 and scale.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_backbone.parameters())


def test_mvfa_blocks_and_reinjection_by_hand(tiny_backbone):
    assert mvfa_layers(24) == (6, 12, 18, 24) and mvfa_layers(12) == (3, 6, 9, 12)
    visual = tiny_backbone.visual
    torch.manual_seed(0)
    adapters = AdaptedStream((2, 3), tiny_backbone.vision_width, tiny_backbone.embed_dim)
    with torch.no_grad():
        _, prefix = encode_stream(visual, images(), 2)
        seg, det = adapters(visual, prefix[:, 0])
        x = prefix[:, 0]
        seg_med, seg_out = adapters.seg_adapters[0](x)
        det_med, det_out = adapters.det_adapters[0](x)
        x = visual.transformer.resblocks[2](0.8 * x + 0.1 * seg_out + 0.1 * det_out)
    assert torch.allclose(seg[:, 0], seg_med) and torch.allclose(det[:, 0], det_med)
    assert torch.allclose(seg[:, 1], adapters.seg_adapters[1](x)[0], atol=1e-6)
    assert seg.shape == (2, 2, 1 + 64, tiny_backbone.embed_dim)


@pytest.mark.slow
def test_mvfa_learns_a_synthetic_lesion_from_4_shots(tmp_path, synth_domains, pretrained_tiny_spec):
    """usad-tiny pretrained on synthetic images only; figures are synthetic, not results."""

    def heldout(epochs: int) -> dict:
        run = tmp_path / f"mvfa-{epochs}"
        overrides = {"epochs": epochs, "batch_size": 8}
        opts = FitOptions("mvfa", synth_domains["source"], 4, 0, run, pretrained_tiny_spec, overrides,
                          cache_dir=tmp_path / "cache", device="cpu")  # fmt: skip
        fit(opts)
        return evaluate(run, [("heldout", synth_domains["source"])], device="cpu", cache_dir=tmp_path / "cache")

    # Observed (seed 0, 10 epochs of one batch of 8): held-out pixel AUROC 0.962; untrained adapters 0.605.
    trained, untrained = heldout(10)["tests"]["heldout"], heldout(0)["tests"]["heldout"]
    print(
        "mvfa held-out pixel AUROC", round(trained["pixel_auroc"], 3), "untrained", round(untrained["pixel_auroc"], 3)
    )
    assert trained["pixel_auroc"] > 0.9
    assert trained["pixel_auroc"] > untrained["pixel_auroc"] + 0.2
