"""Few-shot support sampling: k per class, seeded, patient-disjoint from the held-out set.

Property-style: most tests run over several random small manifests built in code.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from usad_bench.data.manifest import Manifest, Sample
from usad_bench.data.sampler import Split, exclude_groups, read_split, sample_support, write_split
from usad_bench.errors import UsadError

CLASSES = ("normal", "benign", "malignant")


def make_manifest(rng: random.Random, min_images: int = 6) -> Manifest:
    """A random manifest: each class has several patients with 1-4 images, rows shuffled."""
    samples = []
    for label in CLASSES:
        count = 0
        while count < min_images:
            patient = f"{label[:3]}-p{rng.randrange(10**6)}"
            for _ in range(rng.randint(1, 4)):
                count += 1
                samples.append(
                    Sample(
                        id=f"d/{label}-{len(samples):03d}",
                        image=Path(f"/x/{len(samples)}.png"),
                        masks=(),
                        label=label,
                        is_anomaly=label != "normal",
                        group=patient,
                        domain="d",
                        dataset="d",
                    )
                )
    rng.shuffle(samples)
    return Manifest(samples)


MANIFESTS = [make_manifest(random.Random(i), min_images=random.Random(i).randint(4, 12)) for i in range(8)]
CASES = [(m, k, seed) for i, m in enumerate(MANIFESTS) for k, seed in [(1, i), (2, 10 + i), (4, 20 + i)]]


def counts(manifest: Manifest) -> dict[str, int]:
    return {c: sum(s.label == c for s in manifest) for c in CLASSES}


@pytest.mark.parametrize(("manifest", "shots", "seed"), CASES)
def test_exactly_k_per_class_grouped_in_canonical_order(manifest, shots, seed):
    split = sample_support(manifest, shots, seed)
    index = manifest.by_id()
    assert split.classes == list(CLASSES)
    assert [index[i].label for i in split.support_ids] == [c for c in CLASSES for _ in range(shots)]
    assert len(set(split.support_ids)) == len(split.support_ids)
    assert split.support_groups == sorted({index[i].group for i in split.support_ids})


@pytest.mark.parametrize(("manifest", "shots", "seed"), CASES)
def test_support_and_heldout_share_no_patient(manifest, shots, seed):
    split = sample_support(manifest, shots, seed)
    index = manifest.by_id()
    heldout_groups = {index[i].group for i in split.heldout_ids}
    assert not heldout_groups & set(split.support_groups)
    # held-out is *every* row of the unused patients, in manifest order
    assert split.heldout_ids == [s.id for s in manifest if s.group not in set(split.support_groups)]
    assert [s.id for s in exclude_groups(manifest, split.support_groups)] == split.heldout_ids


@pytest.mark.parametrize(("manifest", "shots", "seed"), CASES)
def test_seeded_determinism_and_row_order_invariance(manifest, shots, seed):
    split = sample_support(manifest, shots, seed)
    assert sample_support(manifest, shots, seed) == split
    reordered = Manifest(random.Random(seed).sample(manifest.samples, len(manifest)))
    again = sample_support(reordered, shots, seed)
    assert again.support_ids == split.support_ids
    assert sorted(again.heldout_ids) == sorted(split.heldout_ids)


@pytest.mark.parametrize("manifest", MANIFESTS)
def test_different_seeds_give_different_supports(manifest):
    supports = {tuple(sample_support(manifest, 2, seed).support_ids) for seed in range(10)}
    assert len(supports) >= 5


@pytest.mark.parametrize(("manifest", "shots", "seed"), CASES)
def test_round_robin_uses_as_many_patients_as_possible(manifest, shots, seed):
    split = sample_support(manifest, shots, seed)
    index = manifest.by_id()
    for label in CLASSES:
        patients = {s.group for s in manifest if s.label == label}
        used = [index[i].group for i in split.support_ids if index[i].label == label]
        # with enough patients every image is from a different one; otherwise every patient is used
        assert len(set(used)) == min(shots, len(patients))
        # and no patient gives an (r+1)-th image before every patient has given r (or run out)
        size = {g: sum(s.group == g for s in manifest) for g in patients}
        most = max(used.count(g) for g in used)
        assert all(used.count(g) >= min(most - 1, size[g]) for g in patients)


def one_patient_per_class_manifest() -> Manifest:
    samples = [
        Sample(f"d/{c}{j}", Path(f"/x/{c}{j}.png"), (), c, c != "normal", f"p-{c}", "d", "d")
        for c in CLASSES
        for j in range(5)
    ]
    return Manifest(samples)


def test_single_patient_class_gives_several_images_of_it():
    manifest = one_patient_per_class_manifest()
    split = sample_support(manifest, 3, seed=0)
    assert split.support_groups == ["p-benign", "p-malignant", "p-normal"]
    assert split.heldout_ids == []
    seen = {tuple(sample_support(manifest, 2, seed).support_ids[:2]) for seed in range(20)}
    assert len(seen) > 1, "images within a patient are drawn in a seeded random order too"


def test_class_subset_and_independence_of_other_classes():
    manifest = MANIFESTS[0]
    full = sample_support(manifest, 2, seed=5)
    only = sample_support(manifest, 2, seed=5, classes=["malignant", "benign"])
    assert only.classes == ["benign", "malignant"]
    assert only.support_ids == full.support_ids[2:]  # benign then malignant, same draw
    assert sample_support(manifest, 2, seed=5, classes="benign").support_ids == full.support_ids[2:4]


def test_k_too_large_names_the_class_and_its_count():
    manifest = MANIFESTS[1]
    sizes = counts(manifest)
    smallest = min(sizes, key=lambda c: (sizes[c], CLASSES.index(c)))
    with pytest.raises(UsadError) as err:
        sample_support(manifest, sizes[smallest] + 1, seed=0)
    message = str(err.value)
    assert repr(smallest) in message and f"{sizes[smallest]} images" in message
    assert f"largest k possible for classes normal, benign, malignant is {sizes[smallest]}" in message
    sample_support(manifest, sizes[smallest], seed=0)  # the largest k works


def test_unknown_class_lists_available_classes():
    with pytest.raises(UsadError, match=r"'cyst'.*available: normal, benign, malignant"):
        sample_support(MANIFESTS[0], 1, seed=0, classes=["benign", "cyst"])


@pytest.mark.parametrize("shots", [0, -1, 1.5, True, "2"])
def test_shots_must_be_a_positive_integer(shots):
    with pytest.raises(UsadError, match="shots"):
        sample_support(MANIFESTS[0], shots, seed=0)


def test_split_json_round_trip(tmp_path):
    split = sample_support(MANIFESTS[2], 3, seed=11)
    path = tmp_path / "sub" / "split.json"
    write_split(split, path)
    assert read_split(path) == split
    assert json.loads(path.read_text())["support_ids"] == split.support_ids
    assert Split.from_json(split.to_json()) == split


def test_read_split_errors(tmp_path):
    with pytest.raises(UsadError, match="not found"):
        read_split(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UsadError, match="not valid JSON"):
        read_split(tmp_path / "bad.json")
    (tmp_path / "partial.json").write_text('{"shots": 1, "seed": 0}')
    with pytest.raises(UsadError, match="missing classes"):
        read_split(tmp_path / "partial.json")


def test_exclude_groups_accepts_a_single_group():
    manifest = one_patient_per_class_manifest()
    assert {s.group for s in exclude_groups(manifest, "p-normal")} == {"p-benign", "p-malignant"}
    assert len(exclude_groups(manifest, [])) == len(manifest)


def test_support_image_digests_are_recorded_and_optional(tmp_path):
    samples = []
    for i, label in enumerate(["normal", "normal", "benign", "benign"]):
        image = tmp_path / f"{i}.png"
        image.write_bytes(bytes([i]) * 10)
        samples.append(Sample(f"d/{i}", image, (), label, label != "normal", f"p{i}", "d", "d"))
    split = sample_support(Manifest(samples), 1, seed=0)
    assert len(split.support_sha256) == 2 and set(split.support_sha256) == set(split.support_ids)
    write_split(split, tmp_path / "split.json")
    assert read_split(tmp_path / "split.json").support_sha256 == split.support_sha256
    older = {k: v for k, v in split.to_json().items() if k != "support_sha256"}  # a split.json written before
    assert Split.from_json(older).support_sha256 == {}
