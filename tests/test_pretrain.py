"""`usad-bench pretrain`: Ultrasound-CLIP's objective, captions, and the Lightning loop end to end (tiny, fast)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from usad_bench.backbone import Backbone, BackboneSpec
from usad_bench.captions import attribute_similarity_matrix, build_caption, parse_attributes
from usad_bench.cli import main
from usad_bench.data.synth import synthesise_pretraining
from usad_bench.errors import UsadError
from usad_bench.pretrain.objective import (
    semantic_aware_loss,
    semantic_matching_loss,
    soft_contrastive_loss,
    soft_targets,
)
from usad_bench.pretrain.train import PretrainConfig, pretrain

A = {"diagnosis": "benign", "shape": "oval", "margin": "circumscribed"}
B = {"diagnosis": "malignant", "shape": "irregular", "margin": "spiculated"}
C = {"diagnosis": "malignant", "shape": "oval", "margin": "spiculated"}


# ----------------------------------------------------------------------------- attributes and captions
def test_attribute_similarity_is_the_share_of_agreeing_dimensions():
    s = attribute_similarity_matrix([A, A, B, C, {"shape": "oval"}])
    assert s.shape == (5, 5) and np.allclose(np.diag(s), 1) and np.allclose(s, s.T)
    assert s[0, 1] == 1 and s[0, 2] == 0
    assert s[2, 3] == pytest.approx(2 / 3) and s[0, 3] == pytest.approx(1 / 3)
    assert s[0, 4] == pytest.approx(1 / 3) and s[2, 4] == 0  # a dimension missing from one image counts 0


def test_attribute_cells_round_trip_and_bad_cells_are_one_line_errors():
    assert parse_attributes("shape=oval; margin=spiculated") == {"shape": "oval", "margin": "spiculated"}
    assert parse_attributes("") == {}
    with pytest.raises(UsadError, match="key=value"):
        parse_attributes("oval")


def test_captions_vary_and_name_the_findings():
    attributes = {**A, "orientation": "parallel", "echo": "anechoic", "posterior": "enhancement", "halo": "absent"}
    rng = np.random.default_rng(0)
    captions = [build_caption(attributes, "benign", rng) for _ in range(60)]
    assert len(set(captions)) > 20
    assert all("malignant" not in c and "normal" not in c.replace("abnormal", "") for c in captions)
    assert sum("anechoic" in c for c in captions) > 20
    assert any("benign breast lesion" in c for c in captions)  # the class prompts' own wording
    normal = [build_caption({"diagnosis": "normal"}, "normal", rng) for _ in range(30)]
    assert not any(word in c for c in normal for word in ("malignant", "benign", "spiculated"))


# ----------------------------------------------------------------------------- the objective
def test_soft_targets_share_mass_between_identical_attributes():
    t = soft_targets(torch.from_numpy(attribute_similarity_matrix([A, A, B])))
    assert torch.allclose(t.sum(1), torch.ones(3))
    assert t[0, 0] == pytest.approx(0.5, abs=1e-4) and t[0, 1] == pytest.approx(0.5, abs=1e-4)
    assert t[2, 2] > 0.999


def test_identity_similarity_gives_plain_clip_loss():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    plain = soft_contrastive_loss(img, txt, 10.0, None)
    soft = soft_contrastive_loss(img, txt, 10.0, torch.eye(6))
    assert soft.item() == pytest.approx(plain.item(), abs=1e-4)


def test_pairs_that_share_attributes_are_not_pushed_apart():
    """Plain CLIP prefers four distinct embeddings; the soft-label loss prefers grouping same-attribute pairs."""
    similarity = torch.from_numpy(attribute_similarity_matrix([A, A, B, B]))
    distinct = torch.eye(4)
    grouped = F.normalize(torch.tensor([[1.0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]]), dim=-1)
    assert soft_contrastive_loss(grouped, grouped, 20.0, None) > soft_contrastive_loss(distinct, distinct, 20.0, None)
    soft = soft_contrastive_loss(grouped, grouped, 20.0, similarity)
    assert soft < soft_contrastive_loss(distinct, distinct, 20.0, similarity)
    assert semantic_matching_loss(grouped, grouped, similarity) < 1e-6  # cosines equal the targets exactly
    assert semantic_matching_loss(distinct, distinct, similarity) > 0.1


def test_full_objective_parts_and_gradients():
    similarity = torch.from_numpy(attribute_similarity_matrix([A, B, C, A]))
    img = torch.randn(4, 8, requires_grad=True)
    txt = torch.randn(4, 8, requires_grad=True)
    parts = semantic_aware_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), 14.3, similarity, 0.5)
    assert parts["loss"].item() == pytest.approx((parts["contrastive"] + 0.5 * parts["semantic"]).item())
    parts["loss"].backward()
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- the command end to end
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synthesise_pretraining(tmp_path_factory.mktemp("corpus"), 16, seed=1, size=48)


def tiny_config(**changes) -> PretrainConfig:
    return PretrainConfig(**{"epochs": 1, "batch_size": 8, "threads": 1, "accelerator": "cpu", **changes})


def test_pretrain_writes_loadable_weights_deterministically(corpus, tmp_path):
    first = pretrain(corpus, tmp_path / "a", tiny_config())
    second = pretrain(corpus, tmp_path / "b", tiny_config())
    assert first.read_bytes() == second.read_bytes()
    report = json.loads((tmp_path / "a" / "pretrain.json").read_text())
    assert report["steps"] == 2 and report["n_pairs"] == 16 and "synthetic images only" in report["note"]
    assert np.isfinite(report["final"]["train/loss"])
    assert (tmp_path / "a" / "logs" / "metrics.csv").is_file()
    backbone = Backbone.load(BackboneSpec(name="usad-tiny", pretrained=str(first)))
    assert backbone.weights_id.startswith("file:")
    random = Backbone.load(BackboneSpec(name="usad-tiny", pretrained=None))
    probe = ["an ultrasound image of benign breast lesion."]
    assert not torch.allclose(backbone.encode_text(probe), random.encode_text(probe))


def test_resume_continues_from_the_last_checkpoint(corpus, tmp_path):
    pretrain(corpus, tmp_path, tiny_config())
    pretrain(corpus, tmp_path, tiny_config(epochs=2), resume=True)
    assert json.loads((tmp_path / "pretrain.json").read_text())["steps"] == 4


def test_manifest_without_captions_or_attributes_is_a_one_line_error(corpus, tmp_path, capsys):
    with open(corpus, newline="") as f:
        rows = list(csv.DictReader(f))
    plain = corpus.parent / "plain.csv"
    with open(plain, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "attributes"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    assert main(["pretrain", "--train", str(plain), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "'caption'" in err and "'attributes'" in err and "\n" not in err


def test_captions_alone_are_enough(corpus, tmp_path):
    with open(corpus, newline="") as f:
        rows = list(csv.DictReader(f))
    captioned = corpus.parent / "captioned.csv"
    with open(captioned, "w", newline="") as f:
        fields = [k for k in rows[0] if k != "attributes"] + ["caption"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "caption": f"an ultrasound image of {row['class']} breast tissue."})
    weights = pretrain(captioned, tmp_path, tiny_config())
    assert weights.is_file()
