"""The frozen backbone: shapes, frozenness, text paths, weight loading errors."""

from __future__ import annotations

import pytest
import torch

from usad_bench.backbone import Backbone, BackboneSpec, default_layers
from usad_bench.errors import UsadError


def test_default_layers_are_evenly_spaced():
    assert default_layers(24) == (6, 12, 18, 24)
    assert default_layers(12) == (3, 6, 9, 12)
    assert default_layers(4) == (1, 2, 3, 4)
    assert default_layers(2) == (1, 2)


def test_image_features_shapes(tiny_backbone: Backbone):
    b = tiny_backbone
    images = torch.randn(3, 3, b.image_size, b.image_size)
    feats = b.encode_images(images, (2, 4))
    n_patches = b.grid[0] * b.grid[1]
    assert feats.cls.shape == (3, b.embed_dim)
    assert feats.patches.shape == (3, 2, n_patches, b.vision_width)
    assert b.project_tokens(feats.patches).shape == (3, 2, n_patches, b.embed_dim)
    assert torch.isfinite(feats.patches).all()
    assert b.encode_images(images).patches is None


def test_cls_matches_open_clip_encode_image(tiny_backbone: Backbone):
    images = torch.randn(2, 3, tiny_backbone.image_size, tiny_backbone.image_size)
    reference = tiny_backbone.model.encode_image(images)
    assert torch.allclose(tiny_backbone.encode_images(images, (1,)).cls, reference, atol=1e-5)


def test_last_layer_projection_is_clip_patch_embedding(tiny_backbone: Backbone):
    """Projected last-block tokens are what open_clip returns as output tokens (ln_post, proj)."""
    b = tiny_backbone
    images = torch.randn(1, 3, b.image_size, b.image_size)
    feats = b.encode_images(images, (b.num_layers,))
    visual = b.visual
    visual.output_tokens = True
    try:
        _, tokens = visual(images)
    finally:
        visual.output_tokens = False
    assert torch.allclose(b.project_tokens(feats.patches[:, 0]), tokens @ visual.proj, atol=1e-5)


def test_out_of_range_layer_is_a_clear_error(tiny_backbone: Backbone):
    with pytest.raises(UsadError, match="out of range"):
        tiny_backbone.encode_images(torch.randn(1, 3, 64, 64), (0,))


def test_backbone_stays_frozen_and_in_eval(tiny_backbone: Backbone):
    tiny_backbone.train()
    assert not tiny_backbone.training and not tiny_backbone.model.training
    assert not any(p.requires_grad for p in tiny_backbone.parameters())


def test_edited_prompt_path_reproduces_encode_text(tiny_backbone: Backbone):
    texts = ["a photo of a normal breast.", "an ultrasound image of a breast with a mass."]
    tokens = tiny_backbone.tokenize(texts)
    edited = tiny_backbone.encode_text_embeddings(tiny_backbone.token_embedding(tokens), tokens)
    assert torch.allclose(edited, tiny_backbone.encode_text(texts), atol=1e-5)


def test_gradients_reach_learnable_context_but_not_the_backbone(tiny_backbone: Backbone):
    tokens = tiny_backbone.tokenize(["X X X X breast."])
    base = tiny_backbone.token_embedding(tokens)
    ctx = torch.zeros(4, base.shape[-1], requires_grad=True)
    deep = [torch.zeros(2, base.shape[-1], requires_grad=True)]
    embeds = torch.cat([base[:, :1], ctx.unsqueeze(0), base[:, 5:]], dim=1)
    out = tiny_backbone.encode_text_embeddings(embeds, tokens, deep_prompts=deep)
    out.pow(2).sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert deep[0].grad is not None and deep[0].grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_backbone.parameters())


def test_deep_prompts_change_the_text_embedding(tiny_backbone: Backbone):
    tokens = tiny_backbone.tokenize(["X X breast."])
    embeds = tiny_backbone.token_embedding(tokens)
    plain = tiny_backbone.encode_text_embeddings(embeds, tokens)
    deep = tiny_backbone.encode_text_embeddings(embeds, tokens, deep_prompts=[torch.randn(2, embeds.shape[-1])])
    assert not torch.allclose(plain, deep)


def test_random_weights_are_seeded():
    a = Backbone.load(BackboneSpec(name="usad-tiny", pretrained=None, seed=3))
    b = Backbone.load(BackboneSpec(name="usad-tiny", pretrained=None, seed=3))
    c = Backbone.load(BackboneSpec(name="usad-tiny", pretrained=None, seed=4))
    pa, pb, pc = (next(x.visual.parameters()) for x in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert a.weights_id == b.weights_id != c.weights_id


def test_unknown_model_and_tag_errors():
    with pytest.raises(UsadError, match="unknown open_clip model"):
        Backbone.load(BackboneSpec(name="ViT-Nope-99", pretrained=None))
    with pytest.raises(UsadError, match="no pretrained tag"):
        Backbone.load(BackboneSpec(name="ViT-B-16", pretrained="not-a-tag"))


def test_missing_checkpoint_file_names_the_path(tmp_path):
    missing = tmp_path / "weights" / "ViT-B-16.pt"
    with pytest.raises(UsadError, match="checkpoint file not found"):
        Backbone.load(BackboneSpec(name="ViT-B-16", pretrained=str(missing)))


def test_local_checkpoint_file_loads_and_is_identified_by_content(tmp_path, tiny_backbone: Backbone):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_backbone.model.state_dict(), path)
    loaded = Backbone.load(BackboneSpec(name="usad-tiny", pretrained=str(path)))
    assert loaded.weights_id.startswith("file:")
    assert torch.equal(next(loaded.visual.parameters()), next(tiny_backbone.visual.parameters()))


def test_offline_tag_download_fails_with_instructions(monkeypatch):
    """No network here (HF_HUB_OFFLINE=1): the error says where to get the weights and how to pass them."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-usad-test-cache")
    with pytest.raises(UsadError, match="--pretrained /path/to/file"):
        Backbone.load(BackboneSpec(name="ViT-B-32", pretrained="openai"))


def test_demo_without_its_weights_fails_before_writing_anything(monkeypatch, tmp_path):
    """Offline and not cached, the demo stops with the loader's one-line error and leaves no half-made folder."""
    from usad_bench.demo import run_demo

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-usad-test-cache")
    with pytest.raises(UsadError, match="--pretrained /path/to/file"):
        run_demo(tmp_path / "demo", backbone=BackboneSpec(name="ViT-B-32", pretrained="openai"), cache_dir=None)
    assert not (tmp_path / "demo").exists()


def test_downloaded_hub_folder_loads_through_local_dir(tmp_path, tiny_backbone: Backbone):
    """A Hugging Face repo copied by hand (open_clip_config.json + weights) loads offline with local-dir:."""
    import json
    from importlib import resources

    config = json.loads((resources.files("usad_bench") / "resources" / "model_configs" / "usad-tiny.json").read_text())
    folder = tmp_path / "hub-copy"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    torch.save(tiny_backbone.model.state_dict(), folder / "open_clip_pytorch_model.bin")
    for pretrained in (None, "openai"):  # open_clip ignores the tag: the folder's weights are always loaded
        loaded = Backbone.load(BackboneSpec(name=f"local-dir:{folder}", pretrained=pretrained))
        assert loaded.weights_id.startswith("local-dir:") and not loaded.spec.is_random
    assert torch.equal(next(loaded.visual.parameters()), next(tiny_backbone.visual.parameters()))
    with pytest.raises(UsadError, match=r"open_clip_config\.json"):
        Backbone.load(BackboneSpec(name=f"local-dir:{tmp_path}", pretrained="openai"))


def test_fixed_prompts_are_encoded_once_per_process_and_exactly(tiny_backbone: Backbone):
    """encode_text stops at the last end-of-text token and keeps its result; both are exact (issue 16)."""
    from usad_bench import backbone as backbone_module

    texts = ["a sonogram of a malignant lesion", "normal breast tissue", "a mass"]
    full = tiny_backbone.model.encode_text(tiny_backbone.tokenize(texts)).float()  # all 77 positions
    first = tiny_backbone.encode_text(texts)
    assert torch.allclose(first, full, atol=1e-5, rtol=1e-4)
    first.add_(1.0)  # a caller editing its copy must not change what the next caller gets
    again = tiny_backbone.encode_text(texts)
    assert torch.allclose(again, full, atol=1e-5, rtol=1e-4)
    key = (tiny_backbone._text_identity(), tuple(texts))
    assert key in backbone_module._TEXT_MEMO
    other = Backbone.load(BackboneSpec(name="usad-tiny", pretrained=None, seed=5))  # other weights: other key
    assert other._text_identity() != tiny_backbone._text_identity()
    assert not torch.allclose(other.encode_text(texts), again)
