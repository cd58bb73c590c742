"""Feature cache: hits, misses, invalidation by every key component, corrupt entries, --no-cache."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from usad_bench.backbone import Backbone, BackboneSpec
from usad_bench.cache import FeatureCache, feature_key
from usad_bench.data.manifest import Sample
from usad_bench.features import FeatureExtractor


def _images(folder: Path, n: int = 5) -> list[Sample]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(path)
        samples.append(Sample(f"t/{i}", path, (), "normal", False, f"g{i}", "d", "t"))
    return samples


def test_second_pass_hits_and_gives_identical_features(tmp_path, tiny_backbone: Backbone):
    samples = _images(tmp_path / "img")
    cache = FeatureCache(tmp_path / "cache")
    extractor = FeatureExtractor(tiny_backbone, cache, layers=(2, 4), batch_size=2)
    first = extractor.extract(samples)
    assert cache.stats() == {"hits": 0, "misses": 5, "rejected": 0}
    second = extractor.extract(samples)
    assert cache.hits == 5
    assert torch.equal(first.cls, second.cls) and torch.equal(first.patches, second.patches)


def test_cached_features_equal_uncached(tmp_path, tiny_backbone: Backbone):
    samples = _images(tmp_path / "img", 3)
    cached = FeatureExtractor(tiny_backbone, FeatureCache(tmp_path / "c"), (1,))
    cached.extract(samples)
    warm = cached.extract(samples)
    fresh = FeatureExtractor(tiny_backbone, FeatureCache(None), (1,)).extract(samples)
    assert torch.equal(warm.cls, fresh.cls) and torch.equal(warm.patches, fresh.patches)


def test_no_cache_writes_nothing(tmp_path, tiny_backbone: Backbone):
    samples = _images(tmp_path / "img", 2)
    cache = FeatureCache(None)
    FeatureExtractor(tiny_backbone, cache, (1,)).extract(samples)
    FeatureExtractor(tiny_backbone, cache, (1,)).extract(samples)
    assert cache.hits == 0 and cache.misses == 4
    assert not (tmp_path / ".usad_cache").exists()


@pytest.mark.parametrize(
    "change",
    ["layers", "variant", "weights", "image_size", "version"],
)
def test_key_changes_with_everything_that_changes_features(change, tiny_backbone: Backbone, monkeypatch):
    desc = tiny_backbone.describe()
    base = feature_key(desc, (1, 2), "orig")
    if change == "layers":
        other = feature_key(desc, (1, 3), "orig")
    elif change == "variant":
        other = feature_key(desc, (1, 2), "hflip")
    elif change == "weights":
        other = feature_key({**desc, "weights": "random:usad-tiny:seed1"}, (1, 2), "orig")
    elif change == "image_size":
        other = feature_key({**desc, "image_size": 96}, (1, 2), "orig")
    else:
        import usad_bench

        monkeypatch.setattr(usad_bench, "__version__", "999")
        other = feature_key(desc, (1, 2), "orig")
    assert other != base


def test_edited_image_is_a_new_entry(tmp_path, tiny_backbone: Backbone):
    samples = _images(tmp_path / "img", 1)
    cache = FeatureCache(tmp_path / "cache")
    extractor = FeatureExtractor(tiny_backbone, cache, (1,))
    before = extractor.extract(samples)
    Image.fromarray(np.full((40, 50), 200, dtype=np.uint8)).save(samples[0].image)
    after = extractor.extract(samples)
    assert cache.hits == 0 and cache.misses == 2
    assert not torch.equal(before.cls, after.cls)


def test_other_weights_do_not_reuse_entries(tmp_path, tiny_backbone: Backbone):
    samples = _images(tmp_path / "img", 2)
    cache = FeatureCache(tmp_path / "cache")
    FeatureExtractor(tiny_backbone, cache, (1,)).extract(samples)
    other = Backbone.load(replace(BackboneSpec(name="usad-tiny", pretrained=None), seed=7))
    FeatureExtractor(other, cache, (1,)).extract(samples)
    assert cache.hits == 0 and cache.misses == 4


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip_byte"])
def test_corrupt_entry_is_detected_and_recomputed(damage, tmp_path, tiny_backbone: Backbone):
    samples = _images(tmp_path / "img", 2)
    cache = FeatureCache(tmp_path / "cache")
    extractor = FeatureExtractor(tiny_backbone, cache, (1,))
    good = extractor.extract(samples)
    entry = sorted((tmp_path / "cache").rglob("*.safetensors"))[0]
    data = bytearray(entry.read_bytes())
    if damage == "truncate":
        entry.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "garbage":
        entry.write_bytes(b"not a safetensors file")
    else:
        data[-3] ^= 0xFF  # a flipped bit inside the tensor payload: only the checksum can catch it
        entry.write_bytes(bytes(data))
    again = extractor.extract(samples)
    assert cache.rejected == 1
    # The damaged entry is recomputed in a batch of one, so values match to float tolerance, not bitwise.
    assert torch.allclose(good.cls, again.cls, atol=1e-5)
    assert torch.allclose(good.patches.float(), again.patches.float(), atol=2e-3)
    assert cache.load(extractor.key("orig"), entry.stem) is not None  # rewritten whole


def test_no_temporary_files_left_behind(tmp_path, tiny_backbone: Backbone):
    samples = _images(tmp_path / "img", 3)
    FeatureExtractor(tiny_backbone, FeatureCache(tmp_path / "cache"), (1,)).extract(samples)
    assert not list((tmp_path / "cache").rglob("*.tmp"))


class _CountingBackbone:
    """Counts encoder passes (batches sent through the image tower) of a real backbone."""

    def __init__(self, backbone: Backbone):
        self._backbone, self.passes, self.layers_computed = backbone, 0, []

    def encode_features(self, images, request):
        self.passes += 1
        self.layers_computed.append(request.layers)
        return self._backbone.encode_features(images, request)

    def __getattr__(self, name):
        return getattr(self._backbone, name)


def test_raw_requests_share_one_encoder_pass_per_image(tmp_path, tiny_backbone: Backbone):
    """Issue 16 item 4: a later raw request for a subset of the cached blocks (or the CLS only) is a hit."""
    samples = _images(tmp_path / "img", 4)
    counting = _CountingBackbone(tiny_backbone)
    cache = FeatureCache(tmp_path / "cache")
    full = FeatureExtractor(counting, cache, (1, 2, 3, 4), batch_size=4).extract(samples)
    assert counting.passes == 1
    for layers in [(4,), (2, 3, 4), (), (3, 1)]:
        cached = FeatureExtractor(counting, cache, layers, batch_size=4).extract(samples)
        fresh = FeatureExtractor(tiny_backbone, FeatureCache(None), layers, batch_size=4).extract(samples)
        assert torch.equal(cached.cls, fresh.cls) and cached.layers == tuple(layers)
        if layers:
            assert torch.equal(cached.patches, fresh.patches)
            picked = [(1, 2, 3, 4).index(i) for i in layers]
            assert torch.equal(cached.patches, full.patches[:, picked])
        else:
            assert cached.patches is None
    assert counting.passes == 1 and cache.stats() == {"hits": 16, "misses": 4, "rejected": 0}


def test_raw_miss_encodes_every_planned_block_once(tmp_path, tiny_backbone: Backbone):
    """A larger request after a smaller one costs one pass, then both (and the plan's blocks) hit."""
    samples = _images(tmp_path / "img", 3)
    counting = _CountingBackbone(tiny_backbone)
    cache = FeatureCache(tmp_path / "cache")
    FeatureExtractor(counting, cache, (4,)).extract(samples)
    FeatureExtractor(counting, cache, (1, 2)).extract(samples)  # miss: encodes 1, 2 and the stored 4
    assert counting.layers_computed == [(4,), (1, 2, 4)]
    for layers in [(4,), (1, 2), (1, 2, 4)]:
        FeatureExtractor(counting, cache, layers).extract(samples)
    assert counting.passes == 2
    new_images = _images(tmp_path / "more", 5)[3:]  # images never seen: the plan names blocks 1, 2 and 4
    FeatureExtractor(counting, cache, (4,)).extract(new_images)
    assert counting.layers_computed[-1] == (1, 2, 4)
    FeatureExtractor(counting, cache, (1, 2)).extract(new_images)
    assert counting.passes == 3


def test_a_raw_request_reads_only_its_tensors(tmp_path, tiny_backbone: Backbone):
    samples = _images(tmp_path / "img", 1)
    cache = FeatureCache(tmp_path / "cache")
    extractor = FeatureExtractor(tiny_backbone, cache, (1, 4))
    extractor.extract(samples)
    sha = next((tmp_path / "cache").rglob("*.safetensors")).stem
    assert set(cache.load(extractor.key("orig"), sha, {"cls"})) == {"cls"}
    assert cache.load(extractor.key("orig"), sha, {"cls", "layer_2"}) is None  # a block it lacks: a miss
    assert cache.rejected == 0 and cache.stored_names(extractor.key("orig"), sha) == {"cls", "layer_1", "layer_4"}
