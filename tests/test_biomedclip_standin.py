"""Issue 14 item 2: BiomedCLIP's structure through the backbone loader, on a tiny offline stand-in.

The stand-in is a ``local-dir:`` folder shaped like the Hugging Face repo
microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224: an ``open_clip_config.json`` with a timm ViT image
tower (``timm_model_name``, ``timm_pool: ""``, ``timm_proj: linear``) and a Hugging Face BERT text tower
(``hf_model_name`` / ``hf_tokenizer_name``, ``hf_proj_type: mlp``, ``cls_last_hidden_state_pooler``), the
BERT tokenizer files next to it (open_clip reads a local-dir model's tokenizer from that folder), and the
open_clip weights. Every file is written under tmp_path with random weights: nothing is fetched.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
import yaml

from usad_bench.backbone import Backbone, BackboneSpec
from usad_bench.data.synth import synthesise
from usad_bench.errors import UsadError
from usad_bench.runner import FitOptions, evaluate, fit

transformers = pytest.importorskip("transformers", reason="the biomedclip extra (transformers) is not installed")

WORDS = ["a", "an", "of", "the", "ultrasound", "image", "breast", "normal", "benign", "malignant", "lesion", "tissue"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
IMAGE_SIZE = 224  # BiomedCLIP's; open_clip builds the timm trunk at its default size (ViT-Ti/16: 14 x 14)
EMBED_DIM = 32


def biomedclip_config(text_dir: Path) -> dict:
    """BiomedCLIP's open_clip_config.json with a tiny timm tower and a local BERT folder for the hub ids."""
    return {
        "model_cfg": {
            "embed_dim": EMBED_DIM,
            "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                           "timm_pool": "", "timm_proj": "linear", "image_size": IMAGE_SIZE},
            "text_cfg": {"hf_model_name": str(text_dir), "hf_tokenizer_name": str(text_dir),
                         "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                         "context_length": 24},
        },
        "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)},
    }  # fmt: skip


def write_bert(folder: Path) -> None:
    """A 2-layer, 32-wide BERT with a 17-entry lower-case WordPiece vocabulary (config, weights, tokenizer)."""
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(str(folder))
    config = transformers.BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(str(folder))


@pytest.fixture(scope="module", autouse=True)
def hub_offline():
    """Everything here is local: huggingface_hub's offline switch makes any attempted request fail at once."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    """The hub-style folder: open_clip_config.json + tokenizer files + open_clip_model.safetensors."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("biomedclip_standin")
    write_bert(root / "bert")
    folder = root / "BiomedCLIP-standin"
    write_bert(folder)  # the real repo ships the tokenizer beside open_clip_config.json too
    for name in ("config.json", "model.safetensors"):
        (folder / name).unlink()  # only tokenizer files stay; the text model comes from hf_model_name
    (folder / "open_clip_config.json").write_text(json.dumps(biomedclip_config(root / "bert")))
    torch.manual_seed(1)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def loaded(standin) -> Backbone:
    return Backbone.load(BackboneSpec(name=f"local-dir:{standin}", pretrained=None))


def test_loader_builds_timm_image_and_hf_text_towers_from_the_saved_weights(standin, loaded):
    from safetensors.torch import load_file

    assert loaded.weights_id.startswith("local-dir:") and not loaded.spec.is_random
    assert type(loaded.visual).__name__ == "TimmModel" and type(loaded.model.text).__name__ == "HFTextEncoder"
    assert isinstance(loaded.tokenizer, open_clip.tokenizer.HFTokenizer)
    saved = load_file(str(standin / "open_clip_model.safetensors"))
    state = loaded.model.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(state[k], saved[k]) for k in saved)  # the checkpoint, not a fresh random init
    assert loaded.num_layers == 12 and loaded.image_size == IMAGE_SIZE and loaded.grid == (14, 14)
    assert loaded.embed_dim == EMBED_DIM and loaded.text_num_layers == 0


def test_encodes_images_and_text_like_open_clip(loaded):
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    feats = loaded.encode_images(images, layers=(6, 12))
    assert feats.cls.shape == (2, EMBED_DIM) and feats.patches.shape[:2] == (2, 2)
    assert feats.patches.shape[-1] == 192  # ViT-Ti width; tokens before the final norm and projection
    assert torch.allclose(feats.cls, loaded.model.encode_image(images), atol=1e-5)
    assert loaded.project_tokens(feats.patches[:, -1]).shape[-1] == EMBED_DIM

    texts = ["an ultrasound image of a benign breast lesion", "normal breast tissue"]
    tokens = loaded.tokenize(texts)
    assert tokens.shape == (2, 24) and int(tokens[0, 0]) == SPECIAL.index("[CLS]")  # BERT ids, not CLIP BPE
    text = loaded.encode_text(texts)
    assert text.shape == (2, EMBED_DIM) and torch.isfinite(text).all()
    assert torch.allclose(text, loaded.model.encode_text(tokens), atol=1e-6)
    assert not torch.allclose(text[0], text[1])


def test_prompt_embedding_editing_says_it_needs_an_open_clip_text_tower(loaded):
    tokens = loaded.tokenize(["normal breast tissue"])
    with pytest.raises(UsadError, match="Hugging Face") as caught:
        loaded.encode_text_embeddings(torch.zeros(1, 24, 32), tokens)
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_biomedclip_metric_fits_and_evaluates_on_the_stand_in(standin, tmp_path):
    """fit + evaluate through the runner, backbone named as the CLI would (--backbone local-dir:...)."""
    train = synthesise(tmp_path / "source", n=18, seed=3, style="source", size=64)
    test = synthesise(tmp_path / "target", n=12, seed=4, style="target", size=64)
    spec = BackboneSpec(name=f"local-dir:{standin}", pretrained=None)
    opts = FitOptions("biomedclip_metric", train, 2, 0, tmp_path / "run", spec, {"epochs": 2},
                      cache_dir=tmp_path / "cache", device="cpu")  # fmt: skip
    run = fit(opts)
    assert (run / "model.pt").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["backbone"]["name"] == spec.name
    metrics = evaluate(run, [("target", test)], device="cpu", cache_dir=tmp_path / "cache")["tests"]["target"]
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and 0.0 <= metrics["cls_auroc_macro"] <= 1.0, metrics


def test_missing_transformers_is_one_line_naming_the_extra(standin, monkeypatch):
    """Without transformers open_clip raises "Please `pip install transformers`"; that is the cause to report."""
    monkeypatch.setattr(open_clip.hf_model, "transformers", None)  # as open_clip sets it when the import fails
    with pytest.raises(UsadError) as caught:
        Backbone.load(BackboneSpec(name=f"local-dir:{standin}", pretrained=None))
    message = str(caught.value)
    assert "\n" not in message and 'pip install "usad_bench[biomedclip]"' in message
    assert "Offline" not in message and "--pretrained" not in message


def test_offline_folder_naming_a_hub_text_model_says_what_to_download(standin, tmp_path, monkeypatch):
    """The real BiomedCLIP folder names its PubMedBERT repo as hf_model_name; offline that repo's config is missing."""
    import shutil

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # (hub_offline sets it too) no request leaves the machine
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = Path(shutil.copytree(standin, tmp_path / "downloaded"))
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["hf_model_name"] = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(UsadError) as caught:
        Backbone.load(BackboneSpec(name=f"local-dir:{folder}", pretrained=None))
    message = str(caught.value)
    assert "\n" not in message and "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract" in message
    assert "hf_model_name" in message and "--pretrained" not in message

    text_config_only = tmp_path / "pubmedbert"  # the fix the message gives: that repo's config.json, in a folder
    text_config_only.mkdir()
    shutil.copy(standin.parent / "bert" / "config.json", text_config_only)  # the stand-in's BERT config
    config["model_cfg"]["text_cfg"]["hf_model_name"] = str(text_config_only)
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    fixed = Backbone.load(BackboneSpec(name=f"local-dir:{folder}", pretrained=None))
    assert fixed.encode_text(["normal breast tissue"]).shape == (1, EMBED_DIM)
