"""The synthetic ultrasound generator: determinism, layout, and that lesions look like their class."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation

from usad_bench.captions import LESION_ATTRIBUTES, parse_attributes
from usad_bench.data import synth
from usad_bench.data.images import load_mask
from usad_bench.data.manifest import read_manifest
from usad_bench.data.synth import DOMAINS, PRETRAIN_STYLE_RANGE, DomainStyle, random_style, synthesise
from usad_bench.errors import UsadError

SIZE = 128


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return read_manifest(synthesise(tmp_path_factory.mktemp("source"), 60, seed=0, style="source"))


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return read_manifest(synthesise(tmp_path_factory.mktemp("target"), 60, seed=0, style="target"))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=float)


def lesion(sample) -> np.ndarray:
    return load_mask(sample.masks, (SIZE, SIZE), sample.image)


def test_same_seed_gives_identical_bytes(tmp_path):
    first = synthesise(tmp_path / "a", 12, seed=7, style="source")
    second = synthesise(tmp_path / "b", 12, seed=7, style="source")
    assert first.read_bytes() == second.read_bytes()
    for a, b in zip(read_manifest(first), read_manifest(second), strict=True):
        assert a.image.read_bytes() == b.image.read_bytes()
        assert [m.read_bytes() for m in a.masks] == [m.read_bytes() for m in b.masks]


def test_different_seeds_differ(tmp_path):
    base = read_manifest(synthesise(tmp_path / "a", 6, seed=1))
    other_seed = read_manifest(synthesise(tmp_path / "b", 6, seed=2))
    assert all(a.image.read_bytes() != b.image.read_bytes() for a, b in zip(base, other_seed, strict=True))


def test_rerun_into_same_folder_is_identical(tmp_path):
    first = read_manifest(synthesise(tmp_path, 6, seed=3)).samples
    before = [s.image.read_bytes() for s in first]
    second = read_manifest(synthesise(tmp_path, 6, seed=3)).samples
    assert [s.image.read_bytes() for s in second] == before


def test_counts_per_class(source):
    labels = [s.label for s in source]
    assert {c: labels.count(c) for c in ("normal", "benign", "malignant")} == {
        "normal": 20,
        "benign": 20,
        "malignant": 20,
    }


@pytest.mark.parametrize(
    ("n", "fractions", "expected"),
    [
        (10, (0.5, 0.25, 0.25), (5, 3, 2)),
        (7, (1, 1, 1), (3, 2, 2)),
        (5, (1, 0, 0), (5, 0, 0)),
        (4, (0, 1, 3), (0, 1, 3)),
    ],
)
def test_class_fractions(tmp_path, n, fractions, expected):
    labels = [s.label for s in read_manifest(synthesise(tmp_path, n, class_fractions=fractions, size=48))]
    assert tuple(labels.count(c) for c in ("normal", "benign", "malignant")) == expected


def test_manifest_round_trip_and_columns(source):
    assert len(source) == 60
    for i, s in enumerate(source):
        assert s.id == f"synth-source/{i:04d}"
        assert s.image.is_file() and s.image.parent.name == "images"
        assert s.is_anomaly == (s.label != "normal")
        assert s.domain == "source" and s.dataset == "synth"
        assert s.group.startswith("synth-source:p")
        with Image.open(s.image) as im:
            assert im.mode == "L" and im.size == (SIZE, SIZE)


def test_patients_hold_consecutive_images_of_one_class(tmp_path):
    manifest = read_manifest(synthesise(tmp_path, 30, seed=4, size=48, images_per_patient=3))
    runs: list[list] = []
    for s in manifest:
        if runs and runs[-1][0].group == s.group:
            runs[-1].append(s)
        else:
            runs.append([s])
    assert len({r[0].group for r in runs}) == len(runs), "a patient's images must be consecutive"
    assert all(len({s.label for s in r}) == 1 and len(r) <= 3 for r in runs)
    assert sum(len(r) == 3 for r in runs) >= 8  # 10 per class = 3 + 3 + 3 + 1


def test_masks_exactly_for_abnormal_rows(source):
    for s in source:
        assert s.has_mask == s.is_anomaly
        if not s.has_mask:
            continue
        with Image.open(s.masks[0]) as im:
            assert im.mode == "L" and im.size == (SIZE, SIZE)
            assert set(np.unique(np.asarray(im)).tolist()) == {0, 255}
        mask = lesion(s)
        assert 0.005 < mask.mean() < 0.25
        # inside the image: the lesion does not run off any edge
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


@pytest.mark.parametrize("domain", ["source", "target"])
def test_lesions_are_hypoechoic(domain, source, target):
    manifest = {"source": source, "target": target}[domain]
    gaps = []
    for s in manifest:
        if s.has_mask:
            image, mask = pixels(s.image), lesion(s)
            ring = binary_dilation(mask, iterations=6) & ~binary_dilation(mask, iterations=2)
            gaps.append(image[ring].mean() - image[mask].mean())
    assert min(gaps) > 0, "every lesion is darker than the tissue around it"
    assert np.mean(gaps) > 30


def aspect(mask: np.ndarray) -> float:  # height / width
    rows, cols = np.nonzero(mask)
    return (np.ptp(rows) + 1) / (np.ptp(cols) + 1)


def below_minus_beside(sample) -> float:
    """Mean grey of the band below the lesion's core minus that of the same rows beside it."""
    image, mask = pixels(sample.image), lesion(sample)
    rows, cols = np.nonzero(mask)
    width = np.ptp(cols) + 1
    left, right = cols.min() + width // 4, cols.max() - width // 4 + 1
    band = slice(rows.max() + 3, min(SIZE, rows.max() + 19))
    beside = [image[band, left + d : right + d].mean() for d in (-width, width) if left + d >= 0 and right + d <= SIZE]
    return image[band, left:right].mean() - np.mean(beside)


def attributes_of(manifest) -> dict[str, dict[str, str]]:
    """id -> the row's parsed ``attributes`` cell."""
    with open(manifest.path, newline="") as f:
        return {row["id"]: parse_attributes(row["attributes"]) for row in csv.DictReader(f)}


def test_attributes_column_describes_every_row(source):
    attributes = attributes_of(source)
    for s in source:
        row = attributes[s.id]
        assert row["diagnosis"] == s.label and set(row) == {"diagnosis", *LESION_ATTRIBUTES}
        if s.label == "normal":
            assert all(row[k] == "none" for k in LESION_ATTRIBUTES)
        else:
            assert all(row[k] in LESION_ATTRIBUTES[k] for k in LESION_ATTRIBUTES)


def test_lesions_look_like_their_attributes(source, target):
    for manifest in (source, target):
        attributes = attributes_of(manifest)
        lesions = [(s, attributes[s.id]) for s in manifest if s.has_mask]
        parallel = [aspect(lesion(s)) for s, a in lesions if a["orientation"] == "parallel" and a["shape"] != "round"]
        upright = [
            aspect(lesion(s)) for s, a in lesions if a["orientation"] == "not_parallel" and a["shape"] != "round"
        ]
        assert np.mean([x < 1 for x in parallel]) >= 0.85 and np.mean([x > 1 for x in upright]) >= 0.85
        # A lesion too wide for a same-width band beside it on either side has no comparison (nan): skipped.
        shadowed = [d for s, a in lesions if a["posterior"] == "shadowing" if not np.isnan(d := below_minus_beside(s))]
        enhanced = [
            d for s, a in lesions if a["posterior"] == "enhancement" if not np.isnan(d := below_minus_beside(s))
        ]
        assert np.mean([d < 0 for d in shadowed]) >= 0.85 and np.mean(shadowed) < -15
        assert np.mean(enhanced) > np.mean(shadowed) + 15


def test_class_attribute_relation_is_informative_not_deterministic():
    rng = np.random.default_rng(0)
    draws = {label: [synth.draw_attributes(rng, label) for _ in range(2000)] for label in ("benign", "malignant")}
    for key, typical_benign, typical_malignant in (
        ("orientation", "parallel", "not_parallel"),
        ("posterior", "enhancement", "shadowing"),
        ("shape", "oval", "irregular"),
    ):
        benign = np.mean([d[key] == typical_benign for d in draws["benign"]])
        malignant = np.mean([d[key] == typical_malignant for d in draws["malignant"]])
        assert 0.5 < benign < 0.95 and 0.5 < malignant < 0.95, key  # leans, never decides
    benign_shadowing = np.mean([d["posterior"] == "shadowing" for d in draws["benign"]])
    circumscribed_cancer = np.mean([d["margin"] == "circumscribed" for d in draws["malignant"]])
    assert benign_shadowing > 0.05 and circumscribed_cancer > 0.05


def horizontal_correlation(image: np.ndarray, lag: int = 2) -> float:
    """Speckle grain: correlation of tissue pixels ``lag`` columns apart (row means removed)."""
    tissue = image[24:96]
    tissue = tissue - tissue.mean(axis=1, keepdims=True)
    return float(np.mean(tissue[:, lag:] * tissue[:, :-lag]) / np.mean(tissue * tissue))


def test_target_style_is_shifted(source, target):
    src = [pixels(s.image) for s in source if s.label == "normal"]
    tgt = [pixels(s.image) for s in target if s.label == "normal"]
    assert abs(np.mean(src) - np.mean(tgt)) > 4
    # the target's near field is brighter (gain, haze) and its far field darker (attenuation)
    assert np.mean([t[5:40].mean() for t in tgt]) > np.mean([s[5:40].mean() for s in src])
    assert np.mean([t[100:].mean() for t in tgt]) < np.mean([s[100:].mean() for s in src])
    src_grain, tgt_grain = [horizontal_correlation(x) for x in src], [horizontal_correlation(x) for x in tgt]
    assert min(tgt_grain) > max(src_grain), "the target transducer has coarser speckle"


def test_custom_style_and_size(tmp_path):
    style = DomainStyle("scanner-x", gain=0.8, speckle=6.0, attenuation=1.0)
    manifest = read_manifest(synthesise(tmp_path, 3, style=style, size=64, class_fractions=(0, 0, 1)))
    assert [s.domain for s in manifest] == ["scanner-x"] * 3
    assert manifest.samples[0].id == "synth-scanner-x/0000"
    assert Image.open(manifest.samples[0].image).size == (64, 64)
    assert set(DOMAINS) == {"source", "target"}


@pytest.mark.parametrize(
    "kwargs",
    [{"n": 0}, {"style": "nope"}, {"class_fractions": (0, 0, 0)}, {"class_fractions": (1, 1)}, {"seed": -1}],
)
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(UsadError):
        synthesise(tmp_path, **{"n": 3, **kwargs})


def test_killed_run_leaves_no_manifest(tmp_path, monkeypatch):
    synthesise(tmp_path, 4, seed=0, size=48)
    assert (tmp_path / "manifest.csv").is_file()
    calls = []
    real = synth.render_image

    def dies_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(synth, "render_image", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        synthesise(tmp_path, 4, seed=1, size=48)
    # the old manifest would now describe images that were overwritten, so it must be gone
    assert not (tmp_path / "manifest.csv").exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_pretraining_corpus_draws_many_styles_never_the_target(tmp_path):
    manifest = read_manifest(synth.synthesise_pretraining(tmp_path, 8, seed=3, size=48))
    assert {s.domain for s in manifest} == {"pretrain"} and len(attributes_of(manifest)) == 8
    styles = [random_style(np.random.default_rng(i)) for i in range(200)]
    assert len({round(st.gain, 6) for st in styles}) == 200
    target = DOMAINS["target"]
    for knob, (low, high) in PRETRAIN_STYLE_RANGE.items():
        assert not low <= getattr(target, knob) <= high, f"the target's {knob} must lie outside the pretraining range"
    source = DOMAINS["source"]
    assert all(low <= getattr(source, k) <= high for k, (low, high) in PRETRAIN_STYLE_RANGE.items())
