"""Issue 14 items 2-3: BiomedCLIP prototype metric learning, Ultrasound-CLIP attribute prompts and soft labels.

Hand-checked pieces on toys, the prompt switch, gradients, BiomedCLIP's name offline (loopback only),
and learning from 4 shots per class through fit/evaluate on ``usad-tiny --pretrained synth`` (synthetic-
only weights: the figures are checks, not results).
"""

from __future__ import annotations

import json
import math
import socket
import time

import pytest
import torch

from usad_bench.backbone import Backbone, BackboneSpec
from usad_bench.data.synth import synthesise
from usad_bench.errors import UsadError
from usad_bench.methods.base import Task
from usad_bench.methods.biomedclip_metric import BiomedCLIPMetric, BiomedCLIPMetricConfig, squared_distances
from usad_bench.methods.ultraad_parts import description_embeddings
from usad_bench.methods.usclip_softlabel import (
    USCLIPSoftLabel,
    USCLIPSoftLabelConfig,
    class_attribute_similarity,
    pair_similarity,
)
from usad_bench.pretrain.objective import semantic_aware_loss, soft_targets
from usad_bench.prompts import _parse, load_prompts
from usad_bench.runner import FitOptions, evaluate, fit

CLASSES = ["normal", "benign", "malignant"]
BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


def make_task(prompts: str) -> Task:
    return Task(classes=CLASSES, shots=4, dataset="synth", prompts=load_prompts(prompts), image_size=32)


# ----------------------------------------------------------------------------- attribute prompts (item 3a)
def test_attribute_vocabulary_describes_each_class_by_nine_attributes():
    prompts = load_prompts("breast_ultrasound_attributes")
    for label in CLASSES:
        attrs = prompts.class_attributes(label)
        assert len(attrs) == 9 and attrs["diagnosis"] == label
        text = " ".join(prompts.describe(label, "any_dataset"))
        assert all(value in text for value in attrs.values())  # every attribute reaches the descriptions
    assert load_prompts("breast_ultrasound").attributes == {}  # the BI-RADS sentences stay as they were


def test_attribute_sentences_need_every_field():
    data = {"object": "x", "states": {"normal": ["n {}"], "abnormal": ["a {}"]}, "templates": ["{}"],
            "class_names": {}, "class_templates": ["{}"], "attribute_sentences": ["{shape} and {margins}"],
            "attributes": {"default": {"benign": {"shape": "oval"}}}}  # fmt: skip
    with pytest.raises(UsadError, match="has no 'margins'"):
        _parse(data, "toy")


def test_prompt_switch_reaches_ultraads_memory(tiny_backbone):
    """UltraAD's text memory and PIF prototypes read describe(): the switch changes what they encode."""
    birads = description_embeddings(tiny_backbone, load_prompts("breast_ultrasound"), CLASSES, "synth")
    attrs = description_embeddings(tiny_backbone, load_prompts("breast_ultrasound_attributes"), CLASSES, "synth")
    assert birads.shape == attrs.shape == (3, tiny_backbone.embed_dim)
    assert not torch.allclose(birads, attrs)


# ----------------------------------------------------------------------------- soft labels (item 3b)
def test_soft_label_targets_on_a_toy_attribute_table():
    table = {"default": {"a": {"organ": "breast", "shape": "oval", "margin": "smooth"},
                         "b": {"organ": "breast", "shape": "oval", "margin": "spiculated"},
                         "c": {"organ": "thyroid", "shape": "round", "margin": "spiculated"}}}  # fmt: skip
    prompts = load_prompts("breast_ultrasound")
    prompts.attributes = table
    similarity = class_attribute_similarity(prompts, ["a", "b", "c"], "synth")
    expected = torch.tensor([[1, 2 / 3, 0], [2 / 3, 1, 1 / 3], [0, 1 / 3, 1]])  # shared attributes out of 3
    assert torch.allclose(similarity, expected)
    pairs = pair_similarity(similarity, torch.tensor([0, 0, 2]))  # two images of class a, one of c
    assert torch.allclose(pairs, torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 1]]))
    targets = soft_targets(pairs, temperature=1.0)  # row softmax: e / (2e + 1) for each same-class pair
    assert math.isclose(float(targets[0, 0]), math.e / (2 * math.e + 1), rel_tol=1e-6)
    assert math.isclose(float(targets[2, 2]), math.e / (math.e + 2), rel_tol=1e-6)


def test_classes_without_attributes_are_a_one_line_error(tiny_backbone):
    with pytest.raises(UsadError, match="prompts=breast_ultrasound_attributes"):
        cfg = USCLIPSoftLabelConfig(prompts="breast_ultrasound")
        USCLIPSoftLabel(cfg, tiny_backbone, make_task("breast_ultrasound"))


def test_usclip_trains_with_the_pretraining_loss_and_starts_at_zero_shot(tiny_backbone):
    method = USCLIPSoftLabel(USCLIPSoftLabelConfig(), tiny_backbone, make_task("breast_ultrasound_attributes"))
    method.log = lambda *a, **k: None
    cls, labels = torch.randn(6, tiny_backbone.embed_dim), torch.tensor([0, 0, 1, 1, 2, 2])
    loss = method.training_step({"cls": cls, "label": labels}, 0)
    text = torch.nn.functional.normalize(method.class_text, dim=-1)[labels]
    image = torch.nn.functional.normalize(cls, dim=-1)  # zero-initialised residual map: the raw embedding
    expected = semantic_aware_loss(image, text, 100.0, method.class_similarity[labels][:, labels])["loss"]
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert method.image_map.weight.grad.abs().sum() > 0 and method.class_text.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_backbone.parameters())
    frozen_text = USCLIPSoftLabel(USCLIPSoftLabelConfig(train_text=False), tiny_backbone, method.task)
    assert not frozen_text.class_text.requires_grad
    assert frozen_text.trainable_parameters() == [frozen_text.image_map.weight, frozen_text.image_map.bias]


# ----------------------------------------------------------------------------- prototypes (item 2)
def test_prototype_distances_on_a_toy():
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # |(1,0)-(1,0)|^2 = 0, |(1,0)-(0,1)|^2 = 2; |(.6,.8)-(1,0)|^2 = .16+.64, |(.6,.8)-(0,1)|^2 = .36+.04
    assert torch.allclose(squared_distances(z, prototypes), torch.tensor([[0.0, 2.0], [0.8, 0.4]]), atol=1e-5)


def test_metric_method_scores_by_distance_to_prototypes(tiny_backbone):
    cfg = BiomedCLIPMetricConfig(temperature=0.5)
    method = BiomedCLIPMetric(cfg, tiny_backbone, make_task("breast_ultrasound"))
    projected_text = method.projection(method.class_text)  # (3, P)
    assert method.prototypes.shape == (3, cfg.proj_dim)
    assert torch.allclose(method.prototypes, projected_text, atol=1e-6)  # text initialises the prototypes
    assert float(method.text_regulariser().detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        method.prototypes.copy_(torch.eye(3, cfg.proj_dim))
        method.projection.net[-1].weight.zero_()
        method.projection.net[-1].bias.copy_(torch.eye(cfg.proj_dim)[0])  # every image lands on prototype 0
    pred = method.predict_features(type("F", (), {"cls": torch.randn(2, tiny_backbone.embed_dim)})())
    assert torch.allclose(pred.class_logits, torch.tensor([[0.0, -4.0, -4.0]] * 2))  # -d^2 / T, d^2 in {0, 2}
    assert torch.allclose(pred.score, torch.full((2,), 2 / (math.exp(4) + 2)))  # 1 - p(normal)


def test_metric_gradients_reach_projection_and_prototypes_only(tiny_backbone):
    method = BiomedCLIPMetric(BiomedCLIPMetricConfig(), tiny_backbone, make_task("breast_ultrasound"))
    method.log = lambda *a, **k: None
    batch = {"cls": torch.randn(6, tiny_backbone.embed_dim), "label": torch.tensor([0, 0, 1, 1, 2, 2])}
    method.training_step(batch, 0).backward()
    names = {n for n, p in method.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert names == {n for n, p in method.named_parameters() if p.requires_grad}
    assert "prototypes" in names and all(not n.startswith("backbone.") for n in names)
    assert "class_text" in dict(method.named_buffers())  # the description embeddings stay fixed


# ----------------------------------------------------------------------------- BiomedCLIP's name
def dead_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_biomedclip_offline_fails_in_seconds_naming_the_download(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from usad_bench import backbone

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{dead_port()}")
    backbone._network_error.cache_clear()
    started = time.perf_counter()
    with pytest.raises(UsadError) as caught:
        Backbone.load(BackboneSpec(name=BIOMEDCLIP, pretrained=None))
    backbone._network_error.cache_clear()
    assert time.perf_counter() - started < 5.0
    message = str(caught.value)
    assert "\n" not in message and "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224" in message
    assert "local-dir:" in message


def test_biomedclip_shaped_stand_in_needs_transformers(tmp_path):
    """A local-dir folder shaped like BiomedCLIP's (timm ViT image tower, Hugging Face text tower and tokenizer).

    ``transformers`` is not a dependency of the suite, so here the loader must say in one line what to install;
    with it installed the stand-in's text tower would still need a local BERT folder (not built offline here).
    """
    pytest.importorskip("timm")
    if __import__("importlib").util.find_spec("transformers") is not None:
        pytest.skip("transformers is installed: the one-line install hint does not apply")
    text = str(tmp_path / "text")
    config = {"model_cfg": {"embed_dim": 32,
              "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                             "timm_pool": "", "timm_proj": "linear", "image_size": 224},
              "text_cfg": {"hf_model_name": text, "hf_tokenizer_name": text, "hf_proj_type": "mlp",
                           "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 16}}}  # fmt: skip
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    save_file({"unused": torch.zeros(1)}, str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(UsadError) as caught:
        Backbone.load(BackboneSpec(name=f"local-dir:{tmp_path}", pretrained=None))
    assert "pip install transformers" in str(caught.value) and "\n" not in str(caught.value)


# ----------------------------------------------------------------------------- learning from 4 shots
@pytest.fixture(scope="module")
def domains(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ultrasound_systems")
    return {"source": synthesise(root / "source", n=45, seed=11, style="source"),
            "target": synthesise(root / "target", n=45, seed=12, style="target")}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("method", ["biomedclip_metric", "usclip_softlabel"])
def test_learns_from_four_shots_per_class(method, domains, pretrained_tiny_spec, tmp_path):
    """usad-tiny --pretrained synth, 4 shots/class of the source style, tested on the unseen target style.

    Prototypes start from random here (text_init false), so the figure is what the support set taught;
    figures next to zero-shot's are in baselines/biomedclip_metric.md and baselines/usclip_softlabel.md.
    """
    source, target = domains["source"], domains["target"]
    overrides = {"epochs": 10, **({"text_init": False} if method == "biomedclip_metric" else {})}
    opts = FitOptions(method, source, 4, 0, tmp_path / method, pretrained_tiny_spec, overrides,
                      cache_dir=tmp_path / "cache", device="cpu")  # fmt: skip
    payload = evaluate(fit(opts), [("target", target)], device="cpu", cache_dir=tmp_path / "cache")
    metrics = payload["tests"]["target"]
    print(method, {k: round(metrics[k], 3) for k in ("image_auroc", "cls_auroc_macro")})  # shown with -s
    assert metrics["image_auroc"] > 0.85 and metrics["cls_auroc_macro"] > 0.7, metrics
